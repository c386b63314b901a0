//! The on-disk, content-addressed module store: index, pull policy, expiry, in-use tracking,
//! single-flight. Owns the cache directory; never touches the network itself (that is `fetch`).
//!
//! Layout under the (canonicalized) cache directory:
//!
//! * `modules/<sha256>.wasm` — one file per module; the name derives only from the module's hex digest.
//! * `index.json` — what a later process needs to reuse the modules: each module's last use, and what each
//!   checksum-less URL resolved to, keyed by the sha256 of the URL (URLs themselves never reach the disk).
//! * `.tmp-<pid>-<random>` — downloads and index writes in progress; renamed into place when complete.
//!
//! Multi-process safety: files only ever appear under their final name by an atomic rename of a complete,
//! synced file. A process holds a shared `flock` on every module file it serves from memory (so its
//! stat-free hit path can trust the file is there); a purge deletes a file only while holding an exclusive
//! lock on it, which it cannot get while any other process holds a shared one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fetch::{new_temp_file, Downloaded, FetchError, Fetcher, TEMP_PREFIX};
use crate::metrics::{FetchResult, Metrics};
use crate::module::{Module, ModuleError, ModuleList, ModuleRequest, ModuleSource, PullPolicy};
use crate::options::Options;

/// What the store needs from a fetcher; lets tests serve modules without a network.
pub(crate) trait ModuleFetcher: Send + Sync {
    /// Fetches `url` into a temp file in `temp_dir` (see [`new_temp_file`]), all within `deadline`.
    fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError>;
}

impl ModuleFetcher for Fetcher {
    fn fetch(&self, url: &str, deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError> {
        Fetcher::fetch(self, url, deadline, temp_dir)
    }
}

const INDEX_FILE: &str = "index.json";
const MODULES_DIR: &str = "modules";
const INDEX_VERSION: u32 = 1;

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

/// What a mutable URL resolved to last time, per consumer resource (reference §2.1 `checksums`).
struct UrlEntry {
    checksum: Arc<str>,
    rv_by_resource: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum FlightKey {
    Sha(String),
    Url(String),
}

#[derive(Clone)]
struct Outcome {
    result: Result<Module, ModuleError>,
    /// A download happened (or was attempted): followers count their lookup as a miss.
    fetched: bool,
}

/// One in-progress resolution of a module that others may wait for.
struct Flight {
    done: Mutex<Option<Outcome>>,
    cv: Condvar,
}

#[derive(Default)]
struct State {
    /// Verified modules by sha256.
    modules: HashMap<Arc<str>, Arc<Entry>>,
    /// Modules known from the index or found on disk, not yet verified in this process: sha256 → last use.
    pending: HashMap<Arc<str>, u64>,
    urls: HashMap<String, UrlEntry>,
    /// URL entries from the index, keyed by hex sha256 of the URL, moved into `urls` on first use.
    restored_urls: HashMap<String, UrlEntry>,
    /// Distinct modules the latest SotW conversion references.
    sotw_in_use: ModuleList,
    delta_in_use: HashMap<String, Arc<str>>,
    flights: HashMap<FlightKey, Arc<Flight>>,
}

impl State {
    fn entry_count(&self) -> usize {
        self.modules.len() + self.pending.len()
    }

    /// Reference §2.3 step 3b: the checksum a checksum-less request resolves to, storing its resource version.
    fn lookup_url(&mut self, req: &ModuleRequest, ignore_rv: bool) -> Option<Arc<str>> {
        if !self.urls.contains_key(req.url.as_str()) {
            if self.restored_urls.is_empty() {
                return None;
            }
            let restored = self.restored_urls.remove(&sha256_hex(req.url.as_bytes()))?;
            self.urls.insert(req.url.clone(), restored);
        }
        let entry = self.urls.get_mut(req.url.as_str())?;
        let stored_rv = entry.rv_by_resource.get(req.resource_name.as_str());
        let found = if ignore_rv || stored_rv.map(String::as_str).unwrap_or("") == req.resource_version {
            Some(entry.checksum.clone())
        } else {
            None
        };
        if stored_rv.map(String::as_str) != Some(req.resource_version.as_str()) {
            entry.rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
        }
        found
    }

    /// Istio's `updateChecksum`: remember what `req.url` resolved to, with the requester's resource version.
    /// Allocates only when something changed.
    fn refresh_url(&mut self, req: &ModuleRequest, sha: &Arc<str>) {
        if is_oci_digest_url(&req.url) {
            return;
        }
        match self.urls.get_mut(req.url.as_str()) {
            Some(entry) => {
                if entry.checksum != *sha {
                    entry.checksum = sha.clone();
                }
                if entry.rv_by_resource.get(req.resource_name.as_str()) != Some(&req.resource_version) {
                    entry.rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
                }
            }
            None => {
                let mut rv_by_resource = HashMap::new();
                rv_by_resource.insert(req.resource_name.clone(), req.resource_version.clone());
                self.urls.insert(req.url.clone(), UrlEntry { checksum: sha.clone(), rv_by_resource });
            }
        }
    }

    /// A module left the store: forget the URLs that resolved to it.
    fn forget_urls_of(&mut self, sha: &str) {
        self.urls.retain(|_, u| &*u.checksum != sha);
        self.restored_urls.retain(|_, u| &*u.checksum != sha);
    }
}

pub(crate) struct Store {
    dir: PathBuf,
    modules_dir: PathBuf,
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

