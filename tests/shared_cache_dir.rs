//! Several processes sharing one cache directory: each converts the same cold response at the same time
//! (the test binary re-runs itself as the child processes), and none may see a half-written or foreign
//! file, none may fail, and no temp file may be left behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::server::{sha256_hex, wasm_module, Route, TestServer};

const CHILD_ENV: &str = "WASM_ECDS_SHARED_DIR_CHILD";

/// The child process: converts the response named by `$WASM_ECDS_SHARED_DIR_CHILD` (`dir|url|sha256`) and
/// prints the file it got. Run only by the test below, which starts it with `--ignored`.
#[test]
#[ignore = "a child process of processes_sharing_a_cache_directory_agree_and_leave_no_temp_files"]
fn child_converts_into_the_shared_directory() {
    let spec = std::env::var(CHILD_ENV).expect("started by the parent test");
    let (dir, url, sha) = {
        let mut parts = spec.splitn(3, '|');
        (parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned(), parts.next().unwrap().to_owned())
    };
    let options = serde_json::json!({ "cache_dir": dir, "max_attempts": 3, "retry_initial_backoff_ms": 10 });
    let cache = Cache::new(Options::from_json(&options.to_string()).unwrap()).unwrap();
    let out = cache.convert(&response(&[wasm_extension("ext", &remote_wasm(&url, &sha))])).expect("converts");
    println!("FILE={}", wasms(&out)[0].local_filename().unwrap());
}

#[test]
fn processes_sharing_a_cache_directory_agree_and_leave_no_temp_files() {
    let server = TestServer::http();
    let module = wasm_module(2 << 20);
    // Slow enough that the processes' downloads overlap.
    server.route("/m.wasm", Route::bytes(module.clone()).delay(Duration::from_millis(300)));
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}|{}|{}", dir.path().display(), server.url("/m.wasm"), sha256_hex(&module));
    let exe = std::env::current_exe().unwrap();
    // All four start before any finishes.
    let running: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "child_converts_into_the_shared_directory", "--ignored", "--nocapture"])
                .env(CHILD_ENV, &spec)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("child starts")
        })
        .collect();
    let children: Vec<_> = running.into_iter().map(|c| c.wait_with_output().expect("child ends")).collect();
    let mut files = Vec::new();
    for out in &children {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let file = stdout.lines().find_map(|l| l.split("FILE=").nth(1)).expect("child printed its file");
        files.push(PathBuf::from(file));
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]), "one content-addressed file: {files:?}");
    assert!(server.requests("/m.wasm") >= 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), module);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}
