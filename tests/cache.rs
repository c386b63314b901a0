//! The library through its Rust API against real HTTP/HTTPS servers on 127.0.0.1: conversion, fetch rules,
//! the store across restarts, expiry, concurrency, and the counters after each.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use prost::Message;
use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::server::{gzip, sha256_hex, tar, wasm_module, Route, TestServer};

fn open(dir: &Path, extra: serde_json::Value) -> Cache {
    let mut options = serde_json::json!({
        "cache_dir": dir,
        "max_attempts": 3,
        "retry_initial_backoff_ms": 10,
        "retry_max_backoff_ms": 50,
    });
    for (k, v) in extra.as_object().expect("object") {
        options[k] = v.clone();
    }
    Cache::new(Options::from_json(&options.to_string()).expect("options")).expect("cache opens")
}

fn sample(cache: &Cache, name: &str) -> f64 {
    metric(&cache.metrics_text(), name)
}

const FETCH_SUCCESS: &str = r#"istio_agent_wasm_remote_fetch_count{result="success"}"#;
const FETCH_DOWNLOAD_FAILURE: &str = r#"istio_agent_wasm_remote_fetch_count{result="download_failure"}"#;
const FETCH_CHECKSUM: &str = r#"istio_agent_wasm_remote_fetch_count{result="checksum_mismatched"}"#;
const FETCH_INVALID: &str = r#"istio_agent_wasm_remote_fetch_count{result="fetch_failure"}"#;
const CONVERSION_SUCCESS: &str = r#"istio_agent_wasm_config_conversion_count{result="success"}"#;
const CONVERSION_FETCH_FAILURE: &str = r#"istio_agent_wasm_config_conversion_count{result="fetch_failure"}"#;
const LOOKUP_HIT: &str = r#"istio_agent_wasm_cache_lookup_count{hit="true"}"#;
const LOOKUP_MISS: &str = r#"istio_agent_wasm_cache_lookup_count{hit="false"}"#;
const ENTRIES: &str = "istio_agent_wasm_cache_entries";
const DURATION_COUNT: &str = "istio_agent_wasm_config_conversion_duration_count";

/// Converts a one-filter response and returns the local file it now names.
fn convert_one(cache: &Cache, uri: &str, sha256: &str) -> Result<PathBuf, String> {
    let out = cache.convert(&response(&[wasm_extension("ext", &remote_wasm(uri, sha256))])).map_err(|r| r.reason)?;
    Ok(PathBuf::from(wasms(&out)[0].local_filename().expect("local filename")))
}

#[test]
fn remote_module_is_fetched_verified_stored_and_counted() {
    let server = TestServer::http();
    let module = wasm_module(1000);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));

    let path = convert_one(&cache, &server.url("/m.wasm"), &sha256_hex(&module)).unwrap();
    assert!(path.is_absolute());
    assert!(path.starts_with(dir.path().canonicalize().unwrap()), "{path:?} is inside the cache dir");
    assert!(path.file_name().unwrap().to_str().unwrap().contains(&sha256_hex(&module)), "content-addressed name");
    assert_eq!(std::fs::read(&path).unwrap(), module);
    assert_eq!(sample(&cache, FETCH_SUCCESS), 1.0);
    assert_eq!(sample(&cache, CONVERSION_SUCCESS), 1.0);
    assert_eq!(sample(&cache, ENTRIES), 1.0);
    assert_eq!(sample(&cache, LOOKUP_MISS), 1.0);
    assert_eq!(sample(&cache, DURATION_COUNT), 1.0);

    // The second push is a hit: no request, same path.
    assert_eq!(convert_one(&cache, &server.url("/m.wasm"), &sha256_hex(&module)).unwrap(), path);
    assert_eq!(server.requests("/m.wasm"), 1);
    assert_eq!(sample(&cache, LOOKUP_HIT), 1.0);
    assert_eq!(sample(&cache, FETCH_SUCCESS), 1.0);
    assert_eq!(sample(&cache, DURATION_COUNT), 2.0);
}