    /// Answers one request from memory, disk or the network (reference §2.3).
    pub fn get(&self, req: &ModuleRequest) -> Result<Module, ModuleError> {
        match self.lookup(req) {
            Lookup::Hit(module) => Ok(module),
            Lookup::Miss(pending) => self.finish(req, pending),
        }
    }

    /// The in-memory part of [`Store::get`]: a hit is answered (touched, counted) at once; otherwise the
    /// request joins or leads a flight, to be completed by [`Store::finish`]. Never blocks beyond the
    /// state lock.
    fn lookup<'a>(&'a self, req: &'a ModuleRequest) -> Lookup<'a> {
        let deadline = Instant::now().checked_add(req.timeout).unwrap_or_else(far_future);
        let expected: Option<Cow<'a, str>> = match req.sha256.as_deref() {
            None | Some("") | Some("nil") => None,
            Some(s) if s.bytes().any(|b| b.is_ascii_uppercase()) => Some(Cow::Owned(s.to_ascii_lowercase())),
            Some(s) => Some(Cow::Borrowed(s)),
        };
        let ignore_rv = ignore_resource_version(req.pull_policy, &req.url);
        let mut guard = self.state();
        let st = &mut *guard;
        let candidate = match expected {
            Some(_) => None,
            None => st.lookup_url(req, ignore_rv),
        };
        let key = expected.as_deref().or(candidate.as_deref());
        if let Some(entry) = key.and_then(|k| st.modules.get(k)) {
            entry.touch();
            let module = entry.module.clone();
            st.refresh_url(req, &module.sha256);
            drop(guard);
            self.metrics.record_lookup(true);
            return Lookup::Hit(module);
        }
        let fkey = match &expected {
            Some(e) => FlightKey::Sha(e.to_string()),
            None => FlightKey::Url(req.url.clone()),
        };
        let (flight, leader) = match st.flights.get(&fkey) {
            Some(f) => (f.clone(), None),
            None => {
                let f = Arc::new(Flight { done: Mutex::new(None), cv: Condvar::new() });
                st.flights.insert(fkey.clone(), f.clone());
                let guard = FlightGuard { store: self, key: fkey, flight: f.clone(), published: false };
                (f, Some(guard))
            }
        };
        Lookup::Miss(Pending { flight, leader, expected, candidate, deadline })
    }

    /// The rest of a [`Store::get`] that missed: lead the flight (reuse from disk or download) or follow it.
    fn finish(&self, req: &ModuleRequest, pending: Pending<'_>) -> Result<Module, ModuleError> {
        let Pending { flight, leader, expected, candidate, deadline } = pending;
        match leader {
            Some(mut guard) => {
                let outcome = self.resolve(req, expected.as_deref(), candidate, deadline);
                guard.publish(outcome.clone());
                outcome.result
            }
            None => self.follow(&flight, req, deadline),
        }
    }

