//! Single-flight across processes that share the cache directory (the containers of one node): the leader of
//! an in-process flight ([`super::flight`]) locks `locks/<sha256 of its flight key>` (an exclusive `flock`)
//! before it goes to the network, empties the file, and after storing the module writes into it what it
//! stored, then lets go. A process that had to wait for the lock then reads the file, and when it names the
//! module it wanted (and the file verifies) serves it without a download. A holder that fails leaves the file
//! empty, and one that crashes loses its lock with its last file descriptor (the kernel releases it): either
//! way the next one downloads the module itself.
//!
//! Waiting polls `LOCK_EX | LOCK_NB` (no thread, and bounded by the request's deadline, which a blocking
//! `flock` cannot be). Lock files stay, a few bytes each; their names are hashes, so no URL reaches the disk.
//! A lock file that cannot be used (a read-only cache directory, `locks` not a directory) only costs the
//! cross-process part: the leader downloads as if it were alone, which the store's files stay safe against.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::files::{
    clear_directory, create_private_dir, is_sha256_hex, open_lock_file, same_file, sha256_hex, NotRegular, Opened,
};
use super::flight::FlightKey;

/// The directory of the lock files, in the cache directory.
pub(super) const LOCKS_DIR: &str = "locks";

/// How often a waiter tries the lock again: short against a download's length, long enough to cost nothing.
const POLL: Duration = Duration::from_millis(25);

/// What a lock file may hold: two names of 64 hex digits and their labels are about 160 bytes; anything
/// longer was not written by this library.
const MAX_RECORD_BYTES: u64 = 512;

/// Why the lock could not be had.
#[derive(Debug)]
pub(super) enum LockError {
    /// The deadline came while another process held the lock.
    TimedOut,
    /// The lock file cannot be used; the reason, for the log.
    Unusable(String),
}

/// What the last holder stored: the module's sha256, and for an OCI image its manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recorded {
    pub sha256: String,
    pub manifest: Option<String>,
}

/// The exclusive lock on one flight key's lock file; released when dropped.
pub(super) struct DownloadLock {
    file: File,
    /// Another process held the lock when this one first asked for it.
    pub waited: bool,
}

/// The lock file of `key` in `locks_dir`: named by the hash of the key, so that no URL appears on disk, and
/// with the key's kind in what is hashed (a module sha256 and a manifest digest are different names).
pub(super) fn lock_path(locks_dir: &Path, key: &FlightKey) -> PathBuf {
    let name = match key {
        FlightKey::Sha(sha) => format!("sha256:{sha}"),
        FlightKey::Manifest(digest) => format!("manifest:{digest}"),
        FlightKey::Url(url) => format!("url:{url}"),
    };
    locks_dir.join(sha256_hex(name.as_bytes()))
}

