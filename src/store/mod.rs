//! The on-disk, content-addressed module store: answers module requests from memory, disk or the network
//! (one download per module however many ask at once), expires unused modules and keeps the ones the latest
//! ECDS state references. Owns the cache directory; never touches the network itself (that is `fetch`).
//!
//! An `oci://` request names its module by the image's manifest digest (the config's `sha256`, or the
//! digest of an `@sha256:` URL), as Istio's cache does; the store keeps a map from manifest digests to the
//! modules they hold (persisted in the index) and is otherwise addressed by module content like any other.
//!
//! Layout under the (canonicalized) cache directory:
//!
//! * `modules/<sha256>.wasm` — one file per module; the name derives only from the module's hex digest.
//! * `index.json` — what a later process needs to reuse the modules ([`index`]).
//! * `locks/<sha256 of a flight key>` — one per module, manifest digest or checksum-less URL ever downloaded,
//!   a few bytes each, never deleted: the cross-process download locks and what their last holder stored
//!   ([`download_lock`]).
//! * `.tmp-<pid>-<random>` — downloads and index writes in progress, each locked by its writer while it lives
//!   (so that a start-up clean-up removes only crash leftovers); renamed into place when complete.
//!
//! Multi-process safety: files only ever appear under their final name by an atomic rename of a complete,
//! synced file. A process holds a shared `flock` on every module file it serves from memory (so its
//! stat-free hit path can trust the file is there); a purge deletes a file only while holding an exclusive
//! lock on it, which it cannot get while any other process holds a shared one ([`files`]). Every file of the
//! directory is opened without following a symlink or blocking on a FIFO, and must be a regular file; what is
//! not is replaced by the download ([`files::open_regular`]).
//!
//! Within a process, a purge also spares the modules a conversion in progress was answered with ([`Pins`]).
//!
//! One download per module across processes too: the leader of a flight locks a file in `locks/` for its
//! module before it downloads, and a neighbour that waited for that lock is served what the leader stored
//! ([`download_lock`]).

mod download_lock;
pub(crate) mod files;
#[cfg(test)]
pub(crate) mod fixture;
mod flight;
mod index;
#[cfg(test)]
mod oci_tests;
mod urls;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fetch::{is_oci_url, Downloaded, FetchError, Fetcher, ImageFetched, ImageRequest};
use crate::metrics::{FetchResult, Metrics};
use crate::module::{Module, ModuleError, ModuleList, ModuleRequest, ModuleSource};
use crate::options::Options;
use download_lock::{DownloadLock, LockError, Recorded, LOCKS_DIR};
use files::{
    create_private_dir, delete_module_file, is_sha256_hex, open_verified, persist_module, remove_stale_temp_files,
    Verify,
};
use flight::{Flight, FlightGuard, FlightKey, Outcome};
use index::{load_state, IndexFile};
use urls::{ignore_resource_version, url_manifest_digest, UrlMap};

/// What the store needs from a fetcher; lets tests serve modules without a network.
pub(crate) trait ModuleFetcher: Send + Sync {
    /// Fetches `url` into a temp file in `temp_dir` (see [`files::new_temp_file`]), all within `deadline`.
    fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError>;

    /// Fetches an OCI image's module (see [`Fetcher::fetch_image`]).
    fn fetch_image(
        &self,
        req: &ImageRequest<'_>,
        deadline: Instant,
        temp_dir: &Path,
        known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError>;
}

impl ModuleFetcher for Fetcher {
    fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError> {
        Fetcher::fetch(self, url, deadline, temp_dir)
    }

    fn fetch_image(
        &self,
        req: &ImageRequest<'_>,
        deadline: Instant,
        temp_dir: &Path,
        known: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ImageFetched, FetchError> {
        Fetcher::fetch_image(self, req, deadline, temp_dir, known)
    }
}

const MODULES_DIR: &str = "modules";

/// A verified module this process serves. Holds a shared `flock` on the file for as long as it lives.
struct Entry {
    module: Module,
    /// Milliseconds since the Unix epoch.
    last_used: AtomicU64,
    lock: File,
}

impl Entry {
    fn touch(&self) {
        self.last_used.fetch_max(now_ms(), Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    /// Verified modules by sha256.
    modules: HashMap<Arc<str>, Arc<Entry>>,
    /// Modules known from the index or found on disk, not yet verified in this process: sha256 → last use.
    pending: HashMap<Arc<str>, u64>,
    urls: UrlMap,
    /// OCI images by manifest digest (lower-case hex) → the sha256 of their module. For an `oci://` URL the
    /// checksum is the manifest digest (Istio, `pkg/wasm/cache.go`), while the store stays addressed by the
    /// module's own content; several manifests may name one module.
    manifests: HashMap<String, Arc<str>>,
    /// Distinct modules the latest SotW conversion references.
    sotw_in_use: ModuleList,
    delta_in_use: HashMap<String, Arc<str>>,
    flights: HashMap<FlightKey, Arc<Flight>>,
    /// Modules that conversions in progress were answered with, and how many times ([`Pins`]).
    pinned: HashMap<Arc<str>, usize>,
}

impl State {
    fn entry_count(&self) -> usize {
        self.modules.len() + self.pending.len()
    }

    /// The module `sha` left the store: forget the URLs and manifests that resolved to it.
    fn forget(&mut self, sha: &str) {
        self.urls.forget_urls_of(sha);
        self.manifests.retain(|_, m| &**m != sha);
    }

    /// The module `sha` if this process serves it: marked used now, and pinned for `pins`.
    fn take(&mut self, sha: &str, pins: &Pins<'_>) -> Option<Module> {
        let entry = self.modules.get(sha)?;
        entry.touch();
        let module = entry.module.clone();
        pins.pin(self, &module.sha256);
        Some(module)
    }
}

/// The modules one conversion in progress has been answered with. From the moment a module is chosen for a
/// response until the conversion has recorded its in-use set, the response references a module that no
/// in-use set protects: a purge meanwhile could delete a file the returned response names. So every answer
/// pins its module (in the store's state, where it is chosen) and [`Store::purge`] spares pinned modules;
/// dropping this releases its pins, after the conversion recorded its in-use set (or panicked).
pub(crate) struct Pins<'a> {
    store: &'a Store,
    held: Mutex<Vec<Arc<str>>>,
}

impl Pins<'_> {
    /// Pins `sha`; called with the state locked, where the module is chosen, so no purge comes in between.
    fn pin(&self, st: &mut State, sha: &Arc<str>) {
        *st.pinned.entry(sha.clone()).or_insert(0) += 1;
        self.held.lock().unwrap_or_else(PoisonError::into_inner).push(sha.clone());
    }

