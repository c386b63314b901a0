//! The accept loop shared by the kit's servers ([`crate::server::TestServer`], the token
//! server and the registry's counting forwarder): a listener on 127.0.0.1, a thread per connection, stopped
//! and joined on drop. Also the bounded reading of an HTTP/1.1 request head.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a connection waits on its socket before giving up.
pub(crate) const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on a request head.
const MAX_HEAD: usize = 64 * 1024;
/// How long `Drop` waits for connection threads in total.
const DROP_JOIN_WAIT: Duration = Duration::from_secs(2);

type Conns = Arc<Mutex<Vec<(JoinHandle<()>, TcpStream)>>>;

/// Accepts connections on `127.0.0.1:<free port>` (or the given address) and hands each to `handle` on a
/// thread of its own until dropped.
pub(crate) struct Loopback {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Conns,
}

impl Loopback {
    pub fn start(bind: &str, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Loopback {
        let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let handle = Arc::new(handle);
        let (s, c) = (stop.clone(), conns.clone());
        let acceptor = thread::Builder::new()
            .name("kit-loopback-accept".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let Ok(clone) = stream.try_clone() else { continue };
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(SOCKET_TIMEOUT));
                            let _ = stream.set_write_timeout(Some(SOCKET_TIMEOUT));
                            let h = handle.clone();
                            let spawned =
                                thread::Builder::new().name("kit-loopback-conn".into()).spawn(move || h(stream));
                            if let Ok(t) = spawned {
                                let mut conns = c.lock().unwrap();
                                conns.retain(|(t, _)| !t.is_finished());
                                conns.push((t, clone));
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
            .expect("spawn acceptor");
        Loopback { addr, stop, acceptor: Some(acceptor), conns }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns: Vec<_> = std::mem::take(&mut *self.conns.lock().unwrap());
        for (_, stream) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let end = Instant::now() + DROP_JOIN_WAIT;
        for (handle, _) in conns {
            while !handle.is_finished() && Instant::now() < end {
                thread::sleep(Duration::from_millis(2));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } // else detached: it owns only its socket.
        }
    }
}

/// A request head: the request line's method and target, the header lines, and any bytes read past the
/// head (the start of the body).
pub(crate) struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads up to the blank line ending the head; `None` if the peer closed first.
pub(crate) fn read_head(s: &mut impl Read) -> io::Result<Option<Head>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
    };
    let rest = buf.split_off(end + 4);
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or("/").to_string();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok(Some(Head { method, target, headers, rest }))
}
