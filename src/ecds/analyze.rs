//! What one ECDS resource is: Istio's `tryUnmarshal` (istio `pkg/wasm/convert.go`) — not a Wasm filter, a
//! Wasm filter with local code, a Wasm filter with remote code, or malformed — plus, for remote code, the
//! module request read out of it (istio `rewriteVMConfig` in the same file).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use crate::metrics::ConversionResult;
use crate::module::{ModuleRequest, PullPolicy};
use crate::schema::{self, short_name, Budget, JVal};
use crate::typed_struct;
use crate::wire::{self, Msg};

pub(super) const TEC: &str = "envoy.config.core.v3.TypedExtensionConfig";
const HTTP_WASM: &str = "envoy.extensions.filters.http.wasm.v3.Wasm";
const NETWORK_WASM: &str = "envoy.extensions.filters.network.wasm.v3.Wasm";
// Istio recognises only the udpa one; the xds one has the same fields (cncf/xds
// `xds/type/v3/typed_struct.proto`) and is converted too.
const UDPA_TYPED_STRUCT: &str = "udpa.type.v1.TypedStruct";
const XDS_TYPED_STRUCT: &str = "xds.type.v3.TypedStruct";

// Internal env vars istiod puts into `vm_config.environment_variables` (istio `pkg/model/wasm.go`).
const SECRET_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_SECRET";
const POLICY_ENV: &str = "ISTIO_META_WASM_IMAGE_PULL_POLICY";
const RESOURCE_VERSION_ENV: &str = "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION";
/// `envoy.extensions.wasm.v3.FailurePolicy.FAIL_OPEN` (envoy `api/envoy/extensions/wasm/v3/wasm.proto`).
const FAIL_OPEN: u64 = 3;

/// How a resource is named in a rejection reason: by its `TypedExtensionConfig.name`, else by the name the
/// envelope gives it (delta `Resource.name`), else by its position.
pub(super) fn label(ordinal: usize, tec_name: &str, hint: Option<&str>) -> String {
    match (tec_name, hint) {
        ("", Some(h)) if !h.is_empty() => format!("resource {h:?}"),
        ("", _) => format!("resource #{ordinal}"),
        (name, _) => format!("resource {name:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WasmKind {
    Http,
    Network,
}

impl WasmKind {
    pub(super) fn message(self) -> &'static schema::Message {
        match self {
            WasmKind::Http => &schema::HTTP_WASM,
            WasmKind::Network => &schema::NETWORK_WASM,
        }
    }

    pub(super) fn type_name(self) -> &'static str {
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

/// What one resource is.
pub(super) enum Analysis<'a> {
    /// Not a Wasm filter, or one with local code: it passes as it came (`no_remote_load`).
    NoRemoteCode,
    /// Not what an ECDS resource must be (`unmarshal_failure`): the full reason text.
    Malformed(String),
    /// A Wasm filter with remote code.
    Remote(Box<Remote<'a>>),
}

impl Analysis<'_> {
    /// What to ask the store for this resource, if anything.
    pub(super) fn request(&self) -> Option<&ModuleRequest> {
        match self {
            Analysis::Remote(remote) => remote.want.as_ref().ok(),
            _ => None,
        }
    }
}

/// A Wasm filter whose code is remote, with what the decision and the rewrite need of it.
pub(super) struct Remote<'a> {
    pub label: String,
    /// `PluginConfig.name` (for the log line of a fallback).
    pub plugin_name: String,
    /// `TypedExtensionConfig.name`, which a fallback keeps.
    pub tec_name: String,
    pub kind: WasmKind,
    pub fail_open: bool,
    /// `remote.http_uri.uri` ("" when absent).
    pub url: String,
    /// What to ask the store, or why the fetch fails without asking (conversion counter and cause).
    pub want: Result<ModuleRequest, (ConversionResult, String)>,
    /// The resource's `Any` and its pieces, read in place in the response, for the rewrite.
    pub any: Msg<'a>,
    pub tec: &'a [u8],
    /// `TypedExtensionConfig.typed_config`, its occurrences merged.
    pub typed_config: Msg<'a>,
    pub form: Form<'a>,
}