    /// Waits for the leader of `flight`, bounded by this request's own deadline.
    fn follow(&self, flight: &Flight, req: &ModuleRequest, deadline: Instant) -> Result<Module, ModuleError> {
        let mut done = flight.done.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = &*done {
                let outcome = outcome.clone();
                drop(done);
                self.metrics.record_lookup(!outcome.fetched);
                if let Ok(module) = &outcome.result {
                    let mut st = self.state();
                    if let Some(entry) = st.modules.get(&*module.sha256) {
                        entry.touch();
                    }
                    st.refresh_url(req, &module.sha256);
                }
                return outcome.result;
            }
            let now = Instant::now();
            if now >= deadline {
                drop(done);
                self.metrics.record_lookup(false);
                return Err(ModuleError {
                    counted_as: None,
                    message: format!("timed out after {:?} waiting for a concurrent fetch of the module", req.timeout),
                });
            }
            done = flight.cv.wait_timeout(done, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The leader's work: reuse a known module (verifying it first if needed), else download.
    fn resolve(
        &self,
        req: &ModuleRequest,
        expected: Option<&str>,
        candidate: Option<Arc<str>>,
        deadline: Instant,
    ) -> Outcome {
        let known = expected.filter(|s| is_sha256_hex(s)).or(candidate.as_deref());
        if let Some(sha) = known {
            if let Some(module) = self.load_existing(sha) {
                self.state().refresh_url(req, &module.sha256);
                self.metrics.record_lookup(true);
                return Outcome { result: Ok(module), fetched: false };
            }
        }
        self.metrics.record_lookup(false);
        Outcome { result: self.fetch_and_install(req, expected, deadline), fetched: true }
    }

    /// A module already in memory, or on disk and verified now. A file that fails verification is deleted.
    fn load_existing(&self, sha: &str) -> Option<Module> {
        {
            let mut st = self.state();
            if let Some(entry) = st.modules.get(sha) {
                entry.touch();
                return Some(entry.module.clone());
            }
            st.pending.remove(sha);
        }
        let path = self.module_path(sha);
        match open_verified(&path, sha) {
            Ok(file) => Some(self.insert_verified(sha, file)),
            Err(Verify::Gone) => {
                let mut st = self.state();
                st.forget_urls_of(sha);
                self.metrics.set_cache_entries(st.entry_count());
                None
            }
            Err(Verify::Mismatch(actual, file)) => {
                log::warn!("module file {} is corrupt (its sha256 is {actual}); deleting it", path.display());
                delete_module_file(&path, Some(file));
                let mut st = self.state();
                st.forget_urls_of(sha);
                self.metrics.set_cache_entries(st.entry_count());
                None
            }
            Err(Verify::Io(e)) => {
                log::warn!("cannot read module file {}: {e}", path.display());
                None
            }
        }
    }

    fn fetch_and_install(
        &self,
        req: &ModuleRequest,
        expected: Option<&str>,
        deadline: Instant,
    ) -> Result<Module, ModuleError> {
        let fail = |counted_as: Option<FetchResult>, message: String| {
            if let Some(result) = counted_as {
                self.metrics.record_fetch(result);
            }
            Err(ModuleError { counted_as, message })
        };
        let downloaded = match self.fetcher.fetch(&req.url, deadline, &self.dir) {
            Ok(d) => d,
            Err(e) => return fail(e.counted_as(), e.message),
        };
        let actual = downloaded.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&actual) {
            return fail(Some(FetchResult::DownloadFailure), format!("fetcher reported an invalid sha256 {actual:?}"));
        }
        match expected {
            Some(want) => {
                if want != actual {
                    return fail(
                        Some(FetchResult::ChecksumMismatched),
                        format!("checksum mismatch: want {want}, got {actual}"),
                    );
                }
            }
            None => {
                // Reference §2.3 step 6: look up again with the downloaded checksum. A hit is served as is
                // and, as in Istio, not counted as a remote fetch.
                let mut st = self.state();
                if let Some(entry) = st.modules.get(actual.as_str()) {
                    entry.touch();
                    let module = entry.module.clone();
                    st.refresh_url(req, &module.sha256);
                    drop(st);
                    self.metrics.record_lookup(true);
                    return Ok(module);
                }
                drop(st);
                self.metrics.record_lookup(false);
            }
        }
        if !downloaded.is_wasm {
            return fail(Some(FetchResult::FetchFailure), format!("fetched Wasm binary from {} is invalid", req.url));
        }
        let size = downloaded.len;
        match self.install(downloaded.file, &actual) {
            Ok(module) => {
                log::info!("stored module {} ({size} bytes) from {}", module.sha256, req.url);
                self.metrics.record_fetch(FetchResult::Success);
                self.state().refresh_url(req, &module.sha256);
                if let Err(e) = self.write_index() {
                    log::warn!("cannot write the module index in {}: {e}", self.dir.display());
                }
                Ok(module)
            }
            Err(e) => fail(Some(FetchResult::DownloadFailure), format!("cannot store the module: {e}")),
        }
    }

    /// Moves a complete download to its final name: fsync, rename (never over an existing file that is
    /// correct), fsync the directory.
    fn install(&self, file: tempfile::NamedTempFile, sha: &str) -> io::Result<Module> {
        file.as_file().sync_all()?;
        // Lock the inode before it becomes visible, so no neighbour's purge can take it in between.
        match file.as_file().try_lock_shared() {
            Ok(()) | Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let final_path = self.module_path(sha);
        let mut temp = file;
        for _ in 0..3 {
            match temp.persist_noclobber(&final_path) {
                Ok(persisted) => {
                    sync_dir(&self.modules_dir);
                    return Ok(self.insert_verified(sha, persisted));
                }
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                    // Someone (maybe another process) stored it already; use theirs if it is intact.
                    temp = e.file;
                    match open_verified(&final_path, sha) {
                        Ok(existing) => return Ok(self.insert_verified(sha, existing)),
                        Err(Verify::Mismatch(..)) => {
                            let persisted = temp.persist(&final_path).map_err(|e| e.error)?;
                            sync_dir(&self.modules_dir);
                            return Ok(self.insert_verified(sha, persisted));
                        }
                        Err(Verify::Gone) => continue,
                        Err(Verify::Io(e)) => return Err(e),
                    }
                }
                Err(e) => return Err(e.error),
            }
        }
        Err(io::Error::other(format!("{} kept changing while it was being stored", final_path.display())))
    }

    fn insert_verified(&self, sha: &str, lock: File) -> Module {
        let mut st = self.state();
        if let Some(entry) = st.modules.get(sha) {
            entry.touch();
            return entry.module.clone();
        }
        let sha: Arc<str> = Arc::from(sha);
        let path: Arc<str> = Arc::from(self.module_path(&sha).to_str().unwrap_or_default());
        let module = Module { path, sha256: sha.clone() };
        st.pending.remove(&sha);
        st.modules.insert(sha, Arc::new(Entry { module: module.clone(), last_used: AtomicU64::new(now_ms()), lock }));
        self.metrics.set_cache_entries(st.entry_count());
        module
    }

    /// The latest converted state-of-the-world response references exactly these modules.
    pub fn set_sotw_in_use(&self, modules: ModuleList) {
        let old = std::mem::replace(&mut self.state().sotw_in_use, modules);
        // The old list is freed outside the lock.
        drop(old);
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

    /// Purges when `purge_interval` has passed since open or the last purge: the library has no thread of
    /// its own, so every convert call asks. Returns whether it purged.
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

    /// Deletes modules unused for longer than the expiry that the latest ECDS state does not reference.
    /// Returns how many module files were deleted. A file another process holds stays on disk (this process
    /// forgets it). Writes the index (with the current last-use times).
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
                st.forget_urls_of(sha);
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

    /// Writes the index atomically: temp file, fsync, rename, fsync the directory.
    fn write_index(&self) -> io::Result<()> {
        let _serial = self.index_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let index = {
            let st = self.state();
            let mut modules: Vec<IndexModule> = st
                .modules
                .iter()
                .map(|(sha, e)| IndexModule {
                    sha256: sha.to_string(),
                    last_used_ms: e.last_used.load(Ordering::Relaxed),
                })
                .chain(
                    st.pending.iter().map(|(sha, &last)| IndexModule { sha256: sha.to_string(), last_used_ms: last }),
                )
                .collect();
            modules.sort_by(|a, b| a.sha256.cmp(&b.sha256));
            let to_index = |url_sha256: String, u: &UrlEntry| IndexUrl {
                url_sha256,
                sha256: u.checksum.to_string(),
                resource_versions: u.rv_by_resource.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            };
            let mut urls: Vec<IndexUrl> = st
                .urls
                .iter()
                .map(|(url, u)| to_index(sha256_hex(url.as_bytes()), u))
                .chain(st.restored_urls.iter().map(|(h, u)| to_index(h.clone(), u)))
                .collect();
            urls.sort_by(|a, b| a.url_sha256.cmp(&b.url_sha256));
            IndexFile { version: INDEX_VERSION, modules, urls }
        };
        let bytes = serde_json::to_vec_pretty(&index).map_err(io::Error::other)?;
        let mut temp = new_temp_file(&self.dir)?;
        temp.write_all(&bytes)?;
        temp.as_file().sync_all()?;
        temp.persist(self.dir.join(INDEX_FILE)).map_err(|e| e.error)?;
        sync_dir(&self.dir);
        Ok(())
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

/// At most this many threads (the caller's included) resolve the misses of one `get_all` call.
const MAX_FETCH_WORKERS: usize = 8;

/// The misses of one group of identical requests: the first one's pending lookup, then the rest of the group.
struct Job<'a> {
    group: &'a [usize],
    pending: Pending<'a>,
}

impl ModuleSource for Store {
    /// Every request is first answered from the in-memory index on the caller's thread (hits cost no thread).
    /// Identical modules (same sha256, or same URL without one) are answered in request order by one worker;
    /// the misses of distinct modules are resolved concurrently: on the caller's thread when there is one,
    /// else by up to [`MAX_FETCH_WORKERS`] workers (the caller and scoped threads that end before this
    /// returns) each taking the next miss.
    fn get_all(&self, requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>> {
        let mut results: Vec<Option<Result<Module, ModuleError>>> = vec![None; requests.len()];
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut jobs: Vec<Mutex<Option<Job<'_>>>> = Vec::new();
        if requests.len() == 1 {
            results[0] = Some(self.get(&requests[0]));
        } else {
            let mut by_key: HashMap<(bool, &str), usize> = HashMap::new();
            for (i, req) in requests.iter().enumerate() {
                let key = match req.sha256.as_deref() {
                    None | Some("") | Some("nil") => (false, req.url.as_str()),
                    Some(s) => (true, s),
                };
                let g = *by_key.entry(key).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(i);
            }
            let groups = &groups;
            for group in groups {
                for (n, &i) in group.iter().enumerate() {
                    match self.lookup(&requests[i]) {
                        Lookup::Hit(module) => results[i] = Some(Ok(module)),
                        Lookup::Miss(pending) => {
                            jobs.push(Mutex::new(Some(Job { group: &group[n..], pending })));
                            break;
                        }
                    }
                }
            }
        }
        let run = |job: Job<'_>| -> Vec<(usize, Result<Module, ModuleError>)> {
            let Job { group, pending } = job;
            let mut done = Vec::with_capacity(group.len());
            done.push((group[0], self.finish(&requests[group[0]], pending)));
            for &i in &group[1..] {
                done.push((i, self.get(&requests[i])));
            }
            done
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || -> Vec<(usize, Result<Module, ModuleError>)> {
            let mut done = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = jobs.get(n) else { break };
                if let Some(job) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    done.extend(run(job));
                }
            }
            done
        };
        match jobs.len() {
            0 => {}
            1 => {
                for (i, r) in work() {
                    results[i] = Some(r);
                }
            }
            n => std::thread::scope(|scope| {
                let mut handles = Vec::new();
                for _ in 1..n.min(MAX_FETCH_WORKERS) {
                    match std::thread::Builder::new().name("wasm-ecds-fetch".into()).spawn_scoped(scope, work) {
                        Ok(h) => {
                            self.threads_spawned.fetch_add(1, Ordering::Relaxed);
                            handles.push(h);
                        }
                        Err(e) => {
                            log::warn!("cannot start a fetch thread ({e}); fetching in the caller's thread");
                            break;
                        }
                    }
                }
                for (i, r) in work() {
                    results[i] = Some(r);
                }
                for h in handles {
                    match h.join() {
                        Ok(done) => {
                            for (i, r) in done {
                                results[i] = Some(r);
                            }
                        }
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
            }),
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ModuleError { counted_as: None, message: "internal error: no result".into() }))
            })
            .collect()
    }
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
    expected: Option<Cow<'a, str>>,
    candidate: Option<Arc<str>>,
    deadline: Instant,
}

/// Makes sure a flight always completes, even if its leader panics: waiters get an error instead of hanging
/// and the key is free for the next attempt.
struct FlightGuard<'a> {
    store: &'a Store,
    key: FlightKey,
    flight: Arc<Flight>,
    published: bool,
}

impl FlightGuard<'_> {
    fn publish(&mut self, outcome: Outcome) {
        self.published = true;
        self.store.state().flights.remove(&self.key);
        *self.flight.done.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        self.flight.cv.notify_all();
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if !self.published {
            self.publish(Outcome {
                result: Err(ModuleError {
                    counted_as: None,
                    message: "internal error while fetching the module".into(),
                }),
                fetched: true,
            });
        }
    }
}

