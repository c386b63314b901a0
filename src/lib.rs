//! wasm-ecds: distributes remote WebAssembly modules to Envoy the way the Istio agent does.
//!
//! Give [`Cache::convert`] the bytes of an ECDS `DiscoveryResponse`; every Envoy Wasm filter whose module is
//! remote (`vm_config.code.remote`) is fetched, verified and stored on disk, and the response comes back with
//! `code.local.filename` pointing at the stored file — or a [`Rejection`] whose reason goes into the NACK.
//! Everything is blocking and thread-safe; no thread outlives a call. The C ABI lives in [`ffi`].

mod ecds;
mod fetch;
pub mod ffi;
mod guard;
mod log_bridge;
pub mod metrics;
mod module;
mod nack;
pub mod options;
mod schema;
mod store;
mod typed_struct;
mod wire;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

pub use ecds::Rejection;
pub use metrics::{ConversionResult, FetchResult, Metrics};
pub use nack::{nack, nack_delta};
pub use options::{OnFetchFailure, Options, OptionsError};

/// Entry points of the fuzz targets (`tests/fuzz`, `docs/fuzzing.md`) into crate-private parsers. Not part of
/// the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::fetch::oci_fuzzing as oci;
}

/// The library version, also returned by `wasm_ecds_version()`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a cache could not be opened.
#[derive(Debug)]
#[non_exhaustive]
pub enum OpenError {
    /// An option was refused; the message names it. A `ca_file` that cannot be loaded is one.
    Options(OptionsError),
    /// The cache directory could not be created, locked or used.
    CacheDir(CacheDirError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Options(e) => e.fmt(f),
            OpenError::CacheDir(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Options(e) => e.source(),
            OpenError::CacheDir(e) => e.source(),
        }
    }
}

impl From<OptionsError> for OpenError {
    fn from(e: OptionsError) -> Self {
        OpenError::Options(e)
    }
}

/// An I/O failure in the cache directory: which directory, and (as [`source`](std::error::Error::source))
/// the operating system's error.
#[derive(Debug)]
pub struct CacheDirError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for CacheDirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache directory {}", self.path.display())
    }
}

impl std::error::Error for CacheDirError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A module cache with its counters: converts ECDS responses. `Send + Sync`; share one per process (or per
/// Envoy) and call it from any thread.
pub struct Cache {
    options: Options,
    metrics: Arc<Metrics>,
    store: store::Store,
    policy: ecds::ConversionPolicy,
}

impl Cache {
    /// Opens (creating if needed) the cache directory and reuses what an earlier process left there. A
    /// directory that exists but is read-only (a cache seeded into an image) opens too.
    ///
    /// [`OpenError::Options`] when `ca_file` cannot be loaded; [`OpenError::CacheDir`] when the directory
    /// cannot be created or used.
    pub fn new(options: Options) -> Result<Cache, OpenError> {
        let metrics = Arc::new(Metrics::new());
        let fetcher = fetch::Fetcher::new(&options).map_err(|e| OptionsError(format!("invalid options: {e}")))?;
        let store = store::Store::open(&options, fetcher, metrics.clone())
            .map_err(|source| OpenError::CacheDir(CacheDirError { path: options.cache_dir.clone(), source }))?;
        let policy = ecds::ConversionPolicy {
            default_timeout: options.default_fetch_timeout,
            on_fetch_failure: options.on_fetch_failure,
        };
        Ok(Cache { options, metrics, store, policy })
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Converts a serialized state-of-the-world `DiscoveryResponse`. On success the bytes to forward to
    /// Envoy; on rejection the reason for the NACK (forward nothing).
    pub fn convert(&self, response: &[u8]) -> Result<Vec<u8>, Rejection> {
        self.timed(response, |r| {
            // Keeps the modules the response is given from a purge until its in-use set is recorded.
            let pins = self.store.pinning();
            let converted = ecds::convert_sotw(r, &pins, &self.policy, &self.metrics)?;
            self.store.set_sotw_in_use(converted.modules);
            Ok(converted.bytes)
        })
    }

    /// Converts a serialized `DeltaDiscoveryResponse`; removed resource names pass through.
    pub fn convert_delta(&self, response: &[u8]) -> Result<Vec<u8>, Rejection> {
        self.timed(response, |r| {
            let pins = self.store.pinning();
            let converted = ecds::convert_delta(r, &pins, &self.policy, &self.metrics)?;
            self.store.update_delta_in_use(converted.resources, &converted.removed);
            Ok(converted.bytes)
        })
    }

    /// What every convert call shares: the pass-through switch, the lazy purge, one duration observation
    /// per call (rejected or not) and the log line.
    fn timed(
        &self,
        response: &[u8],
        convert: impl FnOnce(&[u8]) -> Result<Vec<u8>, Rejection>,
    ) -> Result<Vec<u8>, Rejection> {
        if !self.options.enable_conversion {
            return Ok(response.to_vec());
        }
        // A purge that is due runs first; the observed duration is the conversion's own.
        self.store.purge_if_due();
        let start = Instant::now();
        let result = convert(response);
        let elapsed = start.elapsed();
        self.metrics.observe_conversion_duration(elapsed);
        match &result {
            Ok(_) => log::debug!("converted ECDS response in {elapsed:?}"),
            Err(rejection) => log::warn!("rejecting ECDS response: {}", rejection.reason),
        }
        result
    }

    /// Prometheus text exposition of this cache's counters.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// Runs a purge now: deletes modules unused for longer than the expiry and not referenced by the latest
    /// converted ECDS state. Returns how many modules were removed; an error when the cache directory could
    /// not be written (its index).
    pub fn purge(&self) -> Result<usize, CacheDirError> {
        self.store.purge().map_err(|source| CacheDirError { path: self.options.cache_dir.clone(), source })
    }
}
