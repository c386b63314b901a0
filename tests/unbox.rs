//! Hostile archives served from a loopback server, converted through the whole library in a child process
//! (the test binary re-runs itself) whose peak resident memory (`VmHWM` in `/proc/self/status`) is measured
//! around the conversion. A tar special record (GNU long name `L`, long link `K`, pax `x`/`g`) that declares
//! and holds 200 MiB compresses to ~200 KB; unboxing must refuse it without reading it into memory, and a
//! gzip bomb must stop at `max_module_bytes` while streaming.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::archives::{gzip_tar_with_special, gzip_zeros};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::memory;
use wasm_ecds_testkit::server::{gzip, tar, wasm_module, Route, TestServer};

const CHILD_ENV: &str = "WASM_ECDS_UNBOX_CHILD";
/// Peak memory a hostile conversion may add. The unboxer holds at most one 64 KiB buffer, decoder state and
/// a pax header of up to 1 MiB; before the fix a 200 MiB record added ~257 MiB.
const MAX_GROWTH_KIB: u64 = 16 * 1024;
/// What a special record declares and holds in these tests, as in the hostile review.
const HOSTILE_RECORD_BYTES: u64 = 200 << 20;
/// A generous bound on one child's run (it decompresses ~200 MiB to disk); not a timing assertion.
const CHILD_TIMEOUT: Duration = Duration::from_secs(180);

/// The child process: converts a benign `.tar.gz` module first (so that every buffer and decoder the path
/// uses has been allocated once), then the response named by `$WASM_ECDS_UNBOX_CHILD`
/// (`cache_dir|max_module_bytes|warm-up url|url`), and prints how much the peak RSS grew during the second
/// conversion and its outcome. Run only by the tests below, which start it with `--ignored`.
#[test]
#[ignore = "a child process of the tests in this file"]
fn child_converts_and_reports_peak_memory() {
    let spec = std::env::var(CHILD_ENV).expect("started by a parent test");
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let [dir, max, warm_up, url] = parts[..] else { panic!("bad spec {spec:?}") };
    let options = serde_json::json!({
        "cache_dir": dir,
        "max_module_bytes": max.parse::<u64>().unwrap(),
        "max_attempts": 1,
    });
    let cache = Cache::new(Options::from_json(&options.to_string()).unwrap()).unwrap();
    let convert = |url: &str| cache.convert(&response(&[wasm_extension("ext", &remote_wasm(url, "nil"))]));
    convert(warm_up).expect("the warm-up module converts");
    let (idle, peak, outcome) = memory::peak_of(|| convert(url));
    let growth = peak.saturating_sub(idle);
    println!("GROWTH_KIB={growth}");
    match outcome {
        Ok(_) => println!("OUTCOME=converted"),
        Err(rejection) => println!("OUTCOME=rejected: {}", rejection.reason),
    }
}

/// What the child reported: peak RSS growth in KiB and `converted` or `rejected: <reason>`.
struct Report {
    growth_kib: u64,
    outcome: String,
}

/// Serves `body` and a warm-up module, converts `body` in a child process and returns its report.
fn convert_in_child(body: Vec<u8>, max_module_bytes: u64) -> Report {
    let server = TestServer::http();
    let warm_up = wasm_module(100_000);
    let long_name = "dir/".repeat(30) + "plugin.wasm"; // a GNU long-name record within the limit
    server.route("/warm-up.tar.gz", Route::bytes(gzip(&tar(&[(long_name.as_str(), &warm_up)]))));
    server.route("/hostile", Route::bytes(body));
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "{}|{max_module_bytes}|{}|{}",
        dir.path().display(),
        server.url("/warm-up.tar.gz"),
        server.url("/hostile")
    );
    let out_path = dir.path().join("child.out");
    let err_path = dir.path().join("child.err");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_converts_and_reports_peak_memory", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &spec)
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err_path).unwrap()))
        .spawn()
        .expect("child starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break status;
        }
        if started.elapsed() > CHILD_TIMEOUT {
            child.kill().ok();
            child.wait().ok();
            panic!("child still running after {CHILD_TIMEOUT:?}:\n{}", read(&out_path));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = read(&out_path);
    assert!(status.success(), "child failed:\n{stdout}\n{}", read(&err_path));
    let field = |key: &str| {
        stdout.lines().find_map(|l| l.split(key).nth(1)).unwrap_or_else(|| panic!("no {key} in:\n{stdout}")).to_owned()
    };
    let report = Report { growth_kib: field("GROWTH_KIB=").parse().unwrap(), outcome: field("OUTCOME=") };
    println!("peak RSS growth {} KiB, {}", report.growth_kib, report.outcome);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    report
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `.tar.gz` whose first record is a `kind` special record of 200 MiB before a valid module: refused like
/// any tar that cannot be unpacked (Go's `archive/tar` fails `Next` with `ErrFieldTooLong` past 1 MiB and
/// Istio then keeps the download as it is), so the download is not Wasm; memory stays flat.
fn assert_oversized_special_record_is_refused_in_bounded_memory(kind: u8) {
    let body = gzip_tar_with_special(kind, HOSTILE_RECORD_BYTES, &wasm_module(1000));
    assert!(body.len() < 1 << 20, "the hostile archive is small on the wire: {} bytes", body.len());
    let report = convert_in_child(body, 256 << 20);
    assert!(
        report.growth_kib <= MAX_GROWTH_KIB,
        "record {}: peak RSS grew by {} KiB (at most {MAX_GROWTH_KIB})",
        kind as char,
        report.growth_kib
    );
    assert!(
        report.outcome.starts_with("rejected: ") && report.outcome.contains("is invalid"),
        "record {}: {}",
        kind as char,
        report.outcome
    );
    // The rejection says why the archive was kept as it is, not only that it is no Wasm.
    assert!(
        report.outcome.contains("(it looks like tar but cannot be unpacked: ")
            && report.outcome.contains("over the limit of 1048576 bytes for tar headers"),
        "record {}: {}",
        kind as char,
        report.outcome
    );
}

#[test]
fn gnu_long_name_over_1_mib_is_refused_in_bounded_memory() {
    assert_oversized_special_record_is_refused_in_bounded_memory(b'L');
}

#[test]
fn gnu_long_link_over_1_mib_is_refused_in_bounded_memory() {
    assert_oversized_special_record_is_refused_in_bounded_memory(b'K');
}

#[test]
fn pax_header_over_1_mib_is_refused_in_bounded_memory() {
    assert_oversized_special_record_is_refused_in_bounded_memory(b'x');
}

#[test]
fn pax_global_header_over_1_mib_is_refused_in_bounded_memory() {
    assert_oversized_special_record_is_refused_in_bounded_memory(b'g');
}

#[test]
fn gzip_bomb_stops_at_max_module_bytes_in_bounded_memory() {
    let max = 8u64 << 20;
    let bomb = gzip_zeros(256 << 20);
    assert!(bomb.len() < 1 << 20, "the bomb is small on the wire: {} bytes", bomb.len());
    let report = convert_in_child(bomb, max);
    assert!(report.growth_kib <= MAX_GROWTH_KIB, "peak RSS grew by {} KiB", report.growth_kib);
    assert!(
        report.outcome.starts_with("rejected: ") && report.outcome.contains(&format!("(max_module_bytes) of {max}")),
        "{}",
        report.outcome
    );
}
