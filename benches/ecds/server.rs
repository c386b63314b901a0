//! A loopback HTTP/1.1 file server for the network figures (run as its own process by run.sh so its memory
//! and CPU are not charged to the measured process). `GET /<name>` serves `<dir>/<name>` (sendfile via
//! `std::io::copy`), `GET /slow/<name>` does the same after `delay_ms`, `GET /__count` returns how many
//! module GETs each path received. Keep-alive is supported. The process exits after `max_secs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn serve(dir: PathBuf, delay_ms: u64, max_secs: u64, port_file: &Path) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("addr").port();
    std::fs::write(port_file, format!("{port}\n")).expect("write port file");
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_secs));
        eprintln!("bench server: {max_secs}s lifetime over, exiting");
        std::process::exit(0);
    });
    for stream in listener.incoming().flatten() {
        let dir = dir.clone();
        let counts = counts.clone();
        std::thread::spawn(move || {
            let _ = handle(stream, &dir, delay_ms, &counts);
        });
    }
}

fn handle(stream: TcpStream, dir: &Path, delay_ms: u64, counts: &Mutex<BTreeMap<String, u64>>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    for _ in 0..10_000 {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = false;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("/").split('?').next().unwrap_or("/").to_string();
        if method != "GET" && method != "HEAD" {
            out.write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")?;
            continue;
        }
        if path == "/__count" {
            let body = serde_json::to_string(&*counts.lock().unwrap()).unwrap();
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
        } else {
            let (name, slow) = match path.strip_prefix("/slow/") {
                Some(n) => (n, true),
                None => (path.trim_start_matches('/'), false),
            };
            let file = if name.is_empty() || name.contains('/') || name.starts_with('.') {
                None
            } else {
                std::fs::File::open(dir.join(name)).ok()
            };
            if method == "GET" {
                *counts.lock().unwrap().entry(path.clone()).or_default() += 1;
            }
            if slow {
                std::thread::sleep(Duration::from_millis(delay_ms));
            }
            match file {
                None => out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?,
                Some(mut f) => {
                    let len = f.metadata()?.len();
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
                    )?;
                    if method == "GET" {
                        let copied = std::io::copy(&mut f, &mut out)?;
                        if copied != len {
                            return Ok(());
                        }
                    }
                }
            }
        }
        out.flush()?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

/// GET /__count from the bench server: module GETs per path.
pub fn counts(addr: &str) -> BTreeMap<String, u64> {
    let mut s = TcpStream::connect(addr).expect("connect to bench server");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /__count HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    serde_json::from_str(body).expect("count JSON")
}

pub fn count_of(addr: &str, path: &str) -> u64 {
    counts(addr).get(path).copied().unwrap_or(0)
}
