//! Writes the seed corpora, `tests/fuzz/corpus/<target>/`, from the test kit's real-schema builders and the
//! benchmarks' typical response: `make fuzz-seeds` (deterministic; the checked-in corpora are its output).
//! Each directory is replaced whole.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use wasm_ecds_fuzz::{seed_module, seed_sha, Mode, CLOSED, SEED_MODULES};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::server::{gzip, tar, wasm_module};

// The benchmarks' inputs (`crate::proto` is what they build with).
use wasm_ecds_testkit::proto;
#[allow(dead_code)]
#[path = "../../../../benches/ecds/inputs.rs"]
mod inputs;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let responses = sotw_responses();
    let deltas = delta_responses();

    let mut convert = Vec::new();
    for (name, bytes) in &responses {
        for mode in [Mode::Reject, Mode::Deny] {
            convert.push((format!("{name}-{mode:?}").to_lowercase(), with_byte(mode.byte(), bytes)));
        }
    }
    convert.push(("typical-off".into(), with_byte(Mode::Off.byte(), &responses[0].1)));
    write(&root, "convert", convert);

    let mut convert_delta = Vec::new();
    for (name, bytes) in &deltas {
        for mode in [Mode::Reject, Mode::Deny] {
            convert_delta.push((format!("{name}-{mode:?}").to_lowercase(), with_byte(mode.byte(), bytes)));
        }
    }
    convert_delta.push(("delta-off".into(), with_byte(Mode::Off.byte(), &deltas[0].1)));
    write(&root, "convert_delta", convert_delta);

    write(&root, "nack", responses.clone());
    write(&root, "nack_delta", deltas.clone());

    let mut typed = Vec::new();
    for (name, ts) in typed_structs() {
        // udpa in reject mode, xds in deny mode
        typed.push((format!("{name}-udpa"), with_byte(Mode::Reject.byte(), &ts)));
        typed.push((format!("{name}-xds"), with_byte(0x10 | Mode::Deny.byte(), &ts)));
    }
    write(&root, "typed_struct", typed);

    write(&root, "options", options_texts());
    write(&root, "unbox", unbox_bodies());
}

fn with_byte(byte: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![byte];
    out.extend_from_slice(bytes);
    out
}

fn write(root: &Path, target: &str, inputs: Vec<(String, Vec<u8>)>) {
    let dir = root.join(target);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("remove old corpus");
    }
    std::fs::create_dir_all(&dir).expect("create corpus directory");
    let mut total = 0;
    for (name, bytes) in &inputs {
        std::fs::write(dir.join(name), bytes).expect("write seed");
        total += bytes.len();
    }
    println!("{target}: {} seeds, {total} bytes", inputs.len());
}

/// A module URL on the closed port.
fn url(name: &str) -> String {
    format!("{CLOSED}/{name}")
}

/// An unknown module (never seeded): its fetch fails.
const MISSING_SHA: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn network_wasm_extension(name: &str, wasm: &Wasm) -> TypedExtensionConfig {
    extension(name, any(NETWORK_WASM_TYPE, wasm))
}

fn typed_struct_extension(name: &str, type_url: &str, config: serde_json::Value) -> TypedExtensionConfig {
    let ts = TypedStruct { type_url: HTTP_WASM_TYPE.into(), value: Some(to_struct(config)) };
    extension(name, any(type_url, &ts))
}

/// The Wasm filter config as JSON (the shape a TypedStruct carries), naming `uri` and `sha256`.
fn wasm_json(uri: &str, sha256: &str) -> serde_json::Value {
    serde_json::json!({
        "config": {
            "name": "ns.plugin",
            "root_id": "root",
            "configuration": {"@type": STRING_VALUE_TYPE, "value": "{\"rules\":[1,2.5,true,null]}"},
            "vm_config": {
                "vm_id": "vm",
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"remote": {"http_uri": {"uri": uri, "cluster": "_", "timeout": "10s"}, "sha256": sha256}},
                "environment_variables": {"key_values": {"A": "1", "ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION": "3"}}
            }
        }
    })
}

fn rbac_extension(name: &str) -> TypedExtensionConfig {
    let rbac = HttpRbac { rules: Some(vec![]), rules_stat_prefix: "rbac.".into(), track_per_rule_stats: false };
    extension(name, any(HTTP_RBAC_TYPE, &rbac))
}

fn router_extension(name: &str) -> TypedExtensionConfig {
    let router = Router { dynamic_stats: Some(true), suppress_envoy_headers: true, strict_check_headers: vec![] };
    extension(name, any(ROUTER_TYPE, &router))
}

