//! The on-disk, content-addressed module store: index, pull policy, expiry, in-use tracking,
//! single-flight. Owns the cache directory; never touches the network itself (that is `fetch`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::fetch::Fetcher;
use crate::metrics::Metrics;
use crate::module::{Module, ModuleError, ModuleRequest, ModuleSource};
use crate::options::Options;

#[derive(Debug, Clone)]
pub(crate) struct StoreSettings {
    pub dir: PathBuf,
    pub module_expiry: Duration,
    pub purge_interval: Duration,
}

impl StoreSettings {
    pub fn from_options(o: &Options) -> StoreSettings {
        StoreSettings { dir: o.cache_dir.clone(), module_expiry: o.module_expiry, purge_interval: o.purge_interval }
    }
}

pub(crate) struct Store {
    _fetcher: Fetcher,
    _metrics: Arc<Metrics>,
}

impl Store {
    pub fn open(_settings: StoreSettings, _fetcher: Fetcher, _metrics: Arc<Metrics>) -> std::io::Result<Store> {
        todo!("store::Store::open")
    }

    pub fn get(&self, _request: &ModuleRequest) -> Result<Module, ModuleError> {
        todo!("store::Store::get")
    }

    /// The latest converted state-of-the-world response references exactly these modules.
    pub fn set_sotw_in_use(&self, _modules: Vec<Arc<str>>) {
        todo!()
    }

    /// A converted delta response: `resources` were added or updated (with their module, if any), `removed`
    /// are gone.
    pub fn update_delta_in_use(&self, _resources: Vec<(String, Option<Arc<str>>)>, _removed: &[String]) {
        todo!()
    }

    /// Purges when `purge_interval` has passed since the last purge; cheap otherwise.
    pub fn purge_if_due(&self) {
        todo!()
    }

    pub fn purge(&self) -> std::io::Result<usize> {
        todo!()
    }
}

impl ModuleSource for Store {
    fn get_all(&self, _requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>> {
        todo!()
    }
}
