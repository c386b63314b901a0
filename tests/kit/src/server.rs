//! A small real HTTP/1.1 (and HTTPS) server on 127.0.0.1 for tests, configured per path.
//!
//! Part of the test kit: `use wasm_ecds_testkit::server::{TestServer, Route, ...};`.
//!
//! ```ignore
//! let server = TestServer::http();                       // or TestServer::https()
//! server.route("/m.wasm", Route::bytes(wasm_module(64)).fail_first(&[503, 503]));
//! server.route("/old", Route::redirect(302, "/m.wasm"));
//! let url = server.url("/m.wasm");                       // http://127.0.0.1:<port>/m.wasm
//! // ... fetch ...
//! assert_eq!(server.requests("/m.wasm"), 3);
//! ```
//!
//! Behaviour: one request per connection (`Connection: close`), a thread per connection, unknown paths answer
//! 404. Requests are counted per path (query string ignored) when their head has been read, before any delay.
//! Everything is bounded: socket timeouts of 5 s, delays and trickles give up when the server is dropped, and
//! dropping the server stops accepting, shuts down open connections and joins every thread (waiting at most
//! ~2 s in total; a thread still running after that is detached, it owns only its socket and shared state).
//! Only ever listens on 127.0.0.1.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::loopback::Loopback;

/// How long a connection thread waits on its socket before giving up.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on the request head.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// What a path answers. Build with a constructor, refine with the chained modifiers.
#[derive(Clone, Debug)]
pub struct Route {
    /// Statuses answered to the first requests, in order, before `reply` is used.
    fail_first: Vec<u16>,
    reply: Reply,
    /// Wait before sending anything (applies to every request of the route).
    delay: Duration,
    headers: Vec<(String, String)>,
}

#[derive(Clone, Debug)]
enum Reply {
    Body {
        status: u16,
        body: Vec<u8>,
        /// Send the body gzip-compressed with `Content-Encoding: gzip`.
        gzip_encoding: bool,
        /// Send the body in chunks of this many bytes with a pause after each.
        trickle: Option<(usize, Duration)>,
        /// Announce the full length but send only this many bytes, then close.
        truncate_to: Option<usize>,
    },
    Redirect {
        status: u16,
        location: String,
    },
    /// Read the request, then close the connection without answering.
    HangUp,
}

impl Route {
    /// `200 OK` with these bytes (and a correct `Content-Length`).
    pub fn bytes(body: impl Into<Vec<u8>>) -> Route {
        Route::new(Reply::Body {
            status: 200,
            body: body.into(),
            gzip_encoding: false,
            trickle: None,
            truncate_to: None,
        })
    }

    /// Always this status, with a short text body.
    pub fn status(code: u16) -> Route {
        Route::bytes(format!("status {code}\n")).with_status(code)
    }

    /// A redirect (301, 302, 303, 307, 308) to `location`: a path (`/next`) or an absolute URL.
    pub fn redirect(code: u16, location: impl Into<String>) -> Route {
        Route::new(Reply::Redirect { status: code, location: location.into() })
    }

    /// Closes the connection after reading the request, without any response.
    pub fn hang_up() -> Route {
        Route::new(Reply::HangUp)
    }

    fn new(reply: Reply) -> Route {
        Route { fail_first: Vec::new(), reply, delay: Duration::ZERO, headers: Vec::new() }
    }

    /// Answer the first requests with these statuses (one per request, in order), then as configured.
    pub fn fail_first(mut self, statuses: &[u16]) -> Route {
        self.fail_first = statuses.to_vec();
        self
    }

    /// Wait this long after reading the request before answering.
    pub fn delay(mut self, delay: Duration) -> Route {
        self.delay = delay;
        self
    }

    /// Send the body `chunk` bytes at a time, pausing `interval` after each chunk.
    pub fn trickle(mut self, chunk: usize, interval: Duration) -> Route {
        if let Reply::Body { trickle, .. } = &mut self.reply {
            *trickle = Some((chunk.max(1), interval));
        }
        self
    }

    /// Announce the full `Content-Length` but send only the first `sent` bytes, then close the connection.
    pub fn truncate(mut self, sent: usize) -> Route {
        if let Reply::Body { truncate_to, .. } = &mut self.reply {
            *truncate_to = Some(sent);
        }
        self
    }

    /// Send the body compressed, with `Content-Encoding: gzip`.
    pub fn gzip_encoding(mut self) -> Route {
        if let Reply::Body { gzip_encoding, .. } = &mut self.reply {
            *gzip_encoding = true;
        }
        self
    }

