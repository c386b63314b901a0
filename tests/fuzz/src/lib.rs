//! The fuzz targets of wasm-ecds, one function per target (docs/fuzzing.md).
//!
//! The libFuzzer binaries (`fuzz_targets/*.rs`, built and run by `make fuzz`) and the replay test
//! (`tests/replay.rs`, run by `make test`) call the same functions. Each target feeds its input to one entry
//! point and asserts the library's contract where it can; any panic is a finding.
//!
//! No target reaches the network: caches block every address but 127.0.0.0/8 (`blocked_cidrs`), fetches
//! fail fast (one attempt), and `run.sh` runs everything in a network namespace of its own holding only
//! loopback, so that even a fuzzed host name cannot send a DNS query out. Modules come from caches pre-seeded
//! at start-up ([`SEED_MODULES`] by sha256) or, for `unbox`, from a server on 127.0.0.1 serving the input.

pub mod oci;

pub use oci::{oci_challenge, oci_manifest, oci_pull_secret, oci_reference, oci_token};

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use prost::Message;
use wasm_ecds::{Cache, Options, Rejection};
use wasm_ecds_testkit::ecds::{self as kit, DeltaDiscoveryResponse, DiscoveryResponse};
use wasm_ecds_testkit::server::{Route, TestServer};

/// A fuzz target: feeds one input to the library and asserts what it can.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: &[(&str, Target)] = &[
    ("convert", convert),
    ("convert_delta", convert_delta),
    ("nack", nack),
    ("nack_delta", nack_delta),
    ("typed_struct", typed_struct),
    ("options", options),
    ("unbox", unbox),
    ("oci_manifest", oci_manifest),
    ("oci_reference", oci_reference),
    ("oci_pull_secret", oci_pull_secret),
    ("oci_challenge", oci_challenge),
    ("oci_token", oci_token),
];

/// The modules every convert cache holds before the first input: `kit::server::wasm_module(n)` for these
/// payload sizes. An input naming one by sha256 converts without a fetch.
pub const SEED_MODULES: [usize; 3] = [0, 64, 1000];

/// A URL no fetch can reach: port 9 on loopback, closed (and in `run.sh`'s namespace nothing listens at all).
pub const CLOSED: &str = "http://127.0.0.1:9";

/// The bytes of seed module `i`.
pub fn seed_module(i: usize) -> Vec<u8> {
    wasm_ecds_testkit::server::wasm_module(SEED_MODULES[i])
}

/// The sha256 (hex) of seed module `i`.
pub fn seed_sha(i: usize) -> String {
    wasm_ecds_testkit::server::sha256_hex(&seed_module(i))
}

/// What the first input byte of `convert`, `convert_delta` and `typed_struct` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `enable_conversion: false`: the input must come back byte-identical.
    Off,
    /// `on_fetch_failure: "reject"`.
    Reject,
    /// `on_fetch_failure: "deny"`.
    Deny,
}

impl Mode {
    /// `Off` for 7 modulo 8 (an eighth of the inputs), else the low bit: 0 `Reject`, 1 `Deny`.
    pub fn of(byte: u8) -> Mode {
        if byte % 8 == 7 {
            Mode::Off
        } else if byte & 1 == 0 {
            Mode::Reject
        } else {
            Mode::Deny
        }
    }

    /// The byte [`Mode::of`] maps to this mode (seeds start with it).
    pub fn byte(self) -> u8 {
        match self {
            Mode::Reject => 0,
            Mode::Deny => 1,
            Mode::Off => 7,
        }
    }
}

/// Every IPv4 address but 127.0.0.0/8, and all of IPv6: only loopback over IPv4 can be reached.
const NOT_LOOPBACK: &[&str] = &[
    "0.0.0.0/2",
    "64.0.0.0/3",
    "96.0.0.0/4",
    "112.0.0.0/5",
    "120.0.0.0/6",
    "124.0.0.0/7",
    "126.0.0.0/8",
    "128.0.0.0/1",
    "::/0",
];

