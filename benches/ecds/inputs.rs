//! Deterministic benchmark inputs: module files (pseudo-random payload in a Wasm custom section) and the
//! ECDS responses naming them. Nothing here depends on the clock or the environment except the server port.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::*;

/// Every module the benches serve: (file name, size in bytes).
pub fn module_specs() -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for i in 0..200 {
        v.push((format!("s{i}.wasm"), 16 << 10)); // cache-hit figures (typical: s0..s19, large: s0..s199)
    }
    for i in 0..20 {
        v.push((format!("w{i}.wasm"), 4 << 20)); // warm restart
    }
    for i in 0..8 {
        v.push((format!("f{i}.wasm"), 1 << 20)); // fan-out
    }
    v.push(("fanin.wasm".into(), 1 << 20)); // fan-in
    v.push(("m64.wasm".into(), 64 << 20)); // cold fetch
    v.push(("o16.wasm".into(), 16 << 20)); // OCI cold pull
    v.push(("m256.wasm".into(), 256 << 20)); // memory
    v
}

fn leb128(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Writes a valid Wasm module of exactly `size` bytes: header + one custom section named after the file whose
/// payload is an xorshift64* stream seeded from the name. Returns its sha256 (hex).
pub fn write_module(path: &Path, name: &str, size: u64) -> String {
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create module"));
    let sha256 = module_into(&mut file, name, size);
    file.flush().unwrap();
    sha256
}

/// The module `write_module` writes, into `out`. Returns its sha256 (hex).
fn module_into(out: &mut impl Write, name: &str, size: u64) -> String {
    let mut head = b"\0asm\x01\0\0\0".to_vec();
    head.push(0); // custom section id
    let mut section_len = 0u64;
    for leb_len in 1..=5u64 {
        let s = size - 8 - 1 - leb_len;
        let mut tmp = Vec::new();
        leb128(s, &mut tmp);
        if tmp.len() as u64 == leb_len {
            section_len = s;
            break;
        }
    }
    leb128(section_len, &mut head);
    head.push(name.len() as u8);
    head.extend_from_slice(name.as_bytes());
    let mut remaining = size - head.len() as u64;
    let mut hasher = Sha256::new();
    out.write_all(&head).unwrap();
    hasher.update(&head);
    let mut state =
        name.bytes().fold(0x9E37_79B9_7F4A_7C15u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3)) | 1;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let n = remaining.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
        out.write_all(&buf[..n]).unwrap();
        hasher.update(&buf[..n]);
        remaining -= n as u64;
    }
    hex::encode(hasher.finalize())
}

/// Generates the module files into `dir`, then the archives holding them (each part skipped when the manifest
/// lists it and its file is there), and returns the manifest: served file name -> sha256 of the module it
/// holds (what a config names: the library checks the unboxed module's digest, as Istio's agent does).
pub fn generate(dir: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir).unwrap();
    let manifest_path = dir.join("manifest.json");
    let specs = module_specs();
    let mut m = std::fs::read_to_string(&manifest_path)
        .ok()
        .and_then(|text| serde_json::from_str::<BTreeMap<String, String>>(&text).ok())
        .unwrap_or_default();
    let complete = specs.iter().all(|(name, size)| {
        m.contains_key(name) && std::fs::metadata(dir.join(name)).map(|md| md.len() == *size).unwrap_or(false)
    });
    if !complete {
        m.clear(); // the archives hold these modules: rebuilt with them
        for (name, size) in &specs {
            m.insert(name.clone(), write_module(&dir.join(name), name, *size));
        }
    }
    let listed = |m: &BTreeMap<String, String>, name: &str| m.contains_key(name) && dir.join(name).is_file();
    for (name, write) in BOXED_M256 {
        if !listed(&m, name) {
            write(&dir.join("m256.wasm"), &dir.join(name));
            m.insert(name.to_string(), m["m256.wasm"].clone());
        }
    }
    for (i, name) in hostile_names().iter().enumerate() {
        if !listed(&m, name) {
            m.insert(name.clone(), write_hostile(&dir.join(name), i));
        }
    }
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    m
}

