//! Writes the seed corpora, `tests/fuzz/corpus/<target>/`, from the test kit's real-schema builders and the
//! benchmarks' typical response: `make fuzz-seeds` (deterministic; the checked-in corpora are its output).
//! Each directory is replaced whole.

use std::collections::BTreeMap;
use std::path::Path;

use prost::Message;
use wasm_ecds_fuzz::{seed_module, seed_sha, Mode, CLOSED, SEED_MODULES};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::images::{self, platform, Image, Index};
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

    write(&root, "oci_manifest", oci_manifests());
    write(&root, "oci_reference", oci_references());
    write(&root, "oci_pull_secret", oci_pull_secrets());
    write(&root, "oci_challenge", oci_challenges());
    write(&root, "oci_token", oci_tokens());
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

// ---- OCI ----------------------------------------------------------------------------------------------

/// `oci_manifest` input: the byte picking `content_type` from `CONTENT_TYPES`, then the document.
fn manifest_input(content_type: Option<&str>, document: &[u8]) -> Vec<u8> {
    let i = wasm_ecds_fuzz::oci::CONTENT_TYPES.iter().position(|t| *t == content_type).expect("a listed type");
    with_byte(i as u8, document)
}

/// Manifests of every image format the test kit builds (usable and not), and indexes of them; each without a
/// `Content-Type` and with its own.
fn oci_manifests() -> Vec<(String, Vec<u8>)> {
    let module = wasm_module(16);
    let images: Vec<(&str, Image)> = vec![
        ("docker-compat", images::docker_compat(&module)),
        ("oci-compat", images::oci_compat(&module)),
        ("oci-artifact", images::oci_artifact(&module)),
        ("oci-artifact-wasm-last", images::oci_artifact_ordered(&module, true)),
        ("oras-python", images::oras_python(&module)),
        ("oras-cli", images::oras_cli(&module, images::WASM_LAYER)),
        ("oras-cli-application-wasm", images::oras_cli(&module, images::APPLICATION_WASM)),
        ("unusable-no-wasm-layer", images::unusable::no_wasm_layer(&module)),
        ("unusable-three-layers", images::unusable::three_layers(&module)),
        ("unusable-compat-without-plugin", images::unusable::compat_without_plugin(&module)),
        ("unusable-single-other-layer", images::unusable::single_other_layer(&module)),
    ];
    let mut seeds = Vec::new();
    for (name, image) in &images {
        seeds.push((format!("{name}-no-type"), manifest_input(None, &image.manifest())));
        seeds.push((format!("{name}-typed"), manifest_input(Some(&image.media_type), &image.manifest())));
    }
    let artifact = images[2].1.clone();
    let indexes = [
        (
            "index-wasip1",
            Index::oci(vec![
                (images::docker_compat(&module), platform("linux", "amd64")),
                (artifact.clone(), platform("wasip1", "wasm")),
            ]),
        ),
        ("index-wasi", Index::oci(vec![(artifact.clone(), platform("wasi", "wasm32"))])),
        ("index-no-platform", Index::oci(vec![(artifact.clone(), None), (images::oci_compat(&module), None)])),
        ("index-empty", Index::oci(vec![])),
        ("manifest-list", Index::docker(vec![(images::docker_compat(&module), platform("linux", "arm64"))])),
    ];
    for (name, index) in &indexes {
        seeds.push((format!("{name}-no-type"), manifest_input(None, &index.manifest())));
        seeds.push((format!("{name}-typed"), manifest_input(Some(&index.media_type), &index.manifest())));
    }
    seeds
}

fn oci_references() -> Vec<(String, Vec<u8>)> {
    let hex = "4b3c3fc2e1dd6e4ee4f5f3b4f5e0a9a2b3b1c1d2e3f4a5b6c7d8e9f0a1b2c3d4";
    let urls = [
        ("tag", "oci://ghcr.io/org/plugin:1.0".to_string()),
        ("no-tag", "OCI://ghcr.io/org/plugin".to_string()),
        ("port", "oci://127.0.0.1:5000/plugin:v1".to_string()),
        ("localhost", "oci://localhost/plugin".to_string()),
        ("ipv6", "oci://[::1]:5000/a/b:v1".to_string()),
        ("separators", "oci://my_reg.corp/a__b/c-d/e--f/g.h/i_j:t_1.-x".to_string()),
        ("docker-hub", "oci://nginx".to_string()),
        ("docker-io", "oci://docker.io/istio/plugin:1".to_string()),
        ("hub-namespace", "oci://myregistry/app:v2".to_string()),
        ("digest", format!("oci://ghcr.io/org/plugin@sha256:{hex}")),
        ("tag-and-digest", format!("oci://localhost:5000/p:v@sha256:{hex}")),
        ("query-fragment", format!("oci://ghcr.io/p@sha256:{hex}?a=b#c")),
        ("bad-digest-traversal", "oci://ghcr.io/p@sha256:../../x".to_string()),
        ("bad-digest-algorithm", format!("oci://ghcr.io/p@sha512:{hex}{hex}")),
        ("bad-digest-upper", format!("oci://ghcr.io/p@sha256:{}", hex.to_uppercase())),
        ("bad-traversal", "oci://ghcr.io/org/../x:1".to_string()),
        ("bad-user-info", "oci://user:pass@ghcr.io/p".to_string()),
        ("bad-port", "oci://ghcr.io:65536/p".to_string()),
        ("bad-percent", "oci://ghcr.io/p%3Atag".to_string()),
    ];
    urls.into_iter().map(|(name, url)| (name.to_string(), url.into_bytes())).collect()
}

