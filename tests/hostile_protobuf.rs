//! Hostile but legal protobuf: responses whose shape would make the conversion take far more memory than the
//! response itself. Each case converts in a child process (the test binary re-runs itself), which measures its
//! own peak resident memory around the conversion, so that one test's allocations cannot hide another's.
//!
//! A singular message field may occur more than once; a parser merges the occurrences (protobuf.dev
//! `programming-guides/encoding`, "Last One Wins": "for embedded message fields, the parser merges multiple
//! instances of the same field"), and a oneof's later member replaces the earlier one. Both are legal on the
//! wire, so the converter must accept them without copying the subtree under every repeated level.

use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;
use wasm_ecds::{Cache, Options};
use wasm_ecds_testkit::ecds::*;
use wasm_ecds_testkit::memory;
use wasm_ecds_testkit::server::{sha256_hex, wasm_module, Route, TestServer};

const CHILD_ENV: &str = "WASM_ECDS_HOSTILE_CHILD";
const MIB: usize = 1 << 20;
/// The memory a conversion may grow by: 4 × the response size + 16 MiB.
const SLACK: usize = 16 * MIB;

// ---- raw protobuf ----

fn len_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// `google.protobuf.Value { string_value }` (protobuf `google/protobuf/struct.proto`: `string_value` 3).
fn string_value(s: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    len_field(&mut v, 3, s);
    v
}

/// `google.protobuf.Value { list_value: ListValue { values } }`, each `ListValue` given as its items (`list_value`
/// 6, `ListValue.values` 1); more than one list means the `list_value` field occurs that many times.
fn list_value(occurrences: &[&[&[u8]]]) -> Vec<u8> {
    let mut v = Vec::new();
    for items in occurrences {
        let mut list = Vec::new();
        for item in *items {
            len_field(&mut list, 1, item);
        }
        len_field(&mut v, 6, &list);
    }
    v
}

/// `google.protobuf.Value { struct_value: Struct { fields } }` (`struct_value` 5; `Struct.fields` 1, a map:
/// entries of `key` 1, `value` 2).
fn struct_value(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut s = Vec::new();
    for (key, value) in entries {
        let mut entry = Vec::new();
        len_field(&mut entry, 1, key.as_bytes());
        len_field(&mut entry, 2, value);
        len_field(&mut s, 1, &entry);
    }
    let mut v = Vec::new();
    len_field(&mut v, 5, &s);
    v
}

fn json_value(json: serde_json::Value) -> Vec<u8> {
    to_value(json).encode_to_vec()
}

/// A TypedStruct Wasm filter with remote code whose `config.configuration` is the `Any` of `type_name`
/// (a `google.protobuf` well-known type) with JSON `value` given as raw `google.protobuf.Value` bytes.
fn typed_struct_filter(url: &str, sha: &str, type_name: &str, value: &[u8]) -> Vec<u8> {
    let vm_config = json_value(serde_json::json!({
        "vm_id": "vm",
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"remote": {"http_uri": {"uri": url, "cluster": "_", "timeout": "30s"}, "sha256": sha}},
    }));
    let type_url = string_value(format!("type.googleapis.com/google.protobuf.{type_name}").as_bytes());
    let configuration = struct_value(&[("@type", &type_url), ("value", value)]);
    let config = struct_value(&[
        ("name", &string_value(b"ns.plugin")),
        ("vm_config", &vm_config),
        ("configuration", &configuration),
    ]);
    // `TypedStruct.value` (2) is a Struct: the payload of the Value's `struct_value`.
    let root = struct_value(&[("config", &config)]);
    let mut ts = Vec::new();
    len_field(&mut ts, 1, HTTP_WASM_TYPE.as_bytes());
    len_field(&mut ts, 2, &payload_of(&root));
    extension("hostile", any_bytes(TYPED_STRUCT_TYPE, ts)).encode_to_vec()
}

/// The payload of a message that holds exactly one length-delimited field.
fn payload_of(one_field: &[u8]) -> Vec<u8> {
    let mut rest = &one_field[1..];
    let len = prost::encoding::decode_varint(&mut rest).expect("length") as usize;
    assert_eq!(rest.len(), len, "one field");
    rest.to_vec()
}

/// `levels` nested lists around `inner`, every level's `list_value` occurring twice: the first occurrence
/// holds the next level, the second a small string. The merged list of a level is `[next level, "x"]`.
fn nested_repeated_lists(inner: Vec<u8>, levels: usize) -> Vec<u8> {
    let x = string_value(b"x");
    (0..levels).fold(inner, |v, _| list_value(&[&[&v], &[&x]]))
}

/// ~8 MiB of strings in one list: 128 strings of 64 KiB.
fn eight_mib_of_strings() -> Vec<u8> {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let item = string_value(&chunk);
    let items: Vec<&[u8]> = (0..128).map(|_| &item[..]).collect();
    list_value(&[&items])
}