/// A fuzzing cache's options: one fetch attempt with short timeouts, nothing but loopback reachable, no
/// purge during a run, downloads bounded by `max_module_bytes`.
fn cache_options(dir: &Path, mode: Mode, max_module_bytes: u64) -> Options {
    let json = format!(
        r#"{{"cache_dir": {dir:?}, "enable_conversion": {enable}, "on_fetch_failure": "{on_fail}",
            "max_attempts": 1, "http_request_timeout_ms": 10000, "default_fetch_timeout_ms": 10000,
            "retry_initial_backoff_ms": 1, "retry_max_backoff_ms": 1,
            "module_expiry_secs": 315360000, "purge_interval_secs": 315360000,
            "max_module_bytes": {max_module_bytes}, "insecure_hosts": [], "blocked_cidrs": {cidrs:?}}}"#,
        dir = dir.to_str().expect("temp dir path is UTF-8"),
        enable = mode != Mode::Off,
        on_fail = if mode == Mode::Deny { "deny" } else { "reject" },
        cidrs = NOT_LOOPBACK,
    );
    Options::from_json(&json).expect("fuzzing options are valid")
}

/// The convert caches, one per mode, each in its own directory and seeded with [`SEED_MODULES`].
struct Caches {
    dir: tempfile::TempDir,
    off: Cache,
    reject: Cache,
    deny: Cache,
}

impl Caches {
    fn get(&self, mode: Mode) -> &Cache {
        match mode {
            Mode::Off => &self.off,
            Mode::Reject => &self.reject,
            Mode::Deny => &self.deny,
        }
    }
}

/// Modules larger than this are refused by the convert caches (a fetch there never succeeds anyway).
const CONVERT_MAX_MODULE_BYTES: u64 = 1 << 20;

fn caches() -> &'static Caches {
    static CACHES: OnceLock<Caches> = OnceLock::new();
    CACHES.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("wasm-ecds-fuzz-").tempdir().expect("temp dir");
        let open = |mode: Mode, name: &str| {
            Cache::new(cache_options(&dir.path().join(name), mode, CONVERT_MAX_MODULE_BYTES))
                .expect("open fuzzing cache")
        };
        let caches = Caches {
            off: open(Mode::Off, "off"),
            reject: open(Mode::Reject, "reject"),
            deny: open(Mode::Deny, "deny"),
            dir,
        };
        // Seed by a real conversion from a loopback server, which is then closed.
        let server = TestServer::http();
        let filters: Vec<_> = (0..SEED_MODULES.len())
            .map(|i| {
                let path = format!("/seed-{i}.wasm");
                server.route(&path, Route::bytes(seed_module(i)));
                kit::wasm_extension(&format!("seed-{i}"), &kit::remote_wasm(&server.url(&path), &seed_sha(i)))
            })
            .collect();
        let response = kit::response(&filters);
        for cache in [&caches.reject, &caches.deny] {
            if let Err(e) = cache.convert(&response) {
                panic!("seeding the fuzzing cache failed: {e}");
            }
        }
        caches
    })
}

/// What a convert target's input became (`None`: the input was empty).
pub type Outcome = Option<Result<Vec<u8>, Rejection>>;

/// `convert`: the first byte picks the [`Mode`], the rest is a serialized `DiscoveryResponse`.
pub fn convert(data: &[u8]) {
    convert_outcome(data);
}

/// [`convert`], returning what became of the input.
pub fn convert_outcome(data: &[u8]) -> Outcome {
    let (&mode, input) = data.split_first()?;
    Some(convert_sotw_checked(Mode::of(mode), input))
}

/// `convert_delta`: the first byte picks the [`Mode`], the rest is a serialized `DeltaDiscoveryResponse`.
pub fn convert_delta(data: &[u8]) {
    convert_delta_outcome(data);
}