/// How the Wasm message sits in `typed_config`.
pub(super) enum Form<'a> {
    /// `typed_config` holds the Wasm message itself.
    Direct { wasm: &'a [u8] },
    /// `typed_config` holds a TypedStruct; `wasm` is its Struct encoded as the Wasm message (`encodable`
    /// false: the Struct names an `Any` type we cannot encode, so the filter stays a TypedStruct, and the
    /// rewrite takes its tree, `value`, to change it in place; empty when `encodable`).
    Struct { wasm: Vec<u8>, encodable: bool, typed_struct: &'a [u8], value: Cell<BTreeMap<String, JVal>> },
}

impl Form<'_> {
    fn wasm(&self) -> &[u8] {
        match self {
            Form::Direct { wasm } => wasm,
            Form::Struct { wasm, .. } => wasm,
        }
    }
}

/// Analyses one resource `Any` (the envelope it came in is validated). `ordinal` (from 1) and `hint` (the
/// envelope's name for it) name it in reasons; `default_timeout` is the fetch deadline when `http_uri` sets
/// none. A TypedStruct's decoded tree and its encoding are charged to the response's `budget`.
pub(super) fn analyze<'a>(
    any: Msg<'a>,
    ordinal: usize,
    hint: Option<&str>,
    default_timeout: Duration,
    budget: &mut Budget,
) -> Analysis<'a> {
    let no_name = label(ordinal, "", hint);
    let (type_url, tec) = match (any.last_string(1), any.last(2)) {
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
    // typed_config's occurrences merge; its `value` (bytes: the last one wins) lies in the response as it is.
    let typed_config = match Msg::from(tec).child(2) {
        Ok(Some(tc)) => tc,
        Ok(None) => return Analysis::Malformed(format!("{label}: does not contain any typed config")),
        Err(e) => return Analysis::Malformed(format!("{label}: {e}")),
    };
    let inner_url = typed_config.last_string(1).unwrap_or_default().to_owned();
    let inner_value: &'a [u8] = match typed_config.last(2) {
        Ok(v) => v.map_or(&[][..], |f| f.payload),
        Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
    };
    let over_budget = |budget: &Budget| Analysis::Malformed(format!("{label}: typed_config: {}", budget.reason()));
    let (kind, form) = if let Some(kind) = WasmKind::of(&inner_url) {
        if let Err(e) = schema::validate(kind.message(), inner_value) {
            return Analysis::Malformed(format!("{label}: typed_config: {}: {e}", kind.type_name()));
        }
        (kind, Form::Direct { wasm: inner_value })
    } else if matches!(short_name(&inner_url), UDPA_TYPED_STRUCT | XDS_TYPED_STRUCT) {
        let ts = match typed_struct::parse(inner_value, budget) {
            Ok(ts) => ts,
            Err(_) if budget.exceeded() => return over_budget(budget),
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {}: {e}", short_name(&inner_url))),
        };
        let Some(kind) = WasmKind::of(&ts.type_url) else { return Analysis::NoRemoteCode };
        let (wasm, notes) = match typed_struct::to_wasm(kind.message(), &ts.value, budget, inner_value.len()) {
            Ok(x) => x,
            Err(_) if budget.exceeded() => return over_budget(budget),
            Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
        };
        let encodable = notes.unencodable_any.is_empty();
        // Only a Struct that stays one needs its tree again.
        let value = Cell::new(if encodable { BTreeMap::new() } else { ts.value });
        (kind, Form::Struct { wasm, encodable, typed_struct: inner_value, value })
    } else {
        return Analysis::NoRemoteCode;
    };
    let info = match read_wasm(form.wasm()) {
        Ok(info) => info,
        Err(e) => return Analysis::Malformed(format!("{label}: typed_config: {e}")),
    };
    let remote = match info.code {
        Code::Neither => {
            let kind_word = match kind {
                WasmKind::Http => "HTTP",
                WasmKind::Network => "Network",
            };
            return Analysis::Malformed(format!("{label}: no remote and local load found in Wasm {kind_word} filter"));
        }
        Code::Local => return Analysis::NoRemoteCode,
        Code::Remote(remote) => remote,
    };
    let (url, want) = match request_for(remote, info.env, &tec_name, &info.plugin_name, default_timeout) {
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

/// `vm_config.code`: the `AsyncDataSource` oneof `specifier` (`local` = 1, `remote` = 2), or neither.
enum Code<'a> {
    Neither,
    Local,
    /// The `RemoteDataSource`.
    Remote(Msg<'a>),
}

struct WasmInfo<'a> {
    fail_open: bool,
    code: Code<'a>,
    plugin_name: String,
    /// `vm_config.environment_variables`, its occurrences merged.
    env: Option<Msg<'a>>,
}