/// A Wasm filter (not a TypedStruct) with every message on the way to its code written as two occurrences —
/// `typed_config` (an `Any`: `type_url` in the first occurrence, `value` in the second), `Wasm.config`,
/// `PluginConfig.vm_config`, `VmConfig.code`, `AsyncDataSource.remote` — and 8 MiB at the bottom, in
/// `remote.retry_policy.retry_on` (which the conversion drops with the remote code). Field numbers from envoy
/// `api/envoy/extensions/wasm/v3/wasm.proto` and `api/envoy/config/core/v3/base.proto`.
fn repeated_wasm_filter(url: &str, sha: &str) -> Vec<u8> {
    let Some(async_data_source::Specifier::Remote(remote)) = remote_code(url, sha).specifier else { unreachable!() };
    let retry_policy = RetryPolicy { retry_on: "z".repeat(8 * MIB), ..Default::default() };
    let remote_a = RemoteDataSource { sha256: String::new(), ..remote.clone() }.encode_to_vec();
    let remote_b = RemoteDataSource { http_uri: None, retry_policy: Some(retry_policy), ..remote }.encode_to_vec();
    let code_a = message(&[(2, &remote_a)]);
    let code_b = message(&[(2, &remote_b)]);
    let vm_a = message(&[(1, b"vm"), (3, &code_a)]);
    let vm_b = message(&[(3, &code_b)]);
    let config_a = message(&[(1, b"ns.plugin"), (3, &vm_a)]);
    let config_b = message(&[(3, &vm_b)]);
    let wasm = message(&[(1, &config_a), (1, &config_b)]);
    let any_a = message(&[(1, HTTP_WASM_TYPE.as_bytes())]);
    let any_b = message(&[(2, &wasm)]);
    message(&[(1, b"hostile"), (2, &any_a), (2, &any_b)])
}