/// m256.wasm boxed as Istio's agent unboxes (gzip magic, `ustar` tar, both): (file name, writer from the
/// module's path to the archive's path). Streamed from disk; gzip at the fastest level (the payload is
/// pseudo-random: no level would shrink it, and inflating costs the same).
type BoxWriter = fn(&Path, &Path);
pub const BOXED_M256: [(&str, BoxWriter); 3] =
    [("m256.wasm.gz", write_gzip), ("m256.tar", write_tar), ("m256.tar.gz", write_tar_gzip)];

fn write_gzip(module: &Path, out: &Path) {
    let mut gz = flate2::write::GzEncoder::new(create(out), flate2::Compression::fast());
    std::io::copy(&mut std::fs::File::open(module).unwrap(), &mut gz).unwrap();
    gz.finish().unwrap().flush().unwrap();
}

fn write_tar(module: &Path, out: &Path) {
    tar_of(module, create(out)).flush().unwrap();
}

fn write_tar_gzip(module: &Path, out: &Path) {
    let gz = tar_of(module, flate2::write::GzEncoder::new(create(out), flate2::Compression::fast()));
    gz.finish().unwrap().flush().unwrap();
}

/// A POSIX (ustar) tar whose one entry is the module as `plugin.wasm`, written into `out`.
fn tar_of<W: Write>(module: &Path, out: W) -> W {
    let file = std::fs::File::open(module).unwrap();
    let mut header = tar::Header::new_ustar();
    header.set_size(file.metadata().unwrap().len());
    header.set_mode(0o644);
    let mut builder = tar::Builder::new(out);
    builder.append_data(&mut header, "plugin.wasm", file).unwrap();
    builder.into_inner().unwrap()
}

fn create(path: &Path) -> std::io::BufWriter<std::fs::File> {
    std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create archive"))
}

/// The hostile archives of the memory figure, converted all in one response.
pub const HOSTILE_MODULES: usize = 8;
/// What each hostile archive's first record declares (and holds): far past the 1 MiB tar header limit.
pub const HOSTILE_RECORD_BYTES: u64 = 200 << 20;

pub fn hostile_names() -> Vec<String> {
    (0..HOSTILE_MODULES).map(|i| format!("hostile{i}.tar.gz")).collect()
}

/// A gzipped tar (~200 KB) whose first record is a GNU long name, GNU long link, pax or pax global record
/// (by turn) of 200 MiB, then a small module of its own as `plugin.wasm`. Returns the module's sha256.
fn write_hostile(path: &Path, i: usize) -> String {
    let mut module = Vec::new();
    let sha256 = module_into(&mut module, &format!("hostile{i}"), 1024);
    let kind = [b'L', b'K', b'x', b'g'][i % 4];
    let archive = wasm_ecds_testkit::archives::gzip_tar_with_special(kind, HOSTILE_RECORD_BYTES, &module);
    std::fs::write(path, archive).unwrap();
    sha256
}

pub fn load_manifest(dir: &Path) -> BTreeMap<String, String> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json")).unwrap()
}

/// A ~2 KB JSON plugin configuration, different per resource.
pub fn plugin_configuration(i: usize) -> String {
    let mut rules = Vec::new();
    let mut k = 0;
    loop {
        rules.push(format!(
            r#"{{"prefix":"/api/v{k}/service-{i}/resource-{k}","request_methods":["GET","POST","PUT"],"credentials":["user{k}:secret-{i}-{k}","YWRtaW4{k}OmFkbWluMw=="],"headers":{{"x-tenant":"tenant-{i}"}}}}"#
        ));
        let json = format!(r#"{{"plugin":"bench-{i}","log_level":"info","rules":[{}]}}"#, rules.join(","));
        if json.len() >= 2000 {
            return json;
        }
        k += 1;
    }
}

fn env_vars(i: usize) -> BTreeMap<String, String> {
    (0..3).map(|k| (format!("BENCH_ENV_{k}"), format!("value-{i}-{k}-abcdefghijklmnop"))).collect()
}

pub struct WasmSpec {
    pub uri: String,
    pub sha256: String,
    /// Encode as `udpa.type.v1.TypedStruct` (a Struct) instead of a direct Wasm message.
    pub typed_struct: bool,
}

fn s(v: &str) -> Value {
    Value { kind: Some(Kind::StringValue(v.to_owned())) }
}

fn obj(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() })),
    }
}