/// Reads what the conversion needs from a (validated) Wasm message, with protobuf merge semantics. Field
/// numbers from envoy `api/envoy/extensions/wasm/v3/wasm.proto`: `Wasm.config` 1; `PluginConfig.name` 1,
/// `vm_config` 3, `fail_open` 5, `failure_policy` 7; `VmConfig.code` 3, `environment_variables` 7.
fn read_wasm(wasm: &[u8]) -> Result<WasmInfo<'_>, wire::WireError> {
    let config = Msg::from(wasm).child(1)?.unwrap_or(Msg::from(&[][..]));
    let failure_policy = config.last(7)?.map(|f| f.varint()).transpose()?.unwrap_or(0) as i32;
    let fail_open_flag = config.last(5)?.map(|f| f.varint()).transpose()?.unwrap_or(0) != 0;
    // istio `pkg/wasm/convert.go`: a set `failure_policy` decides (open only for FAIL_OPEN); unset, the
    // deprecated bool does.
    let fail_open = if failure_policy != 0 { failure_policy as u64 == FAIL_OPEN } else { fail_open_flag };
    let plugin_name = config.last_string(1)?.to_owned();
    let (code, env) = match config.child(3)? {
        None => (Code::Neither, None),
        Some(vm) => {
            let env = vm.child(7)?;
            let code = match vm.child(3)? {
                None => Code::Neither,
                Some(code) => match code.oneof(&[1, 2])? {
                    None => Code::Neither,
                    Some(member) if member.number == 1 => Code::Local,
                    Some(member) => Code::Remote(member.merged),
                },
            };
            (code, env)
        }
    };
    Ok(WasmInfo { fail_open, code, plugin_name, env })
}

/// The values of the Istio variables among the environment variables' `key_values` (map field 2: entries of
/// key 1, value 2), as Go's map would hold them (a later duplicate key wins). Only these three are kept: one
/// pass, whatever the number of other entries.
fn istio_env(env: Msg<'_>) -> Result<[Option<String>; 3], wire::WireError> {
    const KEYS: [&str; 3] = [SECRET_ENV, POLICY_ENV, RESOURCE_VERSION_ENV];
    let mut values: [Option<String>; 3] = Default::default();
    for field in env.fields() {
        let field = field?;
        if field.number != 2 {
            continue;
        }
        let entry = field.bytes()?;
        let key = wire::last_string(entry, 1)?;
        if let Some(i) = KEYS.iter().position(|k| *k == key) {
            values[i] = Some(wire::last_string(entry, 2)?.to_owned());
        }
    }
    Ok(values)
}

/// Why a remote code source yields no request: its URL (maybe ""), the conversion counter and the cause.
type NoRequest = (String, ConversionResult, String);