#[test]
fn conversion_duration_is_the_time_the_call_took() {
    // Each call observes what the caller waited (at least the server's delay), in milliseconds.
    const SUM: &str = "istio_agent_wasm_config_conversion_duration_sum";
    const LE_32: &str = r#"istio_agent_wasm_config_conversion_duration_bucket{le="32"}"#;
    let server = TestServer::http();
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    for (i, name) in ["/a.wasm", "/b.wasm", "/c.wasm"].into_iter().enumerate() {
        let module = wasm_module(100 + i);
        server.route(name, Route::bytes(module.clone()).delay(Duration::from_millis(60)));
        let before = sample(&cache, SUM);
        let started = Instant::now();
        convert_one(&cache, &server.url(name), &sha256_hex(&module)).unwrap();
        let waited = started.elapsed().as_secs_f64() * 1e3;
        let observed = sample(&cache, SUM) - before;
        assert!((60.0..=waited).contains(&observed), "call {i}: observed {observed} ms, waited {waited} ms");
        assert_eq!(sample(&cache, LE_32), 0.0, "call {i} fell in a bucket below its duration");
    }
    assert_eq!(sample(&cache, DURATION_COUNT), 3.0);
}

#[test]
fn same_checksum_at_a_new_url_is_served_from_the_store() {
    let server = TestServer::http();
    let module = wasm_module(10);
    server.route("/a.wasm", Route::bytes(module.clone()));
    server.route("/b.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let a = convert_one(&cache, &server.url("/a.wasm"), &sha256_hex(&module)).unwrap();
    let b = convert_one(&cache, &server.url("/b.wasm"), &sha256_hex(&module).to_uppercase()).unwrap();
    assert_eq!(a, b);
    assert_eq!(server.requests("/b.wasm"), 0);
}

#[test]
fn checksum_mismatch_rejects_with_both_digests_and_counts() {
    let server = TestServer::http();
    let module = wasm_module(10);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let wrong = "ab".repeat(32);
    let url = server.url("/m.wasm");
    let reason = convert_one(&cache, &url, &wrong).unwrap_err();
    assert!(reason.contains("\"ext\"") && reason.contains(&url), "{reason}");
    assert!(reason.contains(&wrong) && reason.contains(&sha256_hex(&module)), "{reason}");
    assert_eq!(sample(&cache, FETCH_CHECKSUM), 1.0);
    assert_eq!(sample(&cache, CONVERSION_FETCH_FAILURE), 1.0);
    assert_eq!(sample(&cache, ENTRIES), 0.0);
    assert_eq!(sample(&cache, DURATION_COUNT), 1.0, "a rejected call is observed too");
}

#[test]
fn invalid_module_rejects() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::bytes(b"<html>not wasm</html>".to_vec()));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let reason = convert_one(&cache, &server.url("/m.wasm"), "nil").unwrap_err();
    assert!(reason.contains("invalid"), "{reason}");
    assert_eq!(sample(&cache, FETCH_INVALID), 1.0);
}

#[test]
fn retry_rules_5xx_retried_4xx_and_501_not() {
    let server = TestServer::http();
    let module = wasm_module(10);
    server.route("/flaky.wasm", Route::bytes(module.clone()).fail_first(&[503, 502]));
    server.route("/missing.wasm", Route::status(404));
    server.route("/notimpl.wasm", Route::status(501));
    server.route("/down.wasm", Route::status(503));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));

    convert_one(&cache, &server.url("/flaky.wasm"), &sha256_hex(&module)).unwrap();
    assert_eq!(server.requests("/flaky.wasm"), 3);
    assert_eq!(sample(&cache, FETCH_SUCCESS), 1.0, "one fetch, however many attempts");

    let reason = convert_one(&cache, &server.url("/missing.wasm"), "nil").unwrap_err();
    assert!(reason.contains("404"), "{reason}");
    assert_eq!(server.requests("/missing.wasm"), 1);
    convert_one(&cache, &server.url("/notimpl.wasm"), "nil").unwrap_err();
    assert_eq!(server.requests("/notimpl.wasm"), 1);

    let reason = convert_one(&cache, &server.url("/down.wasm"), "nil").unwrap_err();
    assert!(reason.contains("3 attempts"), "{reason}");
    assert_eq!(server.requests("/down.wasm"), 3);
    assert_eq!(sample(&cache, FETCH_DOWNLOAD_FAILURE), 3.0);
}

