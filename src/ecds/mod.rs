//! The conversion of one ECDS response, state-of-the-world or delta: read the envelope, find what each
//! resource is ([`analyze`]), ask the store for every remote module at once, decide each resource
//! ([`decide`]), rewrite the converted ones ([`rewrite`]) and splice them back into the original bytes. The
//! wire format is read and spliced through `wire`; nothing is decoded into partial structs, so every byte
//! not rewritten leaves as it came.

mod analyze;
mod decide;
mod rewrite;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{ConversionResult, Metrics};
use crate::module::{ModuleError, ModuleList, ModuleSource};
use crate::options::OnFetchFailure;
use crate::schema::{self, short_name, Budget};
use crate::wire::{self, Fields, Msg, WireError};

use analyze::{analyze, label, Analysis};
use decide::{decide, rbac_extension_config, Decision};
use rewrite::rewrite;

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
    pub modules: ModuleList,
}

/// A converted delta response.
pub(crate) struct DeltaConverted {
    pub bytes: Vec<u8>,
    /// Every resource of the response by name, with the module it now references (None: no module).
    pub resources: Vec<(String, Option<Arc<str>>)>,
    /// Names the response removes.
    pub removed: Vec<String>,
}

/// Converts a serialized `envoy.service.discovery.v3.DiscoveryResponse`.
pub(crate) fn convert_sotw(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<Converted, Rejection> {
    let response = convert(Envelope::Sotw, input, source, policy, metrics)?;
    Ok(Converted { bytes: response.bytes, modules: distinct_modules(response.modules.into_iter().flatten()) })
}

/// Converts a serialized `envoy.service.discovery.v3.DeltaDiscoveryResponse`; removed names pass through.
pub(crate) fn convert_delta(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<DeltaConverted, Rejection> {
    let response = convert(Envelope::Delta, input, source, policy, metrics)?;
    let names = response.names.into_iter().map(Option::unwrap_or_default);
    Ok(DeltaConverted {
        bytes: response.bytes,
        resources: names.zip(response.modules).collect(),
        removed: response.removed,
    })
}

/// The two envelopes: where they keep their resources and how a rewritten resource goes back. Field numbers
/// from envoy `api/envoy/service/discovery/v3/discovery.proto`: both keep resources in field 2 and the type
/// URL in field 4; a `DiscoveryResponse` resource is an `Any`, a `DeltaDiscoveryResponse` one a `Resource`
/// (`resource` 2, an `Any`; `name` 3), and delta names removals in `removed_resources` 6 and
/// `removed_resource_names` 8 (`ResourceName.name` 1).
#[derive(Debug, Clone, Copy)]
enum Envelope {
    Sotw,
    Delta,
}

impl Envelope {
    fn message(self) -> &'static schema::Message {
        match self {
            Envelope::Sotw => &schema::DISCOVERY_RESPONSE,
            Envelope::Delta => &schema::DELTA_DISCOVERY_RESPONSE,
        }
    }

    fn malformed(self, e: impl fmt::Display) -> Rejection {
        let name = match self {
            Envelope::Sotw => "DiscoveryResponse",
            Envelope::Delta => "DeltaDiscoveryResponse",
        };
        Rejection { reason: format!("malformed {name}: {e}") }
    }

    /// The resource in a resource field's payload.
    fn resource(self, payload: &[u8]) -> Result<Resource<'_>, WireError> {
        Ok(match self {
            Envelope::Sotw => Resource { any: Some(Msg::from(payload)), name: None },
            Envelope::Delta => {
                Resource { any: Msg::from(payload).child(2)?, name: Some(wire::last_string(payload, 3)?.to_owned()) }
            }
        })
    }

    /// A removed resource name, if the field is one.
    fn removed(self, field: &wire::Field<'_>) -> Result<Option<String>, WireError> {
        Ok(match (self, field.number) {
            (Envelope::Delta, 6) => Some(field.string()?.to_owned()),
            (Envelope::Delta, 8) => Some(wire::last_string(field.payload, 1)?.to_owned()),
            _ => None,
        })
    }

    /// The resource field's payload with the resource's `Any` replaced by `any`.
    fn with_any<'p>(self, payload: &'p [u8], any: &'p [u8]) -> Result<Cow<'p, [u8]>, WireError> {
        Ok(match self {
            Envelope::Sotw => Cow::Borrowed(any),
            Envelope::Delta => Cow::Owned(wire::replace_merged(payload, 2, Some(any))?),
        })
    }
}

/// One resource as its envelope holds it.
struct Resource<'a> {
    /// The resource's `Any` (its occurrences merged); `None` when a delta `Resource` has no body.
    any: Option<Msg<'a>>,
    /// Delta: `Resource.name`.
    name: Option<String>,
}

/// A converted response, with what each of its resources (in response order) became.
struct ConvertedResponse {
    bytes: Vec<u8>,
    /// The envelope's names of the resources (delta).
    names: Vec<Option<String>>,
    /// The module each resource now references.
    modules: Vec<Option<Arc<str>>>,
    removed: Vec<String>,
}

