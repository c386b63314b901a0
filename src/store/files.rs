//! Files in the cache directory: temp files, and module files that are verified, locked, put in place and
//! deleted so that neighbouring processes sharing the directory never see a half-written file, and never
//! lose a file they serve.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

/// Prefix of every temp file the library writes.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Creates a temp file in `dir` named `.tmp-<pid>-<random>`, holding a shared `flock` on it from right after
/// its creation for as long as it is open (until it is persisted and dropped, or dropped). That lock is what
/// tells a live writer's file from a crash leftover ([`remove_stale_temp_files`]); the pid is in the name only
/// for people reading the directory: a neighbour in another PID namespace (another container sharing the
/// directory) has pids this process cannot see. Shared rather than exclusive, because a module file keeps a
/// shared lock once it is in place ([`persist_module`]) and flock(2) converts a lock from one kind to the
/// other non-atomically; an exclusive `try_lock` by a clean-up fails against either.
///
/// A directory this process may not write to (a cache seeded into a read-only container image) fails with
/// an error that says so: the modules already there are still served, only nothing new can be stored.
pub(crate) fn new_temp_file(dir: &Path) -> io::Result<NamedTempFile> {
    for _ in 0..3 {
        let file = tempfile::Builder::new()
            .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
            .tempfile_in(dir)
            .map_err(read_only_error)?;
        match file.as_file().try_lock_shared() {
            Ok(()) => {}
            // A neighbour's start-up clean-up took the file in the instant before the lock, to delete it.
            Err(fs::TryLockError::WouldBlock) => continue,
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        // Or it took and deleted it already: then the name is gone or another file's.
        if same_file(file.as_file(), file.path()) {
            return Ok(file);
        }
    }
    Err(io::Error::other(format!("temp files in {} kept disappearing as they were created", dir.display())))
}

/// Names the cause of an error that creating a file in the cache directory ended with, when it is that the
/// directory is read-only for this process: EACCES or EPERM (`PermissionDenied`), or EROFS
/// (`ReadOnlyFilesystem`). Other errors are returned as they are.
fn read_only_error(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            io::Error::new(e.kind(), format!("the cache directory is read-only ({e})"))
        }
        _ => e,
    }
}

/// Creates `dir` (and its parents) readable by this user only; an existing directory is left as it is.
pub(super) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Removes the `.tmp-…` files in `dir` that no writer holds: a writer holds a lock on its temp file for as
/// long as it lives ([`new_temp_file`]), so a file this process can lock exclusively is a crash leftover,
/// whatever pid its name carries. Anything that is not a regular file is left alone.
pub(super) fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if !entry.file_name().to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX)) {
            continue;
        }
        let path = entry.path();
        let Ok(Opened::File(file)) = open_regular(&path) else { continue };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => continue, // its writer is alive
            Err(fs::TryLockError::Error(e)) => {
                log::warn!("cannot lock {} to tell whether its writer is alive: {e}", path.display());
                continue;
            }
        }
        if !same_file(&file, &path) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => log::info!("removed {}, left by a process that ended without finishing it", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove stale temp file {}: {e}", path.display()),
        }
    }
}

/// What is at a path where the store expects a regular file, when it is something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotRegular {
    Symlink,
    Directory,
    Fifo,
    Socket,
    Device,
    Other,
}

impl NotRegular {
    fn of(file_type: fs::FileType) -> NotRegular {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if file_type.is_fifo() {
                return NotRegular::Fifo;
            }
            if file_type.is_socket() {
                return NotRegular::Socket;
            }
            if file_type.is_block_device() || file_type.is_char_device() {
                return NotRegular::Device;
            }
        }
        if file_type.is_symlink() {
            NotRegular::Symlink
        } else if file_type.is_dir() {
            NotRegular::Directory
        } else {
            NotRegular::Other
        }
    }
}

impl fmt::Display for NotRegular {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotRegular::Symlink => "a symbolic link",
            NotRegular::Directory => "a directory",
            NotRegular::Fifo => "a FIFO",
            NotRegular::Socket => "a socket",
            NotRegular::Device => "a device",
            NotRegular::Other => "not a regular file",
        })
    }
}

/// What [`open_regular`] found.
pub(super) enum Opened {
    /// A regular file, open for reading.
    File(File),
    Missing,
    NotRegular(NotRegular),
}

