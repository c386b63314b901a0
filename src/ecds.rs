//! What to do with each ECDS resource: Istio's decision table (pass through, convert, fall back to RBAC,
//! reject). Reads and splices the wire format through `wire`; never decodes into partial structs.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{ConversionResult, Metrics};
use crate::module::{Module, ModuleError, ModuleRequest, ModuleSource, PullPolicy};
use crate::options::OnFetchFailure;
use crate::schema::{self, short_name};
use crate::typed_struct;
use crate::wire::{self, Fields};

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

const TEC: &str = "envoy.config.core.v3.TypedExtensionConfig";
const HTTP_WASM: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
const NETWORK_WASM: &str = "envoy.extensions.filters.network.wasm.v3.Wasm";
const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";
const XDS_TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";
const TYPE_PREFIX: &str = "type.googleapis.com/";
const HTTP_RBAC_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NETWORK_RBAC_URL: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";

const SECRET_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
const POLICY_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
const RESOURCE_VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";
const INTERNAL_ENV_PREFIX: &str = "ISTIO_META_";
/// `envoy.extensions.wasm.v3.FailurePolicy.FAIL_OPEN`.
const FAIL_OPEN: u64 = 3;

pub(crate) fn convert_sotw(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<Converted, Rejection> {
    schema::validate(&schema::DISCOVERY_RESPONSE, input)
        .map_err(|e| Rejection { reason: format!("malformed DiscoveryResponse: {e}") })?;
    if !is_ecds(input)? {
        return Ok(Converted { bytes: input.to_vec(), modules: Vec::new() });
    }
    let mut items = Vec::new();
    for field in Fields::new(input) {
        let field = field.map_err(malformed_response)?;
        if field.number == 2 {
            let ordinal = items.len() + 1;
            items.push(analyze(field.payload, ordinal, None, policy.default_timeout));
        }
    }
    let done = process(items, source, policy, metrics)?;
    let modules = distinct_modules(done.iter().filter_map(|d| d.module.clone()));
    if done.iter().all(|d| d.replacement.is_none()) {
        return Ok(Converted { bytes: input.to_vec(), modules });
    }
    let mut out = Vec::with_capacity(input.len() + 256);
    let mut next = done.into_iter();
    for field in Fields::new(input) {
        let field = field.map_err(malformed_response)?;
        if field.number != 2 {
            out.extend_from_slice(field.raw);
            continue;
        }
        match next.next().and_then(|d| d.replacement) {
            Some(any) => wire::put_len(&mut out, 2, &any),
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(Converted { bytes: out, modules })
}

pub(crate) fn convert_delta(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<DeltaConverted, Rejection> {
    let malformed = |e: &dyn fmt::Display| Rejection { reason: format!("malformed DeltaDiscoveryResponse: {e}") };
    schema::validate(&schema::DELTA_DISCOVERY_RESPONSE, input).map_err(|e| malformed(&e))?;
    let mut removed = Vec::new();
    let mut names = Vec::new();
    let mut items = Vec::new();
    for field in Fields::new(input) {
        let field = field.map_err(|e| malformed(&e))?;
        match field.number {
            2 => {
                let resource = field.payload;
                let name = wire::last_string(resource, 3).map_err(|e| malformed(&e))?.to_owned();
                let ordinal = items.len() + 1;
                let item = match wire::merged(resource, 2).map_err(|e| malformed(&e))? {
                    Some(any) => analyze(&any, ordinal, Some(&name), policy.default_timeout),
                    None => Analysis::Malformed(format!("{}: has no resource body", label(ordinal, "", Some(&name)))),
                };
                names.push(name);
                items.push(item);
            }
            6 => removed.push(field.string().map_err(|e| malformed(&e))?.to_owned()),
            8 => removed.push(wire::last_string(field.payload, 1).map_err(|e| malformed(&e))?.to_owned()),
            _ => {}
        }
    }
    if !is_ecds(input)? {
        let resources = names.into_iter().map(|n| (n, None)).collect();
        return Ok(DeltaConverted { bytes: input.to_vec(), resources, removed });
    }
    let done = process(items, source, policy, metrics)?;
    let resources: Vec<(String, Option<Arc<str>>)> =
        names.into_iter().zip(done.iter()).map(|(n, d)| (n, d.module.clone())).collect();
    if done.iter().all(|d| d.replacement.is_none()) {
        return Ok(DeltaConverted { bytes: input.to_vec(), resources, removed });
    }
    let mut out = Vec::with_capacity(input.len() + 256);
    let mut next = done.into_iter();
    for field in Fields::new(input) {
        let field = field.map_err(|e| malformed(&e))?;
        if field.number != 2 {
            out.extend_from_slice(field.raw);
            continue;
        }
        match next.next().and_then(|d| d.replacement) {
            Some(any) => {
                let resource = wire::replace_merged(field.payload, 2, Some(&any)).map_err(|e| malformed(&e))?;
                wire::put_len(&mut out, 2, &resource);
            }
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(DeltaConverted { bytes: out, resources, removed })
}

fn malformed_response(e: wire::WireError) -> Rejection {
    Rejection { reason: format!("malformed DiscoveryResponse: {e}") }
}

/// Whether the response carries ECDS resources: `type_url` (field 4) empty or naming TypedExtensionConfig.
fn is_ecds(response: &[u8]) -> Result<bool, Rejection> {
    let type_url = wire::last_string(response, 4).map_err(malformed_response)?;
    Ok(type_url.is_empty() || short_name(type_url) == TEC)
}

fn distinct_modules(all: impl Iterator<Item = Arc<str>>) -> Vec<Arc<str>> {
    let mut out: Vec<Arc<str>> = Vec::new();
    for m in all {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// How a resource is named in a rejection reason.
fn label(ordinal: usize, tec_name: &str, hint: Option<&str>) -> String {
    match (tec_name, hint) {
        ("", Some(h)) if !h.is_empty() => format!("resource {h:?}"),
        ("", _) => format!("resource #{ordinal}"),
        (name, _) => format!("resource {name:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WasmKind {
    Http,
    Network,
}

impl WasmKind {
    fn message(self) -> &'static schema::Message {
        match self {
            WasmKind::Http => &schema::HTTP_WASM,
            WasmKind::Network => &schema::NETWORK_WASM,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            WasmKind::Http => HTTP_WASM,
            WasmKind::Network => NETWORK_WASM,
        }
    }

    fn of(type_url: &str) -> Option<WasmKind> {
        match short_name(type_url) {
            HTTP_WASM => Some(WasmKind::Http),
            NETWORK_WASM => Some(WasmKind::Network),
            _ => None,
        }
    }
}

/// What one resource needs (Istio's `tryUnmarshal` plus the reading of the remote code).
enum Analysis {
    /// Leaves unchanged (`no_remote_load`).
    Keep,
    /// Malformed (`unmarshal_failure`): the full reason text.
    Malformed(String),
    Remote(Box<Remote>),
}

/// A Wasm filter with remote code.
struct Remote {
    label: String,
    plugin_name: String,
    tec_name: String,
    kind: WasmKind,
    fail_open: bool,
    url: String,
    /// What to ask the store, or why the fetch fails without asking (status and cause).
    want: Result<ModuleRequest, (ConversionResult, String)>,
    /// The resource's `Any` and its pieces, for the rewrite.
    any: Vec<u8>,
    tec: Vec<u8>,
    typed_config: Vec<u8>,
    form: Form,
}

enum Form {
    /// `typed_config` holds the Wasm message itself.
    Direct { wasm: Vec<u8> },
    /// `typed_config` holds a TypedStruct; `wasm` is its Struct encoded as the Wasm message.
    Struct {
        wasm: Vec<u8>,
        encodable: bool,
        typed_struct: Vec<u8>,
        value: std::collections::BTreeMap<String, schema::JVal>,
    },
}

impl Form {
    fn wasm(&self) -> &[u8] {
        match self {
            Form::Direct { wasm } | Form::Struct { wasm, .. } => wasm,
        }
    }
}

fn analyze(any: &[u8], ordinal: usize, hint: Option<&str>, default_timeout: Duration) -> Analysis {
    let no_name = label(ordinal, "", hint);
    // The resource Any (already validated as part of the response).
    let (type_url, tec) = match (wire::last_string(any, 1), wire::last(any, 2)) {
        (Ok(t), Ok(v)) => (t, v.map_or(&[][..], |f| f.payload)),
        (Err(e), _) | (_, Err(e)) => return Analysis::Malformed(format!("{no_name}: {e}")),
    };
    if short_name(type_url) != TEC {
        return Analysis::Malformed(format!("{no_name}: not a TypedExtensionConfig ({type_url})"));
    }
    if let Err(e) = schema::validate(&schema::TYPED_EXTENSION_CONFIG, tec) {
        return Analysis::Malformed(format!("{no_name}: not a valid TypedExtensionConfig: {e}"));
    }
    let tec_name = wire::last_string(tec, 1).unwrap_or_default().to_owned();
    let label = label(ordinal, &tec_name, hint);
    let typed_config = match wire::merged(tec, 2) {
        Ok(Some(tc)) => tc.into_owned(),
        Ok(None) => return Analysis::Malformed(format!("{label}: does not contain any typed config")),
        Err(e) => return Analysis::Malformed(format!("{label}: {e}")),
    };
    let inner_url = wire::last_string(&typed_config, 1).unwrap_or_default().to_owned();
    let inner_value = match wire::last(&typed_config, 2) {
        Ok(v) => v.map_or(&[][..], |f| f.payload).to_vec(),
        Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
    };
    let (kind, form) = if let Some(kind) = WasmKind::of(&inner_url) {
        if let Err(e) = schema::validate(kind.message(), &inner_value) {
            return Analysis::Malformed(format!("{label}: typed_config: {}: {e}", kind.type_name()));
        }
        (kind, Form::Direct { wasm: inner_value })
    } else if matches!(short_name(&inner_url), UDPA_TYPED_STRUCT | XDS_TYPED_STRUCT) {
        let ts = match typed_struct::parse(&inner_value) {
            Ok(ts) => ts,
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {}: {e}", short_name(&inner_url))),
        };
        let Some(kind) = WasmKind::of(&ts.type_url) else { return Analysis::Keep };
        let (wasm, notes) = match typed_struct::to_wasm(kind.message(), &ts.value) {
            Ok(x) => x,
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
        };
        let encodable = notes.unencodable_any.is_empty();
        (kind, Form::Struct { wasm, encodable, typed_struct: inner_value, value: ts.value })
    } else {
        return Analysis::Keep;
    };
    let kind_word = match kind {
        WasmKind::Http => "HTTP",
        WasmKind::Network => "Network",
    };
    let info = match read_wasm(form.wasm()) {
        Ok(info) => info,
        Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
    };
    let remote = match info.code {
        Code::Neither => {
            return Analysis::Malformed(format!("{label}: no remote and local load found in Wasm {kind_word} filter"))
        }
        Code::Local => return Analysis::Keep,
        Code::Remote(remote) => remote,
    };
    let (url, want) = match request_for(&remote, info.env.as_deref(), &tec_name, &info.plugin_name, default_timeout) {
        Ok(req) => (req.url.clone(), Ok(req)),
        Err((url, status, cause)) => (url, Err((status, cause))),
    };
    Analysis::Remote(Box::new(Remote {
        label,
        plugin_name: info.plugin_name,
        tec_name,
        kind,
        fail_open: info.fail_open,
        url,
        want,
        any: any.to_vec(),
        tec: tec.to_vec(),
        typed_config,
        form,
    }))
}

enum Code {
    Neither,
    Local,
    Remote(Vec<u8>),
}

struct WasmInfo {
    fail_open: bool,
    code: Code,
    plugin_name: String,
    env: Option<Vec<u8>>,
}

/// Reads what the conversion needs from a (validated) Wasm message, with protobuf merge semantics.
fn read_wasm(wasm: &[u8]) -> Result<WasmInfo, wire::WireError> {
    let config = wire::merged(wasm, 1)?.unwrap_or(Cow::Borrowed(&[]));
    let failure_policy = wire::last(&config, 7)?.map(|f| f.varint()).transpose()?.unwrap_or(0) as i32;
    let fail_open_flag = wire::last(&config, 5)?.map(|f| f.varint()).transpose()?.unwrap_or(0) != 0;
    let fail_open = if failure_policy != 0 { failure_policy as u64 == FAIL_OPEN } else { fail_open_flag };
    let plugin_name = wire::last_string(&config, 1)?.to_owned();
    let vm = wire::merged(&config, 3)?;
    let (code, env) = match vm {
        None => (Code::Neither, None),
        Some(vm) => {
            let env = wire::merged(&vm, 7)?.map(Cow::into_owned);
            let code = match wire::merged(&vm, 3)? {
                None => Code::Neither,
                Some(code) => match wire::oneof(&code, &[1, 2])? {
                    None => Code::Neither,
                    Some((1, _)) => Code::Local,
                    Some((_, remote)) => Code::Remote(remote.into_owned()),
                },
            };
            (code, env)
        }
    };
    Ok(WasmInfo { fail_open, code, plugin_name, env })
}

/// The environment variables' `key_values` as Go's map would hold them (a later duplicate key wins).
fn env_map(env: &[u8]) -> Result<Vec<(String, String)>, wire::WireError> {
    let mut map: Vec<(String, String)> = Vec::new();
    for field in Fields::new(env) {
        let field = field?;
        if field.number != 2 {
            continue;
        }
        let entry = field.bytes()?;
        let key = wire::last_string(entry, 1)?.to_owned();
        let value = wire::last_string(entry, 2)?.to_owned();
        map.retain(|(k, _)| *k != key);
        map.push((key, value));
    }
    Ok(map)
}

type PreFailure = (String, ConversionResult, String);

/// The module request of a remote code source (validated `RemoteDataSource` bytes), in Istio's order of
/// checks: the pull secret, then `http_uri`.
fn request_for(
    remote: &[u8],
    env: Option<&[u8]>,
    tec_name: &str,
    plugin_name: &str,
    default_timeout: Duration,
) -> Result<ModuleRequest, PreFailure> {
    let internal = |e: wire::WireError| (String::new(), ConversionResult::UnmarshalFailure, e.to_string());
    let http_uri = wire::merged(remote, 1).map_err(internal)?;
    let url = match &http_uri {
        Some(h) => wire::last_string(h, 1).map_err(internal)?.to_owned(),
        None => String::new(),
    };
    let env = match env {
        Some(env) => env_map(env).map_err(internal)?,
        None => Vec::new(),
    };
    let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let pull_secret = match get(SECRET_ENV) {
        Some("") => {
            return Err((url, ConversionResult::FetchFailure, "missing image pulling secret".to_owned()));
        }
        Some(secret) => Some(secret.as_bytes().to_vec()),
        None => None,
    };
    let pull_policy = get(POLICY_ENV).map_or(PullPolicy::Unspecified, PullPolicy::from_env_value);
    let resource_version = get(RESOURCE_VERSION_ENV).unwrap_or_default().to_owned();
    let Some(http_uri) = http_uri else {
        let name = if plugin_name.is_empty() { tec_name } else { plugin_name };
        return Err((
            url,
            ConversionResult::MissRemoteFetchHint,
            format!("wasm remote fetch does not have httpUri specified for config {name:?}"),
        ));
    };
    let sha = wire::last_string(remote, 2).map_err(internal)?;
    let sha256 = if sha.is_empty() || sha == "nil" { None } else { Some(sha.to_ascii_lowercase()) };
    let timeout = match wire::merged(&http_uri, 3).map_err(internal)? {
        None => None,
        Some(d) => {
            let seconds = wire::last(&d, 1).map_err(internal)?.map(|f| f.varint()).transpose().map_err(internal)?;
            let nanos = wire::last(&d, 2).map_err(internal)?.map(|f| f.varint()).transpose().map_err(internal)?;
            Some(duration(seconds.unwrap_or(0) as i64, nanos.unwrap_or(0) as i32))
        }
    };
    Ok(ModuleRequest {
        url,
        sha256,
        timeout: timeout.unwrap_or(default_timeout),
        resource_name: tec_name.to_owned(),
        resource_version,
        pull_policy,
        pull_secret,
    })
}

/// A `google.protobuf.Duration` as a deadline: negative or zero is an already expired deadline.
fn duration(seconds: i64, nanos: i32) -> Duration {
    if seconds < 0 || (seconds == 0 && nanos <= 0) {
        return Duration::ZERO;
    }
    Duration::from_secs(seconds as u64).saturating_add(Duration::from_nanos(nanos.max(0) as u64))
}

/// What became of one resource.
struct Done {
    /// The new bytes of the resource's `Any`, if it changed.
    replacement: Option<Vec<u8>>,
    /// The module the resource now references.
    module: Option<Arc<str>>,
}

fn process(
    items: Vec<Analysis>,
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<Vec<Done>, Rejection> {
    // All requests of the response go to the store at once, so that distinct modules are fetched concurrently.
    let mut requests = Vec::new();
    let mut slots = Vec::with_capacity(items.len());
    for item in &items {
        match item {
            Analysis::Remote(r) => match &r.want {
                Ok(req) => {
                    slots.push(Some(requests.len()));
                    requests.push(req.clone());
                }
                Err(_) => slots.push(None),
            },
            _ => slots.push(None),
        }
    }
    let mut answers = if requests.is_empty() { Vec::new() } else { source.get_all(&requests) };
    if answers.len() != requests.len() {
        log::error!("module source answered {} of {} requests", answers.len(), requests.len());
        answers.resize(
            requests.len(),
            Err(ModuleError { counted_as: None, message: "the module store gave no answer".to_owned() }),
        );
    }
    let mut answers: Vec<Option<Result<Module, ModuleError>>> = answers.into_iter().map(Some).collect();

    let mut reasons = Vec::new();
    let mut done = Vec::with_capacity(items.len());
    for (item, slot) in items.into_iter().zip(slots) {
        match item {
            Analysis::Keep => {
                metrics.record_conversion(ConversionResult::NoRemoteLoad);
                done.push(Done { replacement: None, module: None });
            }
            Analysis::Malformed(reason) => {
                metrics.record_conversion(ConversionResult::UnmarshalFailure);
                reasons.push(reason);
                done.push(Done { replacement: None, module: None });
            }
            Analysis::Remote(remote) => {
                let answer = match (&remote.want, slot.and_then(|i| answers.get_mut(i)).and_then(Option::take)) {
                    (Err((status, cause)), _) => Err((*status, cause.clone())),
                    (Ok(_), Some(Ok(module))) => Ok(module),
                    (Ok(_), Some(Err(e))) => Err((ConversionResult::FetchFailure, e.message)),
                    (Ok(_), None) => Err((ConversionResult::FetchFailure, "no answer".to_owned())),
                };
                match answer {
                    Ok(module) => match rewrite(&remote, &module.path) {
                        Ok(any) => {
                            metrics.record_conversion(ConversionResult::Success);
                            done.push(Done { replacement: Some(any), module: Some(module.sha256.clone()) });
                        }
                        Err(e) => {
                            metrics.record_conversion(ConversionResult::MarshalFailure);
                            reasons.push(format!("{}: rewriting the config failed: {e}", remote.label));
                            done.push(Done { replacement: None, module: None });
                        }
                    },
                    Err((status, cause)) => {
                        metrics.record_conversion(status);
                        let what =
                            if remote.url.is_empty() { cause } else { format!("module {}: {cause}", remote.url) };
                        let fallback = if remote.fail_open {
                            Some(Rbac::Allow)
                        } else if policy.on_fetch_failure == OnFetchFailure::Deny {
                            Some(Rbac::Deny)
                        } else {
                            None
                        };
                        match fallback {
                            Some(rbac) => {
                                log::warn!(
                                    "{}: error in converting the wasm config of {:?} to local: {what}. applying {} RBAC filter",
                                    remote.label,
                                    remote.plugin_name,
                                    rbac.word()
                                );
                                let tec = rbac_extension_config(&remote.tec_name, remote.kind, rbac);
                                match wire::replace_last(&remote.any, 2, &tec) {
                                    Ok(any) => done.push(Done { replacement: Some(any), module: None }),
                                    Err(e) => {
                                        reasons.push(format!(
                                            "{}: {what}; building the fallback failed: {e}",
                                            remote.label
                                        ));
                                        done.push(Done { replacement: None, module: None });
                                    }
                                }
                            }
                            None => {
                                reasons.push(format!("{}: {what}", remote.label));
                                done.push(Done { replacement: None, module: None });
                            }
                        }
                    }
                }
            }
        }
    }
    if reasons.is_empty() {
        Ok(done)
    } else {
        Err(Rejection { reason: reasons.join("; ") })
    }
}

#[derive(Debug, Clone, Copy)]
enum Rbac {
    Allow,
    Deny,
}

impl Rbac {
    fn word(self) -> &'static str {
        match self {
            Rbac::Allow => "allow",
            Rbac::Deny => "deny",
        }
    }
}

/// `TypedExtensionConfig{name, typed_config: RBAC}`: Istio's allow-all / deny-all stand-in for a Wasm
/// filter whose module could not be had.
fn rbac_extension_config(name: &str, kind: WasmKind, rbac: Rbac) -> Vec<u8> {
    let mut filter = Vec::new();
    let (url, prefix_field) = match kind {
        WasmKind::Http => (HTTP_RBAC_URL, 6),
        WasmKind::Network => (NETWORK_RBAC_URL, 3),
    };
    let prefix = match rbac {
        Rbac::Allow => "wasm-default-allow",
        Rbac::Deny => {
            wire::put_len(&mut filter, 1, &[]); // rules present but empty: ALLOW with no policies = deny all
            "wasm-default-deny"
        }
    };
    wire::put_len(&mut filter, prefix_field, prefix.as_bytes());
    let mut any = Vec::new();
    wire::put_len(&mut any, 1, url.as_bytes());
    wire::put_len(&mut any, 2, &filter);
    let mut tec = Vec::new();
    if !name.is_empty() {
        wire::put_len(&mut tec, 1, name.as_bytes());
    }
    wire::put_len(&mut tec, 2, &any);
    tec
}

/// The new bytes of the resource's `Any` with the module at `path`.
fn rewrite(remote: &Remote, path: &str) -> Result<Vec<u8>, String> {
    let e = |e: wire::WireError| e.to_string();
    let typed_config = match &remote.form {
        Form::Direct { wasm } => {
            let wasm = rewrite_wasm(wasm, path).map_err(e)?;
            wire::replace_last(&remote.typed_config, 2, &wasm).map_err(e)?
        }
        Form::Struct { wasm, encodable: true, .. } => {
            let wasm = rewrite_wasm(wasm, path).map_err(e)?;
            let mut any = Vec::new();
            wire::put_len(&mut any, 1, format!("{TYPE_PREFIX}{}", remote.kind.type_name()).as_bytes());
            wire::put_len(&mut any, 2, &wasm);
            any
        }
        Form::Struct { encodable: false, typed_struct, value, .. } => {
            let mut value = value.clone();
            typed_struct::rewrite_struct(&mut value, path).map_err(|e| e.to_string())?;
            let encoded = typed_struct::encode_struct(&value).map_err(|e| e.to_string())?;
            let ts = wire::replace_merged(typed_struct, 2, Some(&encoded)).map_err(e)?;
            wire::replace_last(&remote.typed_config, 2, &ts).map_err(e)?
        }
    };
    let tec = wire::replace_merged(&remote.tec, 2, Some(&typed_config)).map_err(e)?;
    wire::replace_last(&remote.any, 2, &tec).map_err(e)
}

/// Splices `config.vm_config` of a Wasm message: `code` becomes `local{filename: path}`, internal env vars go.
fn rewrite_wasm(wasm: &[u8], path: &str) -> Result<Vec<u8>, wire::WireError> {
    let config = wire::merged(wasm, 1)?.unwrap_or(Cow::Borrowed(&[]));
    let vm = wire::merged(&config, 3)?.unwrap_or(Cow::Borrowed(&[]));
    let mut data_source = Vec::new();
    wire::put_len(&mut data_source, 1, path.as_bytes());
    let mut code = Vec::new();
    wire::put_len(&mut code, 1, &data_source);
    let mut new_vm = wire::replace_merged(&vm, 3, Some(&code))?;
    if let Some(env) = wire::merged(&new_vm, 7)? {
        let stripped = strip_env(&env)?;
        new_vm = wire::replace_merged(&new_vm, 7, stripped.as_deref())?;
    }
    let new_config = wire::replace_merged(&config, 3, Some(&new_vm))?;
    wire::replace_merged(wasm, 1, Some(&new_config))
}

/// `EnvironmentVariables` without `ISTIO_META_*` entries; `None` when neither key/values nor host keys remain.
fn strip_env(env: &[u8]) -> Result<Option<Vec<u8>>, wire::WireError> {
    let mut out = Vec::with_capacity(env.len());
    let (mut key_values, mut host_keys) = (0, 0);
    for field in Fields::new(env) {
        let field = field?;
        match field.number {
            1 => host_keys += 1,
            2 => {
                if wire::last_string(field.bytes()?, 1)?.starts_with(INTERNAL_ENV_PREFIX) {
                    continue;
                }
                key_values += 1;
            }
            _ => {}
        }
        out.extend_from_slice(field.raw);
    }
    Ok(if key_values == 0 && host_keys == 0 { None } else { Some(out) })
}