fn wasm_resource(i: usize, spec: &WasmSpec) -> Any {
    let name = format!("bench-ns-{i}.plugin-{i}");
    let typed_config = if spec.typed_struct {
        let env = env_vars(i).into_iter().map(|(k, v)| (k, s(&v))).collect();
        let wasm = obj(vec![(
            "config",
            obj(vec![
                ("name", s(&name)),
                ("root_id", s(&format!("root-{i}"))),
                ("configuration", obj(vec![("@type", s(STRING_VALUE_TYPE)), ("value", s(&plugin_configuration(i)))])),
                (
                    "vm_config",
                    obj(vec![
                        ("vm_id", s(&format!("vm-{i}"))),
                        ("runtime", s("envoy.wasm.runtime.v8")),
                        (
                            "code",
                            obj(vec![(
                                "remote",
                                obj(vec![
                                    (
                                        "http_uri",
                                        obj(vec![("uri", s(&spec.uri)), ("cluster", s("_")), ("timeout", s("30s"))]),
                                    ),
                                    ("sha256", s(&spec.sha256)),
                                ]),
                            )]),
                        ),
                        (
                            "environment_variables",
                            Value {
                                kind: Some(Kind::StructValue(Struct {
                                    fields: [(
                                        "key_values".to_string(),
                                        Value { kind: Some(Kind::StructValue(Struct { fields: env })) },
                                    )]
                                    .into_iter()
                                    .collect(),
                                })),
                            },
                        ),
                    ]),
                ),
            ]),
        )]);
        let Some(Kind::StructValue(value)) = wasm.kind else { unreachable!() };
        Any {
            type_url: TYPED_STRUCT_TYPE.into(),
            value: TypedStruct { type_url: HTTP_WASM_TYPE.into(), value: Some(value) }.encode_to_vec(),
        }
    } else {
        let wasm = Wasm {
            config: Some(PluginConfig {
                name: name.clone(),
                root_id: format!("root-{i}"),
                vm_config: Some(VmConfig {
                    vm_id: format!("vm-{i}"),
                    runtime: "envoy.wasm.runtime.v8".into(),
                    code: Some(AsyncDataSource {
                        specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                            http_uri: Some(HttpUri {
                                uri: spec.uri.clone(),
                                http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("_".into())),
                                timeout: Some(Duration { seconds: 30, nanos: 0 }),
                            }),
                            sha256: spec.sha256.clone(),
                            retry_policy: None,
                        })),
                    }),
                    environment_variables: Some(EnvironmentVariables {
                        host_env_keys: vec![],
                        key_values: env_vars(i),
                    }),
                    ..Default::default()
                }),
                configuration: Some(Any {
                    type_url: STRING_VALUE_TYPE.into(),
                    value: StringValue { value: plugin_configuration(i) }.encode_to_vec(),
                }),
                ..Default::default()
            }),
        };
        Any { type_url: HTTP_WASM_TYPE.into(), value: wasm.encode_to_vec() }
    };
    let ext = TypedExtensionConfig { name, typed_config: Some(typed_config) };
    Any { type_url: ECDS_TYPE.into(), value: ext.encode_to_vec() }
}

