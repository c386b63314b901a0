//! Network fetchers. A fetch streams a module into a temp file in the cache directory while hashing it.

mod http;
mod unbox;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::metrics::FetchResult;
use crate::options::Options;

#[derive(Debug, Clone)]
pub(crate) struct FetchSettings {
    pub http_request_timeout: Duration,
    pub max_attempts: u32,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub max_module_bytes: u64,
    pub insecure_hosts: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub blocked_cidrs: Vec<IpNet>,
}

impl FetchSettings {
    pub fn from_options(o: &Options) -> FetchSettings {
        FetchSettings {
            http_request_timeout: o.http_request_timeout,
            max_attempts: o.max_attempts,
            retry_initial_backoff: o.retry_initial_backoff,
            retry_max_backoff: o.retry_max_backoff,
            max_module_bytes: o.max_module_bytes,
            insecure_hosts: o.insecure_hosts.clone(),
            ca_file: o.ca_file.clone(),
            blocked_cidrs: o.blocked_cidrs.clone(),
        }
    }
}

/// A fetched module: a temp file (deleted on drop unless persisted) holding the final, unboxed bytes.
pub(crate) struct Downloaded {
    pub file: tempfile::NamedTempFile,
    /// Lower-case hex sha256 of the final bytes.
    pub sha256: String,
    pub len: u64,
    /// At least 8 bytes starting with `\0asm`.
    pub is_wasm: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FetchErrorKind {
    /// Not http/https: no network call was made.
    UnsupportedScheme,
    InvalidUrl,
    /// Transport errors and HTTP statuses, after the attempts ran out or a non-retryable status.
    Download,
    /// The body exceeded `max_module_bytes`.
    TooLarge,
    /// Writing the temp file failed (disk full, permissions).
    Io,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FetchError {
    pub kind: FetchErrorKind,
    pub message: String,
}

impl FetchError {
    /// The `istio_agent_wasm_remote_fetch_count` result this error counts as, if any.
    pub fn counted_as(&self) -> Option<FetchResult> {
        match self.kind {
            FetchErrorKind::UnsupportedScheme | FetchErrorKind::InvalidUrl => None,
            FetchErrorKind::Download | FetchErrorKind::TooLarge | FetchErrorKind::Io => {
                Some(FetchResult::DownloadFailure)
            }
        }
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FetchError {}

/// Fetches modules over HTTP/HTTPS. Cheap to share between threads.
pub(crate) struct Fetcher {
    _private: (),
}

impl Fetcher {
    /// Builds the HTTP clients; fails only when the TLS settings (`ca_file`) cannot be loaded.
    pub fn new(_settings: &FetchSettings) -> Result<Fetcher, FetchError> {
        todo!("fetch::Fetcher::new")
    }

    /// Fetches `url` into a temp file in `temp_dir`, unboxing gzip/tar, all within `deadline`.
    pub fn fetch(&self, _url: &str, _deadline: Instant, _temp_dir: &Path) -> Result<Downloaded, FetchError> {
        todo!("fetch::Fetcher::fetch")
    }
}

/// Creates a temp file in `dir` named `.tmp-<pid>-<random>`: the pid lets a later process tell a crashed
/// writer's leftovers (pid gone) from a live neighbour's download in a shared cache directory.
pub(crate) fn new_temp_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new().prefix(&format!("{TEMP_PREFIX}{}-", std::process::id())).tempfile_in(dir)
}

/// Prefix of every temp file the library writes.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";