/// State-of-the-world responses, each small, covering what a resource can be.
fn sotw_responses() -> Vec<(String, Vec<u8>)> {
    let hit = |i: usize| remote_wasm(&url(&format!("seed-{i}.wasm")), &seed_sha(i));
    // The benchmarks' typical response (direct and TypedStruct filters), naming seed modules.
    let manifest: BTreeMap<String, String> =
        (0..SEED_MODULES.len()).map(|i| (format!("s{i}.wasm"), seed_sha(i))).collect();
    let typical = inputs::typical(CLOSED, &manifest, 2);

    let mut secrets = hit(1).with_env(&[
        ("ISTIO_META_WASM_IMAGE_PULL_SECRET", "c2VjcmV0"),
        ("ISTIO_META_WASM_IMAGE_PULL_POLICY", "Always"),
        ("ISTIO_META_WASM_PLUGIN_RESOURCE_VERSION", "7"),
        ("KEEP", "me"),
    ]);
    secrets.vm().environment_variables.as_mut().unwrap().host_env_keys = vec!["HOME".into()];
    let uppercase = remote_wasm(&url("upper.wasm"), &seed_sha(2).to_uppercase());
    let mut local = remote_wasm("", "");
    local.vm().code = Some(local_file("/etc/istio/extensions/plugin.wasm"));
    let mut inline = remote_wasm("", "");
    inline.vm().code = Some(inline_code("(module)"));

    let with_envelope = DiscoveryResponse {
        version_info: "2026-11-27T00:00:00Z/42".into(),
        resources: vec![any(ECDS_TYPE, &wasm_extension("a", &hit(0)))],
        canary: true,
        type_url: ECDS_TYPE.into(),
        nonce: "n-2".into(),
        control_plane: Some(ControlPlane { identifier: "istiod-1".into() }),
        resource_errors: vec![ResourceError {
            resource_name: Some(ResourceName { name: "b".into() }),
            error_detail: Some(Status { code: 3, message: "bad".into(), details: vec![] }),
        }],
    }
    .encode_to_vec();
    let not_ecds = DiscoveryResponse {
        version_info: "1".into(),
        resources: vec![any(HTTP_WASM_TYPE, &hit(0))],
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        nonce: "n".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let malformed = DiscoveryResponse {
        resources: vec![any_bytes(ECDS_TYPE, vec![0x12, 0x05, 0x0a, 0x01]), any_bytes(HTTP_WASM_TYPE, vec![])],
        type_url: ECDS_TYPE.into(),
        ..Default::default()
    }
    .encode_to_vec();

    vec![
        ("typical".into(), typical),
        ("hits".into(), response(&[wasm_extension("h0", &hit(0)), network_wasm_extension("h1", &hit(1))])),
        ("secrets".into(), response(&[wasm_extension("s", &secrets)])),
        ("uppercase-sha".into(), response(&[wasm_extension("u", &uppercase)])),
        (
            "misses".into(),
            response(&[
                wasm_extension("fail-closed", &remote_wasm(&url("missing.wasm"), MISSING_SHA)),
                wasm_extension("fail-open", &remote_wasm(&url("missing.wasm"), MISSING_SHA).fail_open()),
                network_wasm_extension("net", &remote_wasm(&url("missing.wasm"), MISSING_SHA).with_timeout(1)),
            ]),
        ),
        (
            "no-sha".into(),
            response(&[
                wasm_extension("url-only", &remote_wasm(&url("m.wasm"), "")),
                wasm_extension("oci", &remote_wasm("oci://registry.local/plugin:v1", "")),
            ]),
        ),
        (
            "local".into(),
            response(&[wasm_extension("file", &local), wasm_extension("inline", &inline), rbac_extension("rbac")]),
        ),
        (
            "typed-structs".into(),
            response(&[
                typed_struct_extension("udpa", TYPED_STRUCT_TYPE, wasm_json(&url("seed-0.wasm"), &seed_sha(0))),
                typed_struct_extension("xds", XDS_TYPED_STRUCT_TYPE, wasm_json(&url("missing.wasm"), MISSING_SHA)),
            ]),
        ),
        ("mixed".into(), response(&[router_extension("router"), wasm_extension("w", &hit(2)), rbac_extension("r")])),
        ("envelope".into(), with_envelope),
        ("not-ecds".into(), not_ecds),
        ("malformed".into(), malformed),
        ("empty".into(), Vec::new()),
    ]
}

fn delta_resource(name: &str, ext: &TypedExtensionConfig) -> Resource {
    Resource {
        version: format!("{name}-v1"),
        resource: Some(any(ECDS_TYPE, ext)),
        name: name.into(),
        aliases: vec![],
        ttl: None,
    }
}

/// Delta responses: resources with names and versions, removals both ways, a resource without body.
fn delta_responses() -> Vec<(String, Vec<u8>)> {
    let hit = |i: usize| remote_wasm(&url(&format!("seed-{i}.wasm")), &seed_sha(i));
    let delta = |resources: Vec<Resource>, removed: Vec<&str>, removed_names: Vec<&str>| {
        DeltaDiscoveryResponse {
            system_version_info: "sys-1".into(),
            resources,
            type_url: ECDS_TYPE.into(),
            nonce: "delta-nonce".into(),
            removed_resources: removed.into_iter().map(String::from).collect(),
            control_plane: Some(ControlPlane { identifier: "istiod".into() }),
            removed_resource_names: removed_names.into_iter().map(|n| ResourceName { name: n.into() }).collect(),
            resource_errors: vec![],
        }
        .encode_to_vec()
    };
    let no_body = Resource { version: "1".into(), resource: None, name: "gone".into(), aliases: vec![], ttl: None };
    let mut aliased = delta_resource("aliased", &network_wasm_extension("", &hit(1)));
    aliased.aliases = vec!["alias-1".into()];
    aliased.ttl = Some(Duration { seconds: 60, nanos: 0 });
    vec![
        (
            "delta".into(),
            delta(
                vec![
                    delta_resource("a", &wasm_extension("a", &hit(0))),
                    delta_resource(
                        "ts",
                        &typed_struct_extension("ts", TYPED_STRUCT_TYPE, wasm_json(&url("seed-2"), &seed_sha(2))),
                    ),
                ],
                vec!["old-1"],
                vec!["old-2"],
            ),
        ),
        ("delta-aliased".into(), delta(vec![aliased], vec![], vec![])),
        (
            "delta-misses".into(),
            delta(
                vec![
                    delta_resource("closed", &wasm_extension("", &remote_wasm(&url("m.wasm"), MISSING_SHA))),
                    delta_resource("open", &wasm_extension("open", &remote_wasm(&url("m.wasm"), "").fail_open())),
                    delta_resource("rbac", &rbac_extension("rbac")),
                ],
                vec![],
                vec![],
            ),
        ),
        ("delta-no-body".into(), delta(vec![no_body], vec!["x"], vec![])),
        ("delta-removals-only".into(), delta(vec![], vec!["a", "b"], vec!["c"])),
    ]
}

/// Serialized TypedStructs (the `typed_struct` target wraps them in a resource).
fn typed_structs() -> Vec<(String, Vec<u8>)> {
    let ts = |type_url: &str, config: serde_json::Value| {
        TypedStruct { type_url: type_url.into(), value: Some(to_struct(config)) }.encode_to_vec()
    };
    let mut local = wasm_json("", "");
    local["config"]["vm_config"]["code"] = serde_json::json!({"local": {"filename": "/var/plugin.wasm"}});
    let mut fail_open = wasm_json(&url("missing.wasm"), MISSING_SHA);
    fail_open["config"]["fail_open"] = serde_json::json!(true);
    fail_open["config"]["vm_config"]["allow_precompiled"] = serde_json::json!(true);
    fail_open["config"]["vm_config"]["nack_on_code_cache_miss"] = serde_json::json!(false);
    let mut struct_config = wasm_json(&url("seed-1.wasm"), &seed_sha(1));
    struct_config["config"]["configuration"] = serde_json::json!({
        "@type": "type.googleapis.com/google.protobuf.Struct",
        "value": {"list": [1, -2.5e10, "s", null, {"k": [true, false]}], "nested": {"deeper": {"x": 1}}}
    });
    vec![
        ("hit".into(), ts(HTTP_WASM_TYPE, wasm_json(&url("seed-0.wasm"), &seed_sha(0)))),
        ("network".into(), ts(NETWORK_WASM_TYPE, wasm_json(&url("seed-1.wasm"), &seed_sha(1)))),
        ("struct-config".into(), ts(HTTP_WASM_TYPE, struct_config)),
        ("miss-fail-open".into(), ts(HTTP_WASM_TYPE, fail_open)),
        ("local".into(), ts(HTTP_WASM_TYPE, local)),
        ("unknown-key".into(), ts(HTTP_WASM_TYPE, serde_json::json!({"config": {"no_such_field": 1}}))),
        ("empty".into(), ts(HTTP_WASM_TYPE, serde_json::json!({}))),
    ]
}

fn options_texts() -> Vec<(String, Vec<u8>)> {
    let texts = [
        ("empty", ""),
        ("null", "null"),
        ("defaults", "{}"),
        (
            "all",
            r#"{"cache_dir": "/tmp/wasm-ecds-fuzz-options", "enable_conversion": true, "module_expiry_secs": 86400,
"purge_interval_secs": 3600, "default_fetch_timeout_ms": 5000, "http_request_timeout_ms": 15000,
"max_attempts": 5, "retry_initial_backoff_ms": 500, "retry_max_backoff_ms": 60000,
"max_module_bytes": 268435456, "insecure_hosts": ["*", "registry.local:5000"], "ca_file": "/etc/ssl/ca.pem",
"blocked_cidrs": ["10.0.0.0/8", "fd00::/8", "192.168.1.1", "::ffff:0:0/96"], "on_fetch_failure": "deny"}"#,
        ),
        ("unknown-key", r#"{"cache_dir": "/tmp/x", "max_retries": 3}"#),
        ("zero", r#"{"max_attempts": 0}"#),
        ("backoff", r#"{"retry_initial_backoff_ms": 10, "retry_max_backoff_ms": 1}"#),
        ("bad-cidr", r#"{"blocked_cidrs": ["10.0.0.0/33"]}"#),
        ("bad-type", r#"{"enable_conversion": "yes", "on_fetch_failure": "allow"}"#),
        ("huge", r#"{"module_expiry_secs": 18446744073709551615, "default_fetch_timeout_ms": 1e400}"#),
        ("not-object", "[1, 2, 3]"),
        ("nested", r#"{"insecure_hosts": [[[[[[[[["x"]]]]]]]]]}"#),
    ];
    texts.iter().map(|(name, text)| (name.to_string(), text.as_bytes().to_vec())).collect()
}

/// A tar archive with a GNU long-name entry (a name longer than the 100 bytes of a header).
fn gnu_long_name_tar(data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, format!("{}/plugin.wasm", "d".repeat(120)), data).expect("tar entry");
    builder.into_inner().expect("tar")
}

/// A tar archive whose first entry is a PAX extended header.
fn pax_tar(data: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_pax_extensions([("path", b"pax/plugin.wasm".as_slice()), ("comment", b"x".as_slice())]).unwrap();
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, "plugin.wasm", data).expect("tar entry");
    builder.into_inner().expect("tar")
}

/// Module bodies (after a flags byte: bit 0 = `Content-Encoding: gzip`).
fn unbox_bodies() -> Vec<(String, Vec<u8>)> {
    let wasm = wasm_module(200);
    let small = seed_module(0);
    let tar_two = tar(&[("plugin.wasm", small.as_slice()), ("other.wasm", wasm.as_slice())]);
    let mut truncated_gzip = gzip(&wasm);
    truncated_gzip.truncate(truncated_gzip.len() / 2);
    let mut gzip_bad_crc = gzip(&small);
    let n = gzip_bad_crc.len();
    gzip_bad_crc[n - 8] ^= 0xff;
    let mut multi_member = gzip(&small);
    multi_member.extend(gzip(b"tail"));
    let zlib = [&[0x78, 0x9c][..], &small].concat(); // a zlib header: neither gzip nor tar, refused
    let bodies: Vec<(&str, u8, Vec<u8>)> = vec![
        ("wasm", 0, wasm.clone()),
        ("wasm-header-only", 0, small.clone()),
        ("wasm-content-encoding", 1, wasm.clone()),
        ("gzip", 0, gzip(&wasm)),
        ("tar", 0, tar(&[("plugin.wasm", wasm.as_slice())])),
        ("tar-gz", 0, gzip(&tar(&[("plugin.wasm", small.as_slice())]))),
        ("gz-gz", 0, gzip(&gzip(&small))),
        ("tar-two-entries", 0, tar_two),
        ("tar-not-wasm", 0, tar(&[("README", b"not a module".as_slice())])),
        ("tar-gnu-long-name", 0, gnu_long_name_tar(&small)),
        ("tar-pax", 0, pax_tar(&small)),
        ("gzip-truncated", 0, truncated_gzip),
        ("gzip-bad-crc", 0, gzip_bad_crc),
        ("gzip-multi-member", 0, multi_member),
        ("zlib", 0, zlib),
        ("html", 0, b"<html>404</html>".to_vec()),
        ("empty", 0, Vec::new()),
    ];
    bodies.into_iter().map(|(name, flags, body)| (name.to_string(), with_byte(flags, &body))).collect()
}