impl DownloadLock {
    /// Locks `key`'s lock file in `locks_dir` (creating both as needed), waiting while another process holds
    /// it, until `deadline`.
    pub fn acquire(locks_dir: &Path, key: &FlightKey, deadline: Instant) -> Result<DownloadLock, LockError> {
        prepare_dir(locks_dir)?;
        let path = lock_path(locks_dir, key);
        let mut waited = false;
        for _ in 0..3 {
            let file = open(&path)?;
            loop {
                match file.try_lock() {
                    Ok(()) => break,
                    Err(fs::TryLockError::WouldBlock) => {
                        if !waited {
                            log::info!("waiting for another process's download of the module ({})", path.display());
                            waited = true;
                        }
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(LockError::TimedOut);
                        }
                        std::thread::sleep(POLL.min(deadline - now));
                    }
                    Err(fs::TryLockError::Error(e)) => {
                        return Err(LockError::Unusable(format!("cannot lock {}: {e}", path.display())))
                    }
                }
            }
            // A special file at the name, replaced by a neighbour while this one waited on it: lock the new one.
            if same_file(&file, &path) {
                return Ok(DownloadLock { file, waited });
            }
        }
        Err(LockError::Unusable(format!("{} kept being replaced", path.display())))
    }

    /// What the last holder recorded, if the file holds a complete record (a holder that failed, or crashed
    /// while writing, leaves none).
    pub fn recorded(&self) -> Option<Recorded> {
        let mut bytes = Vec::new();
        (&self.file).seek(SeekFrom::Start(0)).ok()?;
        (&self.file).take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes).ok()?;
        parse(&bytes)
    }

    /// Whether the file was last written at or after `t`.
    pub fn written_since(&self, t: SystemTime) -> bool {
        self.file.metadata().and_then(|md| md.modified()).is_ok_and(|m| m >= t)
    }

    /// Empties the file, before a download: if this process fails or crashes, it records nothing.
    pub fn clear(&self) -> io::Result<()> {
        self.file.set_len(0)
    }

    /// Records the module this process stored, for the processes that wait for the lock.
    pub fn record(&self, recorded: &Recorded) -> io::Result<()> {
        let mut text = format!("module {}\n", recorded.sha256);
        if let Some(digest) = &recorded.manifest {
            text.push_str(&format!("manifest {digest}\n"));
        }
        // The end marker tells a complete record from one cut short by a crash.
        text.push_str("end\n");
        self.file.set_len(0)?;
        (&self.file).seek(SeekFrom::Start(0))?;
        (&self.file).write_all(text.as_bytes())
    }
}

