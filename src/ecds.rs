//! What to do with each ECDS resource: Istio's decision table (pass through, convert, fall back to RBAC,
//! reject). Reads and splices the wire format through `wire`; never decodes into partial structs.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::metrics::{ConversionResult, Metrics};
use crate::module::{Module, ModuleError, ModuleList, ModuleRequest, ModuleSource, PullPolicy};
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
    /// sha256 of every module the converted response references (the in-use set); `None` when it is the very
    /// list the source already holds as in use (a repeated push), so that nothing needs to change.
    pub modules: Option<ModuleList>,
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

/// Without a memo (the decision table alone; tests).
#[cfg(test)]
pub(crate) fn convert_sotw(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<Converted, Rejection> {
    convert_sotw_memo(input, source, policy, metrics, None)
}

/// [`convert_sotw`] reusing (and refreshing) the results of earlier calls kept in `memo`.
pub(crate) fn convert_sotw_memo(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
    memo: Option<&Memo>,
) -> Result<Converted, Rejection> {
    if let Some(repeated) = memo.and_then(|m| m.repeat_resources(input, source, metrics)) {
        return Ok(repeated);
    }
    schema::validate(&schema::DISCOVERY_RESPONSE, input)
        .map_err(|e| Rejection { reason: format!("malformed DiscoveryResponse: {e}") })?;
    if !is_ecds(input)? {
        return Ok(Converted { bytes: input.to_vec(), modules: Some(ModuleList::default()) });
    }
    let mut keys: Vec<&[u8]> = Vec::new();
    // Where the resource fields are, and whether they stand together (no other field between them).
    let (mut span_start, mut span_end, mut raw_total) = (usize::MAX, 0, 0);
    for field in Fields::new(input) {
        let field = field.map_err(malformed_response)?;
        if field.number == 2 {
            keys.push(field.payload);
            let at = offset_in(input, field.raw);
            span_start = span_start.min(at);
            span_end = at + field.raw.len();
            raw_total += field.raw.len();
        }
    }
    let name_at = |i: usize| tec_name_of(keys[i]);
    let analyze_at = |i: usize| analyze(keys[i], i + 1, None, policy.default_timeout);
    let (mut done, stable) = run(&keys, &analyze_at, &name_at, source, policy, metrics, memo)?;
    let modules = distinct_modules(done.iter().filter_map(|d| d.module.clone()));
    if let Some(memo) = memo {
        let entries = memoize(&mut done, &keys, &name_at, stable);
        let contiguous = !keys.is_empty() && span_end - span_start == raw_total;
        if contiguous && entries.len() == keys.len() {
            let envelope = envelope_of(input, span_start, span_end);
            memo.keep_resources(&input[span_start..span_end], &entries, &modules, envelope);
        }
        memo.replace(entries);
    }
    if done.iter().all(|d| d.unchanged()) {
        return Ok(Converted { bytes: input.to_vec(), modules: Some(modules) });
    }
    let extra: usize = done.iter().map(|d| d.output().map_or(0, |o| o.len() + 5)).sum();
    let mut out = Vec::with_capacity(input.len() + extra);
    let mut next = done.iter();
    for field in Fields::new(input) {
        let field = field.map_err(malformed_response)?;
        if field.number != 2 {
            out.extend_from_slice(field.raw);
            continue;
        }
        match next.next().and_then(Done::output) {
            Some(any) => wire::put_len(&mut out, 2, any),
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(Converted { bytes: out, modules: Some(modules) })
}

/// Without a memo (the decision table alone; tests).
#[cfg(test)]
pub(crate) fn convert_delta(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
) -> Result<DeltaConverted, Rejection> {
    convert_delta_memo(input, source, policy, metrics, None)
}

/// [`convert_delta`] reusing (and refreshing) the results of earlier calls kept in `memo`, by resource name.
pub(crate) fn convert_delta_memo(
    input: &[u8],
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
    memo: Option<&Memo>,
) -> Result<DeltaConverted, Rejection> {
    let malformed = |e: &dyn fmt::Display| Rejection { reason: format!("malformed DeltaDiscoveryResponse: {e}") };
    schema::validate(&schema::DELTA_DISCOVERY_RESPONSE, input).map_err(|e| malformed(&e))?;
    let mut removed = Vec::new();
    let mut names = Vec::new();
    let mut keys: Vec<&[u8]> = Vec::new();
    let mut bodies: Vec<Option<Cow<'_, [u8]>>> = Vec::new();
    for field in Fields::new(input) {
        let field = field.map_err(|e| malformed(&e))?;
        match field.number {
            2 => {
                let resource = field.payload;
                names.push(wire::last_string(resource, 3).map_err(|e| malformed(&e))?.to_owned());
                bodies.push(wire::merged(resource, 2).map_err(|e| malformed(&e))?);
                keys.push(resource);
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
    let name_at = |i: usize| Some(names[i].as_str());
    let analyze_at = |i: usize| match &bodies[i] {
        Some(any) => analyze(any, i + 1, Some(&names[i]), policy.default_timeout),
        None => Analysis::Malformed(format!("{}: has no resource body", label(i + 1, "", Some(&names[i])))),
    };
    let (mut done, stable) = run(&keys, &analyze_at, &name_at, source, policy, metrics, memo)?;
    // The delta memo holds whole `Resource`s: splice the new Any into each converted one.
    for (d, resource) in done.iter_mut().zip(&keys) {
        if let Out::New(any) = &d.out {
            d.out = Out::New(wire::replace_merged(resource, 2, Some(any)).map_err(|e| malformed(&e))?);
        }
    }
    if let Some(memo) = memo {
        let entries = memoize(&mut done, &keys, &name_at, stable);
        memo.merge(entries, &removed);
    }
    let resources: Vec<(String, Option<Arc<str>>)> =
        names.into_iter().zip(done.iter()).map(|(n, d)| (n, d.module.clone())).collect();
    if done.iter().all(|d| d.unchanged()) {
        return Ok(DeltaConverted { bytes: input.to_vec(), resources, removed });
    }
    let extra: usize = done.iter().map(|d| d.output().map_or(0, |o| o.len() + 5)).sum();
    let mut out = Vec::with_capacity(input.len() + extra);
    let mut next = done.iter();
    for field in Fields::new(input) {
        let field = field.map_err(|e| malformed(&e))?;
        if field.number != 2 {
            out.extend_from_slice(field.raw);
            continue;
        }
        match next.next().and_then(Done::output) {
            Some(resource) => wire::put_len(&mut out, 2, resource),
            None => out.extend_from_slice(field.raw),
        }
    }
    Ok(DeltaConverted { bytes: out, resources, removed })
}

/// Where `part` (a sub-slice of `whole`) starts in it.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// Whether the resource fields of `input` starting at `start` may be exactly `span`: it fits, is not
/// followed by a further resource (key 0x12), and its first and last bytes agree. Cheap, so that only the
/// likely span is compared in full.
fn may_repeat(input: &[u8], start: usize, span: &[u8]) -> bool {
    let end = start + span.len();
    let edge = 16.min(span.len());
    input.len() >= end
        && input.get(end) != Some(&0x12)
        && input[start..start + edge] == span[..edge]
        && input[end - edge..end] == span[span.len() - edge..]
}

/// [`check_envelope_field`] for every field of `part`. The shape of every field istiod sends around the
/// resources (a one-byte key of a length-delimited field with a one-byte length) is read inline; anything
/// else goes to the general reader from there on.
#[inline(always)]
fn check_envelope(part: &[u8], known: &[Box<[u8]>], ecds: &mut bool) -> Option<()> {
    let mut pos = 0;
    while let Some(&[key, len, ..]) = part.get(pos..) {
        if key >= 0x80 || key & 7 != 2 || key < 8 || len >= 0x80 {
            break;
        }
        let raw = part.get(pos..pos + 2 + usize::from(len))?;
        let field = wire::Field {
            number: u32::from(key >> 3),
            wire_type: prost::encoding::WireType::LengthDelimited,
            payload: &raw[2..],
            raw,
        };
        check_envelope_field(&field, known, ecds)?;
        pos += raw.len();
    }
    for field in Fields::new(&part[pos..]) {
        check_envelope_field(&field.ok()?, known, ecds)?;
    }
    Some(())
}

/// Checks a `DiscoveryResponse` field outside the resource span as the full path's validation would; a
/// field byte-identical to one in `known` (accepted by the full path before) needs no second look. Notes
/// whether a `type_url` is ECDS (the last one counts).
#[inline(always)]
fn check_envelope_field(field: &wire::Field<'_>, known: &[Box<[u8]>], ecds: &mut bool) -> Option<()> {
    match field.number {
        2 => return None,
        // version and nonce: new on every push
        1 | 5 => return field.is_string().then_some(()),
        _ => {}
    }
    if known.iter().any(|k| **k == *field.raw) {
        *ecds |= field.number == 4; // only ECDS type URLs are known
        return Some(());
    }
    match field.number {
        4 => *ecds = is_ecds_type_url(field.string().ok()?),
        _ => schema::validate_field_of(&schema::DISCOVERY_RESPONSE, field).ok()?,
    }
    Some(())
}

/// The fields of a response outside its resource span (`start..end`) that pushes repeat as they are: all
/// but version and nonce, and a type URL only when it is ECDS. The response was validated in full.
fn envelope_of(input: &[u8], start: usize, end: usize) -> Vec<Box<[u8]>> {
    Fields::new(&input[..start])
        .chain(Fields::new(&input[end..]))
        .map_while(Result::ok)
        .filter(|f| match f.number {
            1 | 2 | 5 => false,
            4 => f.string().is_ok_and(is_ecds_type_url),
            _ => true,
        })
        .map(|f| f.raw.into())
        .collect()
}

/// The `TypedExtensionConfig.name` of a resource `Any`, if it reads cleanly (only used to find memo entries).
fn tec_name_of(any: &[u8]) -> Option<&str> {
    let tec = wire::last(any, 2).ok()??.payload;
    wire::last_string(tec, 1).ok()
}

fn malformed_response(e: wire::WireError) -> Rejection {
    Rejection { reason: format!("malformed DiscoveryResponse: {e}") }
}

/// Whether the response carries ECDS resources: `type_url` (field 4) empty or naming TypedExtensionConfig.
fn is_ecds(response: &[u8]) -> Result<bool, Rejection> {
    Ok(is_ecds_type_url(wire::last_string(response, 4).map_err(malformed_response)?))
}

fn is_ecds_type_url(type_url: &str) -> bool {
    type_url.is_empty() || type_url.strip_prefix(TYPE_PREFIX) == Some(TEC) || short_name(type_url) == TEC
}

/// The distinct modules, sorted (a set; sorting keeps large responses O(n log n)).
fn distinct_modules(all: impl Iterator<Item = Arc<str>>) -> ModuleList {
    let mut out: Vec<Arc<str>> = all.collect();
    out.sort_unstable();
    out.dedup();
    out.into()
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
enum Analysis<'a> {
    /// Leaves unchanged (`no_remote_load`).
    Keep,
    /// Malformed (`unmarshal_failure`): the full reason text.
    Malformed(String),
    Remote(Box<Remote<'a>>),
    /// Unchanged since a memoised conversion that still holds.
    Memo(Arc<MemoEntry>),
}

/// A Wasm filter with remote code.
struct Remote<'a> {
    label: String,
    plugin_name: String,
    tec_name: String,
    kind: WasmKind,
    fail_open: bool,
    url: String,
    /// What to ask the store, or why the fetch fails without asking (status and cause).
    want: Result<ModuleRequest, (ConversionResult, String)>,
    /// The resource's `Any` and its pieces (borrowed from the response unless merged), for the rewrite.
    any: &'a [u8],
    tec: &'a [u8],
    typed_config: Cow<'a, [u8]>,
    form: Form<'a>,
}

enum Form<'a> {
    /// `typed_config` holds the Wasm message itself.
    Direct { wasm: Cow<'a, [u8]> },
    /// `typed_config` holds a TypedStruct; `wasm` is its Struct encoded as the Wasm message.
    Struct {
        wasm: Vec<u8>,
        encodable: bool,
        typed_struct: Cow<'a, [u8]>,
        value: std::collections::BTreeMap<String, schema::JVal>,
    },
}

impl Form<'_> {
    fn wasm(&self) -> &[u8] {
        match self {
            Form::Direct { wasm } => wasm,
            Form::Struct { wasm, .. } => wasm,
        }
    }
}

fn analyze<'a>(any: &'a [u8], ordinal: usize, hint: Option<&str>, default_timeout: Duration) -> Analysis<'a> {
    if not_wasm(any) {
        return Analysis::Keep;
    }
    analyze_fully(any, ordinal, hint, default_timeout)
}

/// The cheap first look: true when the resource is a well-formed `TypedExtensionConfig` (checked as
/// `schema::validate` checks it: wire structure, wire types, UTF-8 of its strings and of its typed_config's)
/// whose typed_config is neither a Wasm filter nor a TypedStruct — what `analyze_fully` would `Keep` —
/// decided without allocating. Anything else (Wasm, TypedStruct, anything malformed) is left to
/// `analyze_fully`, which also words the errors.
fn not_wasm(any: &[u8]) -> bool {
    fn scan<'a>(buf: &'a [u8], mut on: impl FnMut(&wire::Field<'a>) -> bool) -> bool {
        for field in Fields::new(buf) {
            match field {
                Ok(f) if on(&f) => {}
                _ => return false,
            }
        }
        true
    }
    let is_string = |f: &wire::Field<'_>| {
        f.wire_type == prost::encoding::WireType::LengthDelimited && std::str::from_utf8(f.payload).is_ok()
    };
    let is_len = |f: &wire::Field<'_>| f.wire_type == prost::encoding::WireType::LengthDelimited;
    let (mut type_url, mut tec): (&[u8], &[u8]) = (b"", b"");
    let ok = scan(any, |f| match f.number {
        1 if is_string(f) => {
            type_url = f.payload;
            true
        }
        2 if is_len(f) => {
            tec = f.payload;
            true
        }
        1 | 2 => false,
        _ => true,
    });
    // (type URLs were checked as UTF-8 above; a non-UTF-8 one goes the slow way)
    if !ok || short_name(std::str::from_utf8(type_url).unwrap_or("")) != TEC {
        return false;
    }
    let (mut occurrences, mut inner_url): (usize, &[u8]) = (0, b"");
    let ok = scan(tec, |f| match f.number {
        1 => is_string(f),
        2 if is_len(f) => {
            occurrences += 1;
            scan(f.payload, |g| match g.number {
                1 if is_string(g) => {
                    inner_url = g.payload;
                    true
                }
                2 => is_len(g),
                1 => false,
                _ => true,
            })
        }
        2 => false,
        _ => true,
    });
    if !ok || occurrences == 0 {
        return false;
    }
    let inner = std::str::from_utf8(inner_url).unwrap_or("");
    WasmKind::of(inner).is_none() && !matches!(short_name(inner), UDPA_TYPED_STRUCT | XDS_TYPED_STRUCT)
}

fn analyze_fully<'a>(any: &'a [u8], ordinal: usize, hint: Option<&str>, default_timeout: Duration) -> Analysis<'a> {
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
        Ok(Some(tc)) => tc,
        Ok(None) => return Analysis::Malformed(format!("{label}: does not contain any typed config")),
        Err(e) => return Analysis::Malformed(format!("{label}: {e}")),
    };
    let inner_url = wire::last_string(&typed_config, 1).unwrap_or_default().to_owned();
    // The last `value` of the (merged) typed_config: borrowed from the response unless the merge copied.
    let inner_value: Cow<'a, [u8]> = match &typed_config {
        Cow::Borrowed(tc) => match wire::last(tc, 2) {
            Ok(v) => Cow::Borrowed(v.map_or(&[][..], |f| f.payload)),
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
        },
        Cow::Owned(tc) => match wire::last(tc, 2) {
            Ok(v) => Cow::Owned(v.map_or(&[][..], |f| f.payload).to_vec()),
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
        },
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
        any,
        tec,
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
    out: Out,
    /// The module the resource now references.
    module: Option<Arc<str>>,
    /// A fresh result that may be memoised: `Some(url)` with the URL of a checksum-less module request
    /// (`Some(None)` for a pass-through or a request by sha256). Never set for fallbacks and failures.
    memoable: Option<Option<String>>,
}

