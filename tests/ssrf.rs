//! Hostile URLs through the Rust API, against real servers on 127.0.0.1: addresses the SSRF guard must refuse
//! whatever `blocked_cidrs` says, and ports that must not silently become port 80.

use std::path::Path;

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