    /// The status of a body reply (default 200).
    pub fn with_status(mut self, code: u16) -> Route {
        if let Reply::Body { status, .. } = &mut self.reply {
            *status = code;
        }
        self
    }

    /// An extra response header.
    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

struct Shared {
    routes: Mutex<HashMap<String, Route>>,
    counts: Mutex<HashMap<String, usize>>,
    /// Set on drop: ends the routes' delays and trickles.
    stop: AtomicBool,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps up to `d`; false if the server stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            thread::sleep((end - now).min(Duration::from_millis(10)));
        }
    }
}

/// A running test server; stops when dropped.
pub struct TestServer {
    shared: Arc<Shared>,
    /// Accepts and serves connections until dropped (after `Drop for TestServer` has set `shared.stop`).
    loopback: Loopback,
    ca_pem: Option<String>,
}

impl TestServer {
    /// A plain HTTP server on 127.0.0.1 with a free port.
    pub fn http() -> TestServer {
        TestServer::start(None)
    }

    /// An HTTPS server on 127.0.0.1 whose certificate (for `127.0.0.1` and `localhost`) is issued by a freshly
    /// generated CA; pass [`TestServer::ca_pem`] / [`TestServer::write_ca_file`] to the client to trust it.
    pub fn https() -> TestServer {
        let (config, ca_pem) = tls_config();
        TestServer::start(Some((config, ca_pem)))
    }

    fn start(tls: Option<(Arc<rustls::ServerConfig>, String)>) -> TestServer {
        let (tls, ca_pem) = match tls {
            Some((c, p)) => (Some(c), Some(p)),
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            routes: Mutex::new(HashMap::new()),
            counts: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            tls,
        });
        let s = shared.clone();
        let loopback = Loopback::start("127.0.0.1:0", move |stream| {
            let _ = serve_connection(stream, &s);
        });
        TestServer { shared, loopback, ca_pem }
    }

    /// Sets (or replaces) what `path` answers. `path` is matched without the query string.
    pub fn route(&self, path: &str, route: Route) -> &TestServer {
        self.shared.routes.lock().unwrap().insert(path.to_string(), route);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.loopback.addr()
    }

    pub fn port(&self) -> u16 {
        self.addr().port()
    }

    /// `http://127.0.0.1:<port>` (or `https://…`).
    pub fn base_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// `base_url() + path`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// How many requests reached `path` so far.
    pub fn requests(&self, path: &str) -> usize {
        self.shared.counts.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    /// How many requests reached the server so far, all paths.
    pub fn total_requests(&self) -> usize {
        self.shared.counts.lock().unwrap().values().sum()
    }

    /// The PEM of the CA that issued an HTTPS server's certificate (`None` for HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Writes the CA PEM to `dir/test-ca.pem` and returns the path (panics for an HTTP server).
    pub fn write_ca_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, self.ca_pem().expect("not an HTTPS server")).expect("write CA file");
        path
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Ends delays and trickles at once; the loopback (dropped next) shuts the connections down.
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    stream.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    stream.set_nodelay(true)?;
    match &shared.tls {
        None => {
            let mut s = stream;
            let clean = serve(&mut s, shared);
            // Shut the socket itself down: `TestServer` keeps a clone of the handle, so dropping ours would
            // not close the connection.
            let _ = s.shutdown(if matches!(clean, Ok(true)) { Shutdown::Write } else { Shutdown::Both });
            clean.map(drop)
        }
        Some(config) => {
            let conn = rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
            let mut tls = rustls::StreamOwned::new(conn, stream);
            let clean = serve(&mut tls, shared);
            if matches!(clean, Ok(true)) {
                tls.conn.send_close_notify();
                let _ = tls.flush();
                let _ = tls.sock.shutdown(Shutdown::Write);
            } else {
                let _ = tls.sock.shutdown(Shutdown::Both);
            }
            clean.map(drop)
        }
    }
}