/// The bytes a resource leaves with.
enum Out {
    /// Unchanged.
    Same,
    /// New bytes (SotW: the `Any`; delta: first the `Any`, then the whole `Resource`).
    New(Vec<u8>),
    /// As memoised (`output` None: unchanged).
    Memo(Arc<MemoEntry>),
}

impl Done {
    fn output(&self) -> Option<&[u8]> {
        match &self.out {
            Out::Same => None,
            Out::New(bytes) => Some(bytes),
            Out::Memo(e) => e.output.as_deref(),
        }
    }

    fn unchanged(&self) -> bool {
        self.output().is_none()
    }
}

// ---- memo ----

/// Earlier conversions of unchanged resources, so that a push that repeats them costs a comparison of bytes
/// instead of a conversion. An entry is the exact bytes of a resource and what they converted to; it is used
/// only while the module store's generation is the one it was made at (a module leaving the store, or a
/// change of what a URL resolves to, invalidates every entry that depends on the store), and a hit records
/// the counters a real conversion would (lookup hit with the module's last use, conversion result). Only
/// conversions and pass-throughs are kept: never fallbacks or failures, which are decided again each time.
#[derive(Default)]
pub(crate) struct Memo {
    table: Mutex<MemoTable>,
}

#[derive(Default)]
struct MemoTable {
    /// SotW: the resources of the latest few responses whose resources were all memoised, most recent first.
    repeats: Vec<Arc<RepeatedResources>>,
    /// The entries of the latest call in response order: a resource at the same position is compared first.
    order: Vec<Arc<MemoEntry>>,
    by_name: HashMap<Box<str>, Arc<MemoEntry>>,
    calls: u64,
}

/// The resource fields of a SotW response, exactly as they stood in it (one contiguous span), with what
/// converting them gave. istiod sends every push with a new nonce and often a new version even when no
/// resource changed: such a push is answered with one comparison of this span and one copy.
struct RepeatedResources {
    span: Box<[u8]>,
    /// The converted span; `None` when every resource passed through unchanged.
    output: Option<Box<[u8]>>,
    /// The module of each converted resource, in order: one store hit each when reused.
    hits: Vec<Arc<str>>,
    /// The store generation the conversions hold at.
    generation: u64,
    /// How many resources passed through (`no_remote_load`).
    kept: u64,
    /// What [`Converted::modules`] was (handed back as it is, which the store recognises cheaply).
    modules: ModuleList,
    /// Fields around the span in the response that made it, already validated (see [`envelope_of`]).
    envelope: Vec<Box<[u8]>>,
}

/// SotW: how many responses' resource spans are kept (a cache serving a few streams alternates between them).
const MEMO_REPEATS: usize = 4;

pub(crate) struct MemoEntry {
    name: Box<str>,
    input: Box<[u8]>,
    output: Option<Box<[u8]>>,
    module: Option<Arc<str>>,
    /// The URL of a checksum-less module request (its answer depends on the URL map).
    url: Option<Box<str>>,
    /// The store generation the answer holds at (irrelevant without a module).
    generation: u64,
    /// The memo call that last saw it (SotW eviction).
    seen: AtomicU64,
}

/// SotW: entries not seen for this many calls are dropped (checked every this many calls).
const MEMO_KEEP_CALLS: u64 = 8;
/// Delta: a table that grows past this is cleared (names are only dropped by removals otherwise).
const MEMO_MAX_DELTA: usize = 10_000;

impl Memo {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoTable> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For each resource, the entry holding exactly its bytes that is still valid at `generation`.
    fn find<'k>(
        &self,
        keys: &[&'k [u8]],
        name_at: &dyn Fn(usize) -> Option<&'k str>,
        generation: u64,
    ) -> Vec<Option<Arc<MemoEntry>>> {
        let t = self.lock();
        if t.order.is_empty() && t.by_name.is_empty() {
            return vec![None; keys.len()];
        }
        let mut found = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let entry = match t.order.get(i) {
                Some(e) if *e.input == **key => Some(e),
                _ => name_at(i).and_then(|n| t.by_name.get(n)).filter(|e| *e.input == **key),
            };
            found.push(entry.filter(|e| e.module.is_none() || e.generation == generation).cloned());
        }
        found
    }

    /// SotW: a response whose resource fields equal, byte for byte, a kept span (the other fields — nonce,
    /// version, control plane — may differ), while its conversions still hold: its output, recording what
    /// converting each resource for real would. `None` sends the response down the full path, which also
    /// reports anything malformed. This is the path of almost every push: one comparison of the span (the kept
    /// span is picked by its edges first) and one copy out.
    fn repeat_resources(&self, input: &[u8], source: &dyn ModuleSource, metrics: &Metrics) -> Option<Converted> {
        let start =
            Fields::new(input).map_while(Result::ok).find(|f| f.number == 2).map(|f| offset_in(input, f.raw))?;
        // Held to the end: the kept span is used in place (no reference count to move on the hottest path).
        let mut t = self.lock();
        let at = t
            .repeats
            .iter()
            .position(|r| may_repeat(input, start, &r.span) && input[start..][..r.span.len()] == *r.span)?;
        // Most recently used first: the spans of a few streams alternating on one cache all stay.
        if at > 0 {
            t.repeats[..=at].rotate_right(1);
        }
        let repeat = &*t.repeats[0];
        let end = start + repeat.span.len();
        // The other fields: well formed, no further resource, the last type URL an ECDS one.
        let mut ecds = true;
        check_envelope(&input[..start], &repeat.envelope, &mut ecds)?;
        check_envelope(&input[end..], &repeat.envelope, &mut ecds)?;
        if !ecds {
            return None;
        }
        if !repeat.hits.is_empty() && !source.reuse(&mut repeat.hits.iter().map(|m| &**m), repeat.generation) {
            return None;
        }
        metrics.record_conversions(ConversionResult::Success, repeat.hits.len() as u64);
        metrics.record_conversions(ConversionResult::NoRemoteLoad, repeat.kept);
        let modules = (!source.holds_sotw_in_use(&repeat.modules)).then(|| repeat.modules.clone());
        let bytes = match &repeat.output {
            None => {
                drop(t); // the input is the output: other callers need not wait for the copy
                input.to_vec()
            }
            Some(output) => [&input[..start], output, &input[end..]].concat(),
        };
        Some(Converted { bytes, modules })
    }

    /// SotW: keeps the resource fields `span` of a response all of whose resources are memoised (`entries`,
    /// in order), for [`Memo::repeat_resources`].
    fn keep_resources(&self, span: &[u8], entries: &[Arc<MemoEntry>], modules: &ModuleList, envelope: Vec<Box<[u8]>>) {
        let hits: Vec<Arc<str>> = entries.iter().filter_map(|e| e.module.clone()).collect();
        let generation = entries.iter().find(|e| e.module.is_some()).map_or(0, |e| e.generation);
        if entries.iter().any(|e| e.module.is_some() && e.generation != generation) {
            return; // made at different generations: they cannot all hold at once
        }
        let output = entries.iter().any(|e| e.output.is_some()).then(|| {
            // As the full path writes it: converted resources re-encoded, the others' fields as they came.
            let mut out = Vec::with_capacity(span.len() + 64 * entries.len());
            for (field, e) in Fields::new(span).map_while(Result::ok).zip(entries) {
                match &e.output {
                    Some(any) => wire::put_len(&mut out, 2, any),
                    None => out.extend_from_slice(field.raw),
                }
            }
            out.into_boxed_slice()
        });
        let kept = (entries.len() - hits.len()) as u64;
        let repeat =
            RepeatedResources { span: span.into(), output, hits, generation, kept, modules: modules.clone(), envelope };
        let mut t = self.lock();
        t.repeats.retain(|r| *r.span != *span);
        t.repeats.insert(0, Arc::new(repeat));
        t.repeats.truncate(MEMO_REPEATS);
    }

    /// SotW: the entries of the latest response become the table (older ones linger a few calls, so that
    /// responses alternating on one cache still find theirs).
    fn replace(&self, entries: Vec<Arc<MemoEntry>>) {
        let mut t = self.lock();
        t.calls += 1;
        let calls = t.calls;
        let same_order = t.order.len() == entries.len() && t.order.iter().zip(&entries).all(|(a, b)| Arc::ptr_eq(a, b));
        for e in &entries {
            e.seen.store(calls, Ordering::Relaxed);
        }
        if !same_order {
            for e in &entries {
                if !t.by_name.get(&*e.name).is_some_and(|old| Arc::ptr_eq(old, e)) {
                    t.by_name.insert(e.name.clone(), e.clone());
                }
            }
            t.order = entries;
        }
        if calls.is_multiple_of(MEMO_KEEP_CALLS) && t.by_name.len() > t.order.len() {
            t.by_name.retain(|_, e| e.seen.load(Ordering::Relaxed) + MEMO_KEEP_CALLS >= calls);
        }
    }

    /// Delta: the resources of the response replace their names' entries; removed names are dropped.
    fn merge(&self, entries: Vec<Arc<MemoEntry>>, removed: &[String]) {
        let mut t = self.lock();
        for name in removed {
            t.by_name.remove(name.as_str());
        }
        if t.by_name.len() + entries.len() > MEMO_MAX_DELTA {
            t.by_name.clear();
        }
        for e in &entries {
            t.by_name.insert(e.name.clone(), e.clone());
        }
        t.order = entries;
    }
}