/// The module request of a remote code source (validated `RemoteDataSource` bytes: `http_uri` 1, `sha256` 2;
/// `HttpUri.uri` 1, `timeout` 3), in the order of checks of istio `rewriteVMConfig`: the pull secret, then
/// `http_uri`.
fn request_for(
    remote: Msg<'_>,
    env: Option<Msg<'_>>,
    tec_name: &str,
    plugin_name: &str,
    default_timeout: Duration,
) -> Result<ModuleRequest, NoRequest> {
    let internal = |e: wire::WireError| (String::new(), ConversionResult::UnmarshalFailure, e.to_string());
    let http_uri = remote.child(1).map_err(internal)?;
    let url = match &http_uri {
        Some(h) => h.last_string(1).map_err(internal)?.to_owned(),
        None => String::new(),
    };
    let [secret, policy, resource_version] = match env {
        Some(env) => istio_env(env).map_err(internal)?,
        None => Default::default(),
    };
    // istiod leaves the secret empty when it could not read it.
    let pull_secret = match secret.as_deref() {
        Some("") => {
            return Err((url, ConversionResult::FetchFailure, "missing image pulling secret".to_owned()));
        }
        Some(secret) => Some(secret.as_bytes().to_vec()),
        None => None,
    };
    let pull_policy = policy.as_deref().map_or(PullPolicy::Unspecified, PullPolicy::from_env_value);
    let resource_version = resource_version.unwrap_or_default();
    let Some(http_uri) = http_uri else {
        let name = if plugin_name.is_empty() { tec_name } else { plugin_name };
        return Err((
            url,
            ConversionResult::MissRemoteFetchHint,
            format!("wasm remote fetch does not have httpUri specified for config {name:?}"),
        ));
    };
    // Envoy requires a non-empty sha256, so control planes write "nil" for none.
    let sha = remote.last_string(2).map_err(internal)?;
    let sha256 = if sha.is_empty() || sha == "nil" { None } else { Some(sha.to_ascii_lowercase()) };
    let timeout = match http_uri.child(3).map_err(internal)? {
        None => None,
        Some(d) => {
            let seconds = d.last(1).map_err(internal)?.map(|f| f.varint()).transpose().map_err(internal)?;
            let nanos = d.last(2).map_err(internal)?.map(|f| f.varint()).transpose().map_err(internal)?;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prost::Message as _;
    use wasm_ecds_testkit::ecds::{
        any, any_bytes, extensions, remote_code, to_struct, AsyncDataSource, PluginConfig, TypedExtensionConfig,
        TypedStruct, Wasm, TYPED_STRUCT_TYPE, XDS_TYPED_STRUCT_TYPE,
    };

    use crate::ecds::convert_sotw;
    use crate::ecds::tests::{
        counts, out_wasm, policy, resource, response, wasm, wasm_resource, Fake, ECDS, HTTP, NET,
    };
    use crate::metrics::Metrics;
    use crate::module::PullPolicy;
    use crate::wire;

    fn reject_one(res: wasm_ecds_testkit::ecds::Any) -> (String, Metrics) {
        let (fake, m) = (Fake::default(), Metrics::new());
        let err = convert_sotw(&response(vec![res]), &fake, &policy(), &m).err().expect("rejected");
        assert_eq!(counts(&m), [0, 0, 0, 1, 0, 0]);
        (err.reason, m)
    }

    /// Every `tryUnmarshal` row that rejects, with its reason.
    #[test]
    fn unmarshal_failure_rows_reject() {
        let (r, _) = reject_one(any_bytes("type.googleapis.com/google.protobuf.Empty", vec![]));
        assert_eq!(r, "resource #1: not a TypedExtensionConfig (type.googleapis.com/google.protobuf.Empty)");
        let (r, _) = reject_one(any_bytes(ECDS, vec![0x0a, 0x09, b'x']));
        assert!(r.starts_with("resource #1: not a valid TypedExtensionConfig: "), "{r}");
        let (r, _) = reject_one(any(ECDS, &TypedExtensionConfig { name: "x".into(), typed_config: None }));
        assert_eq!(r, "resource \"x\": does not contain any typed config");
        let (r, _) = reject_one(resource("x", any_bytes(HTTP, vec![0x0a, 0x05, 0x00])));
        assert!(r.starts_with("resource \"x\": typed_config: envoy.extensions.filters.http.wasm.v3.Wasm: "), "{r}");
        // invalid UTF-8 deep inside: config.vm_config.vm_id
        let mut vm = Vec::new();
        wire::put_len(&mut vm, 1, &[0xc3, 0x28]);
        let mut pc = Vec::new();
        wire::put_len(&mut pc, 3, &vm);
        let mut w = Vec::new();
        wire::put_len(&mut w, 1, &pc);
        let (r, _) = reject_one(resource("x", any_bytes(HTTP, w)));
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
        let (r, _) = reject_one(resource("x", any_bytes(NET, w)));
        assert!(r.contains("network.wasm.v3.Wasm: config.fail_open: wire type"), "{r}");
        // neither remote nor local: empty Wasm, no vm_config, empty code
        let (r, _) = reject_one(resource("x", any_bytes(HTTP, vec![])));
        assert_eq!(r, "resource \"x\": no remote and local load found in Wasm HTTP filter");
        let no_vm = Wasm { config: Some(PluginConfig { name: "p".into(), ..Default::default() }) };
        reject_one(resource("x", any(HTTP, &no_vm)));
        let (r, _) = reject_one(resource("x", any(NET, &wasm(Some(AsyncDataSource::default()), None))));
        assert_eq!(r, "resource \"x\": no remote and local load found in Wasm Network filter");
        // TypedStruct with a key the Wasm schema lacks
        let ts = TypedStruct {
            type_url: HTTP.into(),
            value: Some(to_struct(serde_json::json!({"config": {"vmConfig": {}}, "wrong": "value"}))),
        };
        let (r, _) = reject_one(resource("x", any(TYPED_STRUCT_TYPE, &ts)));
        assert_eq!(
            r,
            "resource \"x\": typed_config: unknown field \"wrong\" in envoy.extensions.filters.http.wasm.v3.Wasm"
        );
        let ts = TypedStruct {
            type_url: HTTP.into(),
            value: Some(to_struct(
                serde_json::json!({"config": {"vm_config": {"code": {"remote": {"httpUri": {"timeout": "3"}}}}}}),
            )),
        };
        let (r, _) = reject_one(resource("x", any(XDS_TYPED_STRUCT_TYPE, &ts)));
        assert!(r.contains("config.vm_config.code.remote.http_uri.timeout: invalid google.protobuf.Duration"), "{r}");
    }

    /// The request read out of the remote code: `"nil"` and empty sha256, absent, zero, negative and
    /// sub-second timeouts, and env entries written twice (the later one wins).
    #[test]
    fn request_details_sha_nil_timeouts_duplicates() {
        let mut no_timeout = remote_code("http://h/a.wasm", "nil");
        no_timeout.remote_mut().http_uri.as_mut().unwrap().timeout = None;
        let mut zero = remote_code("http://h/b.wasm", "");
        zero.remote_mut().http_uri.as_mut().unwrap().timeout = Some(Default::default());
        let mut negative = remote_code("http://h/c.wasm", "");
        negative.remote_mut().http_uri.as_mut().unwrap().timeout =
            Some(prost_types::Duration { seconds: -1, nanos: 0 });
        let mut half = remote_code("http://h/d.wasm", "");
        half.remote_mut().http_uri.as_mut().unwrap().timeout = Some(prost_types::Duration { seconds: 0, nanos: 500 });
        // key_values entries written twice: the later one wins (an empty secret followed by a real one)
        let mut bytes = wasm(Some(half), None).encode_to_vec();
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
            resource("d", any_bytes(HTTP, bytes)),
        ]);
        let (fake, m) = (Fake::default(), Metrics::new());
        let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
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
        let t = extensions(&out.bytes);
        assert_eq!(out_wasm(&t[3]).config.unwrap().vm_config.unwrap().environment_variables, None);
        assert_eq!(counts(&m), [4, 0, 0, 0, 0, 0]);
        assert_eq!(out.modules.len(), 4);
    }
}
