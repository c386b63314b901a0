//! What to do with each ECDS resource: Istio's decision table (pass through, convert, fall back to RBAC,
//! reject). Reads and splices the wire format through `wire`; never decodes into partial structs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::module::ModuleSource;
use crate::options::OnFetchFailure;

/// A response that must not reach Envoy; `reason` goes into the NACK's `error_detail.message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Rejection {}

#[derive(Debug, Clone)]
pub(crate) struct ConversionPolicy {
    /// Deadline of a module fetch when `http_uri.timeout` is unset.
    pub default_timeout: Duration,
    pub on_fetch_failure: OnFetchFailure,
}

/// A converted state-of-the-world response.
pub(crate) struct Converted {
    pub bytes: Vec<u8>,
    /// sha256 of every module the converted response references (the in-use set).
    pub modules: Vec<Arc<str>>,
}

/// A converted delta response.
pub(crate) struct DeltaConverted {
    pub bytes: Vec<u8>,
    /// Every resource of the response by name, with the module it now references (None: no module).
    pub resources: Vec<(String, Option<Arc<str>>)>,
    /// Names the response removes.
    pub removed: Vec<String>,
}

pub(crate) fn convert_sotw(
    _input: &[u8],
    _source: &dyn ModuleSource,
    _policy: &ConversionPolicy,
    _metrics: &Metrics,
) -> Result<Converted, Rejection> {
    todo!("ecds::convert_sotw")
}

pub(crate) fn convert_delta(
    _input: &[u8],
    _source: &dyn ModuleSource,
    _policy: &ConversionPolicy,
    _metrics: &Metrics,
) -> Result<DeltaConverted, Rejection> {
    todo!("ecds::convert_delta")
}