/// Creates the locks directory if missing. Anything else than a directory at its name is left alone and
/// makes the lock unusable (it is not the store's to remove, and a symlink is never followed).
fn prepare_dir(dir: &Path) -> Result<(), LockError> {
    match fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(md) => {
            let what = if md.file_type().is_symlink() { "a symbolic link" } else { "not a directory" };
            Err(LockError::Unusable(format!("{} is {what}", dir.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => create_private_dir(dir)
            .map_err(|e| LockError::Unusable(format!("cannot create the directory {}: {e}", dir.display()))),
        Err(e) => Err(LockError::Unusable(format!("cannot inspect {}: {e}", dir.display()))),
    }
}

/// Opens (creating) the lock file at `path`, replacing anything that is not a regular file there (a lock
/// file's name is the store's): a symlink is removed, never followed, a directory cleared as a module's.
fn open(path: &Path) -> Result<File, LockError> {
    let unusable = |e: io::Error| LockError::Unusable(format!("cannot open the lock file {}: {e}", path.display()));
    for _ in 0..3 {
        match open_lock_file(path).map_err(unusable)? {
            Opened::File(file) => return Ok(file),
            Opened::Missing => {
                return Err(LockError::Unusable(format!("{} disappeared", path.parent().unwrap_or(path).display())))
            }
            Opened::NotRegular(what) => {
                log::warn!("{} is {what}, not a lock file; replacing it", path.display());
                let cleared = match what {
                    NotRegular::Directory => clear_directory(path),
                    _ => fs::remove_file(path).or_else(|e| match e.kind() {
                        io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    }),
                };
                cleared.map_err(|e| {
                    LockError::Unusable(format!("{} is {what} and cannot be replaced: {e}", path.display()))
                })?;
            }
        }
    }
    Err(LockError::Unusable(format!("{} kept being replaced", path.display())))
}

/// A complete record: `module <sha256>\n`, optionally `manifest <digest>\n`, then `end\n`.
fn parse(bytes: &[u8]) -> Option<Recorded> {
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return None;
    }
    let body = std::str::from_utf8(bytes).ok()?.strip_suffix("end\n")?;
    let (mut sha256, mut manifest) = (None, None);
    for line in body.split_terminator('\n') {
        match line.split_once(' ')? {
            ("module", v) if sha256.is_none() && is_sha256_hex(v) => sha256 = Some(v.to_owned()),
            ("manifest", v) if manifest.is_none() && is_sha256_hex(v) => manifest = Some(v.to_owned()),
            _ => return None,
        }
    }
    Some(Recorded { sha256: sha256?, manifest })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::{FetchResult, Metrics};
    use crate::module::ModuleRequest;
    use crate::store::files::sha256_hex;
    use crate::store::fixture::{digest, fixture, fixture_with, lookups, req, req_sha, wasm, Fixture};
    use crate::store::{Store, MODULES_DIR};

    fn lock_file_of(f: &Fixture, key: &FlightKey) -> PathBuf {
        lock_path(&f.store().locks_dir, key)
    }

    /// Holds `key`'s lock as another process would (flock is per open file, so another open file of this
    /// process excludes the store just as another process does).
    fn hold(f: &Fixture, key: &FlightKey) -> File {
        fs::create_dir_all(&f.store().locks_dir).unwrap();
        let file = File::options().read(true).write(true).create(true).truncate(false).open(lock_file_of(f, key));
        let file = file.unwrap();
        file.lock().unwrap();
        file
    }

    fn no_fetch_counted(m: &Metrics) -> bool {
        [FetchResult::Success, FetchResult::DownloadFailure, FetchResult::ChecksumMismatched]
            .into_iter()
            .all(|r| m.fetches(r) == 0)
    }

    #[test]
    fn a_record_is_read_back_and_anything_else_is_ignored() {
        let (a, b) = (sha256_hex(b"a"), sha256_hex(b"b"));
        let f = fixture();
        let key = FlightKey::Sha(a.clone());
        let lock = DownloadLock::acquire(&f.store().locks_dir, &key, Instant::now()).unwrap();
        assert!(!lock.waited);
        assert_eq!(lock.recorded(), None, "a new lock file records nothing");
        for recorded in
            [Recorded { sha256: a.clone(), manifest: None }, Recorded { sha256: a.clone(), manifest: Some(b.clone()) }]
        {
            lock.record(&recorded).unwrap();
            assert_eq!(lock.recorded(), Some(recorded));
        }
        lock.clear().unwrap();
        assert_eq!(lock.recorded(), None);
        assert_eq!(fs::read(lock_path(&f.store().locks_dir, &key)).unwrap(), b"");

        let complete = format!("module {a}\nmanifest {b}\nend\n");
        assert!(parse(complete.as_bytes()).is_some());
        for bad in [
            String::new(),
            format!("module {a}\n"),                       // cut short: no end marker
            format!("module {a}\nmanifest {b}\nen"),       // cut short
            format!("manifest {b}\nend\n"),                // no module
            format!("module {}\nend\n", a.to_uppercase()), // not a name the store makes
            "module ../../etc/passwd\nend\n".to_string(),
            format!("module {a}\nmodule {b}\nend\n"),          // twice
            format!("module {a}\nurl http://x/\nend\n"),       // unknown line
            format!("module {a}\n{}\nend\n", " ".repeat(600)), // longer than any record
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    /// A neighbour (another store on the directory, as another process) downloads while this store waits for
    /// the lock: this store is then served the neighbour's module from disk, without a fetch of its own,
    /// counting its lookup a miss and no remote fetch; and it knows the module from then on.
    #[test]
    fn a_neighbours_download_is_served_without_a_fetch() {
        let body = wasm("a");
        let sha = sha256_hex(&body);
        let d = digest("m");
        let tag = "oci://reg.test/m:v1";
        let cases = [
            ("sha256", req_sha("http://x/a.wasm", &sha)),
            ("url", req("http://x/a.wasm")),
            ("manifest", req_sha(tag, &d)),
            ("image url", req(tag)),
        ];
        for (name, r) in cases {
            let f = fixture();
            let (neighbour, theirs, _) = f.reopen();
            theirs.serve("http://x/a.wasm", &body);
            theirs.serve_image(tag, &d, &body);
            // Long enough that this store asks while the neighbour downloads, even on a loaded machine (a
            // URL record written before this store missed would not be used).
            theirs.set_delay(Duration::from_secs(1));
            std::thread::scope(|s| {
                let downloading = s.spawn(|| neighbour.get(&r));
                // Inside its fetch, so holding the lock.
                while theirs.calls() + theirs.resolutions() == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let m = f.store().get(&r).unwrap_or_else(|e| panic!("{name}: {}", e.message));
                assert_eq!(downloading.join().unwrap().unwrap(), m, "{name}");
                assert_eq!(&*m.sha256, sha, "{name}");
            });
            assert_eq!(f.fetcher.calls() + f.fetcher.resolutions(), 0, "{name}: fetched itself");
            assert_eq!(lookups(&f.metrics), (0, 1), "{name}");
            assert!(no_fetch_counted(&f.metrics), "{name}");
            assert_eq!(f.metrics.cache_entries(), 1, "{name}");
            // Known from now on, by its URL and (for an image) its manifest digest.
            f.store().get(&r).unwrap();
            if name == "image url" {
                f.store().get(&req_sha(tag, &d)).unwrap();
            }
            assert_eq!(f.fetcher.calls() + f.fetcher.resolutions(), 0, "{name}");
        }
    }

    #[test]
    fn a_failed_neighbour_leaves_the_download_to_the_waiter() {
        let f = fixture();
        let (neighbour, theirs, _) = f.reopen();
        theirs.set_delay(Duration::from_millis(200)); // and serves nothing: 404
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        std::thread::scope(|s| {
            let failing = s.spawn(|| neighbour.get(&req("http://x/a.wasm")));
            while theirs.calls() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            f.store().get(&req("http://x/a.wasm")).unwrap();
            assert!(failing.join().unwrap().is_err());
        });
        assert_eq!(f.fetcher.calls(), 1);
        assert_eq!(f.metrics.fetches(FetchResult::Success), 1);
    }

    #[test]
    fn a_waiter_gives_up_at_its_deadline() {
        let f = fixture();
        let sha = sha256_hex(&wasm("a"));
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        let held = hold(&f, &FlightKey::Sha(sha.clone()));
        let short = ModuleRequest { timeout: Duration::from_millis(100), ..req_sha("http://x/a.wasm", &sha) };
        let err = f.store().get(&short).unwrap_err();
        assert_eq!(err.message, "timed out after 100ms waiting for another process's download of the module");
        assert_eq!(err.counted_as, None);
        assert_eq!(f.fetcher.calls(), 0);
        assert!(no_fetch_counted(&f.metrics));
        // Once the holder lets go (or dies), the next request downloads.
        drop(held);
        f.store().get(&short).unwrap();
        assert_eq!(f.fetcher.calls(), 1);
    }

    #[test]
    fn a_record_of_another_module_or_a_stale_url_record_is_not_served() {
        let f = fixture();
        let (a, b) = (wasm("a"), wasm("b"));
        f.fetcher.serve("http://x/a.wasm", &a);
        f.fetcher.serve("http://x/b.wasm", &b);
        let mb = f.store().get(&req("http://x/b.wasm")).unwrap();
        let other = Recorded { sha256: mb.sha256.to_string(), manifest: None };

        // Waited for, but names another module than the sha256 asked for.
        let sha_a = sha256_hex(&a);
        let held = hold(&f, &FlightKey::Sha(sha_a.clone()));
        DownloadLock { file: held.try_clone().unwrap(), waited: false }.record(&other).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                drop(held);
            });
            assert_eq!(&*f.store().get(&req_sha("http://x/a.wasm", &sha_a)).unwrap().sha256, sha_a);
        });
        assert_eq!(f.fetcher.calls(), 2);

        // Recorded for the URL before this request missed, nobody holding it: the URL's module may have
        // changed since, so it is downloaded.
        let key = FlightKey::Url("http://x/c.wasm".into());
        let lock = DownloadLock::acquire(&f.store().locks_dir, &key, Instant::now()).unwrap();
        lock.record(&other).unwrap();
        drop(lock);
        std::thread::sleep(Duration::from_millis(20));
        f.fetcher.serve("http://x/c.wasm", &a);
        assert_eq!(&*f.store().get(&req("http://x/c.wasm")).unwrap().sha256, sha_a);
        assert_eq!(f.fetcher.calls(), 3);
        // What this process downloaded is what the file records now.
        let lock = DownloadLock::acquire(&f.store().locks_dir, &key, Instant::now()).unwrap();
        assert_eq!(lock.recorded(), Some(Recorded { sha256: sha_a, manifest: None }));
    }

    /// A record of a module sha256 or a manifest digest cannot go stale: a store that missed it in memory
    /// (it opened before the neighbour's download) uses it without having waited.
    #[test]
    fn a_content_record_is_used_without_a_wait() {
        let d = digest("m");
        let tag = "oci://reg.test/m:v1";
        let f = fixture();
        let (late, theirs, metrics) = f.reopen();
        f.fetcher.serve_image(tag, &d, &wasm("m"));
        let m = f.store().get(&req_sha(tag, &d)).unwrap();
        assert_eq!(late.get(&req_sha(tag, &d)).unwrap(), m);
        assert_eq!(theirs.resolutions(), 0);
        assert_eq!(lookups(&metrics), (0, 1));
    }

    #[cfg(unix)]
    #[test]
    fn special_files_in_the_locks_directory_are_replaced_never_followed() {
        use std::os::unix::fs::symlink;
        let body = wasm("a");
        let sha = sha256_hex(&body);
        let outside = tempfile::tempdir().unwrap();
        type Make = fn(&Path, &Path);
        let makers: [(&str, Make); 4] = [
            ("symlink to a file outside", |p, outside| {
                fs::write(outside.join("victim"), b"keep").unwrap();
                symlink(outside.join("victim"), p).unwrap();
            }),
            ("symlink to /dev/zero", |p, _| symlink("/dev/zero", p).unwrap()),
            ("fifo", |p, _| {
                let status = std::process::Command::new("mkfifo").arg(p).status().unwrap();
                assert!(status.success());
            }),
            ("directory", |p, _| {
                fs::create_dir_all(p.join("inside")).unwrap();
            }),
        ];
        for (name, make) in makers {
            let f = fixture();
            fs::create_dir_all(&f.store().locks_dir).unwrap();
            let path = lock_file_of(&f, &FlightKey::Sha(sha.clone()));
            make(&path, outside.path());
            f.fetcher.serve("http://x/a.wasm", &body);
            f.store().get(&req_sha("http://x/a.wasm", &sha)).unwrap_or_else(|e| panic!("{name}: {}", e.message));
            assert!(fs::symlink_metadata(&path).unwrap().is_file(), "{name}");
            assert!(fs::read_to_string(&path).unwrap().starts_with(&format!("module {sha}\n")), "{name}");
        }
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");

        // `locks` itself a symlink: not followed, and the download goes on without the lock.
        let f = fixture();
        symlink(outside.path(), &f.store().locks_dir).unwrap();
        f.fetcher.serve("http://x/a.wasm", &body);
        f.store().get(&req_sha("http://x/a.wasm", &sha)).unwrap();
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1, "only the victim");
    }

    #[test]
    fn start_up_and_purge_leave_the_locks_directory_alone() {
        let mut f = fixture_with(Duration::ZERO, Duration::from_secs(3600));
        f.fetcher.serve("http://x/a.wasm", &wasm("a"));
        f.store().get(&req("http://x/a.wasm")).unwrap();
        let locks = f.store().locks_dir.clone();
        assert_eq!(fs::read_dir(&locks).unwrap().count(), 1);
        f.close();
        let store = Store::open_with(
            &crate::store::fixture::options(&f.cache_dir(), Duration::ZERO, Duration::from_secs(3600)),
            Box::new(crate::store::fixture::Shared(Arc::new(Default::default()))),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.purge().unwrap(), 1);
        assert_eq!(fs::read_dir(f.cache_dir().join(MODULES_DIR)).unwrap().count(), 0);
        assert_eq!(fs::read_dir(&locks).unwrap().count(), 1);
    }
}
