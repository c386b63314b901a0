//! Hostile URLs and settings through the Rust API, against real servers on 127.0.0.1: addresses the SSRF
//! guard must refuse whatever `blocked_cidrs` says, ports that must not silently become port 80, and a
//! `ca_file` that is not a small regular file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::server::{wasm_module, Route, TestServer};

fn open(dir: &Path, extra: serde_json::Value) -> Cache {
    let mut options = serde_json::json!({
        "cache_dir": dir,
        "max_attempts": 1,
        "retry_initial_backoff_ms": 10,
        "retry_max_backoff_ms": 50,
    });
    for (k, v) in extra.as_object().expect("object") {
        options[k] = v.clone();
    }
    Cache::new(Options::from_json(&options.to_string()).expect("options")).expect("cache opens")
}

/// Converts a one-filter response; the rejection reason on failure.
fn convert_one(cache: &Cache, uri: &str) -> Result<(), String> {
    cache.convert(&response(&[wasm_extension("ext", &remote_wasm(uri, "nil"))])).map(drop).map_err(|r| r.reason)
}

/// The unspecified address in each spelling a URL can give it, with the address the reason names.
fn unspecified_urls(port: u16) -> Vec<(String, &'static str)> {
    vec![
        (format!("http://0.0.0.0:{port}/m.wasm"), "0.0.0.0"),
        (format!("http://0:{port}/m.wasm"), "0.0.0.0"),
        (format!("http://[::]:{port}/m.wasm"), "::"),
        (format!("http://[::ffff:0.0.0.0]:{port}/m.wasm"), "0.0.0.0"),
    ]
}

/// Linux routes a connection to 0.0.0.0 (or `::`) to the local host: with loopback blocked, the unspecified
/// address must not be a way around the rule.
#[test]
fn unspecified_addresses_are_refused_when_loopback_is_blocked() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::bytes(wasm_module(10)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"blocked_cidrs": ["127.0.0.0/8", "::1/128"]}));
    for (url, ip) in unspecified_urls(server.port()) {
        let reason = convert_one(&cache, &url).unwrap_err();
        assert!(reason.contains(&format!("connection blocked: resolved IP {ip} is unspecified")), "{url}: {reason}");
    }
    assert_eq!(server.total_requests(), 0);
}

/// No module server lives at the unspecified address: it is refused even with no `blocked_cidrs`, directly
/// and as a redirect hop from an allowed server.
#[test]
fn unspecified_addresses_are_refused_whatever_blocked_cidrs_says() {
    let target = TestServer::http();
    target.route("/m.wasm", Route::bytes(wasm_module(10)));
    let entry = TestServer::http();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    for (i, (url, ip)) in unspecified_urls(target.port()).into_iter().enumerate() {
        let expected = format!("connection blocked: resolved IP {ip} is unspecified");
        let reason = convert_one(&cache, &url).unwrap_err();
        assert!(reason.contains(&expected), "{url}: {reason}");

        let hop = format!("/hop{i}");
        entry.route(&hop, Route::redirect(302, url.clone()));
        let reason = convert_one(&cache, &entry.url(&hop)).unwrap_err();
        assert!(reason.contains(&expected), "redirect to {url}: {reason}");
        assert_eq!(entry.requests(&hop), 1, "the allowed first hop was fetched");
    }
    assert_eq!(target.total_requests(), 0);
}

/// A port that is not 0–65535 in digits is a URL error, as Go's `url.Parse` (digits) and dialer (range)
/// make it, never a request to port 80; `+P` would otherwise reach port P.
#[test]
fn invalid_ports_are_url_errors_without_a_request() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::bytes(wasm_module(10)));
    let port = server.port();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    for port_text in [
        format!("+{port}"),
        format!("-{port}"),
        "65536".to_string(),
        "99999999".to_string(),
        format!("{}", u64::from(port) + 65536),
        "12345678901234567890".to_string(),
    ] {
        let url = format!("http://127.0.0.1:{port_text}/m.wasm");
        let reason = convert_one(&cache, &url).unwrap_err();
        let expected =
            format!("fail to parse Wasm module fetch url: {url}, error: invalid port \":{port_text}\" after host");
        assert!(reason.contains(&expected), "{reason}");
    }
    assert_eq!(server.total_requests(), 0);
    // Leading zeros are digits like any other (Go agrees): the port is still the server's.
    convert_one(&cache, &format!("http://127.0.0.1:000{port}/m.wasm")).unwrap();
    assert_eq!(server.total_requests(), 1);
}