    /// Answers one request (see [`Store::get_all`]), pinning its module.
    pub fn get(&self, req: &ModuleRequest) -> Result<Module, ModuleError> {
        match self.store.lookup(req, self) {
            Lookup::Hit(module) => Ok(module),
            Lookup::Miss(pending) => self.store.finish(req, pending, self),
        }
    }
}

impl ModuleSource for Pins<'_> {
    fn get_all(&self, requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>> {
        self.store.get_all(requests, self)
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let held = std::mem::take(self.held.get_mut().unwrap_or_else(PoisonError::into_inner));
        if held.is_empty() {
            return;
        }
        let mut st = self.store.state();
        for sha in held {
            if let Some(n) = st.pinned.get_mut(&sha) {
                *n -= 1;
                if *n == 0 {
                    st.pinned.remove(&sha);
                }
            }
        }
    }
}

pub(crate) struct Store {
    dir: PathBuf,
    modules_dir: PathBuf,
    /// Cross-process download locks ([`download_lock`]); created with the first download.
    locks_dir: PathBuf,
    module_expiry: Duration,
    purge_interval: Duration,
    /// When [`Store::purge_if_due`] purges next (`None`: never, the interval is too long to add).
    next_purge: Mutex<Option<Instant>>,
    fetcher: Box<dyn ModuleFetcher>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Serialises index writes (the state lock is held only to snapshot).
    index_lock: Mutex<()>,
    /// Fetch threads `get_all` has started (for tests and diagnostics).
    threads_spawned: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) `options.cache_dir`; uses `module_expiry` and `purge_interval` too.
    pub fn open(options: &Options, fetcher: Fetcher, metrics: Arc<Metrics>) -> io::Result<Store> {
        Store::open_with(options, Box::new(fetcher), metrics)
    }

    /// Opens the store with any fetcher (tests use an in-process one).
    pub(crate) fn open_with(
        options: &Options,
        fetcher: Box<dyn ModuleFetcher>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Store> {
        create_private_dir(&options.cache_dir)?;
        let dir = fs::canonicalize(&options.cache_dir)?;
        if dir.to_str().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cache directory {} is not valid UTF-8", dir.display()),
            ));
        }
        let modules_dir = dir.join(MODULES_DIR);
        create_private_dir(&modules_dir)?;
        remove_stale_temp_files(&dir);
        remove_stale_temp_files(&modules_dir);