#[test]
fn fetch_deadline_bounds_retries_and_backoff() {
    let server = TestServer::http();
    server.route("/down.wasm", Route::status(503));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(
        dir.path(),
        serde_json::json!({"max_attempts": 50, "retry_initial_backoff_ms": 400, "retry_max_backoff_ms": 400}),
    );
    let wasm = remote_wasm(&server.url("/down.wasm"), "nil").with_timeout(1);
    let started = Instant::now();
    cache.convert(&response(&[wasm_extension("ext", &wasm)])).unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "http_uri.timeout of 1 s bounds the fetch, took {took:?}");
    assert!(server.requests("/down.wasm") < 10);
}

#[test]
fn redirects_gzip_and_tar_are_followed_and_unboxed() {
    let server = TestServer::http();
    let module = wasm_module(300);
    server.route("/real.wasm", Route::bytes(module.clone()));
    server.route("/moved", Route::redirect(302, "/real.wasm"));
    server.route("/m.wasm.gz", Route::bytes(gzip(&module)));
    server.route("/m.tar", Route::bytes(tar(&[("anything.wasm", &module)])));
    server.route("/m.tar.gz", Route::bytes(gzip(&tar(&[("plugin.wasm", &module)]))));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let sha = sha256_hex(&module);
    for path in ["/moved", "/m.wasm.gz", "/m.tar", "/m.tar.gz"] {
        let file = convert_one(&cache, &server.url(path), "nil").unwrap_or_else(|r| panic!("{path}: {r}"));
        assert_eq!(std::fs::read(&file).unwrap(), module, "{path}");
        assert!(file.to_str().unwrap().contains(&sha));
    }
}

#[test]
fn truncated_body_is_retried_then_rejected_and_oversized_body_aborted() {
    let server = TestServer::http();
    server.route("/cut.wasm", Route::bytes(wasm_module(5_000)).truncate(100));
    server.route("/big.wasm", Route::bytes(wasm_module(20_000)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"max_module_bytes": 10_000}));
    convert_one(&cache, &server.url("/cut.wasm"), "nil").unwrap_err();
    assert_eq!(server.requests("/cut.wasm"), 3);
    let reason = convert_one(&cache, &server.url("/big.wasm"), "nil").unwrap_err();
    assert!(reason.contains("10000"), "names the limit: {reason}");
    let leftovers: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.to_str().unwrap().contains(".tmp-")).collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

#[test]
fn https_needs_a_trusted_certificate_or_an_insecure_host() {
    let server = TestServer::https();
    let module = wasm_module(10);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sha = sha256_hex(&module);

    let untrusting = open(&dir.path().join("a"), serde_json::json!({"max_attempts": 1}));
    assert!(convert_one(&untrusting, &server.url("/m.wasm"), &sha).is_err());

    let ca = server.write_ca_file(dir.path());
    let trusting = open(&dir.path().join("b"), serde_json::json!({"ca_file": ca}));
    convert_one(&trusting, &server.url("/m.wasm"), &sha).unwrap();

    let host = format!("127.0.0.1:{}", server.port());
    let insecure = open(&dir.path().join("c"), serde_json::json!({"insecure_hosts": [host]}));
    convert_one(&insecure, &server.url("/m.wasm"), &sha).unwrap();
}

#[test]
fn blocked_addresses_are_never_connected() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::bytes(wasm_module(10)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"blocked_cidrs": ["127.0.0.0/8"], "max_attempts": 1}));
    let reason = convert_one(&cache, &server.url("/m.wasm"), "nil").unwrap_err();
    assert!(reason.contains("blocked"), "{reason}");
    assert_eq!(server.total_requests(), 0);
    let reason = convert_one(&cache, "http://169.254.169.254/latest/meta-data", "nil").unwrap_err();
    assert!(reason.contains("link-local"), "{reason}");
}

