//! What the store's tests share: a store in a temp directory, fed by an in-process fetcher.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::files::{new_temp_file, sha256_hex, TEMP_PREFIX};
use super::{ModuleFetcher, Store, MODULES_DIR};
use crate::fetch::{Downloaded, FetchError, FetchErrorKind, ImageFetched, ImageRequest};
use crate::metrics::Metrics;
use crate::module::{ModuleRequest, PullPolicy};
use crate::options::Options;

/// Serves bytes from a map into temp files, counting calls and concurrency.
#[derive(Default)]
pub(super) struct TestFetcher {
    bodies: Mutex<HashMap<String, Vec<u8>>>,
    delay: Mutex<Duration>,
    calls: AtomicUsize,
    current: AtomicUsize,
    pub max_concurrent: AtomicUsize,
    /// The least time any fetch had left before its deadline when it started.
    pub min_time_left: Mutex<Option<Duration>>,
}

impl TestFetcher {
    pub fn serve(&self, url: &str, body: &[u8]) {
        self.bodies.lock().unwrap().insert(url.to_string(), body.to_vec());
    }
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

pub(super) struct Shared(pub Arc<TestFetcher>);

impl ModuleFetcher for Shared {
    fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError> {
        let f = &self.0;
        let left = deadline.saturating_duration_since(Instant::now());
        let mut min = f.min_time_left.lock().unwrap();
        *min = Some(min.map_or(left, |m| m.min(left)));
        drop(min);
        f.calls.fetch_add(1, Ordering::SeqCst);
        let now = f.current.fetch_add(1, Ordering::SeqCst) + 1;
        f.max_concurrent.fetch_max(now, Ordering::SeqCst);
        let delay = *f.delay.lock().unwrap();
        std::thread::sleep(delay);
        let body = f.bodies.lock().unwrap().get(url).cloned();
        f.current.fetch_sub(1, Ordering::SeqCst);
        let Some(body) = body else {
            return Err(FetchError {
                kind: FetchErrorKind::Download,
                message: "wasm module download request failed: status code 404".into(),
            });
        };
        let mut file =
            new_temp_file(temp_dir).map_err(|e| FetchError { kind: FetchErrorKind::Io, message: e.to_string() })?;
        file.write_all(&body).unwrap();
        Ok(Downloaded {
            file,
            sha256: sha256_hex(&body),
            len: body.len() as u64,
            is_wasm: body.len() >= 8 && body.starts_with(b"\0asm"),
        })
    }

    fn fetch_image(
        &self,
        req: &ImageRequest<'_>,
        _deadline: Instant,
        _temp_dir: &Path,
        _known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        Err(FetchError { kind: FetchErrorKind::Manifest, message: format!("no image {}", req.url) })
    }
}

pub(super) fn wasm(tag: &str) -> Vec<u8> {
    let mut b = b"\0asm\x01\0\0\0".to_vec();
    b.extend_from_slice(tag.as_bytes());
    b
}

pub(super) struct Fixture {
    // Declared first so it is dropped (writing its index) before the directory goes.
    store: Option<Store>,
    pub fetcher: Arc<TestFetcher>,
    pub metrics: Arc<Metrics>,
    dir: tempfile::TempDir,
}

/// Options for a store in `dir`; the rest are the built-in defaults.
pub(super) fn options(dir: &Path, expiry: Duration, interval: Duration) -> Options {
    Options { cache_dir: dir.to_path_buf(), module_expiry: expiry, purge_interval: interval, ..Options::default() }
}

pub(super) fn fixture() -> Fixture {
    fixture_with(Duration::from_secs(3600), Duration::from_secs(3600))
}

pub(super) fn fixture_with(expiry: Duration, interval: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Arc::new(TestFetcher::default());
    let metrics = Arc::new(Metrics::new());
    let store = Store::open_with(
        &options(&dir.path().join("cache"), expiry, interval),
        Box::new(Shared(fetcher.clone())),
        metrics.clone(),
    )
    .unwrap();
    Fixture { dir, fetcher, metrics, store: Some(store) }
}

impl Fixture {
    pub fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }
    pub fn close(&mut self) {
        self.store = None;
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    /// A second store on the same directory, as another process (or a restart) would open it.
    pub fn reopen(&self) -> (Store, Arc<TestFetcher>, Arc<Metrics>) {
        let fetcher = Arc::new(TestFetcher::default());
        let metrics = Arc::new(Metrics::new());
        let store = Store::open_with(
            &options(&self.cache_dir(), Duration::from_secs(3600), Duration::from_secs(3600)),
            Box::new(Shared(fetcher.clone())),
            metrics.clone(),
        )
        .unwrap();
        (store, fetcher, metrics)
    }
    pub fn temp_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in [self.cache_dir(), self.cache_dir().join(MODULES_DIR)] {
            for e in fs::read_dir(d).unwrap().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(TEMP_PREFIX) {
                    out.push(n);
                }
            }
        }
        out
    }
}

pub(super) fn req(url: &str) -> ModuleRequest {
    ModuleRequest {
        url: url.to_string(),
        sha256: None,
        timeout: Duration::from_secs(5),
        resource_name: "res".into(),
        resource_version: "1".into(),
        pull_policy: PullPolicy::Unspecified,
        pull_secret: None,
    }
}

pub(super) fn req_sha(url: &str, sha: &str) -> ModuleRequest {
    ModuleRequest { sha256: Some(sha.to_string()), ..req(url) }
}

/// The lookup counter: (hits, misses).
pub(super) fn lookups(m: &Metrics) -> (u64, u64) {
    (m.lookups(true), m.lookups(false))
}