        let state = load_state(&dir, &modules_dir);
        metrics.set_cache_entries(state.entry_count());
        Ok(Store {
            locks_dir: dir.join(LOCKS_DIR),
            dir,
            modules_dir,
            module_expiry: options.module_expiry,
            purge_interval: options.purge_interval,
            next_purge: Mutex::new(Instant::now().checked_add(options.purge_interval)),
            fetcher,
            metrics,
            state: Mutex::new(state),
            index_lock: Mutex::new(()),
            threads_spawned: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn module_path(&self, sha: &str) -> PathBuf {
        self.modules_dir.join(format!("{sha}.wasm"))
    }

    /// How many fetch threads `get_all` has started so far.
    #[cfg(test)]
    fn threads_spawned(&self) -> u64 {
        self.threads_spawned.load(Ordering::Relaxed)
    }

    /// What a conversion asks the store through: answers requests, and keeps the modules it answered with
    /// from being purged until it is dropped ([`Pins`]).
    pub fn pinning(&self) -> Pins<'_> {
        Pins { store: self, held: Mutex::new(Vec::new()) }
    }

    /// Answers one request and releases its pin at once (tests).
    #[cfg(test)]
    fn get(&self, req: &ModuleRequest) -> Result<Module, ModuleError> {
        self.pinning().get(req)
    }

    /// The in-memory part of answering a request, as Istio's `Get` (`pkg/wasm/cache.go`) does: a hit is
    /// answered (touched, pinned, counted) at once; otherwise the request joins or leads a flight (one
    /// download per module however many ask at once), to be completed by [`Store::finish`]. Never blocks
    /// beyond the state lock.
    ///
    /// The checksum of an `oci://` request is its image's manifest digest (the config's `sha256`, else the
    /// digest of an `@sha256:` URL), found through the manifest map; the checksum of any other request is
    /// the module's own sha256.
    fn lookup<'a>(&'a self, req: &'a ModuleRequest, pins: &Pins<'_>) -> Lookup<'a> {
        let checksum: Option<Cow<'a, str>> = match req.sha256.as_deref() {
            None | Some("") | Some("nil") => None,
            Some(s) if s.bytes().any(|b| b.is_ascii_uppercase()) => Some(Cow::Owned(s.to_ascii_lowercase())),
            Some(s) => Some(Cow::Borrowed(s)),
        };
        let (expected, manifest) = if is_oci_url(&req.url) {
            (None, checksum.or_else(|| url_manifest_digest(&req.url).map(Cow::Borrowed)))
        } else {
            (checksum, None)
        };
        let ignore_rv = ignore_resource_version(req.pull_policy, &req.url);
        let mut guard = self.state();
        let st = &mut *guard;
        let candidate = match (&expected, &manifest) {
            (None, None) => st.urls.lookup_url(req, ignore_rv),
            _ => None,
        };
        let by_manifest = manifest.as_deref().and_then(|m| st.manifests.get(m).cloned());
        let key = expected.as_deref().or(by_manifest.as_deref()).or(candidate.as_deref());
        if let Some(module) = key.and_then(|k| st.take(k, pins)) {
            st.urls.refresh_url(req, &module.sha256);
            drop(guard);
            self.metrics.record_lookup(true);
            return Lookup::Hit(module);
        }
        let fkey = match (&manifest, &expected) {
            (Some(m), _) => FlightKey::Manifest(m.to_string()),
            (None, Some(e)) => FlightKey::Sha(e.to_string()),
            (None, None) => FlightKey::Url(req.url.clone()),
        };
        let (flight, leader) = flight::join(self, &mut st.flights, fkey.clone());
        drop(guard);
        let missed_at = SystemTime::now();
        Lookup::Miss(Pending { flight, leader, key: fkey, missed_at, expected, manifest, candidate })
    }

    /// The rest of answering a request that missed: lead the flight (reuse from disk or download) or follow
    /// it. The request's deadline (`timeout`) starts now, when this work starts, not when it was looked up.
    fn finish(&self, req: &ModuleRequest, pending: Pending<'_>, pins: &Pins<'_>) -> Result<Module, ModuleError> {
        let deadline = Instant::now().checked_add(req.timeout).unwrap_or_else(far_future);
        let Pending { flight, leader, key, missed_at, expected, manifest, candidate } = pending;
        match leader {
            Some(mut guard) => {
                let known = Known { expected: expected.as_deref(), manifest: manifest.as_deref(), candidate };
                let outcome = self.resolve(req, &key, known, missed_at, deadline, pins);
                guard.publish(outcome.clone());
                outcome.result
            }
            None => self.follow(&flight, req, deadline, pins),
        }
    }

    /// Waits for the leader of `flight`, bounded by this request's own deadline.
    fn follow(
        &self,
        flight: &Flight,
        req: &ModuleRequest,
        deadline: Instant,
        pins: &Pins<'_>,
    ) -> Result<Module, ModuleError> {
        let Some(outcome) = flight.wait(deadline) else {
            self.metrics.record_lookup(false);
            return Err(ModuleError {
                counted_as: None,
                message: format!("timed out after {:?} waiting for a concurrent fetch of the module", req.timeout),
            });
        };
        self.metrics.record_lookup(!outcome.fetched);
        let module = outcome.result?;
        let mut st = self.state();
        if st.take(&module.sha256, pins).is_none() {
            // Purged since the leader used it: possible only when this thread woke up later than the expiry.
            return Err(ModuleError {
                counted_as: None,
                message: format!("module {} expired and was purged while this request waited for it", module.sha256),
            });
        }
        st.urls.refresh_url(req, &module.sha256);
        Ok(module)
    }

    /// The leader's work: reuse a known module (verifying it first if needed), else download, once across
    /// the processes sharing the directory ([`download_lock`]).
    fn resolve(
        &self,
        req: &ModuleRequest,
        key: &FlightKey,
        known: Known<'_>,
        missed_at: SystemTime,
        deadline: Instant,
        pins: &Pins<'_>,
    ) -> Outcome {
        let Known { expected, manifest, candidate } = known;
        let known = match (manifest, expected) {
            (Some(m), _) => self.state().manifests.get(m).cloned(),
            (None, Some(e)) => is_sha256_hex(e).then(|| Arc::from(e)),
            (None, None) => candidate,
        };
        if let Some(sha) = known {
            if let Some(module) = self.load_existing(&sha, pins) {
                self.state().urls.refresh_url(req, &module.sha256);
                self.metrics.record_lookup(true);
                return Outcome { result: Ok(module), fetched: false };
            }
        }
        self.metrics.record_lookup(false);
        let lock = match DownloadLock::acquire(&self.locks_dir, key, deadline) {
            Ok(lock) => Some(lock),
            Err(LockError::TimedOut) => {
                let message =
                    format!("timed out after {:?} waiting for another process's download of the module", req.timeout);
                return Outcome { result: Err(ModuleError { counted_as: None, message }), fetched: true };
            }
            Err(LockError::Unusable(why)) => {
                log::warn!("{why}; downloading without coordinating with other processes");
                None
            }
        };
        if let Some(lock) = &lock {
            if let Some(module) = self.stored_by_neighbour(req, key, lock, missed_at, pins) {
                return Outcome { result: Ok(module), fetched: true };
            }
            if let Err(e) = lock.clear() {
                log::warn!("cannot empty a download lock file in {}: {e}", self.locks_dir.display());
            }
        }
        let result = if is_oci_url(&req.url) {
            self.fetch_image_and_install(req, manifest, deadline, pins).map(|(module, digest)| (module, Some(digest)))
        } else {
            self.fetch_and_install(req, expected, deadline, pins).map(|module| (module, None))
        };
        if let (Some(lock), Ok((module, manifest))) = (&lock, &result) {
            let recorded = Recorded { sha256: module.sha256.to_string(), manifest: manifest.clone() };
            if let Err(e) = lock.record(&recorded) {
                log::warn!("cannot write a download lock file in {}: {e}", self.locks_dir.display());
            }
        }
        Outcome { result: result.map(|(module, _)| module), fetched: true }
    }

    /// The module a neighbouring process stored for `key` while this one waited for the download lock (or,
    /// as good as waiting, since this request missed): read from the lock file, verified from disk, and then
    /// known here as if downloaded here. Counted as the miss it was, and not as a remote fetch (nothing was
    /// downloaded here). A record about a module sha256 or a manifest digest cannot go stale, so it is used
    /// whenever it verifies; one about a URL only when it is that recent, as a URL's module may change.
    fn stored_by_neighbour(
        &self,
        req: &ModuleRequest,
        key: &FlightKey,
        lock: &DownloadLock,
        missed_at: SystemTime,
        pins: &Pins<'_>,
    ) -> Option<Module> {
        if matches!(key, FlightKey::Url(_)) && !lock.waited && !lock.written_since(missed_at) {
            return None;
        }
        let recorded = lock.recorded()?;
        let fits = match key {
            FlightKey::Sha(want) => recorded.sha256 == *want,
            FlightKey::Manifest(want) => recorded.manifest.as_deref() == Some(want.as_str()),
            FlightKey::Url(_) => recorded.manifest.is_some() == is_oci_url(&req.url),
        };
        if !fits {
            return None;
        }
        let module = self.load_existing(&recorded.sha256, pins)?;
        log::info!("module {} from {} was stored by another process", module.sha256, req.url);
        {
            let mut st = self.state();
            if let Some(digest) = recorded.manifest {
                st.manifests.insert(digest, module.sha256.clone());
            }
            st.urls.refresh_url(req, &module.sha256);
        }
        if let Err(e) = self.write_index() {
            log::warn!("cannot write the module index in {}: {e}", self.dir.display());
        }
        Some(module)
    }

    /// A module already in memory, or on disk and verified now. A file that fails verification is deleted.
    fn load_existing(&self, sha: &str, pins: &Pins<'_>) -> Option<Module> {
        {
            let mut st = self.state();
            if let Some(module) = st.take(sha, pins) {
                return Some(module);
            }
            st.pending.remove(sha);
        }
        let path = self.module_path(sha);
        match open_verified(&path, sha) {
            Ok(file) => Some(self.insert_verified(sha, file, pins)),
            Err(e @ (Verify::Gone | Verify::NotRegular(_))) => {
                if let Verify::NotRegular(what) = e {
                    // Not a module: fetched again, and the download replaces it (see `persist_module`).
                    log::warn!("module file {} is {what}, not a regular file", path.display());
                }
                let mut st = self.state();
                st.forget(sha);
                self.metrics.set_cache_entries(st.entry_count());
                None
            }
            Err(Verify::Mismatch(actual, file)) => {
                log::warn!("module file {} is corrupt (its sha256 is {actual}); deleting it", path.display());
                delete_module_file(&path, Some(file));
                let mut st = self.state();
                st.forget(sha);
                self.metrics.set_cache_entries(st.entry_count());
                None
            }
            Err(Verify::Io(e)) => {
                log::warn!("cannot read module file {}: {e}", path.display());
                None
            }
        }
    }

    /// Counts a failed fetch (if it counts) and returns it as the request's error.
    fn failed<T>(&self, counted_as: Option<FetchResult>, message: String) -> Result<T, ModuleError> {
        if let Some(result) = counted_as {
            self.metrics.record_fetch(result);
        }
        Err(ModuleError { counted_as, message })
    }

    /// Downloads an `http(s)` module and stores it.
    fn fetch_and_install(
        &self,
        req: &ModuleRequest,
        expected: Option<&str>,
        deadline: Instant,
        pins: &Pins<'_>,
    ) -> Result<Module, ModuleError> {
        let downloaded = match self.fetcher.fetch(&req.url, deadline, &self.dir) {
            Ok(d) => d,
            Err(e) => return self.failed(e.counted_as(), e.message),
        };
        let actual = downloaded.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&actual) {
            return self
                .failed(Some(FetchResult::DownloadFailure), format!("fetcher reported an invalid sha256 {actual:?}"));
        }
        match expected {
            Some(want) => {
                if want != actual {
                    return self.failed(
                        Some(FetchResult::ChecksumMismatched),
                        format!("checksum mismatch: want {want}, got {actual}"),
                    );
                }
            }
            None => {
                // As Istio's `Get` (`pkg/wasm/cache.go`): look up again with the downloaded checksum. A hit
                // is served as it is and not counted as a remote fetch.
                let mut st = self.state();
                if let Some(module) = st.take(&actual, pins) {
                    st.urls.refresh_url(req, &module.sha256);
                    drop(st);
                    self.metrics.record_lookup(true);
                    return Ok(module);
                }
                drop(st);
                self.metrics.record_lookup(false);
            }
        }
        self.store_download(req, downloaded, &actual, None, pins)
    }

    /// Fetches the module of an `oci://` image, as Istio's `Get` (`pkg/wasm/cache.go`) with its image
    /// fetcher: the manifest is resolved first, and when its digest names a module the store has (Istio's
    /// second lookup, here the fetcher's `known` question) no layer is fetched.
    fn fetch_image_and_install(
        &self,
        req: &ModuleRequest,
        manifest: Option<&str>,
        deadline: Instant,
        pins: &Pins<'_>,
    ) -> Result<(Module, String), ModuleError> {
        let image =
            ImageRequest { url: &req.url, pull_secret: req.pull_secret.as_deref(), expected_manifest: manifest };
        // The module a known digest names, loaded (and pinned) when the fetcher asks, so that it is the one
        // served even if a purge comes before the fetcher returns.
        let mut found: Option<Module> = None;
        let mut known = |digest: &str| -> bool {
            let sha = self.state().manifests.get(digest).cloned();
            found = sha.and_then(|sha| self.load_existing(&sha, pins));
            found.is_some()
        };
        let fetched = self.fetcher.fetch_image(&image, deadline, &self.dir, &mut known);
        let (digest, downloaded) = match fetched {
            Err(e) => return self.failed(e.counted_as(), e.message),
            Ok(ImageFetched::Known { manifest_digest }) => {
                let Some(module) = found else {
                    return self
                        .failed(None, format!("internal error: the store does not know manifest {manifest_digest}"));
                };
                self.state().urls.refresh_url(req, &module.sha256);
                self.metrics.record_lookup(true);
                return Ok((module, manifest_digest));
            }
            Ok(ImageFetched::Downloaded { manifest_digest, module }) => (manifest_digest, module),
        };
        if let Some(want) = manifest {
            if want != digest {
                // The fetcher checks this before any layer; checked again because the store records it.
                return self.failed(
                    Some(FetchResult::ChecksumMismatched),
                    format!("module downloaded from {} has checksum {digest}, which does not match: {want}", req.url),
                );
            }
        } else {
            // Istio's second lookup, by the manifest digest: it missed (`known` said no).
            self.metrics.record_lookup(false);
        }
        let actual = downloaded.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&actual) || !is_sha256_hex(&digest) {
            return self.failed(
                Some(FetchResult::DownloadFailure),
                format!("fetcher reported an invalid sha256 {actual:?} or manifest digest {digest:?}"),
            );
        }
        self.store_download(req, downloaded, &actual, Some(&digest), pins).map(|module| (module, digest))
    }

    /// Stores a verified download whose module sha256 is `actual` (the image's manifest digest `manifest`
    /// for an OCI module), counts the fetch a success and writes the index.
    fn store_download(
        &self,
        req: &ModuleRequest,
        downloaded: Downloaded,
        actual: &str,
        manifest: Option<&str>,
        pins: &Pins<'_>,
    ) -> Result<Module, ModuleError> {
        if !downloaded.is_wasm {
            // Istio's reason, and why it was not unpacked when it looked like an archive.
            let mut reason = format!("fetched Wasm binary from {} is invalid", req.url);
            if let Some(why) = &downloaded.not_unpacked {
                reason.push_str(&format!(" ({why})"));
            }
            return self.failed(Some(FetchResult::FetchFailure), reason);
        }
        let size = downloaded.len;
        // Another image (or URL) may have brought the same module: then the download is not stored again.
        let served = self.state().take(actual, pins);
        let module = match served {
            Some(module) => module,
            None => match self.install(downloaded.file, actual, pins) {
                Ok(module) => module,
                Err(e) => {
                    return self.failed(Some(FetchResult::DownloadFailure), format!("cannot store the module: {e}"))
                }
            },
        };
        log::info!("stored module {} ({size} bytes) from {}", module.sha256, req.url);
        self.metrics.record_fetch(FetchResult::Success);
        {
            let mut st = self.state();
            if let Some(digest) = manifest {
                st.manifests.insert(digest.to_owned(), module.sha256.clone());
            }
            st.urls.refresh_url(req, &module.sha256);
        }
        if let Err(e) = self.write_index() {
            log::warn!("cannot write the module index in {}: {e}", self.dir.display());
        }
        Ok(module)
    }

    /// Puts a complete download in place (see [`persist_module`]) and serves it from now on.
    fn install(&self, file: tempfile::NamedTempFile, sha: &str, pins: &Pins<'_>) -> io::Result<Module> {
        let file = persist_module(file, &self.module_path(sha), sha)?;
        Ok(self.insert_verified(sha, file, pins))
    }

    fn insert_verified(&self, sha: &str, lock: File, pins: &Pins<'_>) -> Module {
        let mut st = self.state();
        if let Some(module) = st.take(sha, pins) {
            return module;
        }
        let sha: Arc<str> = Arc::from(sha);
        let path: Arc<str> = Arc::from(self.module_path(&sha).to_str().unwrap_or_default());
        let module = Module { path, sha256: sha.clone() };
        st.pending.remove(&sha);
        st.modules
            .insert(sha.clone(), Arc::new(Entry { module: module.clone(), last_used: AtomicU64::new(now_ms()), lock }));
        pins.pin(&mut st, &sha);
        self.metrics.set_cache_entries(st.entry_count());
        module
    }

    /// The latest converted state-of-the-world response references exactly these modules.
    pub fn set_sotw_in_use(&self, modules: ModuleList) {
        self.state().sotw_in_use = modules;
    }

    /// A converted delta response: `resources` were added or updated (with their module, if any), `removed`
    /// are gone.
    pub fn update_delta_in_use(&self, resources: Vec<(String, Option<Arc<str>>)>, removed: &[String]) {
        let mut st = self.state();
        for (name, module) in resources {
            match module {
                Some(sha) => {
                    st.delta_in_use.insert(name, sha);
                }
                None => {
                    st.delta_in_use.remove(&name);
                }
            }
        }
        for name in removed {
            st.delta_in_use.remove(name);
        }
    }

    /// Purges when `purge_interval` has passed since open or the last purge. Istio purges on a ticker
    /// (`pkg/wasm/cache.go`); this library has no thread of its own, so every convert call asks. Returns
    /// whether it purged.
    pub fn purge_if_due(&self) -> bool {
        let mut next = self.next_purge.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if next.is_none_or(|due| now < due) {
            return false;
        }
        // Set before purging, so that concurrent callers do not purge too.
        *next = now.checked_add(self.purge_interval);
        drop(next);
        if let Err(e) = self.purge() {
            log::warn!("purging the module cache in {} failed: {e}", self.dir.display());
        }
        true
    }

    /// Deletes modules unused for longer than the expiry that neither the latest ECDS state references nor a
    /// conversion in progress was answered with ([`Pins`]). Returns how many module files were deleted. A
    /// file another process holds stays on disk (this process forgets it). Writes the index (with the current
    /// last-use times).
    pub fn purge(&self) -> io::Result<usize> {
        let now = now_ms();
        let expiry = duration_ms(self.module_expiry);
        let expired = |last: u64| now.saturating_sub(last) > expiry;
        let mut victims: Vec<(Arc<str>, Option<File>)> = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let mut protected: HashSet<&str> = st.sotw_in_use.iter().map(|s| &**s).collect();
            protected.extend(st.delta_in_use.values().map(|s| &**s));
            protected.extend(st.pinned.keys().map(|s| &**s));
            let dead_modules: Vec<Arc<str>> = st
                .modules
                .iter()
                .filter(|(sha, e)| expired(e.last_used.load(Ordering::Relaxed)) && !protected.contains(&***sha))
                .map(|(sha, _)| sha.clone())
                .collect();
            let dead_pending: Vec<Arc<str>> = st
                .pending
                .iter()
                .filter(|(sha, last)| expired(**last) && !protected.contains(&***sha))
                .map(|(sha, _)| sha.clone())
                .collect();
            for sha in dead_modules {
                if let Some(entry) = st.modules.remove(&sha) {
                    // The last Arc is ours unless a caller is mid-hit; then the lock is released when it is done.
                    let lock = Arc::try_unwrap(entry).ok().map(|e| e.lock);
                    victims.push((sha, lock));
                }
            }
            for sha in dead_pending {
                st.pending.remove(&sha);
                victims.push((sha, None));
            }
            for (sha, _) in &victims {
                st.forget(sha);
            }
            self.metrics.set_cache_entries(st.entry_count());
        }
        let mut deleted = 0;
        for (sha, lock) in victims {
            if delete_module_file(&self.module_path(&sha), lock) {
                deleted += 1;
            }
        }
        self.write_index()?;
        Ok(deleted)
    }

    /// Writes the index (see [`IndexFile::write`]); one writer at a time, the state locked only to copy it.
    fn write_index(&self) -> io::Result<()> {
        let _serial = self.index_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let index = IndexFile::of(&self.state());
        index.write(&self.dir)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Persist the last-use times that hits updated only in memory.
        if let Err(e) = self.write_index() {
            log::warn!("cannot write the module index in {}: {e}", self.dir.display());
        }
    }
}

