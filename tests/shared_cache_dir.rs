//! Several processes sharing one cache directory (the containers of a node): each converts the same cold
//! response at the same time (the test binary re-runs itself as the child processes). They download each
//! module once between them, none may see a half-written or foreign file, none may fail, and no temp file
//! may be left behind. A process killed while it downloads leaves the download to the next one, and one that
//! waits for a neighbour's download gives up at its own deadline.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::images;
use wasm_ecds_testkit::registry::{Registry, RegistryConfig};
use wasm_ecds_testkit::server::{sha256_hex, wasm_module, Route, TestServer};

const CHILD_ENV: &str = "WASM_ECDS_SHARED_DIR_CHILD";
/// How long the parent waits for a child to say something or end; far longer than any step takes.
const LIMIT: Duration = Duration::from_secs(60);
/// What the library says (and logs) when a neighbour holds the download of a module.
const WAITING: &str = "waiting for another process's download of the module";

/// What a child converts, passed as JSON in `$WASM_ECDS_SHARED_DIR_CHILD`.
#[derive(Default, Clone)]
struct Spec {
    dir: PathBuf,
    url: String,
    /// `nil` for none.
    sha256: String,
    /// The filter's fetch timeout, in seconds.
    timeout_s: i64,
    plain_http_hosts: Vec<String>,
    /// Print `READY` once the cache is open, and convert only when standard input closes.
    wait_for_go: bool,
}

impl Spec {
    fn json(&self) -> String {
        serde_json::json!({
            "dir": self.dir, "url": self.url, "sha256": self.sha256, "timeout_s": self.timeout_s,
            "plain_http_hosts": self.plain_http_hosts, "wait_for_go": self.wait_for_go,
        })
        .to_string()
    }
}

