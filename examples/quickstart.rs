//! The Istio "Distributing WebAssembly Modules" walkthrough, end to end, on this machine alone:
//!
//! 1. a loopback HTTP server serves `basic-auth.wasm` (a small valid module made here);
//! 2. the ECDS response istiod would send for the walkthrough's filter is built: extension config
//!    `istio.basic_auth`, a `udpa.type.v1.TypedStruct` holding the Wasm filter with `vm_id: basic-auth`,
//!    `runtime: envoy.wasm.runtime.v8`, the module's URL and sha256, and the basic-auth rules;
//! 3. the library converts it: downloads, verifies and stores the module, and rewrites the filter to
//!    `code.local.filename`; a second push is a cache hit; a push with a wrong sha256 is rejected (NACK);
//! 4. the rewritten config and the metrics are printed.
//!
//! Run with `make demo` (or `cargo run --release --example quickstart`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prost::Message;
use prost_types::{value::Kind, Any, Struct, Value};
use sha2::{Digest, Sha256};
use wasm_ecds::{Cache, Options};

const ECDS_TYPE: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
const HTTP_WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const TYPED_STRUCT_TYPE: &str = "type.googleapis.com/udpa.type.v1.TypedStruct";
const BASIC_AUTH_RULES: &str = r#"{"basic_auth_rules":[{"prefix":"/productpage","request_methods":["GET","POST"],"credentials":["ok:test","YWRtaW4zOmFkbWluMw=="]}]}"#;

// The few messages the demo builds and reads back (the library itself never decodes into structs).
#[derive(Clone, PartialEq, Message)]
struct DiscoveryResponse {
    #[prost(string, tag = "1")]
    version_info: String,
    #[prost(message, repeated, tag = "2")]
    resources: Vec<Any>,
    #[prost(string, tag = "4")]
    type_url: String,
    #[prost(string, tag = "5")]
    nonce: String,
}

#[derive(Clone, PartialEq, Message)]
struct TypedExtensionConfig {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    typed_config: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct TypedStruct {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

#[derive(Clone, PartialEq, Message)]
struct Wasm {
    #[prost(message, optional, tag = "1")]
    config: Option<PluginConfig>,
}

#[derive(Clone, PartialEq, Message)]
struct PluginConfig {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    root_id: String,
    #[prost(message, optional, tag = "3")]
    vm_config: Option<VmConfig>,
    #[prost(message, optional, tag = "4")]
    configuration: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct VmConfig {
    #[prost(string, tag = "1")]
    vm_id: String,
    #[prost(string, tag = "2")]
    runtime: String,
    #[prost(message, optional, tag = "3")]
    code: Option<AsyncDataSource>,
}

#[derive(Clone, PartialEq, Message)]
struct AsyncDataSource {
    #[prost(message, optional, tag = "1")]
    local: Option<DataSource>,
}

#[derive(Clone, PartialEq, Message)]
struct DataSource {
    #[prost(string, tag = "1")]
    filename: String,
}

#[derive(Clone, PartialEq, Message)]
struct StringValue {
    #[prost(string, tag = "1")]
    value: String,
}

/// A valid WebAssembly module: the header plus a custom section naming it.
fn sample_module() -> Vec<u8> {
    let name = b"basic-auth (wasm-ecds demo)";
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.push(0); // custom section
    module.push((1 + name.len()) as u8);
    module.push(name.len() as u8);
    module.extend_from_slice(name);
    module
}

/// Serves `body` at every path on 127.0.0.1; counts requests. The thread ends with the process.
fn serve(body: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let mut out = &stream;
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = out.write_all(head.as_bytes()).and_then(|_| out.write_all(&body));
        }
    });
    (port, hits)
}

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_owned())) }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct { fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect() })),
    }
}

