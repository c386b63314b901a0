//! Pipeline tests (whole responses through `convert_sotw` / `convert_delta`), and the helpers the tests of
//! `analyze`, `decide` and `rewrite` share: a fake module source and builders over the test kit's types.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use wasm_ecds_testkit::ecds::{
    any, any_bytes, env_vars, extension, extensions, remote_code, to_struct, Any, AsyncDataSource, DataSource,
    DeltaDiscoveryResponse, DiscoveryResponse, EnvironmentVariables, PluginConfig, Resource, ResourceName,
    TypedExtensionConfig, TypedStruct, VmConfig, Wasm, ECDS_TYPE, HTTP_RBAC_TYPE, HTTP_WASM_TYPE, NETWORK_WASM_TYPE,
    STRING_VALUE_TYPE, TYPED_STRUCT_TYPE, XDS_TYPED_STRUCT_TYPE,
};

use super::*;
use crate::metrics::ConversionResult as CR;
use crate::module::{Module, ModuleRequest};
use crate::wire;

// ---- a fake store ----

/// Answers `…/<file>` with the module `/cache/<file>` (sha256 `sha-<file>`), and a checksum mismatch for a
/// file whose name starts with "bad".
#[derive(Default)]
pub(super) struct Fake {
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
    /// Every request asked, in order.
    pub(super) fn requests(&self) -> Vec<ModuleRequest> {
        self.calls.lock().unwrap().concat()
    }