/// Opens `path` for reading the way the store opens every file of the cache directory: without following a
/// symlink (`O_NOFOLLOW`: a link to `/dev/zero` would be read forever, one elsewhere would serve or lock a
/// file outside the directory), without blocking (`O_NONBLOCK`: opening a FIFO that has no writer waits
/// forever; it changes nothing for a regular file), and only if it is a regular file (checked on the open
/// handle, so nothing can be swapped in between), and without making a terminal the process's controlling
/// terminal (`O_NOCTTY`). The flags come from `libc`: their values differ between architectures.
pub(super) fn open_regular(path: &Path) -> io::Result<Opened> {
    let mut options = fs::OpenOptions::new();
    options.read(true);
    open_no_follow(path, options)
}

/// Opens (creating it, private, if missing) a lock file for reading and writing, by the rules of
/// [`open_regular`].
pub(super) fn open_lock_file(path: &Path) -> io::Result<Opened> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    open_no_follow(path, options)
}

fn open_no_follow(path: &Path, mut options: fs::OpenOptions) -> io::Result<Opened> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    match options.open(path) {
        Ok(file) => {
            let file_type = file.metadata()?.file_type();
            Ok(if file_type.is_file() { Opened::File(file) } else { Opened::NotRegular(NotRegular::of(file_type)) })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Opened::Missing),
        // A symlink fails with ELOOP under O_NOFOLLOW, a socket with ENXIO: say what it is instead.
        Err(e) => match fs::symlink_metadata(path) {
            Ok(md) if !md.is_file() => Ok(Opened::NotRegular(NotRegular::of(md.file_type()))),
            _ => Err(e),
        },
    }
}