/// The child process: converts the response its spec names and prints `FILE=<the local file>` or
/// `REASON=<the rejection>`; prints what the library logs, as it logs it, as `LOG <line>`. Run only by the
/// tests below, which start it with `--ignored`.
#[test]
#[ignore = "a child process of the tests of this file"]
fn child_converts_into_the_shared_directory() {
    let spec: serde_json::Value =
        serde_json::from_str(&std::env::var(CHILD_ENV).expect("started by a parent test")).unwrap();
    let say = |line: &str| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    assert!(wasm_ecds_testkit::logs::capture(), "the child's logger is the capture");
    std::thread::spawn(move || {
        let mut seen = 0;
        loop {
            let lines = wasm_ecds_testkit::logs::lines();
            for line in &lines[seen..] {
                say(&format!("LOG {line}"));
            }
            seen = lines.len();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let options = serde_json::json!({
        "cache_dir": spec["dir"], "plain_http_hosts": spec["plain_http_hosts"],
        "max_attempts": 3, "retry_initial_backoff_ms": 10,
    });
    let cache = Cache::new(Options::from_json(&options.to_string()).unwrap()).unwrap();
    if spec["wait_for_go"].as_bool().unwrap() {
        say("READY");
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
    let wasm = remote_wasm(spec["url"].as_str().unwrap(), spec["sha256"].as_str().unwrap())
        .with_timeout(spec["timeout_s"].as_i64().unwrap());
    match cache.convert(&response(&[wasm_extension("ext", &wasm)])) {
        Ok(out) => say(&format!("FILE={}", wasms(&out)[0].local_filename().unwrap())),
        Err(rejection) => say(&format!("REASON={}", rejection.reason)),
    }
}

/// A running child and the lines it prints.
struct Child {
    process: std::process::Child,
    lines: Receiver<String>,
}

impl Child {
    fn start(spec: &Spec) -> Child {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_converts_into_the_shared_directory", "--ignored", "--nocapture"])
            .env(CHILD_ENV, spec.json())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("child starts");
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child { process, lines }
    }

    /// Waits for a line containing `what` (panics if the child ends first or takes longer than [`LIMIT`]).
    fn wait_for(&self, what: &str) {
        let end = Instant::now() + LIMIT;
        loop {
            match self.lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(what) => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("the child did not print {what:?} within {LIMIT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("the child ended without printing {what:?}"),
            }
        }
    }

    /// Lets a child started with `wait_for_go` convert.
    fn go(&mut self) {
        drop(self.process.stdin.take());
    }

    /// Waits for the child to end: the file it got, or its rejection reason.
    fn result(mut self) -> Result<PathBuf, String> {
        self.go();
        let end = Instant::now() + LIMIT;
        let mut result = None;
        loop {
            match self.lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(file) = line.strip_prefix("FILE=") {
                        result = Some(Ok(PathBuf::from(file)));
                    } else if let Some(reason) = line.strip_prefix("REASON=") {
                        result = Some(Err(reason.to_string()));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.process.kill();
                    panic!("the child did not end within {LIMIT:?}");
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = self.process.wait().expect("child ends");
        assert!(status.success(), "the child failed: {status}");
        result.expect("the child printed its result")
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // A child still running here belongs to a test that failed: do not leave it behind.
        if let Ok(None) = self.process.try_wait() {
            let _ = self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// Four children convert `spec` at once (each opens the cache, then all are let go together); every one
/// gets the same file, which holds `module`, and no temp file is left.
fn four_at_once(spec: &Spec, module: &[u8]) {
    let mut children: Vec<Child> = (0..4).map(|_| Child::start(&Spec { wait_for_go: true, ..spec.clone() })).collect();
    for child in &children {
        child.wait_for("READY");
    }
    for child in &mut children {
        child.go();
    }
    let files: Vec<PathBuf> =
        children.into_iter().map(|c| c.result().unwrap_or_else(|reason| panic!("rejected: {reason}"))).collect();
    assert!(files.windows(2).all(|w| w[0] == w[1]), "one content-addressed file: {files:?}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), module);
    assert_eq!(temp_files(&spec.dir), Vec::<String>::new(), "temp files left");
}

fn temp_files(dir: &Path) -> Vec<String> {
    [dir.to_path_buf(), dir.join("modules")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn processes_sharing_a_cache_directory_download_a_module_once() {
    let server = TestServer::http();
    let module = wasm_module(2 << 20);
    // Slow enough that every process asks while the first one downloads (which matters most without a
    // checksum: a record about a URL is used only when it is written after the request missed).
    server.route("/sha.wasm", Route::bytes(module.clone()).delay(Duration::from_millis(1500)));
    server.route("/nil.wasm", Route::bytes(module.clone()).delay(Duration::from_secs(3)));
    for (path, sha256) in [("/sha.wasm", sha256_hex(&module)), ("/nil.wasm", "nil".to_string())] {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec { dir: dir.path().into(), url: server.url(path), sha256, timeout_s: 30, ..Spec::default() };
        four_at_once(&spec, &module);
        assert_eq!(server.requests(path), 1, "{path}");
    }
}

#[test]
fn processes_sharing_a_cache_directory_pull_an_image_once() {
    let registry = Registry::start(RegistryConfig::plain());
    let module = wasm_module(2 << 20);
    let image = images::oci_artifact(&module);
    let digest = registry.pusher().push("shared/m", "v1", &image);
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec {
        dir: dir.path().into(),
        url: registry.oci_url("shared/m:v1"),
        sha256: digest,
        timeout_s: 30,
        plain_http_hosts: vec![registry.host()],
        ..Spec::default()
    };
    four_at_once(&spec, &module);
    let layer = image.layers.iter().find(|l| l.media_type == images::WASM_LAYER).expect("the wasm layer");
    assert_eq!(registry.blob_downloads("shared/m", &layer.digest()), 1);
}

/// A process holds the download of a module (its server never answers), another waits for it with a short
/// deadline and gives up with the reason, a third waits; when the first is killed, the third downloads the
/// module itself (from another URL with the same sha256: one module, one lock).
#[test]
fn a_killed_downloader_leaves_the_download_to_a_waiting_process() {
    let server = TestServer::http();
    let module = wasm_module(100 << 10);
    server.route("/stalls.wasm", Route::bytes(module.clone()).delay(Duration::from_secs(120)));
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let spec = |path: &str, timeout_s| Spec {
        dir: dir.path().into(),
        url: server.url(path),
        sha256: sha256_hex(&module),
        timeout_s,
        ..Spec::default()
    };
    let holder = Child::start(&spec("/stalls.wasm", 120));
    // It asks the server only while it holds the download lock.
    let end = Instant::now() + LIMIT;
    while server.requests("/stalls.wasm") == 0 {
        assert!(Instant::now() < end, "the holder did not ask for the module within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }

    let reason = Child::start(&spec("/m.wasm", 1)).result().expect_err("gave up waiting");
    assert!(reason.contains(&format!("timed out after 1s {WAITING}")), "{reason}");
    assert_eq!(server.requests("/m.wasm"), 0);

    let waiter = Child::start(&spec("/m.wasm", 60));
    waiter.wait_for(WAITING);
    let mut holder = holder;
    holder.process.kill().unwrap();
    holder.process.wait().unwrap();
    let file = waiter.result().expect("downloaded after the holder died");
    assert_eq!(std::fs::read(file).unwrap(), module);
    assert_eq!(server.requests("/m.wasm"), 1);
}

/// The child process: a neighbour whose downloads are in progress, as seen from another PID namespace. It
/// creates the temp files named by `$WASM_ECDS_TEMP_HOLDER_CHILD` (`path|path`) with a pid that is not alive
/// here, holds them open and locked (the first shared, as the library's writers lock theirs, the second
/// exclusive), prints `LOCKED`, and when its standard input closes checks that they are still there. Run
/// only by the test below, which starts it with `--ignored`.
#[test]
#[ignore = "a child process of a_neighbours_locked_temp_files_survive_start_up_whatever_their_pid"]
fn child_holds_locked_temp_files() {
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

const HOLDER_ENV: &str = "WASM_ECDS_TEMP_HOLDER_CHILD";

/// Two containers sharing a cache directory do not see each other's pids: start-up must decide whether a
/// temp file is a crash leftover by whether its writer still holds it locked, never by the pid in its name.
#[test]
fn a_neighbours_locked_temp_files_survive_start_up_whatever_their_pid() {
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