/// Decides every resource of a response: reuses valid memo entries (when no other resource of the call
/// could change their answer), analyses the others, asks the store, applies the decision table. Returns
/// what became of each resource and, with a memo, the store generation when it did not move during the call
/// (the generation fresh results may be memoised at).
#[allow(clippy::too_many_arguments)]
fn run<'k>(
    keys: &[&'k [u8]],
    analyze_at: &dyn Fn(usize) -> Analysis<'k>,
    name_at: &dyn Fn(usize) -> Option<&'k str>,
    source: &dyn ModuleSource,
    policy: &ConversionPolicy,
    metrics: &Metrics,
    memo: Option<&Memo>,
) -> Result<(Vec<Done>, Option<u64>), Rejection> {
    let Some(memo) = memo else {
        let items = (0..keys.len()).map(analyze_at).collect();
        return Ok((process(items, source, policy, metrics)?, None));
    };
    let generation = source.generation();
    let mut found = memo.find(keys, name_at, generation);
    let mut items: Vec<Option<Analysis<'k>>> =
        found.iter().enumerate().map(|(i, f)| if f.is_some() { None } else { Some(analyze_at(i)) }).collect();
    // A checksum-less request's answer depends on its URL's entry, which another request of this call for the
    // same URL may change: such resources are converted for real, in order with the others.
    if found.iter().any(|f| f.as_ref().is_some_and(|e| e.url.is_some())) {
        let asked: Vec<String> = items
            .iter()
            .flatten()
            .filter_map(|a| match a {
                Analysis::Remote(r) => r.want.as_ref().ok().map(|q| q.url.clone()),
                _ => None,
            })
            .collect();
        for (i, f) in found.iter_mut().enumerate() {
            if f.as_ref().and_then(|e| e.url.as_deref()).is_some_and(|u| asked.iter().any(|a| a == u)) {
                *f = None;
                items[i] = Some(analyze_at(i));
            }
        }
    }
    let mut reused = found.iter().flatten().filter_map(|e| e.module.as_deref()).peekable();
    if reused.peek().is_some() && !source.reuse(&mut reused, generation) {
        for (i, f) in found.iter_mut().enumerate() {
            if f.as_ref().is_some_and(|e| e.module.is_some()) {
                *f = None;
                items[i] = Some(analyze_at(i));
            }
        }
    }
    let items = items
        .into_iter()
        .zip(found)
        .map(|(item, f)| match (item, f) {
            (Some(item), _) => item,
            (None, Some(entry)) => Analysis::Memo(entry),
            (None, None) => Analysis::Malformed("internal error: resource not analysed".to_owned()),
        })
        .collect();
    let done = process(items, source, policy, metrics)?;
    let stable = (source.generation() == generation).then_some(generation);
    Ok((done, stable))
}

/// Turns the memoable fresh results of a call into memo entries (results depending on the store only when
/// the generation stood still: `stable`), and returns every entry of the call in order.
fn memoize<'k>(
    done: &mut [Done],
    keys: &[&'k [u8]],
    name_at: &dyn Fn(usize) -> Option<&'k str>,
    stable: Option<u64>,
) -> Vec<Arc<MemoEntry>> {
    let mut entries = Vec::with_capacity(done.len());
    for (i, d) in done.iter_mut().enumerate() {
        if let Out::Memo(e) = &d.out {
            entries.push(e.clone());
            continue;
        }
        let Some(url) = d.memoable.take() else { continue };
        let generation = match (&d.module, stable) {
            (None, _) => 0,
            (Some(_), Some(g)) => g,
            (Some(_), None) => continue,
        };
        let output = match std::mem::replace(&mut d.out, Out::Same) {
            Out::New(bytes) => Some(bytes.into_boxed_slice()),
            _ => None,
        };
        let entry = Arc::new(MemoEntry {
            name: name_at(i).unwrap_or_default().into(),
            input: keys[i].into(),
            output,
            module: d.module.clone(),
            url: url.map(String::into_boxed_str),
            generation,
            seen: AtomicU64::new(0),
        });
        d.out = Out::Memo(entry.clone());
        entries.push(entry);
    }
    entries
}