#[test]
fn unsupported_scheme_rejects_without_network() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let reason = convert_one(&cache, "ftp://127.0.0.1/m.wasm", "nil").unwrap_err();
    assert!(reason.contains("unsupported"), "{reason}");
    assert_eq!(sample(&cache, FETCH_DOWNLOAD_FAILURE), 0.0);
}

#[test]
fn fail_open_filter_becomes_allow_rbac_and_the_response_is_accepted() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::status(404));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let wasm = remote_wasm(&server.url("/m.wasm"), "nil").fail_open();
    let out = cache.convert(&response(&[wasm_extension("open", &wasm)])).unwrap();
    let ext = &extensions(&out)[0];
    assert_eq!(ext.name, "open");
    let tc = ext.typed_config.as_ref().unwrap();
    assert_eq!(tc.type_url, HTTP_RBAC_TYPE);
    let rbac = HttpRbac::decode(tc.value.as_slice()).unwrap();
    assert_eq!(rbac.rules_stat_prefix, "wasm-default-allow");
    assert!(rbac.rules.is_none());
}

#[test]
fn pull_policy_always_refetches_only_when_the_resource_version_changes() {
    let server = TestServer::http();
    server.route("/latest.wasm", Route::bytes(wasm_module(10)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let push = |policy: &str, version: &str| {
        let wasm = remote_wasm(&server.url("/latest.wasm"), "nil").with_env(&[
            ("ISTIO_META_WASM_IMAGE_PULL_POLICY", policy),
            ("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", version),
        ]);
        let out = cache.convert(&response(&[wasm_extension("ext", &wasm)])).unwrap();
        assert!(wasms(&out)[0].vm().environment_variables.is_none(), "ISTIO_META_* stripped");
    };
    push("Always", "1");
    push("Always", "1");
    assert_eq!(server.requests("/latest.wasm"), 1, "same resource version: no pull");
    push("Always", "2");
    assert_eq!(server.requests("/latest.wasm"), 2, "new resource version: pulled again");
    push("IfNotPresent", "3");
    assert_eq!(server.requests("/latest.wasm"), 2, "IfNotPresent: cached");
}

#[test]
fn restart_reuses_the_store_without_downloading() {
    let server = TestServer::http();
    let module = wasm_module(100);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let first = convert_one(&open(dir.path(), serde_json::json!({})), &server.url("/m.wasm"), "nil").unwrap();
    // A new process (a new Cache on the same directory) reuses the module, even without a sha256.
    let again = open(dir.path(), serde_json::json!({}));
    assert_eq!(sample(&again, ENTRIES), 1.0);
    assert_eq!(convert_one(&again, &server.url("/m.wasm"), "nil").unwrap(), first);
    assert_eq!(convert_one(&again, &server.url("/m.wasm"), &sha256_hex(&module)).unwrap(), first);
    assert_eq!(server.requests("/m.wasm"), 1);
}

#[test]
fn corrupted_module_file_is_detected_after_restart_and_fetched_again() {
    let server = TestServer::http();
    let module = wasm_module(100);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sha = sha256_hex(&module);
    let path = convert_one(&open(dir.path(), serde_json::json!({})), &server.url("/m.wasm"), &sha).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let cache = open(dir.path(), serde_json::json!({}));
    let again = convert_one(&cache, &server.url("/m.wasm"), &sha).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), module);
    assert_eq!(server.requests("/m.wasm"), 2);
}

#[test]
fn crash_leftover_temp_files_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), serde_json::json!({})));
    // A temp file (the store keeps them in the cache directory) of a process that no longer exists:
    // the pid is beyond Linux's pid_max.
    let stale = dir.path().join(".tmp-4194999999-crashed");
    std::fs::write(&stale, b"half a module").unwrap();
    drop(open(dir.path(), serde_json::json!({})));
    assert!(!stale.exists(), "{stale:?} survived a restart");
}