/// The ECDS response istiod sends for the walkthrough's EnvoyFilter.
fn walkthrough_response(uri: &str, sha256: &str) -> Vec<u8> {
    let wasm = object(vec![(
        "config",
        object(vec![
            ("name", string("basic-auth")),
            ("root_id", string("basic-auth_root")),
            (
                "configuration",
                object(vec![
                    ("@type", string("type.googleapis.com/google.protobuf.StringValue")),
                    ("value", string(BASIC_AUTH_RULES)),
                ]),
            ),
            (
                "vm_config",
                object(vec![
                    ("vm_id", string("basic-auth")),
                    ("runtime", string("envoy.wasm.runtime.v8")),
                    (
                        "code",
                        object(vec![(
                            "remote",
                            object(vec![
                                ("http_uri", object(vec![("uri", string(uri)), ("timeout", string("10s"))])),
                                ("sha256", string(sha256)),
                            ]),
                        )]),
                    ),
                ]),
            ),
        ]),
    )]);
    let Some(Kind::StructValue(value)) = wasm.kind else { unreachable!() };
    let typed_struct = TypedStruct { type_url: HTTP_WASM_TYPE.into(), value: Some(value) };
    let extension = TypedExtensionConfig {
        name: "istio.basic_auth".into(),
        typed_config: Some(Any { type_url: TYPED_STRUCT_TYPE.into(), value: typed_struct.encode_to_vec() }),
    };
    DiscoveryResponse {
        version_info: "2026-11-27T00:00:00Z/1".into(),
        resources: vec![Any { type_url: ECDS_TYPE.into(), value: extension.encode_to_vec() }],
        type_url: ECDS_TYPE.into(),
        nonce: "demo-nonce-1".into(),
    }
    .encode_to_vec()
}

/// The converted response, as readable JSON.
fn describe(converted: &[u8]) -> serde_json::Value {
    let response = DiscoveryResponse::decode(converted).expect("converted response decodes");
    let mut resources = Vec::new();
    for any in &response.resources {
        let ext = TypedExtensionConfig::decode(any.value.as_slice()).expect("TypedExtensionConfig");
        let typed = ext.typed_config.unwrap_or_default();
        let mut entry = BTreeMap::new();
        entry.insert("name", serde_json::json!(ext.name));
        entry.insert("typed_config.@type", serde_json::json!(typed.type_url));
        if typed.type_url == HTTP_WASM_TYPE {
            let config = Wasm::decode(typed.value.as_slice()).expect("Wasm").config.unwrap_or_default();
            let vm = config.vm_config.unwrap_or_default();
            let configuration = config
                .configuration
                .map(|c| StringValue::decode(c.value.as_slice()).map(|s| s.value).unwrap_or_default());
            entry.insert(
                "config",
                serde_json::json!({
                    "name": config.name,
                    "root_id": config.root_id,
                    "configuration": configuration,
                    "vm_config": {
                        "vm_id": vm.vm_id,
                        "runtime": vm.runtime,
                        "code": {"local": {"filename": vm.code.and_then(|c| c.local).map(|l| l.filename)}},
                    },
                }),
            );
        }
        resources.push(serde_json::json!(entry));
    }
    serde_json::json!({
        "version_info": response.version_info,
        "type_url": response.type_url,
        "nonce": response.nonce,
        "resources": resources,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let module = sample_module();
    let sha256 = hex::encode(Sha256::digest(&module));
    let (port, downloads) = serve(module.clone());
    let uri = format!("http://127.0.0.1:{port}/basic-auth.wasm");

    let cache_dir = tempfile::tempdir()?;
    let options = Options::from_json(&serde_json::json!({ "cache_dir": cache_dir.path() }).to_string())?;
    let cache = Cache::new(options)?;

    println!("== Istio basic-auth walkthrough: module served at {uri} (sha256 {sha256})\n");
    let response = walkthrough_response(&uri, &sha256);
    let converted = cache.convert(&response).map_err(|r| format!("rejected: {r}"))?;
    println!("== converted ECDS response ({} bytes in, {} bytes out):", response.len(), converted.len());
    println!("{}\n", serde_json::to_string_pretty(&describe(&converted))?);

    let local = describe(&converted)["resources"][0]["config"]["vm_config"]["code"]["local"]["filename"]
        .as_str()
        .map(String::from)
        .ok_or("no local filename in the converted config")?;
    let stored = std::fs::read(&local)?;
    println!("== {local}: {} bytes, identical to the served module: {}", stored.len(), stored == module);

    cache.convert(&response).map_err(|r| format!("rejected: {r}"))?;
    println!("== second push converted from the cache; downloads so far: {}", downloads.load(Ordering::SeqCst));

    let bad = walkthrough_response(&format!("{uri}?v=2"), &"0".repeat(64));
    match cache.convert(&bad) {
        Ok(_) => return Err("a wrong sha256 was accepted".into()),
        Err(rejection) => {
            println!("== a push with a wrong sha256 is rejected; the NACK carries:\n   {rejection}");
            let nack = wasm_ecds::nack(&bad, "2026-11-27T00:00:00Z/1", &rejection.reason)?;
            println!("   (DiscoveryRequest NACK: {} bytes, code 13)\n", nack.len());
        }
    }

    // Modules unused for longer than module_expiry_secs go; this one is fresh and in use, so it stays.
    println!("== purge now: {} module(s) removed", cache.purge()?);
    println!("== metrics (Prometheus text):\n{}", cache.metrics_text());
    Ok(())
}