/// At most this many threads (the caller's included) fetch the misses of one `get_all` call: more distinct
/// remote modules than a response has in practice (one per WasmPlugin), and a bound on the threads — and the
/// memory, ~100 KiB of buffers and stack touched per download in flight — a response can make a conversion
/// use. At 256, the benchmarks' largest response (200 distinct modules) grew the process by 23–53 MiB; at
/// 32, by 9–12 MiB, within the 16 MiB memory target, and faster on two cores.
const MAX_FETCH_THREADS: usize = 32;

/// The misses of one group of identical requests: the first one's pending lookup, then the rest of the group.
struct Job<'a> {
    group: &'a [usize],
    pending: Pending<'a>,
}

impl Store {
    /// Answers every request of one conversion, pinning each module for `pins`; result `i` answers request
    /// `i`. Every request is first answered from the in-memory index on the caller's thread (hits cost no
    /// thread). Identical modules (same sha256, or same URL without one) are answered in request order by one
    /// thread. Every distinct module that misses is fetched at once, as Istio starts one goroutine per
    /// resource (`pkg/wasm/convert.go`), so that no module waits behind a stalled one and each deadline starts
    /// when its own fetch starts: one thread per miss, the caller's thread taking one and scoped threads (all
    /// ended before this returns) the others, up to [`MAX_FETCH_THREADS`]; misses past that are fetched by
    /// those threads as they free up.
    fn get_all(&self, requests: &[ModuleRequest], pins: &Pins<'_>) -> Vec<Result<Module, ModuleError>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        // Keyed as the flights are: by URL, module sha256 or (OCI) manifest digest.
        let mut by_key: HashMap<(u8, &str), usize> = HashMap::new();
        for (i, req) in requests.iter().enumerate() {
            let key = match req.sha256.as_deref() {
                None | Some("") | Some("nil") => (0, req.url.as_str()),
                Some(s) if is_oci_url(&req.url) => (2, s),
                Some(s) => (1, s),
            };
            let g = *by_key.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let mut results: Vec<Option<Result<Module, ModuleError>>> = vec![None; requests.len()];
        let mut jobs = Vec::new();
        for group in &groups {
            for (n, &i) in group.iter().enumerate() {
                match self.lookup(&requests[i], pins) {
                    Lookup::Hit(module) => results[i] = Some(Ok(module)),
                    Lookup::Miss(pending) => {
                        jobs.push(Job { group: &group[n..], pending });
                        break;
                    }
                }
            }
        }
        let threads = jobs.len().min(MAX_FETCH_THREADS);
        let queue = Mutex::new(jobs.into_iter());
        let work = || -> Vec<(usize, Result<Module, ModuleError>)> {
            let mut done = Vec::new();
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(Job { group, pending }) = next else { break };
                done.push((group[0], self.finish(&requests[group[0]], pending, pins)));
                for &i in &group[1..] {
                    done.push((i, pins.get(&requests[i])));
                }
            }
            done
        };
        let done = if threads <= 1 {
            work()
        } else {
            std::thread::scope(|scope| {
                let mut handles = Vec::with_capacity(threads - 1);
                for _ in 1..threads {
                    match std::thread::Builder::new().name("wasm-ecds-fetch".into()).spawn_scoped(scope, work) {
                        Ok(h) => {
                            self.threads_spawned.fetch_add(1, Ordering::Relaxed);
                            handles.push(h);
                        }
                        Err(e) => {
                            log::warn!("cannot start a fetch thread ({e}); the running ones fetch the rest");
                            break;
                        }
                    }
                }
                let mut done = work();
                for h in handles {
                    match h.join() {
                        Ok(theirs) => done.extend(theirs),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                done
            })
        };
        for (i, r) in done {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ModuleError { counted_as: None, message: "internal error: no result".into() }))
            })
            .collect()
    }
}