/// [`convert_delta`], returning what became of the input.
pub fn convert_delta_outcome(data: &[u8]) -> Outcome {
    let (&mode, input) = data.split_first()?;
    let mode = Mode::of(mode);
    let caches = caches();
    let cache = caches.get(mode);
    let result = cache.convert_delta(input);
    match &result {
        Ok(out) if mode == Mode::Off => assert_eq!(out, input, "conversion off must pass the response through"),
        Ok(out) => {
            if let Ok(before) = DeltaDiscoveryResponse::decode(input) {
                let after = DeltaDiscoveryResponse::decode(out.as_slice())
                    .expect("a converted delta response decodes when its input did");
                assert_eq!(after.resources.len(), before.resources.len(), "resource count");
                assert_eq!(after.system_version_info, before.system_version_info);
                assert_eq!(after.type_url, before.type_url);
                assert_eq!(after.nonce, before.nonce);
                assert_eq!(after.removed_resources, before.removed_resources);
                assert_eq!(after.removed_resource_names, before.removed_resource_names);
                for (a, b) in after.resources.iter().zip(&before.resources) {
                    assert_eq!((&a.name, &a.version, &a.aliases), (&b.name, &b.version, &b.aliases));
                }
                for any in after.resources.iter().filter_map(|r| r.resource.as_ref()) {
                    check_local_files(any, caches.dir.path());
                }
            }
            // A converted response converts to itself: nothing remote is left in it.
            assert_eq!(cache.convert_delta(out).as_ref(), Ok(out), "a converted delta response is a fixed point");
        }
        Err(rejection) => {
            assert!(mode != Mode::Off, "conversion off never rejects: {rejection}");
            assert!(!rejection.reason.is_empty(), "a rejection has a reason");
            if DeltaDiscoveryResponse::decode(input).is_ok() {
                let nack = wasm_ecds::nack_delta(input, &rejection.reason)
                    .expect("a rejected delta response that decodes can be NACKed");
                check_delta_nack(&nack, input, &rejection.reason);
            }
        }
    }
    Some(result)
}

/// Converts a `DiscoveryResponse` in `mode` and checks the outcome.
fn convert_sotw_checked(mode: Mode, input: &[u8]) -> Result<Vec<u8>, Rejection> {
    let caches = caches();
    let cache = caches.get(mode);
    let result = cache.convert(input);
    match &result {
        Ok(out) if mode == Mode::Off => assert_eq!(out, input, "conversion off must pass the response through"),
        Ok(out) => {
            if let Ok(before) = DiscoveryResponse::decode(input) {
                let after =
                    DiscoveryResponse::decode(out.as_slice()).expect("a converted response decodes when its input did");
                assert_eq!(after.resources.len(), before.resources.len(), "resource count");
                assert_eq!(after.version_info, before.version_info);
                assert_eq!(after.type_url, before.type_url);
                assert_eq!(after.nonce, before.nonce);
                assert_eq!(after.control_plane, before.control_plane);
                assert_eq!(after.resource_errors, before.resource_errors);
                for any in &after.resources {
                    check_local_files(any, caches.dir.path());
                }
            }
            // A converted response converts to itself: nothing remote is left in it.
            assert_eq!(cache.convert(out).as_ref(), Ok(out), "a converted response is a fixed point");
        }
        Err(rejection) => {
            assert!(mode != Mode::Off, "conversion off never rejects: {rejection}");
            assert!(!rejection.reason.is_empty(), "a rejection has a reason");
            if DiscoveryResponse::decode(input).is_ok() {
                let nack = wasm_ecds::nack(input, "v0", &rejection.reason)
                    .expect("a rejected response that decodes can be NACKed");
                check_nack(&nack, input, "v0", &rejection.reason);
            }
        }
    }
    result
}

/// A resource (an `Any` holding a `TypedExtensionConfig`) whose Wasm code is a local file in the cache
/// directory names a file that exists and holds a Wasm module.
fn check_local_files(any: &kit::Any, cache_root: &Path) {
    let Some(path) = local_filename(any) else { return };
    let path = PathBuf::from(path);
    if !path.starts_with(cache_root) {
        return; // a local file the input named itself
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("converted filename {}: {e}", path.display()));
    assert!(bytes.len() >= 8 && bytes.starts_with(b"\0asm"), "{} is not a Wasm module", path.display());
}

/// `vm_config.code.local.filename` of a Wasm filter resource, where it decodes.
fn local_filename(any: &kit::Any) -> Option<String> {
    let tec = kit::TypedExtensionConfig::decode(any.value.as_slice()).ok()?;
    let typed = tec.typed_config?;
    if typed.type_url != kit::HTTP_WASM_TYPE && typed.type_url != kit::NETWORK_WASM_TYPE {
        return None;
    }
    kit::Wasm::decode(typed.value.as_slice()).ok()?.local_filename()
}

