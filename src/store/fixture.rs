//! What the store's tests share: a store in a temp directory, fed by an in-process fetcher that serves
//! plain modules by URL and OCI images (a manifest digest and a module) by `oci://` URL.

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

/// An image as the fixture serves it: what its manifest resolves to, and the one layer's module.
#[derive(Clone)]
struct Image {
    manifest_digest: String,
    module: Vec<u8>,
}

/// A failure the fixture's image source can be told to answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImageFailure {
    /// The manifest cannot be had.
    Manifest,
    /// The manifest resolves; its layer cannot be had.
    Download,
}

/// What one `fetch_image` call was asked: the URL, the pull secret and the expected manifest digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ImageAsked {
    pub url: String,
    pub pull_secret: Option<Vec<u8>>,
    pub expected_manifest: Option<String>,
}

/// Serves bytes from a map into temp files, counting calls and concurrency; and images, counting manifest
/// resolutions and layer downloads apart.
#[derive(Default)]
pub(crate) struct TestFetcher {
    bodies: Mutex<HashMap<String, Vec<u8>>>,
    images: Mutex<HashMap<String, Image>>,
    image_failures: Mutex<HashMap<String, ImageFailure>>,
    asked: Mutex<Vec<ImageAsked>>,
    resolutions: AtomicUsize,
    layers: AtomicUsize,
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
    /// Serves the image `url` (an `oci://` URL as requested): its manifest resolves to `manifest_digest`
    /// and its layer holds `module`.
    pub fn serve_image(&self, url: &str, manifest_digest: &str, module: &[u8]) {
        let image = Image { manifest_digest: manifest_digest.to_owned(), module: module.to_vec() };
        self.images.lock().unwrap().insert(url.to_owned(), image);
        self.image_failures.lock().unwrap().remove(url);
    }
    /// Makes the image `url` fail this way from now on (until served again).
    pub fn fail_image(&self, url: &str, failure: ImageFailure) {
        self.image_failures.lock().unwrap().insert(url.to_owned(), failure);
    }
    /// How many manifests were resolved (every `fetch_image` call resolves one, or fails to).
    pub fn resolutions(&self) -> usize {
        self.resolutions.load(Ordering::SeqCst)
    }
    /// How many layers were downloaded.
    pub fn layers(&self) -> usize {
        self.layers.load(Ordering::SeqCst)
    }
    /// Every `fetch_image` call's request, in order.
    pub fn asked(&self) -> Vec<ImageAsked> {
        self.asked.lock().unwrap().clone()
    }
}

pub(crate) struct Shared(pub Arc<TestFetcher>);

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
            not_unpacked: None,
        })
    }

    /// The steps and errors of [`crate::fetch::Fetcher::fetch_image`]: resolve the manifest, compare its
    /// digest, ask `known`, then download the layer.
    fn fetch_image(
        &self,
        req: &ImageRequest<'_>,
        _deadline: Instant,
        temp_dir: &Path,
        known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        let f = &self.0;
        f.asked.lock().unwrap().push(ImageAsked {
            url: req.url.to_owned(),
            pull_secret: req.pull_secret.map(<[u8]>::to_vec),
            expected_manifest: req.expected_manifest.map(str::to_owned),
        });
        f.resolutions.fetch_add(1, Ordering::SeqCst);
        let delay = *f.delay.lock().unwrap();
        std::thread::sleep(delay);
        let failure = f.image_failures.lock().unwrap().get(req.url).copied();
        let image = f.images.lock().unwrap().get(req.url).cloned();
        let image = match (failure, image) {
            (Some(ImageFailure::Manifest), _) | (None, None) => {
                return Err(FetchError {
                    kind: FetchErrorKind::Manifest,
                    message: format!("could not fetch Wasm OCI image: MANIFEST_UNKNOWN: {}", req.url),
                });
            }
            (Some(ImageFailure::Download), None) => unreachable!("fail_image(Download) on an image not served"),
            (_, Some(image)) => image,
        };
        let digest = image.manifest_digest;
        if let Some(want) = req.expected_manifest {
            if want != digest {
                return Err(FetchError {
                    kind: FetchErrorKind::ChecksumMismatch,
                    message: format!(
                        "module downloaded from {} has checksum {digest}, which does not match: {want}",
                        req.url
                    ),
                });
            }
        }
        if known(&digest) {
            return Ok(ImageFetched::Known { manifest_digest: digest });
        }
        f.layers.fetch_add(1, Ordering::SeqCst);
        if failure == Some(ImageFailure::Download) {
            return Err(FetchError {
                kind: FetchErrorKind::Download,
                message: "could not fetch Wasm binary: BLOB_UNKNOWN".into(),
            });
        }
        let body = image.module;
        let mut file =
            new_temp_file(temp_dir).map_err(|e| FetchError { kind: FetchErrorKind::Io, message: e.to_string() })?;
        file.write_all(&body).unwrap();
        let module = Downloaded {
            file,
            sha256: sha256_hex(&body),
            len: body.len() as u64,
            is_wasm: body.len() >= 8 && body.starts_with(b"\0asm"),
            not_unpacked: None,
        };
        Ok(ImageFetched::Downloaded { manifest_digest: digest, module })
    }
}

pub(crate) fn wasm(tag: &str) -> Vec<u8> {
    let mut b = b"\0asm\x01\0\0\0".to_vec();
    b.extend_from_slice(tag.as_bytes());
    b
}

pub(crate) struct Fixture {
    // Declared first so it is dropped (writing its index) before the directory goes.
    store: Option<Store>,
    pub fetcher: Arc<TestFetcher>,
    pub metrics: Arc<Metrics>,
    dir: tempfile::TempDir,
}

/// Options for a store in `dir`; the rest are the built-in defaults.
pub(crate) fn options(dir: &Path, expiry: Duration, interval: Duration) -> Options {
    Options { cache_dir: dir.to_path_buf(), module_expiry: expiry, purge_interval: interval, ..Options::default() }
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(Duration::from_secs(3600), Duration::from_secs(3600))
}

pub(crate) fn fixture_with(expiry: Duration, interval: Duration) -> Fixture {
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

pub(crate) fn req(url: &str) -> ModuleRequest {
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

pub(crate) fn req_sha(url: &str, sha: &str) -> ModuleRequest {
    ModuleRequest { sha256: Some(sha.to_string()), ..req(url) }
}

/// The lookup counter: (hits, misses).
/// Runs `f` on 16 threads released together (a barrier), and returns their results.
pub(crate) fn sixteen_at_once<T: Send>(f: impl Fn() -> T + Sync) -> Vec<T> {
    let barrier = std::sync::Barrier::new(16);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    f()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

pub(crate) fn lookups(m: &Metrics) -> (u64, u64) {
    (m.lookups(true), m.lookups(false))
}

/// A made-up manifest digest (64 hex digits) for the image `tag`.
pub(crate) fn digest(tag: &str) -> String {
    sha256_hex(format!("manifest {tag}").as_bytes())
}