/// A message of length-delimited fields, in this order.
fn message(fields: &[(u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (number, payload) in fields {
        len_field(&mut out, *number, payload);
    }
    out
}

/// The hostile responses, by name.
fn hostile_response(shape: &str, url: &str, sha: &str) -> Vec<u8> {
    // Depth: the Wasm schema nests `configuration` a few levels down, and every level of lists is two
    // messages deep (Value, ListValue); 40 levels stay within the 100-message nesting limit.
    const LEVELS: usize = 40;
    let tec = match shape {
        "repeated-lists" => {
            typed_struct_filter(url, sha, "ListValue", &nested_repeated_lists(eight_mib_of_strings(), LEVELS))
        }
        "tiny-objects" => {
            // 1 MiB of `{"a": null}`: a few bytes each on the wire, a map node each once decoded.
            let object = struct_value(&[("a", &json_value(serde_json::Value::Null))]);
            let items: Vec<&[u8]> = (0..MIB / (object.len() + 2)).map(|_| &object[..]).collect();
            let objects = list_value(&[&items]);
            typed_struct_filter(url, sha, "Struct", &struct_value(&[("objects", &objects)]))
        }
        "repeated-wasm" => repeated_wasm_filter(url, sha),
        other => panic!("unknown shape {other}"),
    };
    // The envelope by prost, the resource as built (prost would merge its repeated occurrences).
    DiscoveryResponse {
        version_info: "v1".into(),
        resources: vec![any_bytes(ECDS_TYPE, tec)],
        type_url: ECDS_TYPE.into(),
        nonce: "nonce-1".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

// ---- the child process ----

/// The child: converts the hostile response `shape` named by `$WASM_ECDS_HOSTILE_CHILD` (`shape|dir|url|sha256`)
/// and prints `INPUT=<bytes> GROWTH=<bytes> OUTCOME=<converted|rejected: reason>`; it checks a conversion's
/// output itself. Run only by the tests below, which start it with `--ignored`.
#[test]
#[ignore = "a child process of the tests in this file"]
fn child_converts_a_hostile_response() {
    let spec = std::env::var(CHILD_ENV).expect("started by a parent test");
    let parts: Vec<&str> = spec.splitn(4, '|').collect();
    let (shape, dir, url, sha) = (parts[0], parts[1], parts[2], parts[3]);
    let options = serde_json::json!({ "cache_dir": dir, "max_attempts": 3, "retry_initial_backoff_ms": 10 });
    let cache = Cache::new(Options::from_json(&options.to_string()).unwrap()).unwrap();
    // Warm up: download the module and touch every lazily set-up part with a small response.
    cache.convert(&response(&[wasm_extension("warm", &remote_wasm(url, sha))])).expect("warm-up converts");

    let input = hostile_response(shape, url, sha);
    // Building the input freed more than it kept: `peak_of` gives that back first, so that the conversion
    // cannot hide its own growth in it.
    let (before_kib, peak_kib, result) = memory::peak_of(|| cache.convert(&input));
    let (before, peak) = (before_kib as usize * 1024, peak_kib as usize * 1024);
    let outcome = match &result {
        Ok(_) => "converted".to_owned(),
        Err(r) => format!("rejected: {}", r.reason),
    };
    println!("INPUT={} GROWTH={} OUTCOME={outcome}", input.len(), peak.saturating_sub(before));
    if let Ok(out) = result {
        check_conversion(&input, &out);
    }
}

/// A conversion must be the right one: the filter now names the module's file, and everything else is what
/// protobuf decodes from the input (occurrences merged).
fn check_conversion(input: &[u8], out: &[u8]) {
    let got = wasms(out).remove(0);
    let file = got.local_filename().expect("converted to a local file");
    let typed_config = extensions(input).remove(0).typed_config.expect("typed_config");
    if typed_config.type_url == HTTP_WASM_TYPE {
        let mut want = Wasm::decode(typed_config.value.as_slice()).expect("Wasm");
        want.vm().code = Some(local_file(&file));
        assert!(got == want, "the converted filter is the input with its code replaced");
        return;
    }
    // A TypedStruct: compare the configuration it carries with what the output's `configuration` holds.
    let ts = TypedStruct::decode(typed_config.value.as_slice()).expect("TypedStruct");
    let field = |v: &prost_types::Value, key: &str| match &v.kind {
        Some(prost_types::value::Kind::StructValue(s)) => s.fields[key].clone(),
        other => panic!("not an object: {other:?}"),
    };
    let root = prost_types::Value { kind: Some(prost_types::value::Kind::StructValue(ts.value.unwrap())) };
    let want = field(&field(&field(&root, "config"), "configuration"), "value");
    let got = got.config.unwrap().configuration.expect("configuration");
    let same = match want.kind.expect("a value") {
        prost_types::value::Kind::ListValue(l) => prost_types::ListValue::decode(got.value.as_slice()).unwrap() == l,
        prost_types::value::Kind::StructValue(s) => prost_types::Struct::decode(got.value.as_slice()).unwrap() == s,
        other => panic!("unexpected configuration {other:?}"),
    };
    assert!(same, "the configuration converted is the one protobuf decodes");
}

/// What the child reported.
struct Report {
    input: usize,
    growth: usize,
    outcome: String,
}

/// Runs the child for `shape` against a real server, and returns what it reported. The child gets 300 s.
fn convert_in_child(shape: &str) -> Report {
    let server = TestServer::http();
    let module = wasm_module(1000);
    server.route("/m.wasm", Route::bytes(module.clone()));
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{shape}|{}|{}|{}", dir.path().display(), server.url("/m.wasm"), sha256_hex(&module));
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_converts_a_hostile_response", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("child starts");
    let pid = child.id();
    let (done, wait) = mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let Ok(out) = wait.recv_timeout(Duration::from_secs(300)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the child converting {shape:?} did not finish in 300 s");
    };
    let out = out.expect("child ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // libtest may print the test's name on the same line before the report.
    let line = stdout.lines().find_map(|l| l.split("INPUT=").nth(1)).expect("child reported");
    let (input, rest) = line.split_once(" GROWTH=").expect("GROWTH");
    let (growth, outcome) = rest.split_once(" OUTCOME=").expect("OUTCOME");
    let report = Report { input: input.parse().unwrap(), growth: growth.parse().unwrap(), outcome: outcome.to_owned() };
    eprintln!("{shape}: input {} B, peak RSS growth {} B, {}", report.input, report.growth, report.outcome);
    report
}

/// Asserts that the conversion grew the peak resident memory by at most `factor` × the response + 16 MiB.
fn assert_bounded(shape: &str, r: &Report, factor: usize) {
    assert!(
        r.growth <= factor * r.input + SLACK,
        "{shape}: converting {} bytes grew the peak resident memory by {} bytes, more than {factor} × input + 16 MiB",
        r.input,
        r.growth
    );
}

/// Every level of nested lists written as two `list_value` occurrences: merging them must not copy the
/// subtree under each level (it did: 40 levels over 8 MiB took ~40 × the response).
#[test]
fn repeated_list_levels_do_not_multiply_memory() {
    let r = convert_in_child("repeated-lists");
    assert_bounded("repeated-lists", &r, 4);
    assert!(
        r.outcome == "converted" || r.outcome.contains("exceeds the memory budget"),
        "converted or rejected for its size: {}",
        r.outcome
    );
}

/// The messages on the way to a Wasm filter's code, each written twice: merging them must not copy them (it
/// did: each level a copy, six in all). The 8 MiB leave with the remote code, so the output is small and the
/// conversion needs no copy of the input at all; one is allowed.
#[test]
fn repeated_wasm_message_levels_do_not_multiply_memory() {
    let r = convert_in_child("repeated-wasm");
    assert_bounded("repeated-wasm", &r, 1);
    assert_eq!(r.outcome, "converted");
}

/// Small objects cost a map node each once decoded, far more than their bytes: the decoded tree is held to a
/// budget proportional to the response, and a response beyond it is rejected with a reason.
#[test]
fn a_decoded_configuration_beyond_the_memory_budget_is_rejected() {
    let r = convert_in_child("tiny-objects");
    assert_bounded("tiny-objects", &r, 4);
    assert!(
        r.outcome.starts_with(
            "rejected: resource \"hostile\": typed_config: the decoded configuration exceeds the memory budget of "
        ),
        "{}",
        r.outcome
    );
}