/// `google.rpc.Code.INTERNAL`, the code of a Wasm NACK (istio `pkg/istio-agent/xds_proxy.go`).
const CODE_INTERNAL: i32 = 13;

fn check_nack(nack: &[u8], response: &[u8], version: &str, reason: &str) {
    let request = kit::DiscoveryRequest::decode(nack).expect("a NACK decodes as a DiscoveryRequest");
    assert_eq!(request.version_info, version);
    let detail = request.error_detail.expect("a NACK has error_detail");
    assert_eq!((detail.code, detail.message.as_str()), (CODE_INTERNAL, reason));
    if let Ok(response) = DiscoveryResponse::decode(response) {
        assert_eq!((request.type_url, request.response_nonce), (response.type_url, response.nonce));
    }
}

fn check_delta_nack(nack: &[u8], response: &[u8], reason: &str) {
    let request = kit::DeltaDiscoveryRequest::decode(nack).expect("a delta NACK decodes as a DeltaDiscoveryRequest");
    let detail = request.error_detail.expect("a delta NACK has error_detail");
    assert_eq!((detail.code, detail.message.as_str()), (CODE_INTERNAL, reason));
    if let Ok(response) = DeltaDiscoveryResponse::decode(response) {
        assert_eq!((request.type_url, request.response_nonce), (response.type_url, response.nonce));
    }
}

/// The NACK targets' reason: not ASCII, so that its bytes are carried as they are.
const NACK_REASON: &str = "resource \"x\": module http://127.0.0.1:9/m.wasm: refusé ✗";

/// `nack`: the input is a serialized `DiscoveryResponse`. A response prost decodes is NACKed.
pub fn nack(data: &[u8]) {
    match wasm_ecds::nack(data, "v7", NACK_REASON) {
        Ok(nack) => check_nack(&nack, data, "v7", NACK_REASON),
        Err(e) => {
            assert!(!e.0.is_empty(), "a NACK error has a reason");
            assert!(DiscoveryResponse::decode(data).is_err(), "a response that decodes is NACKed, not: {e}");
        }
    }
}

/// `nack_delta`: the input is a serialized `DeltaDiscoveryResponse`.
pub fn nack_delta(data: &[u8]) {
    match wasm_ecds::nack_delta(data, NACK_REASON) {
        Ok(nack) => check_delta_nack(&nack, data, NACK_REASON),
        Err(e) => {
            assert!(!e.0.is_empty(), "a NACK error has a reason");
            assert!(DeltaDiscoveryResponse::decode(data).is_err(), "a delta response that decodes is NACKed, not: {e}");
        }
    }
}

/// `typed_struct`: the first byte picks the [`Mode`] (as `convert`) and, with bit 4, the TypedStruct type
/// (clear: `udpa.type.v1.TypedStruct`, set: `xds.type.v3.TypedStruct`); the rest is a serialized TypedStruct,
/// converted as the `typed_config` of the one resource of a `DiscoveryResponse`.
pub fn typed_struct(data: &[u8]) {
    typed_struct_outcome(data);
}

/// [`typed_struct`], returning what became of the response wrapping the input.
pub fn typed_struct_outcome(data: &[u8]) -> Outcome {
    let (&flags, value) = data.split_first()?;
    let type_url = if flags & 0x10 == 0 { kit::TYPED_STRUCT_TYPE } else { kit::XDS_TYPED_STRUCT_TYPE };
    let response = kit::response(&[kit::extension("fuzz.typed-struct", kit::any_bytes(type_url, value.to_vec()))]);
    Some(convert_sotw_checked(Mode::of(flags), &response))
}