fn convert(
    envelope: Envelope,
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<ConvertedResponse, Rejection> {
    schema::validate(envelope.message(), input).map_err(|e| envelope.malformed(e))?;
    let mut resources = Vec::new();
    let mut removed = Vec::new();
    let mut type_url = "";
    for field in Fields::new(input) {
        let field = field.map_err(|e| envelope.malformed(e))?;
        match field.number {
            2 => resources.push(envelope.resource(field.payload).map_err(|e| envelope.malformed(e))?),
            4 => type_url = field.string().map_err(|e| envelope.malformed(e))?,
            _ => removed.extend(envelope.removed(&field).map_err(|e| envelope.malformed(e))?),
        }
    }
    let names: Vec<Option<String>> = resources.iter().map(|r| r.name.clone()).collect();
    if !is_ecds_type_url(type_url) {
        let modules = vec![None; resources.len()];
        return Ok(ConvertedResponse { bytes: input.to_vec(), names, modules, removed });
    }
    let mut budget = Budget::for_response(input.len());
    let converted = convert_resources(&resources, source, policy, metrics, &mut budget)?;
    let modules = converted.iter().map(|c| c.module.clone()).collect();
    if converted.iter().all(|c| c.any.is_none()) {
        return Ok(ConvertedResponse { bytes: input.to_vec(), names, modules, removed });
    }
    // The response as it came, with each rewritten resource spliced in where it was.
    let extra: usize = converted.iter().map(|c| c.any.as_ref().map_or(0, |a| a.len() + 5)).sum();
    let mut out = Vec::with_capacity(input.len() + extra);
    let mut next = converted.iter();
    for field in Fields::new(input) {
        let field = field.map_err(|e| envelope.malformed(e))?;
        let new_any = if field.number == 2 { next.next().and_then(|c| c.any.as_deref()) } else { None };
        match new_any {
            Some(any) => {
                let resource = envelope.with_any(field.payload, any).map_err(|e| envelope.malformed(e))?;
                wire::put_len(&mut out, 2, &resource);
            }
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(ConvertedResponse { bytes: out, names, modules, removed })
}

/// What became of one resource.
struct ResourceOutcome {
    /// The resource's new `Any`; `None`: unchanged.
    any: Option<Vec<u8>>,
    /// The module the resource now references.
    module: Option<Arc<str>>,
}

/// Analyses and decides every resource, and rewrites the ones that change. Every resource is counted; the
/// reasons of all that fail make one rejection. What the resources decode is charged to `budget`.
fn convert_resources(
    resources: &[Resource<'_>],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
    budget: &mut Budget,
) -> Result<Vec<ResourceOutcome>, Rejection> {
    let analyses: Vec<Analysis<'_>> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| match r.any {
            Some(any) => analyze(any, i + 1, r.name.as_deref(), policy.default_timeout, budget),
            None => Analysis::Malformed(format!("{}: has no resource body", label(i + 1, "", r.name.as_deref()))),
        })
        .collect();
    // All requests of the response go to the store at once, so that distinct modules are fetched concurrently.
    let requests: Vec<_> = analyses.iter().filter_map(Analysis::request).cloned().collect();
    let mut answers = if requests.is_empty() { Vec::new() } else { source.get_all(&requests) };
    if answers.len() != requests.len() {
        log::error!("module source answered {} of {} requests", answers.len(), requests.len());
        answers.resize(
            requests.len(),
            Err(ModuleError { counted_as: None, message: "the module store gave no answer".to_owned() }),
        );
    }
    let mut answers = answers.into_iter();

    let mut reasons = Vec::new();
    let mut outcomes = Vec::with_capacity(analyses.len());
    for analysis in &analyses {
        let answer = analysis.request().and_then(|_| answers.next());
        let decision = decide(analysis, answer, policy.on_fetch_failure);
        outcomes.push(apply(decision, metrics, budget, &mut reasons));
    }
    if reasons.is_empty() {
        Ok(outcomes)
    } else {
        Err(Rejection { reason: reasons.join("; ") })
    }
}

/// Carries out a decision: rewrites or replaces the resource, or notes why the response fails; counts it.
fn apply(
    decision: Decision<'_, '_>,
    metrics: &Metrics,
    budget: &mut Budget,
    reasons: &mut Vec<String>,
) -> ResourceOutcome {
    let mut counter = decision.counter();
    let unchanged = ResourceOutcome { any: None, module: None };
    let outcome = match decision {
        Decision::Pass => unchanged,
        Decision::Convert { remote, module } => match rewrite(remote, &module.path, budget) {
            Ok(any) => ResourceOutcome { any: Some(any), module: Some(module.sha256) },
            Err(_) if budget.exceeded() => {
                counter = ConversionResult::MarshalFailure;
                reasons.push(format!("{}: typed_config: {}", remote.label, budget.reason()));
                unchanged
            }
            Err(e) => {
                counter = ConversionResult::MarshalFailure;
                reasons.push(format!("{}: rewriting the config failed: {e}", remote.label));
                unchanged
            }
        },
        Decision::Fallback { remote, rbac, what, .. } => {
            log::warn!(
                "{}: error in converting the wasm config of {:?} to local: {what}. applying {} RBAC filter",
                remote.label,
                remote.plugin_name,
                rbac.word()
            );
            let tec = rbac_extension_config(&remote.tec_name, remote.kind, rbac);
            // Any.value is field 2 (protobuf `google/protobuf/any.proto`).
            match wire::replace_last(remote.any, 2, &tec) {
                Ok(any) => ResourceOutcome { any: Some(any), module: None },
                Err(e) => {
                    reasons.push(format!("{}: {what}; building the fallback failed: {e}", remote.label));
                    unchanged
                }
            }
        }
        Decision::Reject { reason, .. } => {
            reasons.push(reason);
            unchanged
        }
    };
    metrics.record_conversion(counter);
    outcome
}

/// Whether a response's `type_url` names ECDS (`TypedExtensionConfig`); an empty one is taken as ECDS too.
fn is_ecds_type_url(type_url: &str) -> bool {
    type_url.is_empty() || short_name(type_url) == analyze::TEC
}

/// The distinct modules, sorted (a set; sorting keeps large responses O(n log n)).
fn distinct_modules(all: impl Iterator<Item = Arc<str>>) -> ModuleList {
    let mut out: Vec<Arc<str>> = all.collect();
    out.sort_unstable();
    out.dedup();
    out.into()
}