fn process(
    items: Vec<Analysis<'_>>,
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

    let unchanged = || Done { out: Out::Same, module: None, memoable: None };
    let mut reasons = Vec::new();
    let mut done = Vec::with_capacity(items.len());
    for (item, slot) in items.into_iter().zip(slots) {
        match item {
            Analysis::Keep => {
                metrics.record_conversion(ConversionResult::NoRemoteLoad);
                done.push(Done { out: Out::Same, module: None, memoable: Some(None) });
            }
            Analysis::Memo(entry) => {
                metrics.record_conversion(if entry.module.is_some() {
                    ConversionResult::Success
                } else {
                    ConversionResult::NoRemoteLoad
                });
                done.push(Done { module: entry.module.clone(), out: Out::Memo(entry), memoable: None });
            }
            Analysis::Malformed(reason) => {
                metrics.record_conversion(ConversionResult::UnmarshalFailure);
                reasons.push(reason);
                done.push(unchanged());
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
                            let url = match &remote.want {
                                Ok(req) if req.sha256.is_none() => Some(req.url.clone()),
                                _ => None,
                            };
                            done.push(Done {
                                out: Out::New(any),
                                module: Some(module.sha256.clone()),
                                memoable: Some(url),
                            });
                        }
                        Err(e) => {
                            metrics.record_conversion(ConversionResult::MarshalFailure);
                            reasons.push(format!("{}: rewriting the config failed: {e}", remote.label));
                            done.push(unchanged());
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
                                match wire::replace_last(remote.any, 2, &tec) {
                                    Ok(any) => done.push(Done { out: Out::New(any), module: None, memoable: None }),
                                    Err(e) => {
                                        reasons.push(format!(
                                            "{}: {what}; building the fallback failed: {e}",
                                            remote.label
                                        ));
                                        done.push(unchanged());
                                    }
                                }
                            }
                            None => {
                                reasons.push(format!("{}: {what}", remote.label));
                                done.push(unchanged());
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

/// The new bytes of the resource's `Any` with the module at `path`: the new `vm_config` is built, then
/// spliced through every enclosing message in one pass that writes the result once.
fn rewrite(remote: &Remote<'_>, path: &str) -> Result<Vec<u8>, String> {
    let e = |e: wire::WireError| e.to_string();
    // Any.value (last) -> TypedExtensionConfig.typed_config (merged)
    let outer = [Level::last(remote.any, 2), Level::merged(remote.tec, 2)];
    match &remote.form {
        Form::Direct { wasm } => {
            let config = wire::merged(wasm, 1).map_err(e)?.unwrap_or(Cow::Borrowed(&[]));
            let vm = new_vm_config(&config, path).map_err(e)?;
            // ... -> typed_config.value (last) -> Wasm.config (merged) -> PluginConfig.vm_config (merged)
            let levels = [
                outer[0],
                outer[1],
                Level::last(&remote.typed_config, 2),
                Level::merged(wasm, 1),
                Level::merged(&config, 3),
            ];
            splice(&levels, &vm).map_err(e)
        }
        Form::Struct { wasm, encodable: true, .. } => {
            let config = wire::merged(wasm, 1).map_err(e)?.unwrap_or(Cow::Borrowed(&[]));
            let vm = new_vm_config(&config, path).map_err(e)?;
            let wasm = splice(&[Level::merged(wasm, 1), Level::merged(&config, 3)], &vm).map_err(e)?;
            let mut any = Vec::with_capacity(wasm.len() + 80);
            wire::put_len(&mut any, 1, format!("{TYPE_PREFIX}{}", remote.kind.type_name()).as_bytes());
            wire::put_len(&mut any, 2, &wasm);
            splice(&outer, &any).map_err(e)
        }
        Form::Struct { encodable: false, typed_struct, value, .. } => {
            let mut value = value.clone();
            typed_struct::rewrite_struct(&mut value, path).map_err(|e| e.to_string())?;
            let encoded = typed_struct::encode_struct(&value).map_err(|e| e.to_string())?;
            let ts = wire::replace_merged(typed_struct, 2, Some(&encoded)).map_err(e)?;
            let typed_config = wire::replace_last(&remote.typed_config, 2, &ts).map_err(e)?;
            splice(&outer, &typed_config).map_err(e)
        }
    }
}

/// `config.vm_config` (of the merged `PluginConfig` bytes) with `code` = `local{filename: path}` and the
/// internal env vars stripped.
fn new_vm_config(config: &[u8], path: &str) -> Result<Vec<u8>, wire::WireError> {
    let vm = wire::merged(config, 3)?.unwrap_or(Cow::Borrowed(&[]));
    let mut data_source = Vec::with_capacity(path.len() + 4);
    wire::put_len(&mut data_source, 1, path.as_bytes());
    let mut code = Vec::with_capacity(data_source.len() + 4);
    wire::put_len(&mut code, 1, &data_source);
    let mut new_vm = wire::replace_merged(&vm, 3, Some(&code))?;
    if let Some(env) = wire::merged(&new_vm, 7)? {
        let stripped = strip_env(&env)?;
        new_vm = wire::replace_merged(&new_vm, 7, stripped.as_deref())?;
    }
    Ok(new_vm)
}

/// One enclosing message of a nested splice: in `buf`, field `number` is replaced by the next level's new
/// bytes (the innermost level's: the leaf), at its last occurrence (appended when absent). `merged`: every
/// occurrence is dropped (they were merged into the one replaced, as `wire::replace_merged`); otherwise only
/// the last occurrence is replaced and earlier ones keep their bytes (as `wire::replace_last`).
#[derive(Clone, Copy)]
struct Level<'b> {
    buf: &'b [u8],
    number: u32,
    merged: bool,
}

impl<'b> Level<'b> {
    fn merged(buf: &'b [u8], number: u32) -> Level<'b> {
        Level { buf, number, merged: true }
    }

    fn last(buf: &'b [u8], number: u32) -> Level<'b> {
        Level { buf, number, merged: false }
    }

    /// Index of the last occurrence of the field among the message's fields.
    fn last_index(&self) -> Result<Option<usize>, wire::WireError> {
        let mut last = None;
        for (i, field) in Fields::new(self.buf).enumerate() {
            if field?.number == self.number {
                last = Some(i);
            }
        }
        Ok(last)
    }

    /// The size of this level's new bytes when the replaced field's payload is `child` bytes long.
    fn size(&self, child: usize) -> Result<usize, wire::WireError> {
        let last = self.last_index()?;
        let replaced =
            prost::encoding::key_len(self.number) + prost::encoding::encoded_len_varint(child as u64) + child;
        let mut size = if last.is_none() { replaced } else { 0 };
        for (i, field) in Fields::new(self.buf).enumerate() {
            let field = field?;
            if field.number != self.number || (!self.merged && Some(i) != last) {
                size += field.raw.len();
            } else if Some(i) == last {
                size += replaced;
            }
        }
        Ok(size)
    }
}

/// Splices `leaf` through `levels` (outermost first) in one pass: each level's bytes are written once,
/// straight into the result.
fn splice(levels: &[Level<'_>], leaf: &[u8]) -> Result<Vec<u8>, wire::WireError> {
    let mut sizes = vec![0; levels.len() + 1];
    sizes[levels.len()] = leaf.len();
    for i in (0..levels.len()).rev() {
        sizes[i] = levels[i].size(sizes[i + 1])?;
    }
    let mut out = Vec::with_capacity(sizes[0]);
    write_levels(&mut out, levels, &sizes[1..], leaf)?;
    debug_assert_eq!(out.len(), sizes[0]);
    Ok(out)
}

/// Writes `levels[0]` with its field replaced by the rest; `sizes[0]` is the size of that replacement.
fn write_levels(out: &mut Vec<u8>, levels: &[Level<'_>], sizes: &[usize], leaf: &[u8]) -> Result<(), wire::WireError> {
    let Some((level, inner)) = levels.split_first() else {
        out.extend_from_slice(leaf);
        return Ok(());
    };
    let last = level.last_index()?;
    let replace = |out: &mut Vec<u8>| {
        prost::encoding::encode_key(level.number, prost::encoding::WireType::LengthDelimited, out);
        prost::encoding::encode_varint(sizes[0] as u64, out);
        write_levels(out, inner, &sizes[1..], leaf)
    };
    for (i, field) in Fields::new(level.buf).enumerate() {
        let field = field?;
        if Some(i) == last {
            replace(out)?;
        } else if field.number != level.number || !level.merged {
            out.extend_from_slice(field.raw);
        }
    }
    if last.is_none() {
        replace(out)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ConversionResult as CR;
    use prost::Message as _;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    // ---- small prost mirrors of the schema, for building inputs and decoding outputs ----

    #[derive(Clone, PartialEq, prost::Message)]
    struct PAny {
        #[prost(string, tag = "1")]
        type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PResponse {
        #[prost(string, tag = "1")]
        version_info: String,
        #[prost(message, repeated, tag = "2")]
        resources: Vec<PAny>,
        #[prost(string, tag = "4")]
        type_url: String,
        #[prost(string, tag = "5")]
        nonce: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PTec {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(message, optional, tag = "2")]
        typed_config: Option<PAny>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PWasm {
        #[prost(message, optional, tag = "1")]
        config: Option<PPluginConfig>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PPluginConfig {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(string, tag = "2")]
        root_id: String,
        #[prost(message, optional, tag = "3")]
        vm_config: Option<PVmConfig>,
        #[prost(message, optional, tag = "4")]
        configuration: Option<PAny>,
        #[prost(bool, tag = "5")]
        fail_open: bool,
        #[prost(int32, tag = "7")]
        failure_policy: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PVmConfig {
        #[prost(string, tag = "1")]
        vm_id: String,
        #[prost(string, tag = "2")]
        runtime: String,
        #[prost(message, optional, tag = "3")]
        code: Option<PAsync>,
        #[prost(bool, tag = "6")]
        nack_on_code_cache_miss: bool,
        #[prost(message, optional, tag = "7")]
        environment_variables: Option<PEnv>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PAsync {
        #[prost(message, optional, tag = "1")]
        local: Option<PDataSource>,
        #[prost(message, optional, tag = "2")]
        remote: Option<PRemote>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PDataSource {
        #[prost(string, optional, tag = "1")]
        filename: Option<String>,
        #[prost(string, optional, tag = "3")]
        inline_string: Option<String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PRemote {
        #[prost(message, optional, tag = "1")]
        http_uri: Option<PHttpUri>,
        #[prost(string, tag = "2")]
        sha256: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PHttpUri {
        #[prost(string, tag = "1")]
        uri: String,
        #[prost(string, tag = "2")]
        cluster: String,
        #[prost(message, optional, tag = "3")]
        timeout: Option<PDuration>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PDuration {
        #[prost(int64, tag = "1")]
        seconds: i64,
        #[prost(int32, tag = "2")]
        nanos: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PEnv {
        #[prost(string, repeated, tag = "1")]
        host_env_keys: Vec<String>,
        #[prost(btree_map = "string, string", tag = "2")]
        key_values: BTreeMap<String, String>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PRules {
        #[prost(int32, tag = "1")]
        action: i32,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PHttpRbac {
        #[prost(message, optional, tag = "1")]
        rules: Option<PRules>,
        #[prost(string, tag = "6")]
        rules_stat_prefix: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PNetRbac {
        #[prost(message, optional, tag = "1")]
        rules: Option<PRules>,
        #[prost(string, tag = "3")]
        stat_prefix: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PTypedStruct {
        #[prost(string, tag = "1")]
        type_url: String,
        #[prost(message, optional, tag = "2")]
        value: Option<PStruct>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PStruct {
        #[prost(btree_map = "string, message", tag = "1")]
        fields: BTreeMap<String, PValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PValue {
        #[prost(oneof = "PKind", tags = "1, 2, 3, 4, 5, 6")]
        kind: Option<PKind>,
    }
    #[derive(Clone, PartialEq, prost::Oneof)]
    enum PKind {
        #[prost(int32, tag = "1")]
        Null(i32),
        #[prost(double, tag = "2")]
        Num(f64),
        #[prost(string, tag = "3")]
        Str(String),
        #[prost(bool, tag = "4")]
        Bool(bool),
        #[prost(message, tag = "5")]
        Struct(PStruct),
        #[prost(message, tag = "6")]
        List(PList),
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PList {
        #[prost(message, repeated, tag = "1")]
        values: Vec<PValue>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PDelta {
        #[prost(string, tag = "1")]
        system_version_info: String,
        #[prost(message, repeated, tag = "2")]
        resources: Vec<PResource>,
        #[prost(string, tag = "4")]
        type_url: String,
        #[prost(string, repeated, tag = "6")]
        removed_resources: Vec<String>,
        #[prost(message, repeated, tag = "8")]
        removed_resource_names: Vec<PResourceName>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PResource {
        #[prost(string, tag = "1")]
        version: String,
        #[prost(message, optional, tag = "2")]
        resource: Option<PAny>,
        #[prost(string, tag = "3")]
        name: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct PResourceName {
        #[prost(string, tag = "1")]
        name: String,
    }

    fn pstruct(v: serde_json::Value) -> PStruct {
        match pvalue(v).kind {
            Some(PKind::Struct(s)) => s,
            _ => panic!("not an object"),
        }
    }

    fn pvalue(v: serde_json::Value) -> PValue {
        let kind = match v {
            serde_json::Value::Null => PKind::Null(0),
            serde_json::Value::Bool(b) => PKind::Bool(b),
            serde_json::Value::Number(n) => PKind::Num(n.as_f64().unwrap()),
            serde_json::Value::String(s) => PKind::Str(s),
            serde_json::Value::Array(a) => PKind::List(PList { values: a.into_iter().map(pvalue).collect() }),
            serde_json::Value::Object(o) => {
                PKind::Struct(PStruct { fields: o.into_iter().map(|(k, v)| (k, pvalue(v))).collect() })
            }
        };
        PValue { kind: Some(kind) }
    }

    // ---- the fake store ----

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<Vec<ModuleRequest>>>,
    }

    impl ModuleSource for Fake {
        fn get_all(&self, requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>> {
            self.calls.lock().unwrap().push(requests.to_vec());
            requests
                .iter()
                .map(|r| {
                    let file = r.url.rsplit('/').next().unwrap_or("").to_owned();
                    if file.starts_with("bad") {
                        Err(ModuleError { counted_as: None, message: "checksum mismatch: want aa, got bb".to_owned() })
                    } else {
                        Ok(Module { path: format!("/cache/{file}").into(), sha256: format!("sha-{file}").into() })
                    }
                })
                .collect()
        }
    }

    impl Fake {
        fn requests(&self) -> Vec<ModuleRequest> {
            self.calls.lock().unwrap().concat()
        }
        fn call_count(&self) -> usize {
            self.calls.lock().unwrap().len()
        }
    }

    const ECDS: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    const HTTP: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
    const NET: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";

    fn policy() -> ConversionPolicy {
        ConversionPolicy { default_timeout: Duration::from_secs(5), on_fetch_failure: OnFetchFailure::Reject }
    }

    fn deny_policy() -> ConversionPolicy {
        ConversionPolicy { on_fetch_failure: OnFetchFailure::Deny, ..policy() }
    }

    fn any(type_url: &str, value: Vec<u8>) -> PAny {
        PAny { type_url: type_url.to_owned(), value }
    }

    fn remote_code(url: &str, sha: &str) -> PAsync {
        PAsync {
            local: None,
            remote: Some(PRemote {
                http_uri: Some(PHttpUri {
                    uri: url.to_owned(),
                    cluster: "_".to_owned(),
                    timeout: Some(PDuration { seconds: 30, nanos: 0 }),
                }),
                sha256: sha.to_owned(),
            }),
        }
    }

    fn wasm(code: Option<PAsync>, env: Option<PEnv>) -> PWasm {
        PWasm {
            config: Some(PPluginConfig {
                name: "ns.plugin".to_owned(),
                root_id: "root".to_owned(),
                vm_config: Some(PVmConfig {
                    vm_id: "vm".to_owned(),
                    runtime: "envoy.wasm.runtime.v8".to_owned(),
                    code,
                    nack_on_code_cache_miss: true,
                    environment_variables: env,
                }),
                configuration: Some(any(
                    "type.googleapis.com/google.protobuf.StringValue",
                    vec![0x0a, 7, b'{', b'"', b'a', b'"', b':', b'1', b'}'],
                )),
                fail_open: false,
                failure_policy: 0,
            }),
        }
    }

    fn remote_wasm(url: &str) -> PWasm {
        wasm(Some(remote_code(url, "nil")), None)
    }

    fn resource(name: &str, typed: PAny) -> PAny {
        any(ECDS, PTec { name: name.to_owned(), typed_config: Some(typed) }.encode_to_vec())
    }

    fn wasm_resource(name: &str, w: &PWasm) -> PAny {
        resource(name, any(HTTP, w.encode_to_vec()))
    }

    fn response(resources: Vec<PAny>) -> Vec<u8> {
        PResponse { version_info: "1".into(), resources, type_url: ECDS.into(), nonce: "n".into() }.encode_to_vec()
    }

    fn convert(input: &[u8], fake: &Fake, policy: &ConversionPolicy, m: &Metrics) -> Result<Converted, Rejection> {
        convert_sotw(input, fake, policy, m)
    }

    fn tecs(out: &[u8]) -> Vec<PTec> {
        PResponse::decode(out).unwrap().resources.iter().map(|a| PTec::decode(a.value.as_slice()).unwrap()).collect()
    }

    fn out_wasm(tec: &PTec) -> PWasm {
        let tc = tec.typed_config.as_ref().unwrap();
        assert!(tc.type_url == HTTP || tc.type_url == NET, "{}", tc.type_url);
        PWasm::decode(tc.value.as_slice()).unwrap()
    }

    fn counts(m: &Metrics) -> [u64; 6] {
        [
            CR::Success,
            CR::NoRemoteLoad,
            CR::MarshalFailure,
            CR::UnmarshalFailure,
            CR::FetchFailure,
            CR::MissRemoteFetchHint,
        ]
        .map(|r| m.conversions(r))
    }

    fn env(pairs: &[(&str, &str)], hosts: &[&str]) -> PEnv {
        PEnv {
            host_env_keys: hosts.iter().map(|s| s.to_string()).collect(),
            key_values: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    // ---- tests ----

    #[test]
    fn other_type_urls_pass_byte_identical_without_counting() {
        let mut r =
            PResponse::decode(response(vec![wasm_resource("a", &remote_wasm("http://h/m.wasm"))]).as_slice()).unwrap();
        r.type_url = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
        let input = r.encode_to_vec();
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, input);
        assert_eq!(counts(&m), [0; 6]);
        assert_eq!(fake.call_count(), 0);
    }

    #[test]
    fn empty_type_url_is_ecds() {
        let mut r =
            PResponse::decode(response(vec![wasm_resource("a", &remote_wasm("http://h/m.wasm"))]).as_slice()).unwrap();
        r.type_url.clear();
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&r.encode_to_vec(), &fake, &policy(), &m).ok().unwrap();
        assert_eq!(*out.modules.unwrap(), [Arc::<str>::from("sha-m.wasm")]);
        assert_eq!(counts(&m)[0], 1);
    }

    #[test]
    fn malformed_response_is_rejected() {
        let (fake, m) = (Fake::default(), Metrics::new());
        let err = convert(&[0x12, 0x05, 0x01], &fake, &policy(), &m).err().unwrap();
        assert!(err.reason.starts_with("malformed DiscoveryResponse: "), "{}", err.reason);
        // type_url with invalid UTF-8
        let err = convert(&[0x22, 0x01, 0xff], &fake, &policy(), &m).err().unwrap();
        assert!(err.reason.starts_with("malformed DiscoveryResponse: type_url: "), "{}", err.reason);
        assert_eq!(counts(&m), [0; 6]);
    }

    #[test]
    fn pass_through_rows_are_byte_identical() {
        let rbac = any(
            "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            PHttpRbac { rules: None, rules_stat_prefix: "x".into() }.encode_to_vec(),
        );
        let st =
            any("type.googleapis.com/google.protobuf.Struct", pstruct(serde_json::json!({"a": 1})).encode_to_vec());
        let ts_other = any(
            "type.googleapis.com/udpa.type.v1.TypedStruct",
            PTypedStruct {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
                value: Some(pstruct(serde_json::json!({"wrong": 1}))),
            }
            .encode_to_vec(),
        );
        let local_file =
            PAsync { local: Some(PDataSource { filename: Some("/x.wasm".into()), inline_string: None }), remote: None };
        let local_inline =
            PAsync { local: Some(PDataSource { filename: None, inline_string: Some("code".into()) }), remote: None };
        let empty_local = PAsync { local: Some(PDataSource::default()), remote: None };
        let resources = vec![
            resource("rbac", rbac),
            resource("struct", st),
            resource("router-ts", ts_other),
            resource("empty-any", PAny::default()),
            wasm_resource("file", &wasm(Some(local_file), Some(env(&[("ISTIO_META_X", "")], &[])))),
            wasm_resource("inline", &wasm(Some(local_inline), None)),
            wasm_resource("empty-local", &wasm(Some(empty_local), None)),
        ];
        let input = response(resources);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, input);
        assert!(out.modules.unwrap().is_empty());
        assert_eq!(counts(&m), [0, 7, 0, 0, 0, 0]);
        assert_eq!(fake.call_count(), 0);
    }

    fn reject_one(res: PAny) -> (String, Metrics) {
        let (fake, m) = (Fake::default(), Metrics::new());
        let err = convert(&response(vec![res]), &fake, &policy(), &m).err().expect("rejected");
        assert_eq!(counts(&m), [0, 0, 0, 1, 0, 0]);
        (err.reason, m)
    }

    #[test]
    fn unmarshal_failure_rows_reject() {
        let (r, _) = reject_one(any("type.googleapis.com/google.protobuf.Empty", vec![]));
        assert_eq!(r, "resource #1: not a TypedExtensionConfig (type.googleapis.com/google.protobuf.Empty)");
        let (r, _) = reject_one(any(ECDS, vec![0x0a, 0x09, b'x']));
        assert!(r.starts_with("resource #1: not a valid TypedExtensionConfig: "), "{r}");
        let (r, _) = reject_one(any(ECDS, PTec { name: "x".into(), typed_config: None }.encode_to_vec()));
        assert_eq!(r, "resource \"x\": does not contain any typed config");
        let (r, _) = reject_one(resource("x", any(HTTP, vec![0x0a, 0x05, 0x00])));
        assert!(r.starts_with("resource \"x\": typed_config: envoy.extensions.filters.http.wasm.v3.Wasm: "), "{r}");
        // invalid UTF-8 deep inside: config.vm_config.vm_id
        let mut vm = Vec::new();
        wire::put_len(&mut vm, 1, &[0xc3, 0x28]);
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let (r, _) = reject_one(resource("x", any(HTTP, w)));
        assert_eq!(
            r,
            "resource \"x\": typed_config: envoy.extensions.filters.http.wasm.v3.Wasm: config.vm_config.vm_id: \
             string field contains invalid UTF-8"
        );
        // a known field with the wrong wire type: PluginConfig.fail_open as LEN
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 5, b"x");
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let (r, _) = reject_one(resource("x", any(NET, w)));
        assert!(r.contains("network.wasm.v3.Wasm: config.fail_open: wire type"), "{r}");
        // neither remote nor local: empty Wasm, no vm_config, empty code
        let (r, _) = reject_one(resource("x", any(HTTP, vec![])));
        assert_eq!(r, "resource \"x\": no remote and local load found in Wasm HTTP filter");
        let no_vm = PWasm { config: Some(PPluginConfig { name: "p".into(), ..Default::default() }) };
        reject_one(resource("x", any(HTTP, no_vm.encode_to_vec())));
        let (r, _) = reject_one(resource("x", any(NET, wasm(Some(PAsync::default()), None).encode_to_vec())));
        assert_eq!(r, "resource \"x\": no remote and local load found in Wasm Network filter");
        // TypedStruct with a key the Wasm schema lacks
        let ts = PTypedStruct {
            type_url: HTTP.into(),
            value: Some(pstruct(serde_json::json!({"config": {"vmConfig": {}}, "wrong": "value"}))),
        };
        let (r, _) = reject_one(resource("x", any("type.googleapis.com/udpa.type.v1.TypedStruct", ts.encode_to_vec())));
        assert_eq!(
            r,
            "resource \"x\": typed_config: unknown field \"wrong\" in envoy.extensions.filters.http.wasm.v3.Wasm"
        );
        let ts = PTypedStruct {
            type_url: HTTP.into(),
            value: Some(pstruct(
                serde_json::json!({"config": {"vm_config": {"code": {"remote": {"httpUri": {"timeout": "3"}}}}}}),
            )),
        };
        let (r, _) = reject_one(resource("x", any("type.googleapis.com/xds.type.v3.TypedStruct", ts.encode_to_vec())));
        assert!(r.contains("config.vm_config.code.remote.http_uri.timeout: invalid google.protobuf.Duration"), "{r}");
    }

    #[test]
    fn converts_remote_code_and_builds_the_request() {
        let mut w = wasm(
            Some(remote_code("http://h/m.wasm", "ABCDEF")),
            Some(env(
                &[
                    ("ISTIO_META_WASM_IMAGE_PULL_SECRET", "{\"auths\":{}}"),
                    ("ISTIO_META_WASM_IMAGE_PULL_POLICY", "Always"),
                    ("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "42"),
                    ("ISTIO_META_OTHER", "x"),
                    ("USER", "kept"),
                ],
                &[],
            )),
        );
        let input = response(vec![wasm_resource("extensions.istio.io/wasmplugin/ns.p", &w)]);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(counts(&m), [1, 0, 0, 0, 0, 0]);
        let req = &fake.requests()[0];
        assert_eq!(req.url, "http://h/m.wasm");
        assert_eq!(req.sha256.as_deref(), Some("abcdef"));
        assert_eq!(req.timeout, Duration::from_secs(30));
        assert_eq!(req.resource_name, "extensions.istio.io/wasmplugin/ns.p");
        assert_eq!(req.resource_version, "42");
        assert_eq!(req.pull_policy, PullPolicy::Always);
        assert_eq!(req.pull_secret.as_deref(), Some(&b"{\"auths\":{}}"[..]));
        assert_eq!(*out.modules.unwrap(), [Arc::<str>::from("sha-m.wasm")]);
        let t = tecs(&out.bytes);
        assert_eq!(t[0].name, "extensions.istio.io/wasmplugin/ns.p");
        let got = out_wasm(&t[0]);
        let vm = w.config.as_mut().unwrap().vm_config.as_mut().unwrap();
        vm.code = Some(PAsync {
            local: Some(PDataSource { filename: Some("/cache/m.wasm".into()), inline_string: None }),
            remote: None,
        });
        vm.environment_variables = Some(env(&[("USER", "kept")], &[]));
        assert_eq!(got, w);
        // the rest of the response is untouched
        let (a, b) = (PResponse::decode(input.as_slice()).unwrap(), PResponse::decode(out.bytes.as_slice()).unwrap());
        assert_eq!((a.version_info, a.nonce, a.type_url), (b.version_info, b.nonce, b.type_url));
    }

    #[test]
    fn env_stripping_variants() {
        let cases: Vec<(PEnv, Option<PEnv>)> = vec![
            (env(&[("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "1")], &[]), None),
            (env(&[], &[]), None),
            (env(&[("ISTIO_META_A", "1")], &["HOME"]), Some(env(&[], &["HOME"]))),
            (env(&[("ISTIO_META_A", "1"), ("B", "2")], &["HOME"]), Some(env(&[("B", "2")], &["HOME"]))),
            (env(&[("B", "2")], &[]), Some(env(&[("B", "2")], &[]))),
        ];
        for (input_env, want) in cases {
            let input =
                response(vec![wasm_resource("a", &wasm(Some(remote_code("http://h/m.wasm", "")), Some(input_env)))]);
            let (fake, m) = (Fake::default(), Metrics::new());
            let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
            let got = out_wasm(&tecs(&out.bytes)[0]);
            assert_eq!(got.config.unwrap().vm_config.unwrap().environment_variables, want);
        }
    }

    #[test]
    fn request_details_sha_nil_timeouts_duplicates() {
        let mut no_timeout = remote_code("http://h/a.wasm", "nil");
        no_timeout.remote.as_mut().unwrap().http_uri.as_mut().unwrap().timeout = None;
        let mut zero = remote_code("http://h/b.wasm", "");
        zero.remote.as_mut().unwrap().http_uri.as_mut().unwrap().timeout = Some(PDuration::default());
        let mut negative = remote_code("http://h/c.wasm", "");
        negative.remote.as_mut().unwrap().http_uri.as_mut().unwrap().timeout =
            Some(PDuration { seconds: -1, nanos: 0 });
        let mut half = remote_code("http://h/d.wasm", "");
        half.remote.as_mut().unwrap().http_uri.as_mut().unwrap().timeout = Some(PDuration { seconds: 0, nanos: 500 });
        // key_values entries written twice: the later one wins (an empty secret followed by a real one)
        let mut w = wasm(Some(half), None);
        let mut bytes = w.encode_to_vec();
        let _ = &mut w;
        let mut e = Vec::new();
        for (k, v) in [("ISTIO_META_WASM_IMAGE_PULL_SECRET", ""), ("ISTIO_META_WASM_IMAGE_PULL_SECRET", "s")] {
            let mut entry = Vec::new();
            wire::put_len(&mut entry, 1, k.as_bytes());
            wire::put_len(&mut entry, 2, v.as_bytes());
            wire::put_len(&mut e, 2, &entry);
        }
        let mut vm = Vec::new();
        wire::put_len(&mut vm, 7, &e);
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm);
        wire::put_len(&mut bytes, 1, &pc); // merged into config.vm_config
        let input = response(vec![
            wasm_resource("a", &wasm(Some(no_timeout), None)),
            wasm_resource("b", &wasm(Some(zero), None)),
            wasm_resource("c", &wasm(Some(negative), None)),
            resource("d", any(HTTP, bytes)),
        ]);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(fake.call_count(), 1, "one batched call per response");
        let reqs = fake.requests();
        assert_eq!(reqs[0].sha256, None);
        assert_eq!(reqs[0].timeout, Duration::from_secs(5));
        assert_eq!(reqs[1].sha256, None);
        assert_eq!(reqs[1].timeout, Duration::ZERO);
        assert_eq!(reqs[2].timeout, Duration::ZERO);
        assert_eq!(reqs[3].timeout, Duration::from_nanos(500));
        assert_eq!(reqs[3].pull_secret.as_deref(), Some(&b"s"[..]));
        assert_eq!(reqs[3].pull_policy, PullPolicy::Unspecified);
        let t = tecs(&out.bytes);
        assert_eq!(out_wasm(&t[3]).config.unwrap().vm_config.unwrap().environment_variables, None);
        assert_eq!(counts(&m), [4, 0, 0, 0, 0, 0]);
        assert_eq!(out.modules.unwrap().len(), 4);
    }

    /// Hand-encoded input with unknown fields at every level: the output is exactly the input with
    /// `code` replaced and the ancestors' lengths re-encoded.
    #[test]
    fn unknown_fields_and_every_other_byte_survive() {
        let build = |code: &[u8], env: Option<&[u8]>| {
            let mut vm = Vec::new();
            wire::put_len(&mut vm, 1, b"vm");
            wire::put_varint(&mut vm, 50, 7); // unknown
            wire::put_len(&mut vm, 3, code);
            wire::put_len(&mut vm, 4, &PAny { type_url: "t/x".into(), value: vec![1, 2, 3] }.encode_to_vec());
            if let Some(env) = env {
                wire::put_len(&mut vm, 7, env);
            }
            vm.extend_from_slice(&[0x5d, 1, 2, 3, 4]); // unknown I32 field 11
            let mut pc = Vec::new();
            wire::put_len(&mut pc, 99, b"unknown");
            wire::put_len(&mut pc, 1, b"ns.p");
            wire::put_len(&mut pc, 3, &vm);
            wire::put_varint(&mut pc, 7, 2);
            let mut w = Vec::new();
            w.extend_from_slice(&[0xeb, 0x04, 0x08, 0x01, 0xec, 0x04]); // unknown group 77
            wire::put_len(&mut w, 1, &pc);
            let mut tc = Vec::new();
            wire::put_len(&mut tc, 1, HTTP.as_bytes());
            wire::put_len(&mut tc, 2, &w);
            wire::put_varint(&mut tc, 3, 1); // unknown in the Any
            let mut tec = Vec::new();
            wire::put_len(&mut tec, 1, b"res");
            wire::put_len(&mut tec, 9, b"?"); // unknown
            wire::put_len(&mut tec, 2, &tc);
            let mut a = Vec::new();
            wire::put_len(&mut a, 1, ECDS.as_bytes());
            wire::put_len(&mut a, 2, &tec);
            wire::put_len(&mut a, 15, b"zz"); // unknown
            let mut r = Vec::new();
            wire::put_len(&mut r, 1, b"v1");
            wire::put_varint(&mut r, 20, 5); // unknown
            wire::put_len(&mut r, 2, &a);
            wire::put_len(&mut r, 4, ECDS.as_bytes());
            wire::put_len(&mut r, 5, b"nonce");
            r
        };
        let remote = PAsync { local: None, remote: remote_code("http://h/m.wasm", "nil").remote }.encode_to_vec();
        let mut env_in = Vec::new();
        wire::put_len(&mut env_in, 1, b"HOME");
        wire::put_varint(&mut env_in, 3, 9); // unknown inside env
        let mut entry = Vec::new();
        wire::put_len(&mut entry, 1, b"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION");
        wire::put_len(&mut entry, 2, b"7");
        wire::put_len(&mut env_in, 2, &entry);
        let mut env_out = Vec::new();
        wire::put_len(&mut env_out, 1, b"HOME");
        wire::put_varint(&mut env_out, 3, 9);
        let local = PAsync {
            local: Some(PDataSource { filename: Some("/cache/m.wasm".into()), inline_string: None }),
            remote: None,
        }
        .encode_to_vec();
        let input = build(&remote, Some(&env_in));
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, build(&local, Some(&env_out)));
        assert_eq!(fake.requests()[0].resource_version, "7");
        // and without env
        let out = convert(&build(&remote, None), &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, build(&local, None));
    }

    #[test]
    fn merged_fields_and_oneof_last_wins() {
        // vm_config split over two occurrences: vm_id+code in the first, runtime in the second
        let mut vm1 = Vec::new();
        wire::put_len(&mut vm1, 1, b"vm");
        wire::put_len(&mut vm1, 3, &remote_code("http://h/m.wasm", "").encode_to_vec());
        let mut vm2 = Vec::new();
        wire::put_len(&mut vm2, 2, b"rt");
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm1);
        wire::put_len(&mut pc, 1, b"ns.p");
        wire::put_len(&mut pc, 3, &vm2);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&response(vec![resource("a", any(HTTP, w))]), &fake, &policy(), &m).ok().unwrap();
        let vm = out_wasm(&tecs(&out.bytes)[0]).config.unwrap().vm_config.unwrap();
        assert_eq!((vm.vm_id.as_str(), vm.runtime.as_str()), ("vm", "rt"));
        assert_eq!(vm.code.unwrap().local.unwrap().filename.as_deref(), Some("/cache/m.wasm"));

        // code oneof: local then remote -> remote wins -> converted
        let local =
            PAsync { local: Some(PDataSource { filename: Some("/l".into()), inline_string: None }), remote: None };
        let remote = remote_code("http://h/m.wasm", "");
        let mut code = local.encode_to_vec();
        code.extend(remote.encode_to_vec());
        let mut vm = Vec::new();
        wire::put_len(&mut vm, 3, &code);
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let out = convert(&response(vec![resource("a", any(HTTP, w))]), &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.modules.unwrap().len(), 1);
        // remote then local -> local wins -> untouched
        let mut code = remote.encode_to_vec();
        code.extend(local.encode_to_vec());
        let mut vm = Vec::new();
        wire::put_len(&mut vm, 3, &code);
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let input = response(vec![resource("a", any(HTTP, w))]);
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, input);
        assert_eq!(counts(&m), [2, 1, 0, 0, 0, 0]);
    }

    fn failing(name: &str, fail_open: bool, failure_policy: i32, type_url: &str) -> PAny {
        let mut w = remote_wasm("http://h/bad.wasm");
        let c = w.config.as_mut().unwrap();
        c.fail_open = fail_open;
        c.failure_policy = failure_policy;
        resource(name, any(type_url, w.encode_to_vec()))
    }

    #[test]
    fn fetch_failures_fail_open_closed_and_deny() {
        let (fake, m) = (Fake::default(), Metrics::new());
        // fail-open via failure_policy, and via the deprecated bool with the policy unset
        let input =
            response(vec![failing("a", false, 3, HTTP), failing("b", true, 0, HTTP), failing("c", true, 0, NET)]);
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        let t = tecs(&out.bytes);
        assert_eq!(t[0].name, "a");
        let tc = t[0].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, HTTP_RBAC_URL);
        assert_eq!(tc.value, PHttpRbac { rules: None, rules_stat_prefix: "wasm-default-allow".into() }.encode_to_vec());
        assert_eq!(t[1].typed_config.as_ref().unwrap().type_url, HTTP_RBAC_URL);
        let tc = t[2].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, NETWORK_RBAC_URL);
        assert_eq!(PNetRbac::decode(tc.value.as_slice()).unwrap().stat_prefix, "wasm-default-allow");
        assert!(out.modules.unwrap().is_empty());
        assert_eq!(counts(&m), [0, 0, 0, 0, 3, 0]);

        // fail_open true but failure_policy FAIL_CLOSED: closed -> rejected with the module's cause
        let m = Metrics::new();
        let input = response(vec![failing("extensions.istio.io/wasmplugin/ns.basic-auth", true, 2, HTTP)]);
        let err = convert(&input, &fake, &policy(), &m).err().unwrap();
        assert_eq!(
            err.reason,
            "resource \"extensions.istio.io/wasmplugin/ns.basic-auth\": module http://h/bad.wasm: \
             checksum mismatch: want aa, got bb"
        );
        assert_eq!(counts(&m), [0, 0, 0, 0, 1, 0]);

        // the same with on_fetch_failure = deny: deny-all RBAC, rules present but empty
        let m = Metrics::new();
        let input = response(vec![failing("h", false, 0, HTTP), failing("n", false, 1, NET)]);
        let out = convert(&input, &fake, &deny_policy(), &m).ok().unwrap();
        let t = tecs(&out.bytes);
        let tc = t[0].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, HTTP_RBAC_URL);
        assert!(tc.value.starts_with(&[0x0a, 0x00]));
        assert_eq!(
            PHttpRbac::decode(tc.value.as_slice()).unwrap(),
            PHttpRbac { rules: Some(PRules::default()), rules_stat_prefix: "wasm-default-deny".into() }
        );
        let tc = t[1].typed_config.as_ref().unwrap();
        assert_eq!(tc.type_url, NETWORK_RBAC_URL);
        assert_eq!(
            PNetRbac::decode(tc.value.as_slice()).unwrap(),
            PNetRbac { rules: Some(PRules::default()), stat_prefix: "wasm-default-deny".into() }
        );
        assert_eq!(counts(&m), [0, 0, 0, 0, 2, 0]);
    }

    #[test]
    fn missing_secret_and_missing_http_uri() {
        let (fake, m) = (Fake::default(), Metrics::new());
        let secret = wasm(
            Some(remote_code("http://h/m.wasm", "")),
            Some(env(&[("ISTIO_META_WASM_IMAGE_PULL_SECRET", "")], &[])),
        );
        let no_uri =
            wasm(Some(PAsync { local: None, remote: Some(PRemote { http_uri: None, sha256: "x".into() }) }), None);
        let input = response(vec![wasm_resource("s", &secret), wasm_resource("u", &no_uri)]);
        let err = convert(&input, &fake, &policy(), &m).err().unwrap();
        assert_eq!(
            err.reason,
            "resource \"s\": module http://h/m.wasm: missing image pulling secret; \
             resource \"u\": wasm remote fetch does not have httpUri specified for config \"ns.plugin\""
        );
        assert_eq!(fake.call_count(), 0, "nothing to fetch");
        assert_eq!(counts(&m), [0, 0, 0, 0, 1, 1]);
        // fail-open turns both into allow RBAC
        let mut s2 = secret.clone();
        s2.config.as_mut().unwrap().failure_policy = 3;
        let mut u2 = no_uri.clone();
        u2.config.as_mut().unwrap().fail_open = true;
        let out = convert(&response(vec![wasm_resource("s", &s2), wasm_resource("u", &u2)]), &fake, &policy(), &m)
            .ok()
            .unwrap();
        assert!(tecs(&out.bytes).iter().all(|t| t.typed_config.as_ref().unwrap().type_url == HTTP_RBAC_URL));
    }

    #[test]
    fn rejection_lists_every_failure_in_order_and_still_counts_the_rest() {
        let (fake, m) = (Fake::default(), Metrics::new());
        let input = response(vec![
            failing("first", false, 0, HTTP),
            any("type.googleapis.com/google.protobuf.Empty", vec![]),
            wasm_resource("ok", &remote_wasm("http://h/m.wasm")),
            resource("rbac", any(HTTP_RBAC_URL, vec![])),
        ]);
        let err = convert(&input, &fake, &policy(), &m).err().unwrap();
        assert_eq!(
            err.reason,
            "resource \"first\": module http://h/bad.wasm: checksum mismatch: want aa, got bb; \
             resource #2: not a TypedExtensionConfig (type.googleapis.com/google.protobuf.Empty)"
        );
        assert_eq!(counts(&m), [1, 1, 0, 1, 1, 0]);
        assert_eq!(fake.call_count(), 1);
        assert_eq!(fake.requests().len(), 2);
    }

    fn typed_struct_resource(ts_url: &str, inner: &str, value: serde_json::Value) -> PAny {
        let ts = PTypedStruct { type_url: inner.into(), value: Some(pstruct(value)) };
        resource("ts", any(ts_url, ts.encode_to_vec()))
    }

    const CAMEL: &str = r#"{"config": {"name": "ns.plugin", "rootId": "root", "vmConfig": {"vmId": "vm",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"remote": {"httpUri": {"uri": "http://h/m.wasm", "cluster": "_", "timeout": "30s"}, "sha256": "nil"}},
        "nackOnCodeCacheMiss": true,
        "environmentVariables": {"keyValues": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "3", "USER": "v"}}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"a\":1}"},
        "failOpen": false}}"#;
    const SNAKE: &str = r#"{"config": {"name": "ns.plugin", "root_id": "root", "vm_config": {"vm_id": "vm",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"remote": {"http_uri": {"uri": "http://h/m.wasm", "cluster": "_", "timeout": "30s"}, "sha256": "nil"}},
        "nackOnCodeCacheMiss": true,
        "environment_variables": {"key_values": {"ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "3", "USER": "v"}}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"a\":1}"},
        "fail_open": false}}"#;

    #[test]
    fn typed_struct_converts_to_the_same_typed_wasm() {
        let direct = wasm(
            Some(remote_code("http://h/m.wasm", "nil")),
            Some(env(&[("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "3"), ("USER", "v")], &[])),
        );
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert(&response(vec![wasm_resource("ts", &direct)]), &fake, &policy(), &m).ok().unwrap();
        let want = out_wasm(&tecs(&out.bytes)[0]);
        for ts_url in ["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"] {
            for json in [CAMEL, SNAKE] {
                let value: serde_json::Value = serde_json::from_str(json).unwrap();
                let input = response(vec![typed_struct_resource(ts_url, HTTP, value)]);
                let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
                let t = tecs(&out.bytes);
                assert_eq!(t[0].typed_config.as_ref().unwrap().type_url, HTTP);
                assert_eq!(out_wasm(&t[0]), want, "{ts_url}");
            }
        }
        let reqs = fake.requests();
        assert!(reqs.iter().all(|r| r.resource_version == "3" && r.timeout == Duration::from_secs(30)));
        // network kind
        let value: serde_json::Value = serde_json::from_str(CAMEL).unwrap();
        let out = convert(
            &response(vec![typed_struct_resource("t/udpa.type.v1.TypedStruct", NET, value)]),
            &fake,
            &policy(),
            &m,
        )
        .ok()
        .unwrap();
        assert_eq!(tecs(&out.bytes)[0].typed_config.as_ref().unwrap().type_url, NET);
        assert_eq!(counts(&m), [6, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn typed_struct_with_unencodable_any_stays_a_typed_struct() {
        let value = serde_json::json!({"config": {"vmConfig": {
            "code": {"remote": {"httpUri": {"uri": "http://h/m.wasm"}}},
            "environmentVariables": {"keyValues": {"ISTIO_META_X": "1"}},
            "configuration": {"@type": "type.googleapis.com/some.vendor.Config", "x": 1}}}});
        let (fake, m) = (Fake::default(), Metrics::new());
        let ts_url = "type.googleapis.com/xds.type.v3.TypedStruct";
        let out =
            convert(&response(vec![typed_struct_resource(ts_url, HTTP, value)]), &fake, &policy(), &m).ok().unwrap();
        let tc = tecs(&out.bytes)[0].typed_config.clone().unwrap();
        assert_eq!(tc.type_url, ts_url);
        let ts = PTypedStruct::decode(tc.value.as_slice()).unwrap();
        assert_eq!(ts.type_url, HTTP);
        let want = pstruct(serde_json::json!({"config": {"vmConfig": {
            "code": {"local": {"filename": "/cache/m.wasm"}},
            "configuration": {"@type": "type.googleapis.com/some.vendor.Config", "x": 1}}}}));
        assert_eq!(ts.value.unwrap(), want);
        assert_eq!(counts(&m), [1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn typed_struct_of_another_type_or_local_code_passes() {
        let (fake, m) = (Fake::default(), Metrics::new());
        let input = response(vec![
            typed_struct_resource(
                "type.googleapis.com/udpa.type.v1.TypedStruct",
                HTTP,
                serde_json::json!({"config": {"vm_config": {"code": {"local": {"inline_string": "x"}}}}}),
            ),
            typed_struct_resource(
                "type.googleapis.com/xds.type.v3.TypedStruct",
                "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                serde_json::json!({"anything": true}),
            ),
        ]);
        let out = convert(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, input);
        assert_eq!(counts(&m), [0, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn delta_responses() {
        let res = |name: &str, body: Option<PAny>| PResource { version: "v".into(), resource: body, name: name.into() };
        let delta = PDelta {
            system_version_info: "s".into(),
            resources: vec![
                res("a", Some(wasm_resource("a", &remote_wasm("http://h/m.wasm")))),
                res("b", Some(resource("b", any(HTTP_RBAC_URL, vec![])))),
            ],
            type_url: ECDS.into(),
            removed_resources: vec!["gone".into()],
            removed_resource_names: vec![PResourceName { name: "gone2".into() }],
        };
        let input = delta.encode_to_vec();
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert_delta(&input, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(
            out.resources,
            vec![("a".to_string(), Some(Arc::<str>::from("sha-m.wasm"))), ("b".to_string(), None)]
        );
        assert_eq!(out.removed, vec!["gone".to_string(), "gone2".to_string()]);
        let d = PDelta::decode(out.bytes.as_slice()).unwrap();
        assert_eq!(d.system_version_info, "s");
        assert_eq!(d.removed_resources, delta.removed_resources);
        assert_eq!(d.resources[1], delta.resources[1]);
        let tec = PTec::decode(d.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
        let w = out_wasm(&tec);
        assert_eq!(
            w.config.unwrap().vm_config.unwrap().code.unwrap().local.unwrap().filename.as_deref(),
            Some("/cache/m.wasm")
        );
        assert_eq!(counts(&m), [1, 1, 0, 0, 0, 0]);
        // nothing to convert: identical
        let only_removed = PDelta { resources: vec![], ..delta.clone() }.encode_to_vec();
        let out = convert_delta(&only_removed, &fake, &policy(), &m).ok().unwrap();
        assert_eq!(out.bytes, only_removed);
        // a failing resource is named by its Resource.name when the body says nothing
        let bad = PDelta { resources: vec![res("x", Some(any("t/google.protobuf.Empty", vec![])))], ..delta.clone() };
        let err = convert_delta(&bad.encode_to_vec(), &fake, &policy(), &m).err().unwrap();
        assert_eq!(err.reason, "resource \"x\": not a TypedExtensionConfig (t/google.protobuf.Empty)");
        let err = convert_delta(&[0x12, 0x03, 0x1a, 0x05], &fake, &policy(), &m).err().unwrap();
        assert!(err.reason.starts_with("malformed DeltaDiscoveryResponse"), "{}", err.reason);
    }

    /// Truncations and byte flips of valid responses must never panic.
    #[test]
    fn mutated_inputs_never_panic() {
        let value: serde_json::Value = serde_json::from_str(CAMEL).unwrap();
        let inputs = vec![
            response(vec![
                wasm_resource(
                    "a",
                    &wasm(Some(remote_code("http://h/m.wasm", "x")), Some(env(&[("ISTIO_META_A", "1")], &["H"]))),
                ),
                typed_struct_resource("type.googleapis.com/udpa.type.v1.TypedStruct", HTTP, value),
                failing("f", true, 0, NET),
            ]),
            PDelta {
                resources: vec![PResource {
                    name: "a".into(),
                    resource: Some(wasm_resource("a", &remote_wasm("http://h/m.wasm"))),
                    version: "1".into(),
                }],
                type_url: ECDS.into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ];
        let fake = Fake::default();
        let m = Metrics::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for input in &inputs {
            for cut in 0..input.len() {
                let _ = convert_sotw(&input[..cut], &fake, &policy(), &m);
                let _ = convert_delta(&input[..cut], &fake, &deny_policy(), &m);
            }
            for _ in 0..3000 {
                let mut x = input.clone();
                for _ in 0..rng.usize(1..4) {
                    let i = rng.usize(..x.len());
                    x[i] = if rng.bool() { x[i] ^ (1 << rng.u8(0..8)) } else { rng.u8(..) };
                }
                let _ = convert_sotw(&x, &fake, &policy(), &m);
                let _ = convert_delta(&x, &fake, &deny_policy(), &m);
            }
        }
        // deep nesting inside a TypedStruct: refused, no stack overflow
        // (built by hand: prost itself would recurse that deep)
        let mut v = Vec::new();
        wire::put_len(&mut v, 3, b"x");
        for _ in 0..5000 {
            let mut list = Vec::new();
            wire::put_len(&mut list, 1, &v);
            v.clear();
            wire::put_len(&mut v, 6, &list);
        }
        let mut entry = Vec::new();
        wire::put_len(&mut entry, 1, b"config");
        wire::put_len(&mut entry, 2, &v);
        let mut st = Vec::new();
        wire::put_len(&mut st, 1, &entry);
        let mut ts = Vec::new();
        wire::put_len(&mut ts, 1, HTTP.as_bytes());
        wire::put_len(&mut ts, 2, &st);
        let input = response(vec![resource("deep", any("t/udpa.type.v1.TypedStruct", ts))]);
        assert!(convert_sotw(&input, &fake, &policy(), &m).is_err());
    }

    // ---- memo (against the real store) ----

    use crate::fetch::{new_temp_file, Downloaded, FetchError, FetchErrorKind};
    use crate::store::{ModuleFetcher, Store, StoreSettings};
    use std::io::Write as _;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Served {
        bodies: Mutex<HashMap<String, Vec<u8>>>,
        calls: AtomicUsize,
    }

    struct ServedRef(Arc<Served>);

    impl ModuleFetcher for ServedRef {
        fn fetch(&self, url: &str, _: std::time::Instant, dir: &std::path::Path) -> Result<Downloaded, FetchError> {
            self.0.calls.fetch_add(1, Ordering::SeqCst);
            let body = self.0.bodies.lock().unwrap().get(url).cloned().ok_or(FetchError {
                kind: FetchErrorKind::Download,
                message: "wasm module download request failed: status code 404".into(),
            })?;
            let mut file = new_temp_file(dir).unwrap();
            file.write_all(&body).unwrap();
            use sha2::Digest as _;
            Ok(Downloaded {
                file,
                sha256: hex::encode(sha2::Sha256::digest(&body)),
                len: body.len() as u64,
                is_wasm: true,
            })
        }
    }

    /// The real store, counting the requests that reach it.
    struct Counting<'a> {
        store: &'a Store,
        asked: AtomicUsize,
    }

    impl ModuleSource for Counting<'_> {
        fn get_all(&self, requests: &[ModuleRequest]) -> Vec<Result<Module, ModuleError>> {
            self.asked.fetch_add(requests.len(), Ordering::SeqCst);
            self.store.get_all(requests)
        }
        fn generation(&self) -> u64 {
            self.store.generation()
        }
        fn reuse(&self, modules: &mut dyn Iterator<Item = &str>, generation: u64) -> bool {
            self.store.reuse(modules, generation)
        }
        fn holds_sotw_in_use(&self, modules: &ModuleList) -> bool {
            self.store.holds_sotw_in_use(modules)
        }
    }

    struct RealStore {
        _dir: tempfile::TempDir,
        served: Arc<Served>,
        metrics: Arc<Metrics>,
        store: Store,
    }

    fn real_store(expiry: Duration) -> RealStore {
        let dir = tempfile::tempdir().unwrap();
        let served = Arc::new(Served::default());
        for name in ["a", "b", "c", "v1", "v2"] {
            let mut body = b"\0asm\x01\0\0\0".to_vec();
            body.extend_from_slice(name.as_bytes());
            served.bodies.lock().unwrap().insert(format!("http://h/{name}.wasm"), body);
        }
        let metrics = Arc::new(Metrics::new());
        let settings = StoreSettings {
            dir: dir.path().join("cache"),
            module_expiry: expiry,
            purge_interval: Duration::from_secs(3600),
        };
        let store = Store::open_with(settings, Box::new(ServedRef(served.clone())), metrics.clone()).unwrap();
        RealStore { _dir: dir, served, metrics, store }
    }

    fn all_counts(m: &Metrics) -> ([u64; 6], u64, u64) {
        (counts(m), m.lookups(true), m.lookups(false))
    }

    fn minus(a: ([u64; 6], u64, u64), b: ([u64; 6], u64, u64)) -> ([u64; 6], u64, u64) {
        (std::array::from_fn(|i| a.0[i] - b.0[i]), a.1 - b.1, a.2 - b.2)
    }

    /// Drops the per-resource entries, so that only a kept span can answer a push without the store.
    fn forget_resources(memo: &Memo) {
        let mut t = memo.lock();
        t.order.clear();
        t.by_name.clear();
    }

    fn memo_response() -> Vec<u8> {
        let sha_b = {
            use sha2::Digest as _;
            hex::encode(sha2::Sha256::digest(b"\0asm\x01\0\0\0b"))
        };
        let ts = PTypedStruct {
            type_url: HTTP.into(),
            value: Some(pstruct(serde_json::from_str(&CAMEL.replace("http://h/m.wasm", "http://h/c.wasm")).unwrap())),
        };
        response(vec![
            wasm_resource("a", &remote_wasm("http://h/a.wasm")),
            wasm_resource("b", &wasm(Some(remote_code("http://h/b.wasm", &sha_b)), None)),
            resource("c", any("type.googleapis.com/udpa.type.v1.TypedStruct", ts.encode_to_vec())),
            resource("rbac", any(HTTP_RBAC_URL, vec![])),
            typed_struct_resource(
                "type.googleapis.com/xds.type.v3.TypedStruct",
                "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                serde_json::json!({"anything": true}),
            ),
            failing("f", true, 0, HTTP),
        ])
    }

    #[test]
    fn memo_hits_record_what_a_real_conversion_records() {
        let rs = real_store(Duration::from_secs(3600));
        let memo = Memo::default();
        let source = Counting { store: &rs.store, asked: AtomicUsize::new(0) };
        let input = memo_response();
        let m = &rs.metrics;
        // cold (fetches: the generation moves, so only pass-throughs are memoised), then warm (memoised)
        let cold = convert_sotw_memo(&input, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 4, "three modules and the failing one");
        let warm = convert_sotw_memo(&input, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(warm.bytes, cold.bytes);
        // the reference: a real conversion of the same response, without the memo
        let (asked, before) = (source.asked.load(Ordering::SeqCst), all_counts(m));
        let real = convert_sotw_memo(&input, &source, &policy(), m, None).ok().unwrap();
        let real_counts = minus(all_counts(m), before);
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 4, "three modules and the failing one");
        // from the memo: same bytes, same modules, same counters; only the failing (fallback) one is asked
        let (asked, before) = (source.asked.load(Ordering::SeqCst), all_counts(m));
        let hit = convert_sotw_memo(&input, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(minus(all_counts(m), before), real_counts);
        assert_eq!(real_counts, ([3, 2, 0, 0, 1, 0], 3, 1), "the failing module misses every time");
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 1, "only the fallback is decided again");
        assert_eq!(hit.bytes, real.bytes);
        assert_eq!(hit.modules, real.modules);
        assert_eq!(hit.modules.unwrap().len(), 3);
        let t = tecs(&hit.bytes);
        assert_eq!(t[5].typed_config.as_ref().unwrap().type_url, HTTP_RBAC_URL);
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 7, "the failing module is asked for every time");
        // a changed resource is converted for real, the others still come from the memo
        let mut changed = PResponse::decode(input.as_slice()).unwrap();
        changed.resources[0] = wasm_resource("a", &remote_wasm("http://h/c.wasm"));
        let changed = changed.encode_to_vec();
        let asked = source.asked.load(Ordering::SeqCst);
        let out = convert_sotw_memo(&changed, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 3, "and \"c\", which asks for the same URL");
        assert_eq!(out.bytes, convert_sotw_memo(&changed, &source, &policy(), m, None).ok().unwrap().bytes);
        let mut other = PResponse::decode(input.as_slice()).unwrap();
        other.resources[0] = wasm_resource("a", &remote_wasm("http://h/v1.wasm"));
        let other = other.encode_to_vec();
        // a fetch moves the store generation: the next call re-converts everything once, then all is memoised
        convert_sotw_memo(&other, &source, &policy(), m, Some(&memo)).ok().unwrap();
        let asked = source.asked.load(Ordering::SeqCst);
        convert_sotw_memo(&other, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 4);
        let asked = source.asked.load(Ordering::SeqCst);
        let out = convert_sotw_memo(&other, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 1, "only the fallback");
        let asked = source.asked.load(Ordering::SeqCst);
        let mut again = PResponse::decode(input.as_slice()).unwrap();
        again.resources[0] = wasm_resource("a", &remote_wasm("http://h/b.wasm"));
        convert_sotw_memo(&again.encode_to_vec(), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst) - asked, 2, "the changed one and the fallback");
        assert_eq!(out.bytes, convert_sotw_memo(&other, &source, &policy(), m, None).ok().unwrap().bytes);
    }

    #[test]
    fn memo_is_invalidated_when_the_store_forgets_a_module() {
        let rs = real_store(Duration::ZERO);
        let memo = Memo::default();
        let input = response(vec![wasm_resource("a", &remote_wasm("http://h/a.wasm"))]);
        let m = &rs.metrics;
        for _ in 0..3 {
            convert_sotw_memo(&input, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        }
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 1);
        let generation = rs.store.generation();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(rs.store.purge().unwrap(), 1);
        assert_ne!(rs.store.generation(), generation, "a purge moves the generation");
        let before = all_counts(m);
        let out = convert_sotw_memo(&input, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 2, "fetched again, not served from the memo");
        assert_eq!(minus(all_counts(m), before), ([1, 0, 0, 0, 0, 0], 0, 2));
        let path = out_wasm(&tecs(&out.bytes)[0]).config.unwrap().vm_config.unwrap().code.unwrap().local.unwrap();
        assert!(std::path::Path::new(path.filename.as_deref().unwrap()).is_file());
    }

    #[test]
    fn memo_pull_policy_always_with_a_new_resource_version_fetches_again() {
        let rs = real_store(Duration::from_secs(3600));
        let memo = Memo::default();
        let m = &rs.metrics;
        let versioned = |rv: &str, url: &str| {
            let vars =
                [("ISTIO_META_WASM_IMAGE_PULL_POLICY", "Always"), ("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", rv)];
            response(vec![wasm_resource("p", &wasm(Some(remote_code(url, "nil")), Some(env(&vars, &[]))))])
        };
        let v1 = versioned("1", "http://h/v1.wasm");
        for _ in 0..3 {
            convert_sotw_memo(&v1, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        }
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 1);
        // the server now has new content at the same URL; a new resource version changes the bytes: no memo
        let body = rs.served.bodies.lock().unwrap()["http://h/v2.wasm"].clone();
        rs.served.bodies.lock().unwrap().insert("http://h/v1.wasm".into(), body);
        let v2 = versioned("2", "http://h/v1.wasm");
        let out = convert_sotw_memo(&v2, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 2);
        assert_eq!(out.modules.unwrap().len(), 1);
        let again = convert_sotw_memo(&v2, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(again.bytes, out.bytes);
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 2);
        // the old version again: its entry was made under an older generation, so it is converted for real
        // (Always with a changed version: fetched again, as Istio does)
        let before = all_counts(m);
        convert_sotw_memo(&v1, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), 3);
        // (a miss by URL, then the downloaded content is found in the store: a hit)
        assert_eq!(minus(all_counts(m), before), ([1, 0, 0, 0, 0, 0], 1, 1));
    }

    #[test]
    fn delta_memo_by_name_and_removals() {
        let rs = real_store(Duration::from_secs(3600));
        let memo = Memo::default();
        let m = &rs.metrics;
        let res = |name: &str, url: &str| PResource {
            version: "v".into(),
            resource: Some(wasm_resource(name, &remote_wasm(url))),
            name: name.into(),
        };
        let delta = |resources: Vec<PResource>, removed: Vec<String>| {
            PDelta { resources, type_url: ECDS.into(), removed_resources: removed, ..Default::default() }
                .encode_to_vec()
        };
        let input = delta(vec![res("a", "http://h/a.wasm"), res("b", "http://h/b.wasm")], vec![]);
        let source = Counting { store: &rs.store, asked: AtomicUsize::new(0) };
        let first = convert_delta_memo(&input, &source, &policy(), m, Some(&memo)).ok().unwrap();
        let second = convert_delta_memo(&input, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(first.bytes, second.bytes);
        assert_eq!(source.asked.load(Ordering::SeqCst), 4);
        // only "a" again: from the memo, counted like a real hit
        let only_a = delta(vec![res("a", "http://h/a.wasm")], vec![]);
        let before = all_counts(m);
        let out = convert_delta_memo(&only_a, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst), 4);
        assert_eq!(minus(all_counts(m), before), ([1, 0, 0, 0, 0, 0], 1, 0));
        assert_eq!(out.bytes, convert_delta(&only_a, &rs.store, &policy(), m).ok().unwrap().bytes);
        assert_eq!(out.resources.len(), 1);
        assert!(out.resources[0].1.is_some());
        // "b" removed: its entry goes; sent again, it is converted for real
        convert_delta_memo(&delta(vec![], vec!["b".into()]), &source, &policy(), m, Some(&memo)).ok().unwrap();
        let only_b = delta(vec![res("b", "http://h/b.wasm")], vec![]);
        convert_delta_memo(&only_b, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst), 5);
    }

    /// The cheap pass-through decision never disagrees with the full analysis (on valid and mutated input).
    #[test]
    fn not_wasm_agrees_with_the_full_analysis() {
        let value: serde_json::Value = serde_json::from_str(CAMEL).unwrap();
        let mut twice = PTec { name: "t".into(), typed_config: Some(any(HTTP_RBAC_URL, vec![])) }.encode_to_vec();
        twice.extend(PTec { name: String::new(), typed_config: Some(any(HTTP, vec![])) }.encode_to_vec());
        let samples = vec![
            resource("rbac", any(HTTP_RBAC_URL, vec![0x0a, 0x00])),
            resource("", any("", vec![])),
            any(ECDS, PTec { name: "none".into(), typed_config: None }.encode_to_vec()),
            any(ECDS, twice),
            wasm_resource("a", &remote_wasm("http://h/m.wasm")),
            typed_struct_resource("type.googleapis.com/udpa.type.v1.TypedStruct", HTTP, value),
            any("type.googleapis.com/google.protobuf.Empty", vec![]),
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        let mut kept = 0;
        for sample in &samples {
            let bytes = sample.encode_to_vec();
            let mut inputs = vec![bytes.clone(), sample.value.clone()];
            for _ in 0..2000 {
                let mut x = bytes.clone();
                let i = rng.usize(..x.len());
                x[i] = if rng.bool() { x[i] ^ (1 << rng.u8(0..8)) } else { rng.u8(..) };
                inputs.push(x);
            }
            for input in &inputs {
                if not_wasm(input) {
                    kept += 1;
                    assert!(
                        matches!(analyze_fully(input, 1, None, Duration::from_secs(1)), Analysis::Keep),
                        "{input:?}"
                    );
                }
            }
        }
        assert!(kept > 100);
    }

    #[test]
    fn a_push_repeating_the_resources_with_a_new_nonce_is_answered_from_the_span() {
        let rs = real_store(Duration::ZERO);
        let memo = Memo::default();
        let source = Counting { store: &rs.store, asked: AtomicUsize::new(0) };
        let mut r = PResponse::decode(memo_response().as_slice()).unwrap();
        r.resources.pop(); // no fallback: every resource can be memoised
        let push = |nonce: &str, r: &PResponse| {
            let mut p = r.clone();
            p.nonce = nonce.into();
            p.version_info = format!("v-{nonce}");
            p.encode_to_vec()
        };
        let m = &rs.metrics;
        // The first push fetches (the generation moves, nothing store-dependent is kept); the next one keeps.
        convert_sotw_memo(&push("0", &r), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(memo.lock().repeats.len(), 0);
        convert_sotw_memo(&push("1", &r), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(memo.lock().repeats.len(), 1);
        let second = push("2", &r);
        let before = all_counts(m);
        let real = convert_sotw_memo(&second, &source, &policy(), m, None).ok().unwrap();
        let real_counts = minus(all_counts(m), before);
        assert_eq!(real_counts, ([3, 2, 0, 0, 0, 0], 3, 0));
        forget_resources(&memo); // only the span can answer now
        let (asked, before) = (source.asked.load(Ordering::SeqCst), all_counts(m));
        let again = convert_sotw_memo(&second, &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(source.asked.load(Ordering::SeqCst), asked, "nothing reaches the store");
        assert_eq!(minus(all_counts(m), before), real_counts, "the counters of a real conversion");
        assert_eq!(again.bytes, real.bytes);
        assert_eq!(again.modules, real.modules);

        // One more resource after the span: not a repeat; the new resource is analysed for real.
        let mut more = r.clone();
        more.resources.push(r.resources[0].clone());
        let out = convert_sotw_memo(&push("3", &more), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(PResponse::decode(out.bytes.as_slice()).unwrap().resources.len(), 6);
        assert!(source.asked.load(Ordering::SeqCst) > asked);

        // A purge moves the generation: converted (and fetched) for real again.
        std::thread::sleep(Duration::from_millis(5));
        convert_sotw_memo(&push("4", &PResponse::default()), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.store.purge().unwrap(), 3);
        let fetched = rs.served.calls.load(Ordering::SeqCst);
        let out = convert_sotw_memo(&push("5", &r), &source, &policy(), m, Some(&memo)).ok().unwrap();
        assert_eq!(rs.served.calls.load(Ordering::SeqCst), fetched + 3);
        assert_eq!(
            out.bytes[..],
            convert_sotw_memo(&push("5", &r), &source, &policy(), m, None).ok().unwrap().bytes[..]
        );
    }

    /// A response whose resources begin another's (the shorter span is a prefix of the longer) is answered
    /// from its own span, and the most recently used spans are the ones kept.
    #[test]
    fn alternating_responses_each_find_their_own_span() {
        let rs = real_store(Duration::ZERO);
        let memo = Memo::default();
        let source = Counting { store: &rs.store, asked: AtomicUsize::new(0) };
        let mut long = PResponse::decode(memo_response().as_slice()).unwrap();
        long.resources.pop();
        let mut short = long.clone();
        short.resources.truncate(2);
        let others: Vec<PResponse> = (0..MEMO_REPEATS - 1)
            .map(|i| {
                let mut r = short.clone();
                r.resources.push(resource(&format!("rbac-{i}"), any(HTTP_RBAC_URL, vec![])));
                r
            })
            .collect();
        let m = &rs.metrics;
        let nonce = AtomicUsize::new(0);
        let convert = |r: &PResponse| {
            let mut p = r.clone();
            p.nonce = nonce.fetch_add(1, Ordering::SeqCst).to_string();
            convert_sotw_memo(&p.encode_to_vec(), &source, &policy(), m, Some(&memo)).ok().unwrap()
        };
        // Answered from a kept span: without the per-resource entries, anything else asks the store.
        let from_span = |r: &PResponse| {
            forget_resources(&memo);
            let asked = source.asked.load(Ordering::SeqCst);
            let out = convert(r);
            assert_eq!(source.asked.load(Ordering::SeqCst), asked, "answered from the kept span");
            assert_eq!(PResponse::decode(out.bytes.as_slice()).unwrap().resources.len(), r.resources.len());
        };
        for r in [&long, &long, &short] {
            convert(r); // fetches, then keeps both spans: short (the prefix) is tried first
        }
        for _ in 0..3 {
            from_span(&long);
            from_span(&short);
        }
        // Kept: others[0], others[1], short, long. Using long makes short the least recent one.
        convert(&others[0]);
        convert(&others[1]);
        from_span(&long);
        convert(&others[2]);
        from_span(&long);
        from_span(&others[2]);
        assert_eq!(memo.lock().repeats.len(), MEMO_REPEATS);
        let asked = source.asked.load(Ordering::SeqCst);
        convert(&short);
        assert!(source.asked.load(Ordering::SeqCst) > asked, "short was the one dropped");
    }

    /// Around a kept span, only fields the full path accepted for it are taken as they are: anything else is
    /// checked again, so a repeated span never carries a malformed or non-ECDS envelope through.
    #[test]
    fn the_fields_around_a_repeated_span_are_checked_like_the_full_path() {
        let rs = real_store(Duration::ZERO);
        let memo = Memo::default();
        let mut r = PResponse::decode(memo_response().as_slice()).unwrap();
        r.resources.pop();
        r.type_url = ECDS.into();
        let m = &rs.metrics;
        let mut control_plane = Vec::new();
        wire::put_len(&mut control_plane, 1, b"istiod-1");
        let mut with_envelope = r.encode_to_vec();
        wire::put_len(&mut with_envelope, 6, &control_plane);
        for _ in 0..2 {
            convert_sotw_memo(&with_envelope, &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        }
        let converted = convert_sotw_memo(&with_envelope, &rs.store, &policy(), m, None).ok().unwrap().bytes;
        let push = |extra: &[u8]| [&r.encode_to_vec()[..], extra].concat();
        let source = Counting { store: &rs.store, asked: AtomicUsize::new(0) };
        let memo_or_full = |input: &[u8]| {
            let full = convert_sotw_memo(input, &rs.store, &policy(), m, None).map(|c| c.bytes);
            let memo = convert_sotw_memo(input, &source, &policy(), m, Some(&memo)).map(|c| c.bytes);
            assert_eq!(memo, full);
            memo
        };
        // The same control plane: answered from the span as before (no per-resource entry left to answer).
        forget_resources(&memo);
        let mut same = Vec::new();
        wire::put_len(&mut same, 6, &control_plane);
        assert_eq!(memo_or_full(&push(&same)).unwrap(), converted);
        assert_eq!(source.asked.load(Ordering::SeqCst), 0);
        // A control plane whose identifier is not UTF-8, a version that is not: rejected as by the full path.
        let mut bad_cp = Vec::new();
        wire::put_len(&mut bad_cp, 1, b"istiod-\xff");
        let mut bad = Vec::new();
        wire::put_len(&mut bad, 6, &bad_cp);
        assert!(memo_or_full(&push(&bad)).unwrap_err().reason.contains("malformed DiscoveryResponse"));
        let mut bad_version = Vec::new();
        wire::put_len(&mut bad_version, 1, b"v\xff");
        assert!(memo_or_full(&push(&bad_version)).is_err());
        // The known ECDS type URL followed by another one: the last counts, nothing is converted.
        let mut listener = Vec::new();
        wire::put_len(&mut listener, 4, b"type.googleapis.com/envoy.config.listener.v3.Listener");
        let input = push(&listener);
        assert_eq!(memo_or_full(&input).unwrap(), input);
    }

    #[test]
    fn a_repeated_span_under_another_type_url_passes_through_untouched() {
        let rs = real_store(Duration::ZERO);
        let memo = Memo::default();
        let mut r = PResponse::decode(memo_response().as_slice()).unwrap();
        r.resources.pop();
        let m = &rs.metrics;
        for _ in 0..2 {
            convert_sotw_memo(&r.encode_to_vec(), &rs.store, &policy(), m, Some(&memo)).ok().unwrap();
        }
        assert_eq!(memo.lock().repeats.len(), 1);
        r.type_url = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
        let input = r.encode_to_vec();
        let before = all_counts(m);
        assert_eq!(convert_sotw_memo(&input, &rs.store, &policy(), m, Some(&memo)).ok().unwrap().bytes, input);
        assert_eq!(all_counts(m), before);
    }

    /// The one-pass splice writes what the chain of `replace_last` / `replace_merged` copies wrote.
    #[test]
    fn splice_equals_the_chain_of_replacements() {
        let mut inner = Vec::new();
        wire::put_len(&mut inner, 3, b"first");
        wire::put_varint(&mut inner, 9, 7);
        wire::put_len(&mut inner, 3, b"second");
        let mut mid = Vec::new();
        wire::put_len(&mut mid, 2, b"x");
        wire::put_len(&mut mid, 1, &inner);
        wire::put_len(&mut mid, 5, b"unknown");
        wire::put_len(&mut mid, 1, b"");
        let mut outer = Vec::new();
        wire::put_len(&mut outer, 2, &mid);
        wire::put_len(&mut outer, 1, b"type");
        wire::put_len(&mut outer, 2, &mid);
        let no_field = b"\x08\x01".to_vec();
        for leaf in [&b"new"[..], b""] {
            for merged_outer in [false, true] {
                for inner_buf in [&inner[..], &no_field[..]] {
                    let level = |buf, n, merged| if merged { Level::merged(buf, n) } else { Level::last(buf, n) };
                    let chain = |buf: &[u8], n, merged, p: &[u8]| {
                        if merged {
                            wire::replace_merged(buf, n, Some(p)).unwrap()
                        } else {
                            wire::replace_last(buf, n, p).unwrap()
                        }
                    };
                    let want = chain(&outer, 2, merged_outer, &chain(&mid, 1, true, &chain(inner_buf, 3, true, leaf)));
                    let got = splice(
                        &[level(&outer, 2, merged_outer), Level::merged(&mid, 1), Level::merged(inner_buf, 3)],
                        leaf,
                    )
                    .unwrap();
                    assert_eq!(got, want);
                }
            }
        }
    }
}