/// Pull secrets (after the byte picking the registry from `REGISTRIES`); `@P` is the password, `@A` an
/// `auth` holding it.
fn oci_pull_secrets() -> Vec<(String, Vec<u8>)> {
    let registry = |r: &str| wasm_ecds_fuzz::oci::REGISTRIES.iter().position(|x| *x == r).expect("listed") as u8;
    let secrets: Vec<(&str, &str, &str)> = vec![
        ("auth", "ghcr.io", r#"{"auths":{"ghcr.io":{"auth":"@A"}}}"#),
        ("username-password", "127.0.0.1:5000", r#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"@P"}}}"#),
        ("docker-hub-key", "index.docker.io", r#"{"auths":{"https://index.docker.io/v1/":{"auth":"@A"}}}"#),
        ("docker-io-host", "docker.io", r#"{"auths":{"https://docker.io":{"auth":"@A"}}}"#),
        ("url-key", "[::1]:5000", r#"{"auths":{"https://[::1]:5000/v2/":{"auth":"@A"}}}"#),
        ("case", "Registry.Example:443", r#"{"AUTHS":{"registry.example:443":{"Username":"u","PASSWORD":"@P"}}}"#),
        ("other-registry", "ghcr.io", r#"{"auths":{"quay.io":{"auth":"@A"}}}"#),
        ("broken-other-entry", "ghcr.io", r#"{"auths":{"ghcr.io":{"auth":"@A"},"quay.io":{"auth":"@P!"}}}"#),
        ("identitytoken", "ghcr.io", r#"{"auths":{"ghcr.io":{"identitytoken":"@P"}}}"#),
        ("not-string", "ghcr.io", r#"{"auths":{"ghcr.io":{"password":["@P"]}}}"#),
        ("truncated", "ghcr.io", r#"{"auths":{"ghcr.io":{"password":"@P"#),
        ("null", "ghcr.io", "null"),
        ("empty", "ghcr.io", " \n"),
        ("creds-store", "ghcr.io", r#"{"auths":{},"credsStore":"desktop","credHelpers":{"ghcr.io":"gcr"}}"#),
    ];
    secrets.into_iter().map(|(name, r, secret)| (name.to_string(), with_byte(registry(r), secret.as_bytes()))).collect()
}

/// `WWW-Authenticate` values, one a line.
fn oci_challenges() -> Vec<(String, Vec<u8>)> {
    let values = [
        ("basic", r#"Basic realm="Registry Realm""#),
        (
            "docker-hub",
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        ),
        ("spaces-case", r#"BEARER  Realm = "http://127.0.0.1:1/t" , SERVICE=reg"#),
        ("escapes", r#"Bearer realm="http://h/t?a=\"b\"\\c",scope="s, t""#),
        ("basic-then-bearer", "Basic realm=\"r\"\nBearer realm=\"http://h/t?x=1#f\",service=\"a b&c\""),
        ("token68-and-others", r#"Negotiate abc==, Digest realm="x", nonce="y", Basic"#),
        ("unterminated", r#"Basic realm="r", Bearer realm="http://h/t"#),
        ("junk", "=,\"x\", Basic\n\"\n,,,"),
    ];
    values.into_iter().map(|(name, v)| (name.to_string(), v.as_bytes().to_vec())).collect()
}

/// Token endpoint answers; `@T` is the token.
fn oci_tokens() -> Vec<(String, Vec<u8>)> {
    let bodies = [
        ("token", r#"{"token":"@T","expires_in":300,"issued_at":"2024-01-01T00:00:00Z"}"#),
        ("access-token", r#"{"access_token":"@T"}"#),
        ("both", r#"{"token":"","access_token":"@T"}"#),
        ("not-string", r#"{"token":["@T"]}"#),
        ("header-injection", r#"{"token":"@T\r\nX-Evil: 1"}"#),
        ("html", "<html>@T</html>"),
        ("truncated", r#"{"token":"@T"#),
    ];
    bodies.into_iter().map(|(name, b)| (name.to_string(), b.as_bytes().to_vec())).collect()
}
