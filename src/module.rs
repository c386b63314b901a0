//! What the conversion asks of the store and what it gets back: the contract between `ecds` (which reads
//! requests out of Wasm filter configs) and `store` (which answers them from disk or the network).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::FetchResult;

/// `ISTIO_META_WASM_IMAGE_PULL_POLICY`; unknown values are `Unspecified`, as in Istio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    #[default]
    Unspecified,
    IfNotPresent,
    Always,
}

impl PullPolicy {
    pub fn from_env_value(value: &str) -> PullPolicy {
        match value {
            "IfNotPresent" => PullPolicy::IfNotPresent,
            "Always" => PullPolicy::Always,
            _ => PullPolicy::Unspecified,
        }
    }
}

/// One remote module that one ECDS resource wants.
#[derive(Clone, PartialEq, Eq)]
pub struct ModuleRequest {
    /// `remote.http_uri.uri`, as given.
    pub url: String,
    /// Expected sha256 in lower-case hex; `None` when empty or `"nil"`. For an `oci://` URL it is the
    /// image's manifest digest, not the module's (as Istio, `pkg/wasm/cache.go`).
    pub sha256: Option<String>,
    /// Deadline of the whole fetch (all attempts and backoff): `http_uri.timeout`, else the default.
    pub timeout: Duration,
    /// `TypedExtensionConfig.name`: the consumer whose resource version the pull policy tracks.
    pub resource_name: String,
    /// `ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION`, or empty.
    pub resource_version: String,
    pub pull_policy: PullPolicy,
    /// `ISTIO_META_WASM_IMAGE_PULL_SECRET` (docker config JSON), for `oci://` URLs. Never logged, stored or
    /// counted.
    pub pull_secret: Option<Vec<u8>>,
}

impl fmt::Debug for ModuleRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleRequest")
            .field("url", &self.url)
            .field("sha256", &self.sha256)
            .field("timeout", &self.timeout)
            .field("resource_name", &self.resource_name)
            .field("resource_version", &self.resource_version)
            .field("pull_policy", &self.pull_policy)
            .field("pull_secret", &self.pull_secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A module present in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Absolute path of the module file, what goes into `code.local.filename`.
    pub path: Arc<str>,
    /// Lower-case hex sha256 of the module bytes: its identity in the store.
    pub sha256: Arc<str>,
}

/// The distinct modules (sha256) a converted state-of-the-world response references: the store's in-use set.
pub type ModuleList = Arc<[Arc<str>]>;

/// Why a module could not be had. `message` is the cause an operator reads, without the resource or URL
/// (the conversion adds those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleError {
    /// The fetch counter this failure was counted under, if it reached a fetch at all.
    pub counted_as: Option<FetchResult>,
    pub message: String,
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ModuleError {}

/// Answers module requests. Implemented by the store's handle for one conversion (which also keeps the modules
/// it answered with from being purged until the conversion is over); a conversion calls it once per response.
pub trait ModuleSource: Sync {
    /// Answers every request; result `i` answers request `i`. Distinct modules are fetched concurrently
    /// and the call returns only when all are answered.
    fn get_all(&self, requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>>;
}