// ---- index ----

#[derive(Serialize, Deserialize, Default)]
struct IndexFile {
    version: u32,
    #[serde(default)]
    modules: Vec<IndexModule>,
    #[serde(default)]
    urls: Vec<IndexUrl>,
}

#[derive(Serialize, Deserialize)]
struct IndexModule {
    sha256: String,
    last_used_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct IndexUrl {
    /// Hex sha256 of the URL: URLs may carry credentials and never reach the disk.
    url_sha256: String,
    sha256: String,
    #[serde(default)]
    resource_versions: BTreeMap<String, String>,
}

fn read_index(dir: &Path) -> IndexFile {
    let path = dir.join(INDEX_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return IndexFile::default(),
        Err(e) => {
            log::warn!("ignoring the module index {}: {e}", path.display());
            return IndexFile::default();
        }
    };
    match serde_json::from_slice::<IndexFile>(&bytes) {
        Ok(index) if index.version == INDEX_VERSION => index,
        Ok(index) => {
            log::warn!("ignoring the module index {}: unknown version {}", path.display(), index.version);
            IndexFile::default()
        }
        Err(e) => {
            log::warn!("ignoring the unreadable module index {}: {e}", path.display());
            IndexFile::default()
        }
    }
}

/// The state at open: index entries whose file exists, plus `<sha>.wasm` files the index does not know
/// (last use = their mtime). All unverified until first use.
fn load_state(dir: &Path, modules_dir: &Path) -> State {
    let index = read_index(dir);
    let mut st = State::default();
    for m in index.modules {
        let sha = m.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&sha) {
            continue;
        }
        match fs::symlink_metadata(modules_dir.join(format!("{sha}.wasm"))) {
            Ok(md) if md.is_file() => {
                st.pending.insert(Arc::from(sha), m.last_used_ms);
            }
            _ => {}
        }
    }
    match fs::read_dir(modules_dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(sha) = name.to_str().and_then(|n| n.strip_suffix(".wasm")) else { continue };
                if !is_sha256_hex(sha) || st.pending.contains_key(sha) {
                    continue;
                }
                let Ok(md) = entry.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                let mtime = md.modified().ok().map(system_time_ms).unwrap_or_else(now_ms);
                st.pending.insert(Arc::from(sha), mtime);
            }
        }
        Err(e) => log::warn!("cannot list {}: {e}", modules_dir.display()),
    }
    for u in index.urls {
        let sha = u.sha256.to_ascii_lowercase();
        if let Some(checksum) = st.pending.get_key_value(sha.as_str()).map(|(k, _)| k.clone()) {
            let rv_by_resource = u.resource_versions.into_iter().collect();
            st.restored_urls.insert(u.url_sha256.to_ascii_lowercase(), UrlEntry { checksum, rv_by_resource });
        }
    }
    st
}