fn response(resources: Vec<Any>) -> Vec<u8> {
    DiscoveryResponse {
        version_info: "2026-11-27T00:00:00Z/42".into(),
        resources,
        type_url: ECDS_TYPE.into(),
        nonce: "bench-nonce-1".into(),
        control_plane: Some(ControlPlane { identifier: "istiod-bench".into() }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A response of Wasm resources; resource `i` alternates direct (even) / TypedStruct (odd) when `mixed`.
pub fn wasm_response(specs: &[WasmSpec]) -> Vec<u8> {
    response(specs.iter().enumerate().map(|(i, spec)| wasm_resource(i, spec)).collect())
}

/// `n` resources like "typical": module `s{i % 200}.wasm`, even ones direct, odd ones TypedStruct.
pub fn typical(base: &str, manifest: &BTreeMap<String, String>, n: usize) -> Vec<u8> {
    typical_with(base, manifest, n, |i| i % 2 == 1)
}

/// As `typical`, choosing per resource whether it is a TypedStruct.
pub fn typical_with(base: &str, manifest: &BTreeMap<String, String>, n: usize, ts: impl Fn(usize) -> bool) -> Vec<u8> {
    let specs: Vec<WasmSpec> = (0..n)
        .map(|i| {
            let name = format!("s{}.wasm", i % 200);
            WasmSpec { uri: format!("{base}/{name}"), sha256: manifest[&name].clone(), typed_struct: ts(i) }
        })
        .collect();
    wasm_response(&specs)
}

/// Direct Wasm resources naming `names` under `base` (e.g. `http://127.0.0.1:P/slow`).
pub fn named(base: &str, manifest: &BTreeMap<String, String>, names: &[String]) -> Vec<u8> {
    let specs: Vec<WasmSpec> = names
        .iter()
        .map(|name| WasmSpec { uri: format!("{base}/{name}"), sha256: manifest[name].clone(), typed_struct: false })
        .collect();
    wasm_response(&specs)
}

/// `n` non-Wasm resources: even ones an HTTP RBAC filter with three policies, odd ones a router filter.
pub fn pass_through(n: usize) -> Vec<u8> {
    let resources = (0..n)
        .map(|i| {
            let typed = if i % 2 == 0 {
                // envoy.config.rbac.v3.RBAC { action: ALLOW, policies: {name: Policy{permissions:[{any:true}],
                // principals:[{any:true}]}} x3 }, hand-encoded: Policy(1: Permission{3: true}, 2: Principal{3: true}).
                let mut rules = Vec::new();
                for k in 0..3 {
                    let key = format!("ns-{i}/allow-policy-{k}");
                    let policy: &[u8] = &[0x0a, 0x02, 0x18, 0x01, 0x12, 0x02, 0x18, 0x01];
                    let mut entry = Vec::new();
                    entry.push(0x0a);
                    entry.push(key.len() as u8);
                    entry.extend_from_slice(key.as_bytes());
                    entry.push(0x12);
                    entry.push(policy.len() as u8);
                    entry.extend_from_slice(policy);
                    rules.push(0x12);
                    rules.push(entry.len() as u8);
                    rules.extend_from_slice(&entry);
                }
                let rbac = HttpRbac {
                    rules: Some(rules),
                    rules_stat_prefix: format!("rbac-{i}."),
                    track_per_rule_stats: true,
                };
                Any { type_url: HTTP_RBAC_TYPE.into(), value: rbac.encode_to_vec() }
            } else {
                let router = Router {
                    dynamic_stats: Some(true),
                    suppress_envoy_headers: true,
                    strict_check_headers: vec!["x-envoy-upstream-rq-timeout-ms".into(), "x-envoy-max-retries".into()],
                };
                Any { type_url: ROUTER_TYPE.into(), value: router.encode_to_vec() }
            };
            let ext = TypedExtensionConfig { name: format!("bench-ns-{i}.filter-{i}"), typed_config: Some(typed) };
            Any { type_url: ECDS_TYPE.into(), value: ext.encode_to_vec() }
        })
        .collect();
    response(resources)
}

/// How many resources of a converted response load their module from a local file (sanity check).
pub fn count_local(converted: &[u8]) -> usize {
    local_files(converted).len()
}

/// The local files the resources of a converted response load their modules from.
pub fn local_files(converted: &[u8]) -> Vec<String> {
    let response = DiscoveryResponse::decode(converted).expect("converted response decodes");
    response
        .resources
        .iter()
        .filter_map(|any| {
            let ext = TypedExtensionConfig::decode(any.value.as_slice()).expect("TypedExtensionConfig");
            let typed = ext.typed_config.unwrap_or_default();
            if typed.type_url != HTTP_WASM_TYPE {
                return None;
            }
            let wasm = Wasm::decode(typed.value.as_slice()).expect("Wasm");
            match wasm.config.and_then(|c| c.vm_config).and_then(|v| v.code).and_then(|c| c.specifier) {
                Some(async_data_source::Specifier::Local(DataSource {
                    specifier: Some(data_source::Specifier::Filename(f)),
                    ..
                })) => Some(f),
                _ => None,
            }
        })
        .collect()
}
