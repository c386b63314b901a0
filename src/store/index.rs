//! `index.json`: what a later process needs to reuse the modules in the cache directory — each module's last
//! use (so expiry survives a restart), what each checksum-less URL resolved to and which module each OCI
//! manifest digest names. (Istio's cache,
//! `pkg/wasm/cache.go`, keeps this in memory only and downloads every module again after a restart.)

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::files::{clear_directory, is_sha256_hex, new_temp_file, open_regular, sync_dir, NotRegular, Opened};
use super::urls::UrlEntry;
use super::{now_ms, system_time_ms, State};

const INDEX_FILE: &str = "index.json";
const INDEX_VERSION: u32 = 1;
/// The largest `index.json` read. An entry takes about 130 bytes per module and 250 per URL, so 100 000
/// modules and URLs take under 40 MiB; a larger file is not an index this library wrote.
const MAX_INDEX_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize, Default)]
pub(super) struct IndexFile {
    version: u32,
    #[serde(default)]
    modules: Vec<IndexModule>,
    #[serde(default)]
    urls: Vec<IndexUrl>,
    /// Absent from indexes written before OCI support; they load with none.
    #[serde(default)]
    manifests: Vec<IndexManifest>,
}

#[derive(Serialize, Deserialize)]
struct IndexModule {
    sha256: String,
    last_used_ms: u64,
}

/// An OCI image's manifest digest and its module. Digests name content, never a registry or a secret.
#[derive(Serialize, Deserialize)]
struct IndexManifest {
    manifest_digest: String,
    sha256: String,
}

#[derive(Serialize, Deserialize)]
struct IndexUrl {
    /// Hex sha256 of the URL: URLs may carry credentials and never reach the disk.
    url_sha256: String,
    sha256: String,
    #[serde(default)]
    resource_versions: BTreeMap<String, String>,
}

impl IndexFile {
    /// What `state` holds that a later process needs, in a stable order.
    pub fn of(state: &State) -> IndexFile {
        let mut modules: Vec<IndexModule> = state
            .modules
            .iter()
            .map(|(sha, e)| IndexModule { sha256: sha.to_string(), last_used_ms: e.last_used.load(Ordering::Relaxed) })
            .chain(state.pending.iter().map(|(sha, &last)| IndexModule { sha256: sha.to_string(), last_used_ms: last }))
            .collect();
        modules.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        let mut urls: Vec<IndexUrl> = state
            .urls
            .by_url_sha256()
            .map(|(url_sha256, u)| IndexUrl {
                url_sha256,
                sha256: u.checksum.to_string(),
                resource_versions: u.rv_by_resource.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
            .collect();
        urls.sort_by(|a, b| a.url_sha256.cmp(&b.url_sha256));
        let mut manifests: Vec<IndexManifest> = state
            .manifests
            .iter()
            .map(|(d, sha)| IndexManifest { manifest_digest: d.clone(), sha256: sha.to_string() })
            .collect();
        manifests.sort_by(|a, b| a.manifest_digest.cmp(&b.manifest_digest));
        IndexFile { version: INDEX_VERSION, modules, urls, manifests }
    }

    /// Writes the index into `dir` atomically: temp file, fsync, rename, fsync the directory.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let mut temp = new_temp_file(dir)?;
        temp.write_all(&bytes)?;
        temp.as_file().sync_all()?;
        temp.persist(dir.join(INDEX_FILE)).map_err(|e| e.error)?;
        sync_dir(dir);
        Ok(())
    }

    /// The index in `dir`; an empty one when there is none or it cannot be used (it is only an optimisation:
    /// the modules are still found on disk by their checksum).
    fn read(dir: &Path) -> IndexFile {
        let path = dir.join(INDEX_FILE);
        let bytes = match read_bounded(&path) {
            Ok(Some(b)) => b,
            Ok(None) => return IndexFile::default(),
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
}

/// The bytes of the index at `path` (opened as [`open_regular`] does, so a FIFO or a symlink cannot hang or
/// redirect the read), at most [`MAX_INDEX_BYTES`]; `None` when there is none. Something other than a regular
/// file is an error, after a directory was cleared away so that the next index write can take its name (the
/// write's rename replaces anything else).
fn read_bounded(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match open_regular(path)? {
        Opened::File(f) => f,
        Opened::Missing => return Ok(None),
        Opened::NotRegular(what) => {
            if what == NotRegular::Directory {
                if let Err(e) = clear_directory(path) {
                    log::warn!("cannot clear the directory {} away: {e}", path.display());
                }
            }
            return Err(io::Error::other(format!("it is {what}, not a regular file")));
        }
    };
    let mut bytes = Vec::new();
    (&file).take(MAX_INDEX_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_INDEX_BYTES {
        return Err(io::Error::other(format!(
            "it is larger than {MAX_INDEX_BYTES} bytes (64 MiB), more than any index this library writes"
        )));
    }
    Ok(Some(bytes))
}

/// The state at open: index entries whose file exists, plus `<sha>.wasm` files the index does not know
/// (last use = their mtime). All unverified until first use.
pub(super) fn load_state(dir: &Path, modules_dir: &Path) -> State {
    let index = IndexFile::read(dir);
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
            st.urls.restore(u.url_sha256.to_ascii_lowercase(), UrlEntry { checksum, rv_by_resource });
        }
    }
    for m in index.manifests {
        let digest = m.manifest_digest.to_ascii_lowercase();
        let sha = m.sha256.to_ascii_lowercase();
        if !is_sha256_hex(&digest) {
            continue;
        }
        if let Some(module) = st.pending.get_key_value(sha.as_str()).map(|(k, _)| k.clone()) {
            st.manifests.insert(digest, module);
        }
    }
    st
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;
    use crate::store::files::sha256_hex;
    use crate::store::fixture::{fixture, lookups, options, req, req_sha, wasm, Shared, TestFetcher};
    use crate::store::{Store, MODULES_DIR};

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

    #[cfg(unix)]
    #[test]
    fn oversized_or_special_index_is_ignored() {
        let f = fixture();
        let path = f.cache_dir().join(INDEX_FILE);
        // Sparse: costs no disk, reads as zeros.
        fs::File::create(&path).unwrap().set_len(MAX_INDEX_BYTES + 1).unwrap();
        let err = read_bounded(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            "it is larger than 67108864 bytes (64 MiB), more than any index this library writes"
        );
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        assert_eq!(read_bounded(&path).unwrap_err().to_string(), "it is a symbolic link, not a regular file");
        fs::remove_file(&path).unwrap();
        // A directory is moved out of the way, so that the next write can take the name.
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), b"x").unwrap();
        assert_eq!(read_bounded(&path).unwrap_err().to_string(), "it is a directory, not a regular file");
        assert!(!path.exists());
        let (store, _, _) = f.reopen();
        drop(store);
        assert!(fs::symlink_metadata(&path).unwrap().is_file(), "the index was written");
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
}