/// A cache directory that exists but is read-only (a cache seeded into a container image) opens and serves
/// the modules it holds; a download that would have to store a new one is rejected with a reason that says
/// the directory is read-only. Directory permissions do not stop root, so as root this test runs itself
/// again as an unprivileged user (uid 65534) and passes only if that run passed.
#[cfg(unix)]
#[test]
fn read_only_cache_dir_serves_its_modules_and_says_why_it_cannot_store_more() {
    const NAME: &str = "read_only_cache_dir_serves_its_modules_and_says_why_it_cannot_store_more";
    const AS_UNPRIVILEGED: &str = "WASM_ECDS_TEST_AS_UNPRIVILEGED";
    if !directory_permissions_bind() {
        assert!(std::env::var_os(AS_UNPRIVILEGED).is_none(), "directory permissions do not bind even as uid 65534");
        run_as_unprivileged_user(NAME, AS_UNPRIVILEGED);
        return;
    }
    let server = TestServer::http();
    let held = wasm_module(100);
    let new = wasm_module(200);
    server.route("/held.wasm", Route::bytes(held.clone()));
    server.route("/new.wasm", Route::bytes(new.clone()));
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let seeded = convert_one(&open(&cache_dir, serde_json::json!({})), &server.url("/held.wasm"), "nil").unwrap();

    let _read_only = ReadOnly::set(&[cache_dir.clone(), cache_dir.join("modules")]);
    let cache = open(&cache_dir, serde_json::json!({}));
    assert_eq!(sample(&cache, ENTRIES), 1.0);
    assert_eq!(convert_one(&cache, &server.url("/held.wasm"), "nil").unwrap(), seeded);
    assert_eq!(convert_one(&cache, &server.url("/held.wasm"), &sha256_hex(&held)).unwrap(), seeded);
    assert_eq!(server.requests("/held.wasm"), 1, "served from the directory");

    let reason = convert_one(&cache, &server.url("/new.wasm"), &sha256_hex(&new)).unwrap_err();
    let expected = format!(
        "cannot create a temp file in {}: the cache directory is read-only (Permission denied",
        cache_dir.canonicalize().unwrap().display()
    );
    assert!(reason.contains(&expected), "{reason}");
    assert_eq!(sample(&cache, FETCH_DOWNLOAD_FAILURE), 1.0);
    assert_eq!(sample(&cache, ENTRIES), 1.0);
}

/// Whether a directory without write permission stops this process from creating a file in it (not for
/// root, which has CAP_DAC_OVERRIDE).
#[cfg(unix)]
fn directory_permissions_bind() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let _read_only = ReadOnly::set(&[dir.path().to_path_buf()]);
    std::fs::File::create(dir.path().join("probe")).is_err()
}

/// Runs the test `name` of this binary again as uid/gid 65534 (`nobody`), with `marker` set in its
/// environment, and fails unless it ran and passed.
#[cfg(unix)]
fn run_as_unprivileged_user(name: &str, marker: &str) {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--test-threads=1"])
        .env(marker, "1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run the test as uid 65534");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "as uid 65534 ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

/// Makes directories read-only for as long as it lives (then writable by their owner again, so that the
/// temp directory can be removed).
#[cfg(unix)]
struct ReadOnly(Vec<PathBuf>);

#[cfg(unix)]
impl ReadOnly {
    fn set(dirs: &[PathBuf]) -> ReadOnly {
        use std::os::unix::fs::PermissionsExt;
        for d in dirs {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o500)).unwrap();
        }
        ReadOnly(dirs.to_vec())
    }
}

#[cfg(unix)]
impl Drop for ReadOnly {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        for d in &self.0 {
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
    }
}

#[test]
fn sixteen_threads_converting_the_same_cold_response_download_once() {
    let server = TestServer::http();
    let module = wasm_module(5000);
    server.route("/slow.wasm", Route::bytes(module.clone()).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), serde_json::json!({})));
    let input = Arc::new(response(&[wasm_extension("ext", &remote_wasm(&server.url("/slow.wasm"), "nil"))]));
    let barrier = Arc::new(Barrier::new(16));
    let outputs: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let (cache, input, barrier) = (cache.clone(), input.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                cache.convert(&input).expect("converts")
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    assert!(outputs.windows(2).all(|w| w[0] == w[1]), "every thread got the same output");
    assert_eq!(server.requests("/slow.wasm"), 1);
    assert_eq!(sample(&cache, FETCH_SUCCESS), 1.0);
    assert_eq!(sample(&cache, CONVERSION_SUCCESS), 16.0);
}