/// Makes room for a regular file at `path`, where there is a directory: removes it if it is empty, else
/// renames it to `<name>.aside-<random>` beside it (it is not the store's to delete), and says so in the log.
/// (Any other kind of special file needs no clearing: a rename onto it replaces it atomically.)
pub(super) fn clear_directory(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Ok(()) => {
            log::warn!("removed the empty directory {} where a file belongs", path.display());
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    // Still a directory (not, say, a module a neighbour stored here since): then move it aside.
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside: PathBuf = path.with_file_name(format!("{name}.aside-{:016x}", fastrand::u64(..)));
    fs::rename(path, &aside)?;
    log::warn!("moved the directory {} aside to {}: a file belongs at its name", path.display(), aside.display());
    Ok(())
}

pub(super) enum Verify {
    /// The file is not there (or was replaced while we looked).
    Gone,
    /// Something that is not a regular file is at its name.
    NotRegular(NotRegular),
    /// Its content hashes to something else (the actual sha256, and the open file).
    Mismatch(String, File),
    Io(io::Error),
}

/// Opens a module file (see [`open_regular`]), takes a shared lock on it and checks its hash. The returned
/// file keeps the lock. Reads no more than the length the file had when it was opened, and a file whose
/// length changes meanwhile does not verify.
pub(super) fn open_verified(path: &Path, sha: &str) -> Result<File, Verify> {
    let file = match open_regular(path) {
        Ok(Opened::File(f)) => f,
        Ok(Opened::Missing) => return Err(Verify::Gone),
        Ok(Opened::NotRegular(what)) => return Err(Verify::NotRegular(what)),
        Err(e) => return Err(Verify::Io(e)),
    };
    // Blocks only while a neighbour's purge holds it exclusively (briefly, before deleting it).
    file.lock_shared().map_err(Verify::Io)?;
    if !same_file(&file, path) {
        return Err(Verify::Gone);
    }
    let len = file.metadata().map_err(Verify::Io)?.len();
    let actual = hash_reader(&mut (&file).take(len)).map_err(Verify::Io)?;
    let unchanged = file.metadata().map_err(Verify::Io)?.len() == len;
    if actual == sha && unchanged {
        Ok(file)
    } else {
        Err(Verify::Mismatch(actual, file))
    }
}

/// Moves a complete download of the module `sha` to `path`, its final name: fsync, rename (never over an
/// existing file that is intact), fsync the directory. Returns the module file, holding a shared lock.
pub(super) fn persist_module(file: NamedTempFile, path: &Path, sha: &str) -> io::Result<File> {
    file.as_file().sync_all()?;
    // The inode must be locked before it becomes visible, so that no neighbour's purge can take it in
    // between: [`new_temp_file`] locked it already (this is then a no-op), any other temp file is locked now.
    match file.as_file().try_lock_shared() {
        Ok(()) | Err(fs::TryLockError::WouldBlock) => {}
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    let mut temp = file;
    for _ in 0..3 {
        match temp.persist_noclobber(path) {
            Ok(persisted) => {
                sync_parent(path);
                return Ok(persisted);
            }
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                // Someone (maybe another process) stored it already; use theirs if it is intact.
                temp = e.file;
                match open_verified(path, sha) {
                    Ok(existing) => return Ok(existing),
                    Err(Verify::NotRegular(NotRegular::Directory)) => clear_directory(path)?,
                    Err(e @ (Verify::Mismatch(..) | Verify::NotRegular(_))) => {
                        if let Verify::NotRegular(what) = e {
                            log::warn!("{} is {what}, not a module file; replacing it", path.display());
                        }
                        // A rename replaces a symlink, FIFO or corrupt file atomically: at no moment is
                        // there nothing at the name that a neighbour could fill and then lose.
                        let persisted = temp.persist(path).map_err(|e| e.error)?;
                        sync_parent(path);
                        return Ok(persisted);
                    }
                    Err(Verify::Gone) => continue,
                    Err(Verify::Io(e)) => return Err(e),
                }
            }
            Err(e) => return Err(e.error),
        }
    }
    Err(io::Error::other(format!("{} kept changing while it was being stored", path.display())))
}

/// Deletes a module file unless another process holds a lock on it. Returns whether it was deleted.
pub(super) fn delete_module_file(path: &Path, open: Option<File>) -> bool {
    let file = match open {
        Some(f) => f,
        None => match open_regular(path) {
            Ok(Opened::File(f)) => f,
            Ok(Opened::Missing) => return false,
            Ok(Opened::NotRegular(what)) => {
                // Not a module; the next download of this module replaces it.
                log::debug!("not deleting {}: it is {what}", path.display());
                return false;
            }
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
pub(super) fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (file.metadata(), fs::symlink_metadata(path)) {
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

/// Makes a rename into `dir` durable.
pub(super) fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        log::warn!("cannot fsync {}: {e}", dir.display());
    }
}

fn sync_parent(path: &Path) {
    if let Some(dir) = path.parent() {
        sync_dir(dir);
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

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// 64 lower-case hex digits: the only strings that may become part of a file name.
pub(super) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::{FetchResult, Metrics};
    use crate::store::fixture::{fixture, lookups, options, req, req_sha, wasm, Shared, TestFetcher};
    use crate::store::Store;

    #[test]
    fn dead_writers_temp_files_are_removed_live_ones_kept() {
        let f = fixture();
        // Nobody holds it (a pid above the kernel's maximum, 4194304, cannot be alive anyway).
        let dead = f.cache_dir().join(format!("{TEMP_PREFIX}4194305-abc"));
        // A live writer's temp file: locked for as long as it is open.
        let writing = new_temp_file(&f.cache_dir()).unwrap();
        let live = writing.path().to_path_buf();
        // The pid decides nothing: this process is alive, but nobody holds this file.
        let unheld = f.cache_dir().join(format!("{TEMP_PREFIX}{}-def", std::process::id()));
        let other = f.cache_dir().join("unrelated");
        for p in [&dead, &unheld, &other] {
            fs::write(p, b"partial").unwrap();
        }
        let (_store, _, _) = f.reopen();
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(!unheld.exists());
        assert!(other.exists());
        // Until it is dropped (or persisted).
        drop(writing);
        assert!(!live.exists());
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
    fn a_read_only_directory_is_named_as_the_cause() {
        // EACCES, EROFS, EPERM: what creating a file in a directory this process may not write to fails with.
        for errno in [13, 30, 1] {
            let e = read_only_error(io::Error::from_raw_os_error(errno));
            let os = io::Error::from_raw_os_error(errno).to_string();
            assert_eq!(e.to_string(), format!("the cache directory is read-only ({os})"), "errno {errno}");
            assert_eq!(e.kind(), io::Error::from_raw_os_error(errno).kind());
        }
        // tempfile adds the path to the error it reports, keeping its kind.
        let e = read_only_error(io::Error::new(io::ErrorKind::PermissionDenied, "denied at path \"/x/.tmp-1\""));
        assert_eq!(e.to_string(), "the cache directory is read-only (denied at path \"/x/.tmp-1\")");
        // Anything else is not about the directory being read-only.
        for errno in [2, 28] {
            let os = io::Error::from_raw_os_error(errno).to_string();
            assert_eq!(read_only_error(io::Error::from_raw_os_error(errno)).to_string(), os);
        }
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
    fn sha256_hex_is_lower_case() {
        assert!(is_sha256_hex(&sha256_hex(b"")));
        assert!(!is_sha256_hex(&sha256_hex(b"").to_ascii_uppercase()));
    }
}