/// What a leader knows of the module it is to resolve (see [`Pending`]).
struct Known<'a> {
    expected: Option<&'a str>,
    manifest: Option<&'a str>,
    candidate: Option<Arc<str>>,
}

/// What [`Store::lookup`] found.
enum Lookup<'a> {
    Hit(Module),
    Miss(Pending<'a>),
}

/// A request that missed the in-memory index: the flight it leads (with the guard that completes it even if
/// the work is never done) or follows.
struct Pending<'a> {
    flight: Arc<Flight>,
    leader: Option<FlightGuard<'a>>,
    key: FlightKey,
    /// When it missed: a neighbour's download recorded since then is as good as one waited for.
    missed_at: SystemTime,
    /// The content sha256 a non-OCI request names.
    expected: Option<Cow<'a, str>>,
    /// The manifest digest an OCI request names.
    manifest: Option<Cow<'a, str>>,
    candidate: Option<Arc<str>>,
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn system_time_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(duration_ms).unwrap_or(0)
}

fn now_ms() -> u64 {
    system_time_ms(SystemTime::now())
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use files::sha256_hex;
    use fixture::{fixture, fixture_with, lookups, req, req_sha, wasm};

    #[test]
    fn miss_then_hit_counts_and_content_addressed_path() {
        let f = fixture();
        let body = wasm("a");
        f.fetcher.serve("http://x/a.wasm", &body);
        let m = f.store().get(&req_sha("http://x/a.wasm", &sha256_hex(&body))).unwrap();
        assert_eq!(&*m.sha256, sha256_hex(&body));
        let canonical = fs::canonicalize(f.cache_dir()).unwrap();
        assert_eq!(Path::new(&*m.path), canonical.join("modules").join(format!("{}.wasm", m.sha256)));
        assert!(Path::new(&*m.path).is_absolute());
        assert_eq!(fs::read(&*m.path).unwrap(), body);
        assert_eq!(lookups(&f.metrics), (0, 1));
        assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
        assert_eq!(f.metrics.cache_entries(), 1);

        let again = f.store().get(&req_sha("http://x/a.wasm", &sha256_hex(&body))).unwrap();
        assert_eq!(again, m);
        assert_eq!(lookups(&f.metrics), (1, 1));
        assert_eq!(f.fetcher.calls(), 1);
        assert!(f.temp_files().is_empty());
    }

    #[test]
    fn checksum_less_miss_counts_two_lookups() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        f.store().get(&req("http://x/a.wasm")).unwrap();
        assert_eq!(lookups(&f.metrics), (0, 2));
        f.store().get(&req("http://x/a.wasm")).unwrap();
        assert_eq!(lookups(&f.metrics), (1, 2));
        assert_eq!(f.fetcher.calls(), 1);
    }

    #[test]
    fn sha_given_is_served_whatever_url_names_it() {
        let f = fixture();
        let body = wasm("a");
        let sha = sha256_hex(&body);
        f.fetcher.serve("http://x/a.wasm", &body);
        let a = f.store().get(&req_sha("http://x/a.wasm", &sha)).unwrap();
        let b = f.store().get(&req_sha("http://mirror/other.wasm", &sha)).unwrap();
        assert_eq!(a, b);
        assert_eq!(f.fetcher.calls(), 1);
        // Upper-case checksums are the same module.
        let c = f.store().get(&req_sha("http://y/z", &sha.to_ascii_uppercase())).unwrap();
        assert_eq!(a, c);
        assert_eq!(f.fetcher.calls(), 1);
    }

    #[test]
    fn same_content_under_two_urls_is_one_file() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        f.fetcher.serve("http://y/a.wasm", &wasm("a"));
        let a = f.store().get(&req("http://x/a.wasm")).unwrap();
        let b = f.store().get(&req("http://y/a.wasm")).unwrap();
        assert_eq!(a, b);
        // The second URL downloaded, found the checksum in the store (second lookup hit): no success count.
        assert_eq!(f.fetcher.calls(), 2);
        assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
        assert_eq!(lookups(&f.metrics), (1, 3));
        assert_eq!(f.metrics.cache_entries(), 1);
    }

    #[test]
    fn checksum_mismatch_counts_and_leaves_nothing() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let want = sha256_hex(b"something else");
        let err = f.store().get(&req_sha("http://x/a.wasm", &want)).unwrap_err();
        assert_eq!(err.counted_as, Some(FetchResult::ChecksumMismatched));
        assert_eq!(err.message, format!("checksum mismatch: want {want}, got {}", sha256_hex(&wasm("a"))));
        assert_eq!(f.metrics.fetches(FetchResult::ChecksumMismatched), 1);
        assert_eq!(f.metrics.fetches(FetchResult::Success), 0);
        assert_eq!(f.metrics.cache_entries(), 0);
        assert!(f.temp_files().is_empty());
        assert_eq!(fs::read_dir(f.cache_dir().join(MODULES_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn malformed_checksum_never_reaches_a_path() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        for bad in ["../../etc/passwd", "abc", &"g".repeat(64)] {
            let err = f.store().get(&req_sha("http://x/a.wasm", bad)).unwrap_err();
            assert_eq!(err.counted_as, Some(FetchResult::ChecksumMismatched), "{bad}");
        }
        assert_eq!(f.fetcher.calls(), 3);
    }

    #[test]
    fn invalid_wasm_counts_fetch_failure() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", b"<html>not wasm</html>");
        let err = f.store().get(&req("http://x/a.wasm")).unwrap_err();
        assert_eq!(err.counted_as, Some(FetchResult::FetchFailure));
        assert_eq!(err.message, "fetched Wasm binary from http://x/a.wasm is invalid");
        assert_eq!(f.metrics.fetches(FetchResult::FetchFailure), 1);
        assert!(f.temp_files().is_empty());
        assert_eq!(f.metrics.cache_entries(), 0);
    }

    #[test]
    fn download_failure_is_counted_once() {
        let f = fixture();
        let err = f.store().get(&req("http://x/missing.wasm")).unwrap_err();
        assert_eq!(err.counted_as, Some(FetchResult::DownloadFailure));
        assert!(err.message.contains("404"));
        assert_eq!(f.metrics.fetches(FetchResult::DownloadFailure), 1);
        assert!(f.temp_files().is_empty());
    }

    #[test]
    fn purge_deletes_expired_modules_except_those_in_use() {
        let f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
        let mut mods = Vec::new();
        for name in ["a", "b", "c", "d"] {
            let url = format!("http://x/{name}.wasm");
            f.fetcher.serve(&url, &wasm(name));
            mods.push(f.store().get(&req(&url)).unwrap());
        }
        assert_eq!(f.metrics.cache_entries(), 4);
        f.store().set_sotw_in_use(vec![mods[0].sha256.clone()].into());
        f.store().update_delta_in_use(
            vec![("r1".into(), Some(mods[1].sha256.clone())), ("r2".into(), Some(mods[2].sha256.clone()))],
            &[],
        );
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.store().purge().unwrap(), 1);
        assert!(!Path::new(&*mods[3].path).exists());
        assert_eq!(f.metrics.cache_entries(), 3);

        // r1 cleared by an update without module, r2 removed: only the SotW module stays protected.
        f.store().update_delta_in_use(vec![("r1".into(), None)], &["r2".to_string()]);
        assert_eq!(f.store().purge().unwrap(), 2);
        assert!(Path::new(&*mods[0].path).exists());
        assert!(!Path::new(&*mods[1].path).exists());
        assert_eq!(f.metrics.cache_entries(), 1);

        // Its URL-map entry went with it: the next request downloads again.
        let calls = f.fetcher.calls();
        f.store().get(&req("http://x/b.wasm")).unwrap();
        assert_eq!(f.fetcher.calls(), calls + 1);

        f.store().set_sotw_in_use(Vec::new().into());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.store().purge().unwrap(), 2);
        assert_eq!(f.metrics.cache_entries(), 0);
    }

    #[test]
    fn purge_spares_modules_a_conversion_in_progress_was_answered_with() {
        let f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
        for name in ["a", "b"] {
            f.fetcher.serve(&format!("http://x/{name}.wasm"), &wasm(name));
        }
        let pins = f.store().pinning();
        let a = pins.get(&req("http://x/a.wasm")).unwrap(); // fetched
        assert_eq!(pins.get(&req("http://x/a.wasm")).unwrap(), a); // hit
        let b = f.store().get(&req("http://x/b.wasm")).unwrap(); // another conversion, over
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.store().purge().unwrap(), 1);
        assert!(Path::new(&*a.path).exists(), "pinned, yet purged");
        assert!(!Path::new(&*b.path).exists());
        drop(pins);
        assert!(f.store().state().pinned.is_empty());
        assert_eq!(f.store().purge().unwrap(), 1);
        assert!(!Path::new(&*a.path).exists());

        // A conversion that panics releases its pins too.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let pins = f.store().pinning();
            pins.get(&req("http://x/a.wasm")).unwrap();
            assert_eq!(f.store().state().pinned.len(), 1);
            panic!("a bug in the conversion");
        }));
        assert!(panicked.is_err());
        assert!(f.store().state().pinned.is_empty());
    }

    #[test]
    fn a_new_sotw_in_use_list_replaces_the_old_one() {
        let f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
        let mut mods = Vec::new();
        for name in ["a", "b"] {
            let url = format!("http://x/{name}.wasm");
            f.fetcher.serve(&url, &wasm(name));
            mods.push(f.store().get(&req(&url)).unwrap());
        }
        let first: ModuleList = vec![mods[0].sha256.clone()].into();
        f.store().set_sotw_in_use(first.clone());
        f.store().set_sotw_in_use(vec![mods[1].sha256.clone()].into());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(f.store().purge().unwrap(), 1);
        assert!(!Path::new(&*mods[0].path).exists());
        assert!(Path::new(&*mods[1].path).exists());
        // The first list again: the second module is no longer in use.
        f.store().set_sotw_in_use(first);
        assert_eq!(f.store().purge().unwrap(), 1);
        assert!(!Path::new(&*mods[1].path).exists());
    }

    #[test]
    fn hit_path_does_not_touch_the_disk() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        // Nothing but this process's own purge deletes a file it serves (the shared lock keeps
        // neighbours off), so a hit trusts memory: removing the file behind its back goes unnoticed.
        fs::remove_file(&*m.path).unwrap();
        assert_eq!(f.store().get(&req("http://x/a.wasm")).unwrap(), m);
        assert_eq!(f.fetcher.calls(), 1);
    }

    #[test]
    fn purge_keeps_fresh_modules() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        assert_eq!(f.store().purge().unwrap(), 0);
        assert!(Path::new(&*m.path).exists());
    }

    #[test]
    fn purge_if_due_respects_the_interval() {
        let f = fixture_with(Duration::ZERO, Duration::from_millis(300));
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!f.store().purge_if_due());
        assert!(Path::new(&*m.path).exists(), "purged before the interval passed");
        std::thread::sleep(Duration::from_millis(350));
        assert!(f.store().purge_if_due());
        assert!(!Path::new(&*m.path).exists(), "not purged after the interval");
        // The next one is again an interval away.
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!f.store().purge_if_due());
        assert!(Path::new(&*m.path).exists());
    }

    #[test]
    fn get_all_fetches_distinct_modules_concurrently() {
        let f = fixture();
        f.fetcher.set_delay(Duration::from_millis(200));
        let mut requests = Vec::new();
        for i in 0..8 {
            let url = format!("http://x/{i}.wasm");
            f.fetcher.serve(&url, &wasm(&i.to_string()));
            requests.push(req(&url));
        }
        // Duplicates (same URL for another resource) are answered without another download.
        requests.push(ModuleRequest { resource_name: "dup".into(), ..req("http://x/3.wasm") });
        let results = f.store().pinning().get_all(&requests);
        assert_eq!(results.len(), 9);
        for (i, r) in results.iter().enumerate().take(8) {
            assert_eq!(&*r.as_ref().unwrap().sha256, sha256_hex(&wasm(&i.to_string())));
        }
        assert_eq!(results[8], results[3]);
        assert_eq!(f.fetcher.calls(), 8);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) >= 2);
        assert_eq!(f.metrics.cache_entries(), 8);
        assert!(f.store().pinning().get_all(&[]).is_empty());
    }

    #[test]
    fn get_all_answers_hits_without_threads_and_fetches_every_miss_at_once() {
        let f = fixture();
        let mut requests = Vec::new();
        for i in 0..20 {
            let url = format!("http://x/{i}.wasm");
            f.fetcher.serve(&url, &wasm(&i.to_string()));
            requests.push(req(&url));
        }
        // cold: 20 distinct misses, one thread each (19 besides the caller)
        f.fetcher.set_delay(Duration::from_millis(50));
        let results = f.store().pinning().get_all(&requests);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 20);
        assert_eq!(f.store().threads_spawned(), 19);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) <= 20);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) >= 2);
        // all hits: answered on the caller's thread, counted as hits, no thread started
        let before = lookups(&f.metrics);
        let again = f.store().pinning().get_all(&requests);
        assert_eq!(again, results);
        assert_eq!(f.store().threads_spawned(), 19);
        assert_eq!(lookups(&f.metrics), (before.0 + 20, before.1));
        // one miss among hits: resolved inline, still no thread
        let url = "http://x/new.wasm";
        f.fetcher.serve(url, &wasm("new"));
        requests.push(req(url));
        let results = f.store().pinning().get_all(&requests);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 21);
        assert_eq!(f.store().threads_spawned(), 19);
        // two misses: one thread besides the caller
        for name in ["a", "b"] {
            let url = format!("http://x/{name}.wasm");
            f.fetcher.serve(&url, &wasm(name));
            requests.push(req(&url));
        }
        assert!(f.store().pinning().get_all(&requests).iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 23);
        assert_eq!(f.store().threads_spawned(), 20);
    }

    #[test]
    fn get_all_caps_its_threads_and_starts_each_deadline_with_its_fetch() {
        let f = fixture();
        let timeout = Duration::from_secs(1);
        // Not served (404): nothing is stored, so the test costs no fsyncs.
        let requests: Vec<ModuleRequest> = (0..MAX_FETCH_THREADS + 44)
            .map(|i| ModuleRequest { timeout, ..req(&format!("http://x/{i}.wasm")) })
            .collect();
        // 76 misses of 20 ms each: the 44 past the cap wait a round or two for a thread. With a deadline
        // started at lookup, or 8 workers (10 rounds, 200 ms), the last fetches would start with less than
        // 90 % of their time left.
        f.fetcher.set_delay(Duration::from_millis(20));
        let results = f.store().pinning().get_all(&requests);
        assert!(results.iter().all(|r| r.as_ref().unwrap_err().message.contains("404")));
        assert_eq!(f.fetcher.calls(), MAX_FETCH_THREADS + 44);
        assert_eq!(f.store().threads_spawned(), MAX_FETCH_THREADS as u64 - 1);
        let left = f.fetcher.min_time_left.lock().unwrap().unwrap();
        assert!(left > timeout * 9 / 10, "a fetch started with only {left:?} of its {timeout:?}");
    }

    #[test]
    fn poisoned_lock_does_not_break_the_store() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let _g = f.store().state.lock().unwrap();
                panic!("poison");
            })
            .join()
        });
        assert!(f.store().state.is_poisoned());
        f.store().get(&req("http://x/a.wasm")).unwrap();
        f.store().purge().unwrap();
    }
}