/// Repeated pushes answered from the memo by many threads at once, on two streams whose resources overlap:
/// each output is the real conversion of its own push, and the counters add up exactly.
#[test]
fn concurrent_repeated_pushes_are_answered_exactly() {
    let server = TestServer::http();
    let modules: Vec<Vec<u8>> = (0..3).map(|i| wasm_module(1000 + i)).collect();
    for (i, m) in modules.iter().enumerate() {
        server.route(&format!("/m{i}.wasm"), Route::bytes(m.clone()));
    }
    let ext = |i: usize| {
        wasm_extension(&format!("ext-{i}"), &remote_wasm(&server.url(&format!("/m{i}.wasm")), &sha256_hex(&modules[i])))
    };
    let rbac = extension("rbac", any("type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC", &()));
    let streams = [vec![ext(0), ext(1), rbac.clone()], vec![ext(0), ext(1), ext(2), rbac]];
    let push = |stream: usize, nonce: usize| {
        let mut r = DiscoveryResponse::decode(response(&streams[stream]).as_slice()).unwrap();
        r.nonce = format!("nonce-{nonce:08}");
        r.version_info = format!("v-{nonce:08}");
        r.encode_to_vec()
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), serde_json::json!({})));
    // What each stream converts to (the nonce and version apart): its first, real conversion.
    let without_nonce = |out: &[u8]| {
        let mut r = DiscoveryResponse::decode(out).unwrap();
        r.nonce.clear();
        r.version_info.clear();
        r.encode_to_vec()
    };
    let expected: Vec<Vec<u8>> = (0..2).map(|s| without_nonce(&cache.convert(&push(s, 0)).unwrap())).collect();
    for s in [0, 1] {
        cache.convert(&push(s, 0)).unwrap(); // kept now
    }
    let (before_success, before_hits) = (sample(&cache, CONVERSION_SUCCESS), sample(&cache, LOOKUP_HIT));
    let (threads, pushes) = (8, 300);
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (cache, barrier, expected) = (cache.clone(), barrier.clone(), expected.clone());
            let inputs: Vec<(usize, Vec<u8>)> =
                (0..pushes).map(|i| ((t + i) % 2, push((t + i) % 2, t * pushes + i + 1))).collect();
            std::thread::spawn(move || {
                barrier.wait();
                for (stream, input) in inputs {
                    let out = cache.convert(&input).expect("converts");
                    let nonce = DiscoveryResponse::decode(out.as_slice()).unwrap().nonce;
                    assert_eq!(nonce, DiscoveryResponse::decode(input.as_slice()).unwrap().nonce);
                    assert!(without_nonce(&out) == expected[stream], "push {nonce} of stream {stream}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    // Half the pushes name two modules, half three: 2.5 conversions and lookup hits per push.
    let per_push = (2 + 3) as f64 / 2.0;
    let calls = (threads * pushes) as f64;
    assert_eq!(sample(&cache, CONVERSION_SUCCESS) - before_success, calls * per_push);
    assert_eq!(sample(&cache, LOOKUP_HIT) - before_hits, calls * per_push);
    assert_eq!(server.total_requests(), 3, "each module downloaded once");
}

#[test]
fn distinct_modules_of_one_response_are_fetched_concurrently() {
    let server = TestServer::http();
    let mut exts = Vec::new();
    for i in 0..6 {
        let path = format!("/m{i}.wasm");
        server.route(&path, Route::bytes(wasm_module(100 + i)).delay(Duration::from_millis(400)));
        exts.push(wasm_extension(&format!("ext{i}"), &remote_wasm(&server.url(&path), "nil")));
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    let started = Instant::now();
    let out = cache.convert(&response(&exts)).unwrap();
    let took = started.elapsed();
    assert_eq!(wasms(&out).len(), 6);
    // Sequential fetching would take 6 × 400 ms; concurrent about one.
    assert!(took < Duration::from_millis(2000), "took {took:?}");
}

#[test]
fn expiry_spares_modules_the_latest_state_references() {
    let server = TestServer::http();
    server.route("/used.wasm", Route::bytes(wasm_module(1)));
    server.route("/old.wasm", Route::bytes(wasm_module(2)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"module_expiry_secs": 1}));
    let old = convert_one(&cache, &server.url("/old.wasm"), "nil").unwrap();
    let used = convert_one(&cache, &server.url("/used.wasm"), "nil").unwrap(); // the latest state
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(cache.purge().unwrap(), 1);
    assert!(!old.exists(), "expired and unused: deleted");
    assert!(used.exists(), "expired but in use by the latest state: kept (istio #42154)");
    assert_eq!(sample(&cache, ENTRIES), 1.0);

    // Once a new state no longer references it, it expires too.
    cache.convert(&response(&[])).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(cache.purge().unwrap(), 1);
    assert!(!used.exists());
}

#[test]
fn delta_in_use_set_follows_added_and_removed_resources() {
    let server = TestServer::http();
    server.route("/d.wasm", Route::bytes(wasm_module(3)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"module_expiry_secs": 1}));
    let ext = wasm_extension("delta", &remote_wasm(&server.url("/d.wasm"), "nil"));
    let add = DeltaDiscoveryResponse {
        type_url: ECDS_TYPE.into(),
        nonce: "d1".into(),
        resources: vec![Resource {
            name: "delta".into(),
            version: "1".into(),
            resource: Some(any(ECDS_TYPE, &ext)),
            ..Default::default()
        }],
        ..Default::default()
    };
    let out = DeltaDiscoveryResponse::decode(cache.convert_delta(&add.encode_to_vec()).unwrap().as_slice()).unwrap();
    let tec = TypedExtensionConfig::decode(out.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    let path =
        PathBuf::from(Wasm::decode(tec.typed_config.unwrap().value.as_slice()).unwrap().local_filename().unwrap());
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(cache.purge().unwrap(), 0);
    assert!(path.exists());
    let remove = DeltaDiscoveryResponse {
        type_url: ECDS_TYPE.into(),
        nonce: "d2".into(),
        removed_resources: vec!["delta".into()],
        ..Default::default()
    };
    cache.convert_delta(&remove.encode_to_vec()).unwrap();
    assert_eq!(cache.purge().unwrap(), 1);
    assert!(!path.exists());
}

#[test]
fn disabled_conversion_passes_bytes_through_and_fetches_nothing() {
    let server = TestServer::http();
    server.route("/m.wasm", Route::bytes(wasm_module(1)));
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({"enable_conversion": false}));
    let input = response(&[wasm_extension("ext", &remote_wasm(&server.url("/m.wasm"), "nil"))]);
    assert_eq!(cache.convert(&input).unwrap(), input);
    assert_eq!(server.total_requests(), 0);
}

#[test]
fn malformed_response_is_rejected_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), serde_json::json!({}));
    for input in [&[0x12u8, 0x05, 0x01][..], &[0xff, 0xff, 0xff], &[0x0a]] {
        let rejection = cache.convert(input).unwrap_err();
        assert!(!rejection.reason.is_empty());
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[test]
fn cache_is_shared_between_threads_by_type() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Cache>();
}