// ---- ca_file -----------------------------------------------------------------------------------------------

/// The `ca_file` limit, in bytes.
const CA_FILE_LIMIT: u64 = 4 << 20;

fn open_with_ca_file(ca_file: &Path) -> Result<Cache, String> {
    let dir = tempfile::tempdir().unwrap();
    let options = serde_json::json!({ "cache_dir": dir.path().join("cache"), "ca_file": ca_file });
    Cache::new(Options::from_json(&options.to_string()).expect("options")).map_err(|e| e.to_string())
}

fn assert_not_regular(ca_file: &Path) {
    let err = open_with_ca_file(ca_file).err().expect("refused");
    assert_eq!(err, format!("invalid options: cannot load ca_file {}: not a regular file", ca_file.display()));
}

const CHILD_ENV: &str = "WASM_ECDS_SSRF_CHILD";
/// The child's address space, in KiB (`ulimit -v`): an unbounded read fails there instead of growing the
/// machine's memory use.
const CHILD_ADDRESS_SPACE_KIB: u64 = 2 << 20;
/// How long the parent waits for the child before killing it: a `ca_file` open that blocks would otherwise
/// hang the test. The child needs milliseconds; the margin is for a loaded machine.
const CHILD_WAIT: Duration = Duration::from_secs(120);

/// The child process: opens a cache whose `ca_file` is `$WASM_ECDS_SSRF_CHILD`, which must be refused as
/// not a regular file. Run only by the tests below, which start it with `--ignored` in a bounded process.
#[test]
#[ignore = "a child process of the ca_file tests below"]
fn child_opens_a_cache_with_the_ca_file() {
    let path = std::env::var_os(CHILD_ENV).expect("started by a parent test");
    assert_not_regular(Path::new(&path));
}

/// Runs [`child_opens_a_cache_with_the_ca_file`] on `ca_file` in a child process with a capped address space,
/// killing it if it outlives [`CHILD_WAIT`]; fails unless the child's test passed.
fn refused_in_a_bounded_child(ca_file: &Path) {
    let out = tempfile::tempdir().unwrap();
    let log = |name: &str| std::fs::File::create(out.path().join(name)).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {CHILD_ADDRESS_SPACE_KIB} && exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["child_opens_a_cache_with_the_ca_file", "--exact", "--ignored", "--test-threads=1"])
        .env(CHILD_ENV, ca_file)
        .stdin(Stdio::null())
        .stdout(log("stdout"))
        .stderr(log("stderr"))
        .spawn()
        .unwrap();
    let end = Instant::now() + CHILD_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(out.path().join("stdout")).unwrap_or_default();
    let stderr = std::fs::read_to_string(out.path().join("stderr")).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("ca_file {}: still running after {CHILD_WAIT:?}", ca_file.display()));
    assert!(
        status.success() && stdout.contains("1 passed"),
        "ca_file {}: {status}\n{stdout}\n{stderr}",
        ca_file.display()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn ca_file_dev_zero_is_refused() {
    refused_in_a_bounded_child(Path::new("/dev/zero"));
}

#[test]
fn ca_file_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("roots.pem");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(status.success());
    refused_in_a_bounded_child(&fifo);
}

#[test]
fn ca_file_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert_not_regular(dir.path());
}

/// A PEM file of `len` bytes: one valid CA certificate, then blank lines (PEM parsers skip text between
/// blocks).
fn padded_ca_file(dir: &Path, len: u64) -> PathBuf {
    let server = TestServer::https();
    let mut pem = server.ca_pem().unwrap().as_bytes().to_vec();
    pem.resize(len as usize, b'\n');
    let path = dir.join(format!("ca-{len}.pem"));
    std::fs::write(&path, pem).unwrap();
    path
}

#[test]
fn ca_file_over_the_limit_is_refused_and_at_the_limit_loads() {
    let dir = tempfile::tempdir().unwrap();
    let over = padded_ca_file(dir.path(), CA_FILE_LIMIT + 1);
    let err = open_with_ca_file(&over).err().expect("refused");
    assert_eq!(
        err,
        format!(
            "invalid options: cannot load ca_file {}: larger than the limit of {CA_FILE_LIMIT} bytes for PEM roots",
            over.display()
        )
    );
    open_with_ca_file(&padded_ca_file(dir.path(), CA_FILE_LIMIT)).expect("a file of exactly the limit loads");
}
