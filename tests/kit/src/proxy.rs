//! A tiny HTTP proxy on 127.0.0.1 for tests that records every request it is asked for.
//!
//! Part of the test kit: `use wasm_ecds_testkit::proxy::TestProxy;`.
//!
//! ```ignore
//! let proxy = TestProxy::start();
//! // ... fetch through proxy.url() ...
//! assert_eq!(proxy.requests(), vec![format!("CONNECT 127.0.0.1:{port}")]);
//! ```
//!
//! What it does with a request: it records its first line's method and target (`CONNECT host:port`, or
//! `GET http://host/path` for an absolute-URI request), then
//! - `CONNECT 127.0.0.1:<port>`: answers `200` and tunnels bytes both ways to that port on 127.0.0.1;
//! - anything else (another host, another method): answers `502 Bad Gateway` without connecting anywhere.
//!
//! So a test can let the proxy carry traffic to its own loopback servers and see every other target it was
//! asked for, while the proxy itself never reaches beyond 127.0.0.1. Bounded like the test server: a request
//! head of at most 64 KiB, socket timeouts of 5 s, and dropping the proxy stops accepting, shuts every socket
//! down and joins every thread (waiting at most ~2 s in total).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a connection thread waits on a socket before giving up.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on a request head.
const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// How long `Drop` waits for connection threads in total.
const DROP_JOIN_WAIT: Duration = Duration::from_secs(2);

struct Shared {
    /// `"<method> <target>"` of every request, in arrival order.
    requests: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Every thread and every socket (client and upstream), to shut down and join on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn track(&self, stream: &TcpStream) {
        if let Ok(handle) = stream.try_clone() {
            self.sockets.lock().unwrap().push(handle);
        }
    }

    fn spawn(self: &Arc<Shared>, f: impl FnOnce(&Arc<Shared>) + Send + 'static) {
        let s = self.clone();
        if let Ok(t) = thread::Builder::new().name("test-proxy-conn".into()).spawn(move || f(&s)) {
            let mut threads = self.threads.lock().unwrap();
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
    }
}

/// A running recording proxy; stops when dropped.
pub struct TestProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// A proxy on 127.0.0.1 with a free port.
    pub fn start() -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let acceptor = thread::Builder::new()
            .name("test-proxy-accept".into())
            .spawn(move || accept_loop(listener, s))
            .expect("spawn acceptor");
        TestProxy { shared, addr, acceptor: Some(acceptor) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>`, for `HTTP_PROXY` or `ureq::Proxy::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `"<method> <target>"` of every request received so far, in order (e.g. `CONNECT 10.1.2.3:80`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            // The acceptor polls the stop flag every few milliseconds.
            let _ = a.join();
        }
        for s in std::mem::take(&mut *self.shared.sockets.lock().unwrap()) {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads: Vec<_> = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        let end = Instant::now() + DROP_JOIN_WAIT;
        for t in threads {
            while !t.is_finished() && Instant::now() < end {
                thread::sleep(Duration::from_millis(2));
            }
            if t.is_finished() {
                let _ = t.join();
            } // else: detached; it owns only its sockets and an Arc of the shared state.
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                shared.track(&stream);
                shared.spawn(move |s| {
                    let _ = serve(stream, s);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    stream.set_nodelay(true)
}

fn serve(mut client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    configure(&client)?;
    let Some((head, rest)) = read_head(&mut client)? else { return Ok(()) };
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    shared.requests.lock().unwrap().push(format!("{method} {target}"));

    let loopback_port = target.strip_prefix("127.0.0.1:").and_then(|p| p.parse::<u16>().ok());
    let upstream = match (method.as_str(), loopback_port) {
        ("CONNECT", Some(port)) => TcpStream::connect(("127.0.0.1", port)).ok(),
        _ => None,
    };
    let Some(mut upstream) = upstream else {
        client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        let _ = client.shutdown(Shutdown::Write);
        return Ok(());
    };
    configure(&upstream)?;
    shared.track(&upstream);
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    upstream.write_all(&rest)?;

    // Upstream to client on another thread, client to upstream here; when either side ends, both sockets
    // are shut down so the other direction ends too.
    let (mut from_upstream, mut to_client) = (upstream.try_clone()?, client.try_clone()?);
    shared.spawn(move |_| {
        let _ = io::copy(&mut from_upstream, &mut to_client);
        let _ = from_upstream.shutdown(Shutdown::Both);
        let _ = to_client.shutdown(Shutdown::Both);
    });
    let _ = io::copy(&mut client, &mut upstream);
    let _ = upstream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads up to the blank line ending a request head; the head and any bytes read past it. `None` if the peer
/// closed first.
fn read_head(s: &mut TcpStream) -> io::Result<Option<(String, Vec<u8>)>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = head.split_off(end + 4);
            head.truncate(end);
            return Ok(Some((String::from_utf8_lossy(&head).into_owned(), rest)));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
    }
}