    pub(super) fn call_count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

// ---- inputs and outputs ----

pub(super) const ECDS: &str = ECDS_TYPE;
pub(super) const HTTP: &str = HTTP_WASM_TYPE;
pub(super) const NET: &str = NETWORK_WASM_TYPE;

pub(super) fn policy() -> ConversionPolicy {
    ConversionPolicy { default_timeout: Duration::from_secs(5), on_fetch_failure: OnFetchFailure::Reject }
}

pub(super) fn deny_policy() -> ConversionPolicy {
    ConversionPolicy { on_fetch_failure: OnFetchFailure::Deny, ..policy() }
}

/// A Wasm filter as istiod writes one, with this code and these env vars.
pub(super) fn wasm(code: Option<AsyncDataSource>, env: Option<EnvironmentVariables>) -> Wasm {
    Wasm {
        config: Some(PluginConfig {
            name: "ns.plugin".to_owned(),
            root_id: "root".to_owned(),
            vm_config: Some(VmConfig {
                vm_id: "vm".to_owned(),
                runtime: "envoy.wasm.runtime.v8".to_owned(),
                code,
                nack_on_code_cache_miss: true,
                environment_variables: env,
                ..Default::default()
            }),
            configuration: Some(any_bytes(STRING_VALUE_TYPE, vec![0x0a, 7, b'{', b'"', b'a', b'"', b':', b'1', b'}'])),
            ..Default::default()
        }),
    }
}

pub(super) fn remote_wasm(url: &str) -> Wasm {
    wasm(Some(remote_code(url, "nil")), None)
}

/// The resource `Any` of `TypedExtensionConfig{name, typed_config}`.
pub(super) fn resource(name: &str, typed_config: Any) -> Any {
    any(ECDS, &extension(name, typed_config))
}

pub(super) fn wasm_resource(name: &str, w: &Wasm) -> Any {
    resource(name, any(HTTP, w))
}

pub(super) fn typed_struct_resource(ts_url: &str, inner: &str, value: serde_json::Value) -> Any {
    let ts = TypedStruct { type_url: inner.into(), value: Some(to_struct(value)) };
    resource("ts", any(ts_url, &ts))
}

/// A `DiscoveryResponse` with these resources.
pub(super) fn response(resources: Vec<Any>) -> Vec<u8> {
    DiscoveryResponse {
        version_info: "1".into(),
        resources,
        type_url: ECDS.into(),
        nonce: "n".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The Wasm filter of a converted resource.
pub(super) fn out_wasm(tec: &TypedExtensionConfig) -> Wasm {
    let tc = tec.typed_config.as_ref().unwrap();
    assert!(tc.type_url == HTTP || tc.type_url == NET, "{}", tc.type_url);
    Wasm::decode(tc.value.as_slice()).unwrap()
}

/// The conversion counters, in the order success, no_remote_load, marshal_failure, unmarshal_failure,
/// fetch_failure, miss_remote_fetch_hint.
pub(super) fn counts(m: &Metrics) -> [u64; 6] {
    [CR::Success, CR::NoRemoteLoad, CR::MarshalFailure, CR::UnmarshalFailure, CR::FetchFailure, CR::MissRemoteFetchHint]
        .map(|r| m.conversions(r))
}

/// A Wasm filter whose module fails to fetch, with these fail-open settings.
pub(super) fn failing(name: &str, fail_open: bool, failure_policy: i32, type_url: &str) -> Any {
    let mut w = remote_wasm("http://h/bad.wasm");
    let c = w.config.as_mut().unwrap();
    c.fail_open = fail_open;
    c.failure_policy = failure_policy;
    resource(name, any(type_url, &w))
}

// The same Wasm filter as a Struct, in lowerCamelCase and in snake_case keys.
pub(super) const CAMEL: &str = r#"{"config": {"name": "ns.plugin", "rootId": "root", "vmConfig": {"vmId": "vm",
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

// ---- tests ----

#[test]
fn other_type_urls_pass_byte_identical_without_counting() {
    let mut r =
        DiscoveryResponse::decode(response(vec![wasm_resource("a", &remote_wasm("http://h/m.wasm"))]).as_slice())
            .unwrap();
    r.type_url = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
    let input = r.encode_to_vec();
    let (fake, m) = (Fake::default(), Metrics::new());
    let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(out.bytes, input);
    assert_eq!(counts(&m), [0; 6]);
    assert_eq!(fake.call_count(), 0);
}

#[test]
fn empty_type_url_is_ecds() {
    let mut r =
        DiscoveryResponse::decode(response(vec![wasm_resource("a", &remote_wasm("http://h/m.wasm"))]).as_slice())
            .unwrap();
    r.type_url.clear();
    let (fake, m) = (Fake::default(), Metrics::new());
    let out = convert_sotw(&r.encode_to_vec(), &fake, &policy(), &m).ok().unwrap();
    assert_eq!(*out.modules, [Arc::<str>::from("sha-m.wasm")]);
    assert_eq!(counts(&m)[0], 1);
}

#[test]
fn malformed_response_is_rejected() {
    let (fake, m) = (Fake::default(), Metrics::new());
    let err = convert_sotw(&[0x12, 0x05, 0x01], &fake, &policy(), &m).err().unwrap();
    assert!(err.reason.starts_with("malformed DiscoveryResponse: "), "{}", err.reason);
    // type_url with invalid UTF-8
    let err = convert_sotw(&[0x22, 0x01, 0xff], &fake, &policy(), &m).err().unwrap();
    assert!(err.reason.starts_with("malformed DiscoveryResponse: type_url: "), "{}", err.reason);
    assert_eq!(counts(&m), [0; 6]);
}

#[test]
fn pass_through_rows_are_byte_identical() {
    let rbac =
        any(HTTP_RBAC_TYPE, &wasm_ecds_testkit::ecds::HttpRbac { rules_stat_prefix: "x".into(), ..Default::default() });
    let st = any("type.googleapis.com/google.protobuf.Struct", &to_struct(serde_json::json!({"a": 1})));
    let ts_other = any(
        TYPED_STRUCT_TYPE,
        &TypedStruct {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
            value: Some(to_struct(serde_json::json!({"wrong": 1}))),
        },
    );
    let local_file = wasm_ecds_testkit::ecds::local_file("/x.wasm");
    let local_inline = wasm_ecds_testkit::ecds::inline_code("code");
    let empty_local = AsyncDataSource {
        specifier: Some(wasm_ecds_testkit::proto::async_data_source::Specifier::Local(DataSource::default())),
    };
    let resources = vec![
        resource("rbac", rbac),
        resource("struct", st),
        resource("router-ts", ts_other),
        resource("empty-any", Any::default()),
        wasm_resource("file", &wasm(Some(local_file), Some(env_vars(&[("ISTIO_META_X", "")], &[])))),
        wasm_resource("inline", &wasm(Some(local_inline), None)),
        wasm_resource("empty-local", &wasm(Some(empty_local), None)),
    ];
    let input = response(resources);
    let (fake, m) = (Fake::default(), Metrics::new());
    let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(out.bytes, input);
    assert!(out.modules.is_empty());
    assert_eq!(counts(&m), [0, 7, 0, 0, 0, 0]);
    assert_eq!(fake.call_count(), 0);
}

#[test]
fn converts_remote_code_and_builds_the_request() {
    let mut w = wasm(
        Some(remote_code("http://h/m.wasm", "ABCDEF")),
        Some(env_vars(
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
    let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(counts(&m), [1, 0, 0, 0, 0, 0]);
    let req = &fake.requests()[0];
    assert_eq!(req.url, "http://h/m.wasm");
    assert_eq!(req.sha256.as_deref(), Some("abcdef"));
    assert_eq!(req.timeout, Duration::from_secs(30));
    assert_eq!(req.resource_name, "extensions.istio.io/wasmplugin/ns.p");
    assert_eq!(req.resource_version, "42");
    assert_eq!(req.pull_policy, crate::module::PullPolicy::Always);
    assert_eq!(req.pull_secret.as_deref(), Some(&b"{\"auths\":{}}"[..]));
    assert_eq!(*out.modules, [Arc::<str>::from("sha-m.wasm")]);
    let t = extensions(&out.bytes);
    assert_eq!(t[0].name, "extensions.istio.io/wasmplugin/ns.p");
    let got = out_wasm(&t[0]);
    let vm = w.vm();
    vm.code = Some(wasm_ecds_testkit::ecds::local_file("/cache/m.wasm"));
    vm.environment_variables = Some(env_vars(&[("USER", "kept")], &[]));
    assert_eq!(got, w);
    // the rest of the response is untouched
    let (a, b) = (
        DiscoveryResponse::decode(input.as_slice()).unwrap(),
        DiscoveryResponse::decode(out.bytes.as_slice()).unwrap(),
    );
    assert_eq!((a.version_info, a.nonce, a.type_url), (b.version_info, b.nonce, b.type_url));
}

#[test]
fn rejection_lists_every_failure_in_order_and_still_counts_the_rest() {
    let (fake, m) = (Fake::default(), Metrics::new());
    let input = response(vec![
        failing("first", false, 0, HTTP),
        any_bytes("type.googleapis.com/google.protobuf.Empty", vec![]),
        wasm_resource("ok", &remote_wasm("http://h/m.wasm")),
        resource("rbac", any_bytes(HTTP_RBAC_TYPE, vec![])),
    ]);
    let err = convert_sotw(&input, &fake, &policy(), &m).err().unwrap();
    assert_eq!(
        err.reason,
        "resource \"first\": module http://h/bad.wasm: checksum mismatch: want aa, got bb; \
         resource #2: not a TypedExtensionConfig (type.googleapis.com/google.protobuf.Empty)"
    );
    assert_eq!(counts(&m), [1, 1, 0, 1, 1, 0]);
    assert_eq!(fake.call_count(), 1);
    assert_eq!(fake.requests().len(), 2);
}

#[test]
fn typed_struct_converts_to_the_same_typed_wasm() {
    let direct = wasm(
        Some(remote_code("http://h/m.wasm", "nil")),
        Some(env_vars(&[("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "3"), ("USER", "v")], &[])),
    );
    let (fake, m) = (Fake::default(), Metrics::new());
    let out = convert_sotw(&response(vec![wasm_resource("ts", &direct)]), &fake, &policy(), &m).ok().unwrap();
    let want = out_wasm(&extensions(&out.bytes)[0]);
    for ts_url in [TYPED_STRUCT_TYPE, XDS_TYPED_STRUCT_TYPE] {
        for json in [CAMEL, SNAKE] {
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            let input = response(vec![typed_struct_resource(ts_url, HTTP, value)]);
            let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
            let t = extensions(&out.bytes);
            assert_eq!(t[0].typed_config.as_ref().unwrap().type_url, HTTP);
            assert_eq!(out_wasm(&t[0]), want, "{ts_url}");
        }
    }
    let reqs = fake.requests();
    assert!(reqs.iter().all(|r| r.resource_version == "3" && r.timeout == Duration::from_secs(30)));
    // network kind
    let value: serde_json::Value = serde_json::from_str(CAMEL).unwrap();
    let out = convert_sotw(
        &response(vec![typed_struct_resource("t/udpa.type.v1.TypedStruct", NET, value)]),
        &fake,
        &policy(),
        &m,
    )
    .ok()
    .unwrap();
    assert_eq!(extensions(&out.bytes)[0].typed_config.as_ref().unwrap().type_url, NET);
    assert_eq!(counts(&m), [6, 0, 0, 0, 0, 0]);
}

#[test]
fn typed_struct_with_unencodable_any_stays_a_typed_struct() {
    let value = serde_json::json!({"config": {"vmConfig": {
        "code": {"remote": {"httpUri": {"uri": "http://h/m.wasm"}}},
        "environmentVariables": {"keyValues": {"ISTIO_META_X": "1"}},
        "configuration": {"@type": "type.googleapis.com/some.vendor.Config", "x": 1}}}});
    let (fake, m) = (Fake::default(), Metrics::new());
    let ts_url = XDS_TYPED_STRUCT_TYPE;
    let out =
        convert_sotw(&response(vec![typed_struct_resource(ts_url, HTTP, value)]), &fake, &policy(), &m).ok().unwrap();
    let tc = extensions(&out.bytes)[0].typed_config.clone().unwrap();
    assert_eq!(tc.type_url, ts_url);
    let ts = TypedStruct::decode(tc.value.as_slice()).unwrap();
    assert_eq!(ts.type_url, HTTP);
    let want = to_struct(serde_json::json!({"config": {"vmConfig": {
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
            TYPED_STRUCT_TYPE,
            HTTP,
            serde_json::json!({"config": {"vm_config": {"code": {"local": {"inline_string": "x"}}}}}),
        ),
        typed_struct_resource(
            XDS_TYPED_STRUCT_TYPE,
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            serde_json::json!({"anything": true}),
        ),
    ]);
    let out = convert_sotw(&input, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(out.bytes, input);
    assert_eq!(counts(&m), [0, 2, 0, 0, 0, 0]);
}

#[test]
fn delta_responses() {
    let res = |name: &str, body: Option<Any>| Resource {
        version: "v".into(),
        resource: body,
        name: name.into(),
        ..Default::default()
    };
    let delta = DeltaDiscoveryResponse {
        system_version_info: "s".into(),
        resources: vec![
            res("a", Some(wasm_resource("a", &remote_wasm("http://h/m.wasm")))),
            res("b", Some(resource("b", any_bytes(HTTP_RBAC_TYPE, vec![])))),
        ],
        type_url: ECDS.into(),
        removed_resources: vec!["gone".into()],
        removed_resource_names: vec![ResourceName { name: "gone2".into() }],
        ..Default::default()
    };
    let input = delta.encode_to_vec();
    let (fake, m) = (Fake::default(), Metrics::new());
    let out = convert_delta(&input, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(out.resources, vec![("a".to_string(), Some(Arc::<str>::from("sha-m.wasm"))), ("b".to_string(), None)]);
    assert_eq!(out.removed, vec!["gone".to_string(), "gone2".to_string()]);
    let d = DeltaDiscoveryResponse::decode(out.bytes.as_slice()).unwrap();
    assert_eq!(d.system_version_info, "s");
    assert_eq!(d.removed_resources, delta.removed_resources);
    assert_eq!(d.resources[1], delta.resources[1]);
    let tec = TypedExtensionConfig::decode(d.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(out_wasm(&tec).local_filename().as_deref(), Some("/cache/m.wasm"));
    assert_eq!(counts(&m), [1, 1, 0, 0, 0, 0]);
    // nothing to convert: identical
    let only_removed = DeltaDiscoveryResponse { resources: vec![], ..delta.clone() }.encode_to_vec();
    let out = convert_delta(&only_removed, &fake, &policy(), &m).ok().unwrap();
    assert_eq!(out.bytes, only_removed);
    // a failing resource is named by its Resource.name when the body says nothing
    let bad = DeltaDiscoveryResponse {
        resources: vec![res("x", Some(any_bytes("t/google.protobuf.Empty", vec![])))],
        ..delta.clone()
    };
    let err = convert_delta(&bad.encode_to_vec(), &fake, &policy(), &m).err().unwrap();
    assert_eq!(err.reason, "resource \"x\": not a TypedExtensionConfig (t/google.protobuf.Empty)");
    let err = convert_delta(&[0x12, 0x03, 0x1a, 0x05], &fake, &policy(), &m).err().unwrap();
    assert!(err.reason.starts_with("malformed DeltaDiscoveryResponse"), "{}", err.reason);
}

/// `msg` with the message field `path[0]` written as two occurrences (its fields split between them), and so
/// on down `path`: protobuf merges them back into the same message.
fn split_along(msg: &[u8], path: &[u32]) -> Vec<u8> {
    let Some((&number, rest)) = path.split_first() else { return msg.to_vec() };
    let mut out = Vec::new();
    for field in wire::Fields::new(msg) {
        let field = field.unwrap();
        if field.number != number {
            out.extend_from_slice(field.raw);
            continue;
        }
        let inner = split_along(field.payload, rest);
        let pieces: Vec<&[u8]> = wire::Fields::new(&inner).map(|f| f.unwrap().raw).collect();
        let half = pieces.len().div_ceil(2);
        wire::put_len(&mut out, number, &pieces[..half].concat());
        wire::put_len(&mut out, number, &pieces[half..].concat());
    }
    out
}

/// Every message on the way to the code written as two occurrences — `typed_config`, `Wasm.config`,
/// `vm_config`, `code`, `remote`, `http_uri`, `timeout`, and a delta `Resource.resource` — converts as the
/// same filter written once: the request is the same and the output decodes to the same filter.
#[test]
fn every_level_written_twice_converts_as_protobuf_merges_it() {
    let mut code = remote_code("http://h/m.wasm", "abc");
    code.remote_mut().http_uri.as_mut().unwrap().timeout = Some(prost_types::Duration { seconds: 7, nanos: 9 });
    let filter = wasm(Some(code), Some(env_vars(&[("ISTIO_META_WASM_IMAGE_PULL_POLICY", "Always"), ("A", "b")], &[])));
    let once = wasm_resource("w", &filter);
    // Wasm.config 1, PluginConfig.vm_config 3, VmConfig.code 3, AsyncDataSource.remote 2,
    // RemoteDataSource.http_uri 1, HttpUri.timeout 3; TypedExtensionConfig.typed_config 2.
    let wasm_split = split_along(&filter.encode_to_vec(), &[1, 3, 3, 2, 1, 3]);
    let tec = TypedExtensionConfig { name: "w".into(), typed_config: Some(any_bytes(HTTP, wasm_split)) };
    let twice = any_bytes(ECDS, split_along(&tec.encode_to_vec(), &[2]));
    let (fake, m) = (Fake::default(), Metrics::new());
    let a = convert_sotw(&response(vec![once.clone()]), &fake, &policy(), &m).ok().unwrap();
    let b = convert_sotw(&response(vec![twice.clone()]), &fake, &policy(), &m).ok().unwrap();
    let reqs = fake.requests();
    assert_eq!(reqs[0], reqs[1]);
    assert_eq!(reqs[1].timeout, Duration::new(7, 9));
    assert_eq!(reqs[1].sha256.as_deref(), Some("abc"));
    assert_eq!(reqs[1].pull_policy, crate::module::PullPolicy::Always);
    assert_eq!(out_wasm(&extensions(&b.bytes)[0]), out_wasm(&extensions(&a.bytes)[0]));
    // delta: Resource.resource (2) in two occurrences as well
    let delta = |body: Any| {
        let r = Resource { name: "w".into(), resource: Some(body), ..Default::default() };
        DeltaDiscoveryResponse { resources: vec![r], type_url: ECDS.into(), ..Default::default() }
    };
    let mut split_delta = Vec::new();
    for field in wire::Fields::new(&delta(twice).encode_to_vec()) {
        let field = field.unwrap();
        match field.number {
            2 => wire::put_len(&mut split_delta, 2, &split_along(field.payload, &[2])),
            _ => split_delta.extend_from_slice(field.raw),
        }
    }
    let out = convert_delta(&split_delta, &fake, &policy(), &m).ok().unwrap();
    let d = DeltaDiscoveryResponse::decode(out.bytes.as_slice()).unwrap();
    let tec = TypedExtensionConfig::decode(d.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(out_wasm(&tec), out_wasm(&extensions(&a.bytes)[0]));
    assert_eq!(fake.requests()[2], reqs[0]);
    assert_eq!(counts(&m), [3, 0, 0, 0, 0, 0]);
}

/// Truncations and byte flips of valid responses must never panic.
#[test]
fn mutated_inputs_never_panic() {
    let value: serde_json::Value = serde_json::from_str(CAMEL).unwrap();
    let inputs = vec![
        response(vec![
            wasm_resource(
                "a",
                &wasm(Some(remote_code("http://h/m.wasm", "x")), Some(env_vars(&[("ISTIO_META_A", "1")], &["H"]))),
            ),
            typed_struct_resource(TYPED_STRUCT_TYPE, HTTP, value),
            failing("f", true, 0, NET),
        ]),
        DeltaDiscoveryResponse {
            resources: vec![Resource {
                name: "a".into(),
                resource: Some(wasm_resource("a", &remote_wasm("http://h/m.wasm"))),
                version: "1".into(),
                ..Default::default()
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
    let input = response(vec![resource("deep", any_bytes("t/udpa.type.v1.TypedStruct", ts))]);
    assert!(convert_sotw(&input, &fake, &policy(), &m).is_err());
}

/// An `oci://` filter goes to the store (no longer refused by the HTTP fetcher's scheme check) with its pull
/// secret and its manifest digest (a digest URL's, or the config's `sha256`), and converts to the stored
/// module without the secret.
#[test]
fn oci_filter_reaches_the_store_with_its_pull_secret_and_digest() {
    use crate::store::fixture::{digest, fixture, wasm as module_bytes};
    let f = fixture();
    let (d, d2) = (digest("m"), digest("t"));
    let by_digest = format!("oci://reg.test/ns/m@sha256:{d}");
    let tagged = "oci://reg.test/ns/t:v1";
    f.fetcher.serve_image(&by_digest, &d, &module_bytes("m"));
    f.fetcher.serve_image(tagged, &d2, &module_bytes("t"));
    let secret = r#"{"auths":{"reg.test":{"auth":"dXNlcjpzM2NyZXQ="}}}"#;
    let env = env_vars(&[("ISTIO_META_WASM_IMAGE_PULL_SECRET", secret), ("USER", "kept")], &[]);
    let input = response(vec![
        wasm_resource("by-digest", &wasm(Some(remote_code(&by_digest, "nil")), Some(env.clone()))),
        wasm_resource("tagged", &wasm(Some(remote_code(tagged, &d2.to_ascii_uppercase())), Some(env))),
    ]);
    let m = Metrics::new();
    let pins = f.store().pinning();
    let out = convert_sotw(&input, &pins, &policy(), &m).ok().unwrap();
    assert_eq!(counts(&m), [2, 0, 0, 0, 0, 0]);

    let mut asked = f.fetcher.asked();
    asked.sort_by(|a, b| a.url.cmp(&b.url));
    assert_eq!(asked.len(), 2);
    assert_eq!((asked[0].url.as_str(), asked[0].expected_manifest.as_deref()), (by_digest.as_str(), Some(&*d)));
    assert_eq!((asked[1].url.as_str(), asked[1].expected_manifest.as_deref()), (tagged, Some(&*d2)));
    assert!(asked.iter().all(|a| a.pull_secret.as_deref() == Some(secret.as_bytes())));

    let modules = std::fs::canonicalize(f.cache_dir()).unwrap().join("modules");
    let t = extensions(&out.bytes);
    for (tec, body) in t.iter().zip(["m", "t"]) {
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(module_bytes(body)));
        let want = modules.join(format!("{sha}.wasm"));
        assert_eq!(out_wasm(tec).local_filename().as_deref(), want.to_str(), "{}", tec.name);
    }
    assert!(!out.bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret reached Envoy's config");
}