// ---- files ----

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Removes `.tmp-<pid>-…` files whose writer process is gone. Without `/proc` nothing is removed.
fn remove_stale_temp_files(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => log::info!("removed {} left by a crashed process", entry.path().display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove stale temp file {}: {e}", entry.path().display()),
        }
    }
}

enum Verify {
    /// The file is not there (or was replaced while we looked).
    Gone,
    /// Its content hashes to something else (the actual sha256, and the open file).
    Mismatch(String, File),
    Io(io::Error),
}

/// Opens a module file, takes a shared lock on it and checks its hash. The returned file keeps the lock.
fn open_verified(path: &Path, sha: &str) -> Result<File, Verify> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Verify::Gone),
        Err(e) => return Err(Verify::Io(e)),
    };
    // Blocks only while a neighbour's purge holds it exclusively (briefly, before deleting it).
    file.lock_shared().map_err(Verify::Io)?;
    if !same_file(&file, path) {
        return Err(Verify::Gone);
    }
    let actual = hash_reader(&mut file).map_err(Verify::Io)?;
    if actual == sha {
        Ok(file)
    } else {
        Err(Verify::Mismatch(actual, file))
    }
}

/// Deletes a module file unless another process holds a lock on it. Returns whether it was deleted.
fn delete_module_file(path: &Path, open: Option<File>) -> bool {
    let file = match open {
        Some(f) => f,
        None => match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                log::warn!("cannot open {} to delete it: {e}", path.display());
                return false;
            }
        },
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            log::debug!("not deleting {}: another process uses it", path.display());
            return false;
        }
        Err(fs::TryLockError::Error(e)) => {
            log::warn!("cannot lock {} to delete it: {e}", path.display());
            return false;
        }
    }
    if !same_file(&file, path) {
        return false;
    }
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => {
            log::warn!("cannot delete {}: {e}", path.display());
            false
        }
    }
}

/// Whether `path` still names the inode `file` has open.
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        path.exists()
    }
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("cannot fsync {}: {e}", dir.display());
    }
}