/// Reads one request and answers it. Returns whether the connection may be closed cleanly (false after a
/// deliberate truncation or hang-up, where the connection is just dropped).
fn serve<S: Read + Write>(s: &mut S, shared: &Shared) -> io::Result<bool> {
    let Some(head) = read_head(s)? else { return Ok(false) };
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let _method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_string();

    let index = {
        let mut counts = shared.counts.lock().unwrap();
        let n = counts.entry(path.clone()).or_insert(0);
        *n += 1;
        *n - 1
    };
    let route = shared.routes.lock().unwrap().get(&path).cloned();
    let Some(route) = route else {
        write_response(s, 404, &[], b"not found\n")?;
        return Ok(true);
    };
    if !shared.sleep(route.delay) {
        return Ok(false);
    }
    if let Some(&code) = route.fail_first.get(index) {
        write_response(s, code, &route.headers, format!("status {code}\n").as_bytes())?;
        return Ok(true);
    }
    match route.reply {
        Reply::HangUp => Ok(false),
        Reply::Redirect { status, location } => {
            let mut headers = route.headers.clone();
            headers.push(("Location".into(), location));
            write_response(s, status, &headers, b"")?;
            Ok(true)
        }
        Reply::Body { status, body, gzip_encoding, trickle, truncate_to } => {
            let mut headers = route.headers.clone();
            let body = if gzip_encoding {
                headers.push(("Content-Encoding".into(), "gzip".into()));
                gzip(&body)
            } else {
                body
            };
            write!(s, "HTTP/1.1 {status} {}\r\n", reason(status))?;
            write!(s, "Content-Length: {}\r\nConnection: close\r\n", body.len())?;
            for (k, v) in &headers {
                write!(s, "{k}: {v}\r\n")?;
            }
            write!(s, "\r\n")?;
            let sent = truncate_to.unwrap_or(body.len()).min(body.len());
            match trickle {
                None => s.write_all(&body[..sent])?,
                Some((chunk, interval)) => {
                    for piece in body[..sent].chunks(chunk) {
                        s.write_all(piece)?;
                        s.flush()?;
                        if !shared.sleep(interval) {
                            return Ok(false);
                        }
                    }
                }
            }
            s.flush()?;
            Ok(truncate_to.is_none())
        }
    }
}

/// Reads up to the blank line ending the request head; `None` if the peer closed first.
fn read_head<S: Read>(s: &mut S) -> io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut byte = [0u8; 1024];
    loop {
        let n = s.read(&mut byte)?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&byte[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&head).into_owned()));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
    }
}

fn write_response<S: Write>(s: &mut S, status: u16, headers: &[(String, String)], body: &[u8]) -> io::Result<()> {
    write!(s, "HTTP/1.1 {status} {}\r\n", reason(status))?;
    write!(s, "Content-Length: {}\r\nConnection: close\r\n", body.len())?;
    for (k, v) in headers {
        write!(s, "{k}: {v}\r\n")?;
    }
    write!(s, "\r\n")?;
    s.write_all(body)?;
    s.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        511 => "Network Authentication Required",
        _ => "Status",
    }
}

/// A test certificate authority and the leaf certificate for `127.0.0.1`/`localhost` it issued.
pub struct TestCa {
    /// The CA's certificate, PEM: what a client is given as `ca_file`.
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    /// The leaf's certificate, PEM and DER, and its PKCS#8 private key, PEM and DER.
    pub leaf_pem: String,
    pub leaf_der: Vec<u8>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A new CA named `name` and a leaf for `127.0.0.1` and `localhost` signed by it.
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA cert");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("leaf params");
        leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf cert");
        TestCa {
            ca_pem: ca.pem(),
            ca_der: ca.der().to_vec(),
            leaf_pem: leaf.pem(),
            leaf_der: leaf.der().to_vec(),
            key_pem: leaf_key.serialize_pem(),
            key_der: leaf_key.serialize_der(),
        }
    }
}

/// A server config with a leaf certificate for `127.0.0.1`/`localhost` issued by a new CA; and the CA's PEM.
fn tls_config() -> (Arc<rustls::ServerConfig>, String) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca = TestCa::new("wasm-ecds test CA");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ca.key_der.clone()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![ca.leaf_der.clone().into(), ca.ca_der.clone().into()], key)
        .expect("server cert");
    (Arc::new(config), ca.ca_pem)
}

// ---- fixtures -------------------------------------------------------------------------------------------

/// A valid Wasm binary: the 8-byte header and one custom section named `test` holding `payload_len`
/// deterministic bytes.
pub fn wasm_module(payload_len: usize) -> Vec<u8> {
    let name = b"test";
    let mut section = Vec::with_capacity(payload_len + 8);
    section.push(name.len() as u8);
    section.extend_from_slice(name);
    section.extend((0..payload_len).map(|i| (i * 31 % 251) as u8));
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    out.push(0); // custom section id
    let mut len = section.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&section);
    out
}

/// gzip-compresses `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// A POSIX (ustar) tar archive holding these files, in order.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *data).expect("tar entry");
    }
    builder.into_inner().expect("tar")
}

/// Lower-case hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
