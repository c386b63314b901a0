//! A cache directory with special files where the store expects regular ones: a module's name as a symlink
//! to an endless device or as a FIFO, the index as a FIFO, a module's name as a directory. None may hang a
//! call (each call here runs on its own thread and fails the test if it has not returned in 20 s) or wedge a
//! module: the special file is replaced by the download and the conversion succeeds.
#![cfg(unix)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::server::{sha256_hex, wasm_module, Route, TestServer};

const LIMIT: Duration = Duration::from_secs(20);

/// Runs `f` on its own thread and returns its result, failing the test if it has not returned within
/// [`LIMIT`] (the stuck thread is left behind).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within {LIMIT:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

fn open(cache_dir: &Path) -> Arc<Cache> {
    let options = Options { cache_dir: cache_dir.to_path_buf(), max_attempts: 1, ..Options::default() };
    let cache_dir = cache_dir.to_path_buf();
    within("Cache::new", move || Arc::new(Cache::new(options).unwrap_or_else(|e| panic!("{cache_dir:?}: {e}"))))
}

/// Converts one response naming `modules` (URL and the sha256 it gives, or `nil`) on its own thread; the
/// local files it names, in order.
fn convert(cache: &Arc<Cache>, modules: &[(String, String)]) -> Result<Vec<PathBuf>, String> {
    let exts: Vec<_> = modules
        .iter()
        .enumerate()
        .map(|(i, (url, sha))| wasm_extension(&format!("ext{i}"), &remote_wasm(url, sha)))
        .collect();
    let input = response(&exts);
    let cache = cache.clone();
    let out = within("convert", move || cache.convert(&input)).map_err(|r| r.reason)?;
    Ok(wasms(&out).iter().map(|w| PathBuf::from(w.local_filename().unwrap())).collect())
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
    assert!(status.success(), "mkfifo {path:?}");
}

/// A module file's path in `cache_dir`.
fn module_path(cache_dir: &Path, module: &[u8]) -> PathBuf {
    cache_dir.join("modules").join(format!("{}.wasm", sha256_hex(module)))
}

/// Two modules served at `/a.wasm` and `/b.wasm`; the first is asked for by its sha256 (the store looks for
/// it on disk before fetching), the second without one (the store meets the special file only when it puts
/// the download in place).
struct Setup {
    server: TestServer,
    dir: tempfile::TempDir,
    modules: [Vec<u8>; 2],
}

impl Setup {
    fn new() -> Setup {
        let server = TestServer::http();
        let modules = [wasm_module(100), wasm_module(200)];
        server.route("/a.wasm", Route::bytes(modules[0].clone()));
        server.route("/b.wasm", Route::bytes(modules[1].clone()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("cache").join("modules")).unwrap();
        Setup { server, dir, modules }
    }

    fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn paths(&self) -> [PathBuf; 2] {
        [module_path(&self.cache_dir(), &self.modules[0]), module_path(&self.cache_dir(), &self.modules[1])]
    }

    fn requests(&self) -> Vec<(String, String)> {
        vec![(self.server.url("/a.wasm"), sha256_hex(&self.modules[0])), (self.server.url("/b.wasm"), "nil".into())]
    }

    /// Converts, and checks that each module is now a regular file with the right bytes at its path.
    fn converts(&self, cache: &Arc<Cache>) {
        let files = convert(cache, &self.requests()).unwrap_or_else(|r| panic!("rejected: {r}"));
        let canonical = self.cache_dir().canonicalize().unwrap();
        for (i, file) in files.iter().enumerate() {
            assert_eq!(file, &module_path(&canonical, &self.modules[i]));
            assert!(std::fs::symlink_metadata(file).unwrap().file_type().is_file(), "{file:?} is not a regular file");
            assert_eq!(std::fs::read(file).unwrap(), self.modules[i]);
        }
    }
}

#[test]
fn a_module_name_that_is_a_symlink_to_an_endless_device_is_replaced() {
    let s = Setup::new();
    for p in s.paths() {
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
    }
    let cache = open(&s.cache_dir());
    s.converts(&cache);
    assert_eq!(s.server.requests("/a.wasm") + s.server.requests("/b.wasm"), 2);
}

#[test]
fn a_module_name_that_is_a_fifo_is_replaced() {
    let s = Setup::new();
    for p in s.paths() {
        mkfifo(&p);
    }
    let cache = open(&s.cache_dir());
    s.converts(&cache);
}

#[test]
fn an_index_that_is_a_fifo_is_ignored_and_replaced() {
    let s = Setup::new();
    let index = s.cache_dir().join("index.json");
    mkfifo(&index);
    let cache = open(&s.cache_dir());
    s.converts(&cache);
    // The index written after the downloads replaced the FIFO, and a restart reads it.
    assert!(std::fs::symlink_metadata(&index).unwrap().file_type().is_file());
    drop(cache);
    let again = open(&s.cache_dir());
    s.converts(&again);
    assert_eq!(s.server.requests("/a.wasm") + s.server.requests("/b.wasm"), 2, "reused after the restart");
}

#[test]
fn a_module_name_that_is_a_directory_is_cleared_and_the_module_stored() {
    let s = Setup::new();
    let [empty, full] = s.paths();
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep-me"), b"someone's file").unwrap();
    let cache = open(&s.cache_dir());
    s.converts(&cache);
    // The non-empty directory was moved aside, not deleted: its content is still in the modules directory.
    let aside: Vec<PathBuf> = std::fs::read_dir(s.cache_dir().join("modules"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(aside[0].join("keep-me")).unwrap(), b"someone's file");
    // And the module stays served: a second push is a hit.
    s.converts(&cache);
    assert_eq!(s.server.requests("/a.wasm") + s.server.requests("/b.wasm"), 2);
}
