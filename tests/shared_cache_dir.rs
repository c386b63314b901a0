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

const HOLDER_ENV: &str = "WASM_ECDS_TEMP_HOLDER_CHILD";

/// The child process: a neighbour whose downloads are in progress, as seen from another PID namespace. It
/// creates the temp files named by `$WASM_ECDS_TEMP_HOLDER_CHILD` (`path|path`) with a pid that is not alive
/// here, holds them open and locked (the first shared, as the library's writers lock theirs, the second
/// exclusive), prints `LOCKED`, and when its standard input closes checks that they are still there. Run
/// only by the test below, which starts it with `--ignored`.
#[test]
#[ignore = "a child process of a_neighbours_locked_temp_files_survive_start_up_whatever_their_pid"]
fn child_holds_locked_temp_files() {
    use std::io::{Read, Write};
    let spec = std::env::var(HOLDER_ENV).expect("started by the parent test");
    let paths: Vec<PathBuf> = spec.split('|').map(PathBuf::from).collect();
    let files: Vec<std::fs::File> = paths
        .iter()
        .map(|p| {
            let mut f = std::fs::File::create_new(p).expect("create the temp file");
            f.write_all(b"half a module").unwrap();
            f
        })
        .collect();
    files[0].lock_shared().expect("shared lock");
    files[1].lock().expect("exclusive lock");
    println!("LOCKED");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    for p in &paths {
        assert!(p.exists(), "{p:?} was deleted while its writer held it");
    }
}

/// Two containers sharing a cache directory do not see each other's pids: start-up must decide whether a
/// temp file is a crash leftover by whether its writer still holds it locked, never by the pid in its name.
#[test]
fn a_neighbours_locked_temp_files_survive_start_up_whatever_their_pid() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    drop(Cache::new(Options { cache_dir: cache_dir.clone(), ..Options::default() }).unwrap());
    // 999999999 is above Linux's pid_max (4194304): no process here has that pid.
    let held = [cache_dir.join(".tmp-999999999-shared"), cache_dir.join("modules").join(".tmp-999999999-excl")];
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holds_locked_temp_files", "--ignored", "--nocapture"])
        .env(HOLDER_ENV, format!("{}|{}", held[0].display(), held[1].display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child starts");
    // The child prints LOCKED once it holds the locks, or exits (closing its stdout) if it cannot.
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l == "LOCKED")), "the child did not lock its temp files");
    // Leftovers nobody holds, one named with this (live) process's pid: removed all the same.
    let unlocked = [
        cache_dir.join(format!(".tmp-{}-crashed", std::process::id())),
        cache_dir.join("modules").join(".tmp-999999999-crashed"),
    ];
    for p in &unlocked {
        std::fs::write(p, b"half a module").unwrap();
    }

    drop(Cache::new(Options { cache_dir: cache_dir.clone(), ..Options::default() }).unwrap());
    let kept: Vec<bool> = held.iter().map(|p| p.exists()).collect();
    let removed: Vec<bool> = unlocked.iter().map(|p| !p.exists()).collect();
    drop(child.stdin.take()); // the child checks its files and exits
    let status = child.wait().expect("child ends");
    assert_eq!(kept, [true, true], "a live neighbour's temp files were deleted: {held:?}");
    assert_eq!(removed, [true, true], "unlocked leftovers were kept: {unlocked:?}");
    assert!(status.success(), "the child found its temp files gone");
}