/// `options`: the input (as UTF-8; other inputs are skipped) is the options JSON.
pub fn options(data: &[u8]) {
    let Ok(json) = std::str::from_utf8(data) else { return };
    match Options::from_json(json) {
        Ok(o) => {
            let trimmed = json.trim();
            let defaults = trimmed.is_empty() || trimmed == "null";
            let object = |text| matches!(serde_json::from_str(text), Ok(serde_json::Value::Object(_)));
            assert!(defaults || object(trimmed), "accepted options that are not a JSON object: {json:?}");
            assert!(!o.cache_dir.as_os_str().is_empty());
            assert!(o.max_attempts > 0 && o.max_module_bytes > 0 && !o.http_request_timeout.is_zero());
            assert!(!o.module_expiry.is_zero() && !o.purge_interval.is_zero());
            assert!(o.retry_initial_backoff <= o.retry_max_backoff);
        }
        Err(e) => assert!(e.0.starts_with("invalid "), "an options error says what is invalid: {e}"),
    }
}

/// Bodies the `unbox` server sends are written to disk through this bound (a gzip bomb stops here).
const UNBOX_MAX_MODULE_BYTES: u64 = 4 << 20;

/// Inputs one `unbox` cache serves before it is replaced by a fresh one: the modules it stored are deleted
/// with it, so the disk a long run uses stays bounded (at most this many modules of `UNBOX_MAX_MODULE_BYTES`).
const UNBOX_CACHE_USES: u64 = 64;

/// The `unbox` target's loopback server and current cache. Opening a cache costs ~25 ms (the system's trust
/// store is loaded), a conversion with a download ~1-5 ms, so a cache serves several inputs.
struct Unboxing {
    server: TestServer,
    cache: Option<(tempfile::TempDir, Cache)>,
    inputs: u64,
}

/// `unbox`: the first byte's bit 0 sends the body with `Content-Encoding: gzip`; the rest is the body a
/// loopback server answers for a Wasm filter with no sha256, at a URL no earlier input used.
pub fn unbox(data: &[u8]) {
    unbox_outcome(data);
}

/// [`unbox`], returning what became of the response naming the body.
pub fn unbox_outcome(data: &[u8]) -> Outcome {
    static UNBOXING: OnceLock<Mutex<Unboxing>> = OnceLock::new();
    let (&flags, body) = data.split_first()?;
    // One input at a time: the route is shared.
    let mut state = UNBOXING
        .get_or_init(|| Mutex::new(Unboxing { server: TestServer::http(), cache: None, inputs: 0 }))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let state = &mut *state;
    if state.inputs.is_multiple_of(UNBOX_CACHE_USES) {
        state.cache = None; // deletes the old directory first
        let dir = tempfile::Builder::new().prefix("wasm-ecds-fuzz-unbox-").tempdir().expect("temp dir");
        let cache =
            Cache::new(cache_options(dir.path(), Mode::Reject, UNBOX_MAX_MODULE_BYTES)).expect("open fuzzing cache");
        state.cache = Some((dir, cache));
    }
    state.inputs += 1;
    let (_, cache) = state.cache.as_ref().expect("a cache is open");
    let mut route = Route::bytes(body.to_vec());
    if flags & 1 == 1 {
        route = route.gzip_encoding();
    }
    state.server.route("/module", route);
    // A new URL (the server ignores the query) so that no earlier download of it is reused.
    let url = state.server.url(&format!("/module?input={}", state.inputs));
    let response = kit::response(&[kit::wasm_extension("fuzz.unbox", &kit::remote_wasm(&url, "").with_timeout(10))]);
    let is_wasm = body.len() >= 8 && body.starts_with(b"\0asm");
    let result = cache.convert(&response);
    match &result {
        Ok(out) => {
            let wasm = &kit::wasms(out)[0];
            let path = wasm.local_filename().expect("a converted filter loads a local file");
            let module = std::fs::read(&path).unwrap_or_else(|e| panic!("converted filename {path}: {e}"));
            assert!(module.len() >= 8 && module.starts_with(b"\0asm"), "{path} is not a Wasm module");
            assert!(module.len() as u64 <= UNBOX_MAX_MODULE_BYTES, "{path} is larger than max_module_bytes");
            if is_wasm {
                assert!(module == body, "a Wasm body is stored as it came");
            }
        }
        Err(rejection) => {
            assert!(!is_wasm || body.len() as u64 > UNBOX_MAX_MODULE_BYTES, "a Wasm body was refused: {rejection}");
            assert!(rejection.reason.contains(&url), "the rejection names the URL: {rejection}");
        }
    }
    Some(result)
}