/// Runs `f` on its own thread and returns its result, failing the test if it has not returned within `limit`
/// (a hang must fail the test, not wedge the run; the stuck thread is left behind).
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {limit:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Eight fail-open modules on a server that never answers and one healthy fail-closed module, each with a
/// 2 s timeout: every module's fetch starts at once with its own deadline, so the healthy one is fetched
/// and converted, the stalled ones become allow-all RBAC filters when their own deadline passes, and the
/// call takes about one timeout.
#[test]
fn stalled_modules_do_not_starve_a_healthy_one() {
    let server = TestServer::http();
    let healthy = wasm_module(64);
    server.route("/healthy.wasm", Route::bytes(healthy.clone()));
    let mut exts = Vec::new();
    for i in 0..8 {
        let path = format!("/stalled{i}.wasm");
        // Answers only after the test is over (the server gives up the delay when it is dropped).
        server.route(&path, Route::bytes(wasm_module(10 + i)).delay(Duration::from_secs(120)));
        exts.push(wasm_extension(
            &format!("stalled{i}"),
            &remote_wasm(&server.url(&path), "nil").fail_open().with_timeout(2),
        ));
    }
    let healthy_url = server.url("/healthy.wasm");
    exts.push(wasm_extension("healthy", &remote_wasm(&healthy_url, &sha256_hex(&healthy)).with_timeout(2)));
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), serde_json::json!({})));
    let input = response(&exts);
    let started = Instant::now();
    let converting = cache.clone();
    let out = within(Duration::from_secs(30), "convert", move || converting.convert(&input))
        .unwrap_or_else(|r| panic!("rejected: {}", r.reason));
    let took = started.elapsed();

    assert_eq!(server.requests("/healthy.wasm"), 1);
    for i in 0..8 {
        assert!(server.requests(&format!("/stalled{i}.wasm")) >= 1, "stalled{i} was never requested");
    }
    let exts = extensions(&out);
    for ext in &exts[..8] {
        let rbac = HttpRbac::decode(ext.typed_config.as_ref().unwrap().value.as_slice()).unwrap();
        assert_eq!(rbac.rules_stat_prefix, "wasm-default-allow", "{}", ext.name);
    }
    let wasm = Wasm::decode(exts[8].typed_config.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(std::fs::read(wasm.local_filename().unwrap()).unwrap(), healthy);
    assert_eq!(sample(&cache, CONVERSION_SUCCESS), 1.0);
    // One round of 2 s deadlines; a second round (modules queued behind stalled ones) would take 4 s or more.
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

/// A conversion hits module A, then waits seconds for module B; a purge meanwhile finds A expired and not in
/// the previous in-use set. A was chosen by the running conversion, so the purge must leave it: the
/// response that comes back names A's file, which must exist.
#[test]
fn a_purge_during_a_conversion_spares_the_modules_it_chose() {
    let server = TestServer::http();
    let (a, b) = (wasm_module(1), wasm_module(2));
    server.route("/a.wasm", Route::bytes(a.clone()));
    server.route("/b.wasm", Route::bytes(b.clone()).delay(Duration::from_millis(2500)));
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(open(dir.path(), serde_json::json!({"module_expiry_secs": 1})));
    let a_path = convert_one(&cache, &server.url("/a.wasm"), &sha256_hex(&a)).unwrap();
    cache.convert(&response(&[])).unwrap(); // A is no longer in use
    let input = response(&[
        wasm_extension("a", &remote_wasm(&server.url("/a.wasm"), &sha256_hex(&a))),
        wasm_extension("b", &remote_wasm(&server.url("/b.wasm"), &sha256_hex(&b))),
    ]);
    let converting = cache.clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let purging = {
        let (cache, done) = (cache.clone(), done.clone());
        // Purges until the conversion returns: A's use at the start of the conversion expires after 1 s,
        // while the conversion still waits for B.
        std::thread::spawn(move || {
            let mut purged = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                purged += cache.purge().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
            purged
        })
    };
    let out = within(Duration::from_secs(30), "convert", move || converting.convert(&input));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let purged = purging.join().unwrap();
    let out = out.unwrap_or_else(|r| panic!("rejected: {}", r.reason));
    let files: Vec<PathBuf> = wasms(&out).iter().map(|w| PathBuf::from(w.local_filename().unwrap())).collect();
    assert_eq!(files[0], a_path);
    assert!(a_path.exists(), "the response names {a_path:?}, which a purge deleted ({purged} purged)");
    assert_eq!(std::fs::read(&files[1]).unwrap(), b);
    // Once the conversion has recorded its in-use set, A is protected by that set instead.
    assert_eq!(cache.purge().unwrap(), 0);
    assert!(a_path.exists());
}