fn hash_reader(r: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

// ---- small helpers ----

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// 64 lower-case hex digits: the only strings that may become part of a file name.
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reference §2.3 step 2.
fn ignore_resource_version(policy: PullPolicy, url: &str) -> bool {
    match policy {
        PullPolicy::Always => false,
        PullPolicy::IfNotPresent => true,
        PullPolicy::Unspecified => !(scheme_is(url, "oci") && url_path(url).ends_with(":latest")),
    }
}

/// Digest-pinned OCI URLs are immutable and not tracked in the URL map (reference §2.1).
fn is_oci_digest_url(url: &str) -> bool {
    scheme_is(url, "oci") && url.contains('@')
}

fn scheme_is(url: &str, scheme: &str) -> bool {
    url.split_once("://").is_some_and(|(s, _)| s.eq_ignore_ascii_case(scheme))
}

/// The path of `scheme://authority/path?query#fragment`.
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    rest.find('/').map_or("", |i| &rest[i..])
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
    use super::*;
    use crate::fetch::FetchErrorKind;
    use std::sync::atomic::AtomicUsize;

    /// Serves bytes from a map into temp files, counting calls and concurrency.
    #[derive(Default)]
    struct TestFetcher {
        bodies: Mutex<HashMap<String, Vec<u8>>>,
        delay: Mutex<Duration>,
        calls: AtomicUsize,
        current: AtomicUsize,
        max_concurrent: AtomicUsize,
    }

    impl TestFetcher {
        fn serve(&self, url: &str, body: &[u8]) {
            self.bodies.lock().unwrap().insert(url.to_string(), body.to_vec());
        }
        fn set_delay(&self, d: Duration) {
            *self.delay.lock().unwrap() = d;
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    struct Shared(Arc<TestFetcher>);

    impl ModuleFetcher for Shared {
        fn fetch(&self, url: &str, _deadline: Instant, temp_dir: &Path) -> Result<Downloaded, FetchError> {
            let f = &self.0;
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
    }

    fn wasm(tag: &str) -> Vec<u8> {
        let mut b = b"\0asm\x01\0\0\0".to_vec();
        b.extend_from_slice(tag.as_bytes());
        b
    }

    struct Fixture {
        // Declared first so it is dropped (writing its index) before the directory goes.
        store: Option<Store>,
        fetcher: Arc<TestFetcher>,
        metrics: Arc<Metrics>,
        dir: tempfile::TempDir,
    }

    /// Options for a store in `dir`; the rest are the defaults (the environment is not read).
    fn options(dir: &Path, expiry: Duration, interval: Duration) -> Options {
        Options {
            cache_dir: dir.to_path_buf(),
            module_expiry: expiry,
            purge_interval: interval,
            ..Options::from_json_with_env(r#"{"cache_dir": "/unused"}"#, &|_| None).unwrap()
        }
    }

    fn fixture() -> Fixture {
        fixture_with(Duration::from_secs(3600), Duration::from_secs(3600))
    }

    fn fixture_with(expiry: Duration, interval: Duration) -> Fixture {
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
        fn store(&self) -> &Store {
            self.store.as_ref().unwrap()
        }
        fn close(&mut self) {
            self.store = None;
        }
        fn cache_dir(&self) -> PathBuf {
            self.dir.path().join("cache")
        }
        /// A second store on the same directory, as another process (or a restart) would open it.
        fn reopen(&self) -> (Store, Arc<TestFetcher>, Arc<Metrics>) {
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
        fn temp_files(&self) -> Vec<String> {
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

    fn req(url: &str) -> ModuleRequest {
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

    fn req_sha(url: &str, sha: &str) -> ModuleRequest {
        ModuleRequest { sha256: Some(sha.to_string()), ..req(url) }
    }

    fn lookups(m: &Metrics) -> (u64, u64) {
        (m.lookups(true), m.lookups(false))
    }

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

    /// Reference §2.4, one row per case: (policy, url, second resource version, expect a second download).
    #[test]
    fn pull_policy_table() {
        let rows = [
            (PullPolicy::IfNotPresent, "http://x/m.wasm", "1", false),
            (PullPolicy::IfNotPresent, "http://x/m.wasm", "2", false),
            (PullPolicy::Always, "http://x/m.wasm", "1", false),
            (PullPolicy::Always, "http://x/m.wasm", "2", true),
            (PullPolicy::Unspecified, "http://x/m.wasm", "2", false),
            (PullPolicy::Unspecified, "http://x/m:latest", "2", false),
            (PullPolicy::Unspecified, "oci://reg/m:latest", "1", false),
            (PullPolicy::Unspecified, "oci://reg/m:latest", "2", true),
            (PullPolicy::Unspecified, "oci://reg/m:v1", "2", false),
        ];
        for (policy, url, rv2, refetch) in rows {
            let f = fixture();
            f.fetcher.serve(url, &wasm("m"));
            let first = ModuleRequest { pull_policy: policy, ..req(url) };
            f.store().get(&first).unwrap();
            let second = ModuleRequest { resource_version: rv2.into(), ..first.clone() };
            f.store().get(&second).unwrap();
            assert_eq!(f.fetcher.calls(), if refetch { 2 } else { 1 }, "{policy:?} {url} rv {rv2}");
            // The new version was recorded: asking again with it does not download again.
            f.store().get(&second).unwrap();
            assert_eq!(f.fetcher.calls(), if refetch { 2 } else { 1 }, "{policy:?} {url} rv {rv2} again");
        }
    }

    #[test]
    fn always_with_changed_version_picks_up_new_content() {
        let f = fixture();
        let url = "http://x/m.wasm";
        f.fetcher.serve(url, &wasm("v1"));
        let r1 = ModuleRequest { pull_policy: PullPolicy::Always, ..req(url) };
        let m1 = f.store().get(&r1).unwrap();
        f.fetcher.serve(url, &wasm("v2"));
        let m_same = f.store().get(&r1).unwrap();
        assert_eq!(m1, m_same);
        let r2 = ModuleRequest { resource_version: "2".into(), ..r1.clone() };
        let m2 = f.store().get(&r2).unwrap();
        assert_ne!(m1.sha256, m2.sha256);
        assert_eq!(&*m2.sha256, sha256_hex(&wasm("v2")));
        // Resource versions are per resource: another resource at version 1 has no record yet and ignores nothing.
        let other = ModuleRequest { resource_name: "other".into(), ..r1.clone() };
        let m_other = f.store().get(&other).unwrap();
        assert_eq!(m_other, m2);
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
    fn restart_reuses_modules_without_fetching() {
        let mut f = fixture();
        let body = wasm("a");
        f.fetcher.serve("http://x/a.wasm", &body);
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.close();
        let index = fs::read_to_string(f.cache_dir().join(INDEX_FILE)).unwrap();
        assert!(!index.contains("http://x"), "URLs must not reach the disk: {index}");

        let (store, fetcher, metrics) = f.reopen();
        assert_eq!(metrics.cache_entries(), 1);
        // Checksum-less (URL map restored) and by sha.
        assert_eq!(store.get(&req("http://x/a.wasm")).unwrap(), m);
        assert_eq!(store.get(&req_sha("http://elsewhere/", &sha256_hex(&body))).unwrap(), m);
        assert_eq!(fetcher.calls(), 0);
        assert_eq!(lookups(&metrics), (2, 0));
    }

    #[test]
    fn unknown_module_file_on_disk_is_adopted_after_verification() {
        let f = fixture();
        let body = wasm("a");
        let sha = sha256_hex(&body);
        fs::write(f.cache_dir().join(MODULES_DIR).join(format!("{sha}.wasm")), &body).unwrap();
        let (store, fetcher, _) = f.reopen();
        store.get(&req_sha("http://x/a.wasm", &sha)).unwrap();
        assert_eq!(fetcher.calls(), 0);
    }

    #[test]
    fn corrupted_module_is_refetched_after_restart() {
        let mut f = fixture();
        let body = wasm("a");
        f.fetcher.serve("http://x/a.wasm", &body);
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.close();
        fs::write(&*m.path, b"\0asm\x01\0\0\0tampered").unwrap();

        let (store, fetcher, metrics) = f.reopen();
        fetcher.serve("http://x/a.wasm", &body);
        let again = store.get(&req("http://x/a.wasm")).unwrap();
        assert_eq!(again, m);
        assert_eq!(fetcher.calls(), 1);
        assert_eq!(fs::read(&*m.path).unwrap(), body);
        assert_eq!(metrics.fetches(FetchResult::Success), 1);
        assert_eq!(lookups(&metrics), (0, 2));

        // Same with a sha-given request and a truncated file.
        drop(store);
        fs::write(&*m.path, b"").unwrap();
        let (store, fetcher, _) = f.reopen();
        fetcher.serve("http://x/a.wasm", &body);
        store.get(&req_sha("http://x/a.wasm", &sha256_hex(&body))).unwrap();
        assert_eq!(fetcher.calls(), 1);
        assert_eq!(fs::read(&*m.path).unwrap(), body);
    }

    #[test]
    fn dead_writers_temp_files_are_removed_live_ones_kept() {
        let f = fixture();
        // A pid above the kernel's maximum (4194304) cannot be alive.
        let dead = f.cache_dir().join(format!("{TEMP_PREFIX}4194305-abc"));
        let live = f.cache_dir().join(format!("{TEMP_PREFIX}{}-def", std::process::id()));
        let other = f.cache_dir().join("unrelated");
        for p in [&dead, &live, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let (_store, _, _) = f.reopen();
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }

    #[test]
    fn corrupt_index_is_tolerated() {
        let mut f = fixture();
        let body = wasm("a");
        f.fetcher.serve("http://x/a.wasm", &body);
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.close();
        fs::write(f.cache_dir().join(INDEX_FILE), b"{ not json").unwrap();
        let (store, fetcher, _) = f.reopen();
        // The URL map is lost, the file is still found by its checksum.
        assert_eq!(store.get(&req_sha("http://x/a.wasm", &sha256_hex(&body))).unwrap(), m);
        assert_eq!(fetcher.calls(), 0);
        drop(store);
        fs::write(f.cache_dir().join(INDEX_FILE), b"\xff\xfe").unwrap();
        let _ = f.reopen();
    }

    #[test]
    fn index_entry_without_file_is_dropped() {
        let mut f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.close();
        fs::remove_file(&*m.path).unwrap();
        let (store, fetcher, metrics) = f.reopen();
        assert_eq!(metrics.cache_entries(), 0);
        fetcher.serve("http://x/a.wasm", &wasm("a"));
        store.get(&req("http://x/a.wasm")).unwrap();
        assert_eq!(fetcher.calls(), 1);
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
    fn last_use_survives_restart() {
        let mut f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.close();
        std::thread::sleep(Duration::from_millis(5));
        // A restarted store with zero expiry sees the module as old (not freshly loaded) and purges it.
        let store = Store::open_with(
            &options(&f.cache_dir(), Duration::ZERO, Duration::from_secs(3600)),
            Box::new(Shared(Arc::new(TestFetcher::default()))),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert_eq!(store.purge().unwrap(), 1);
        assert!(!Path::new(&*m.path).exists());
    }

    #[test]
    fn module_held_by_another_process_is_not_deleted() {
        let mut f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let m = f.store().get(&req("http://x/a.wasm")).unwrap();
        f.store().set_sotw_in_use(vec![m.sha256.clone()].into());
        // A neighbour with zero expiry, that knows the module from the index but does not use it.
        let neighbour = Store::open_with(
            &options(&f.cache_dir(), Duration::ZERO, Duration::from_secs(3600)),
            Box::new(Shared(Arc::new(TestFetcher::default()))),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(neighbour.purge().unwrap(), 0);
        assert!(Path::new(&*m.path).exists());
        // Still served by the first store, from memory.
        assert_eq!(f.store().get(&req("http://x/a.wasm")).unwrap(), m);
        drop(neighbour);
        f.close();
        // Once nobody holds it, a purge deletes it.
        let last = Store::open_with(
            &options(&f.cache_dir(), Duration::ZERO, Duration::from_secs(3600)),
            Box::new(Shared(Arc::new(TestFetcher::default()))),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(last.purge().unwrap(), 1);
        assert!(!Path::new(&*m.path).exists());
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
    fn single_flight_sixteen_threads_one_fetch() {
        let body = wasm("a");
        for r in [req("http://x/a.wasm"), req_sha("http://x/a.wasm", &sha256_hex(&body))] {
            let f = fixture();
            f.fetcher.serve("http://x/a.wasm", &body);
            f.fetcher.set_delay(Duration::from_millis(200));
            let barrier = std::sync::Barrier::new(16);
            let results: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..16)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            f.store().get(&r)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(f.fetcher.calls(), 1);
            let first = results[0].clone().unwrap();
            assert!(results.iter().all(|r| r.as_ref() == Ok(&first)));
            assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
            // Every waiter counts one miss; the leader of a checksum-less request counts two.
            let leader_lookups = if r.sha256.is_none() { 2 } else { 1 };
            assert_eq!(lookups(&f.metrics), (0, 15 + leader_lookups));
        }
    }

    #[test]
    fn single_flight_failure_is_shared() {
        let f = fixture();
        f.fetcher.set_delay(Duration::from_millis(100));
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8).map(|_| s.spawn(|| f.store().get(&req("http://x/missing")))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r.is_err()));
        assert!(f.fetcher.calls() < 8);
        assert_eq!(f.metrics.fetches(FetchResult::DownloadFailure) as usize, f.fetcher.calls());
    }

    #[test]
    fn waiter_gives_up_at_its_own_deadline() {
        let f = fixture();
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        f.fetcher.set_delay(Duration::from_millis(400));
        std::thread::scope(|s| {
            let leader = s.spawn(|| f.store().get(&req("http://x/a.wasm")));
            while f.fetcher.calls() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let short = ModuleRequest { timeout: Duration::from_millis(50), ..req("http://x/a.wasm") };
            let err = f.store().get(&short).unwrap_err();
            assert!(err.message.contains("timed out"), "{}", err.message);
            assert!(leader.join().unwrap().is_ok());
        });
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
        let results = f.store().get_all(&requests);
        assert_eq!(results.len(), 9);
        for (i, r) in results.iter().enumerate().take(8) {
            assert_eq!(&*r.as_ref().unwrap().sha256, sha256_hex(&wasm(&i.to_string())));
        }
        assert_eq!(results[8], results[3]);
        assert_eq!(f.fetcher.calls(), 8);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) >= 2);
        assert_eq!(f.metrics.cache_entries(), 8);
        assert!(f.store().get_all(&[]).is_empty());
    }

    #[test]
    fn get_all_answers_hits_without_threads_and_caps_the_workers() {
        let f = fixture();
        let mut requests = Vec::new();
        for i in 0..20 {
            let url = format!("http://x/{i}.wasm");
            f.fetcher.serve(&url, &wasm(&i.to_string()));
            requests.push(req(&url));
        }
        // cold: 20 distinct misses, at most 8 workers (7 threads besides the caller)
        f.fetcher.set_delay(Duration::from_millis(50));
        let results = f.store().get_all(&requests);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 20);
        assert_eq!(f.store().threads_spawned(), 7);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) <= 8);
        assert!(f.fetcher.max_concurrent.load(Ordering::SeqCst) >= 2);
        // all hits: answered on the caller's thread, counted as hits, no thread started
        let before = lookups(&f.metrics);
        let again = f.store().get_all(&requests);
        assert_eq!(again, results);
        assert_eq!(f.store().threads_spawned(), 7);
        assert_eq!(lookups(&f.metrics), (before.0 + 20, before.1));
        // one miss among hits: resolved inline, still no thread
        let url = "http://x/new.wasm";
        f.fetcher.serve(url, &wasm("new"));
        requests.push(req(url));
        let results = f.store().get_all(&requests);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 21);
        assert_eq!(f.store().threads_spawned(), 7);
        // two misses: one thread besides the caller
        for name in ["a", "b"] {
            let url = format!("http://x/{name}.wasm");
            f.fetcher.serve(&url, &wasm(name));
            requests.push(req(&url));
        }
        assert!(f.store().get_all(&requests).iter().all(Result::is_ok));
        assert_eq!(f.fetcher.calls(), 23);
        assert_eq!(f.store().threads_spawned(), 8);
    }

    #[test]
    fn cache_dir_is_private_and_created() {
        let f = fixture();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(f.cache_dir()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
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

    #[test]
    fn url_helpers() {
        assert!(ignore_resource_version(PullPolicy::Unspecified, "http://x/m:latest"));
        assert!(!ignore_resource_version(PullPolicy::Unspecified, "OCI://reg/m:latest"));
        assert!(!ignore_resource_version(PullPolicy::Unspecified, "oci://reg/m:latest?x=1"));
        assert!(ignore_resource_version(PullPolicy::Unspecified, "oci://reg:latest"));
        assert!(!ignore_resource_version(PullPolicy::Always, "http://x"));
        assert!(ignore_resource_version(PullPolicy::IfNotPresent, "oci://reg/m:latest"));
        assert!(is_sha256_hex(&sha256_hex(b"")));
        assert!(!is_sha256_hex(&sha256_hex(b"").to_ascii_uppercase()));
    }
}
