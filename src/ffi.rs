//! The C ABI, and only that: opaque handle, status codes, buffers and strings. Every entry point checks its
//! pointers and catches panics (a library inside the agent must never take its host down); the logic lives
//! in the Rust modules. `include/wasm_ecds.h` is generated from this file (and the log callback's types in
//! `log_bridge.rs`) by cbindgen; the header's opening comment, with the conventions every function follows,
//! is in `cbindgen.toml`.
//!
//! Every fallible function returns an `int32_t` status, writes its result through an out parameter only on
//! success and its reason through `char **reason` (which may be NULL) only on failure. Inputs are
//! `(const uint8_t *, size_t)` because protobuf bytes contain zeros; `(NULL, 0)` is empty, `(NULL, n > 0)` is
//! `WASM_ECDS_INVALID_ARGUMENT`. Memory the library returns is freed only with `wasm_ecds_bytes_free` /
//! `wasm_ecds_string_free`.

#![allow(non_camel_case_types)]
// The safety contract of every function is its `# Safety` section; clippy would have them all `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::any::Any;
use std::error::Error;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::log_bridge::{self, LibraryCall};
pub use crate::log_bridge::{
    wasm_ecds_log_callback, WASM_ECDS_LOG_DEBUG, WASM_ECDS_LOG_ERROR, WASM_ECDS_LOG_INFO, WASM_ECDS_LOG_TRACE,
    WASM_ECDS_LOG_WARN,
};
use crate::{Cache, OpenError, Options};

/// Success: the out parameter holds the result; `*reason` is not written.
pub const WASM_ECDS_OK: i32 = 0;
/// The response must not reach Envoy: `*reason` holds the message for the NACK's `error_detail`.
pub const WASM_ECDS_REJECTED: i32 = 1;
/// The caller broke the contract (a NULL pointer, invalid UTF-8, a bad option, an unparsable message):
/// `*reason` says which.
pub const WASM_ECDS_INVALID_ARGUMENT: i32 = -1;
/// A bug inside the library (a caught panic): `*reason` says what; the cache is still usable.
pub const WASM_ECDS_INTERNAL_ERROR: i32 = -2;
/// The file system failed the library (the cache directory cannot be created, locked, read or written):
/// `*reason` names the path and the operating system's error. Retrying may help once the cause is fixed.
pub const WASM_ECDS_IO_ERROR: i32 = -3;

/// A module cache with its counters (opaque). Thread-safe: every function taking a `wasm_ecds_cache *`
/// may be called from many threads at once, except `wasm_ecds_cache_free`.
pub struct wasm_ecds_cache {
    cache: Cache,
}

/// Bytes owned by the library. Free with `wasm_ecds_bytes_free`. `data` is NULL when `len` is 0.
#[repr(C)]
pub struct wasm_ecds_bytes {
    pub data: *mut u8,
    pub len: usize,
}

static VERSION_CSTR: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(s) => s,
    Err(_) => panic!("version contains NUL"),
};

/// Why a call failed: the status it returns and the reason it writes.
struct Failure {
    status: i32,
    reason: String,
}

impl Failure {
    fn invalid(reason: impl Into<String>) -> Failure {
        Failure { status: WASM_ECDS_INVALID_ARGUMENT, reason: reason.into() }
    }

    /// An error's message followed by those of its sources: `cache directory /x: Permission denied`.
    fn from_error(status: i32, error: &dyn Error) -> Failure {
        let mut reason = error.to_string();
        let mut source = error.source();
        while let Some(e) = source {
            reason.push_str(": ");
            reason.push_str(&e.to_string());
            source = e.source();
        }
        Failure { status, reason }
    }

    fn panic(payload: &(dyn Any + Send)) -> Failure {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        Failure { status: WASM_ECDS_INTERNAL_ERROR, reason: format!("internal error: {what}") }
    }
}

/// Runs the body of an entry point: marks the thread as inside a library call (see [`LibraryCall`]), turns
/// a panic into `WASM_ECDS_INTERNAL_ERROR`, and writes the reason of a failure to `*reason` (if not NULL).
fn guarded(reason: *mut *mut c_char, body: impl FnOnce() -> Result<(), Failure>) -> i32 {
    let call = LibraryCall::enter();
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        #[cfg(test)]
        tests::panic_if_asked();
        body()
    }))
    .unwrap_or_else(|payload| Err(Failure::panic(&*payload)));
    drop(call);
    match outcome {
        Ok(()) => WASM_ECDS_OK,
        Err(failure) => {
            set_string(reason, &failure.reason);
            failure.status
        }
    }
}

/// Writes an owned copy of `s` to `*target` if `target` is not NULL. Interior NULs become spaces.
fn set_string(target: *mut *mut c_char, s: &str) {
    if !target.is_null() {
        // SAFETY: the caller promised `target` is NULL or valid for a write.
        unsafe { *target = into_c_string(s) };
    }
}

fn into_c_string(s: &str) -> *mut c_char {
    let cleaned = if s.contains('\0') { s.replace('\0', " ") } else { s.to_owned() };
    CString::new(cleaned).map(CString::into_raw).unwrap_or(ptr::null_mut())
}

/// Builds a slice from a C buffer: `(NULL, 0)` is empty, `(NULL, n > 0)` an error.
///
/// # Safety
/// `data` must be NULL or valid for reads of `len` bytes for the lifetime `'a`.
unsafe fn input<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8], Failure> {
    if data.is_null() {
        return if len == 0 { Ok(&[]) } else { Err(Failure::invalid(format!("{name} is NULL with length {len}"))) };
    }
    Ok(std::slice::from_raw_parts(data, len))
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string that lives for `'a`.
unsafe fn input_str<'a>(s: *const c_char, name: &str) -> Result<&'a str, Failure> {
    if s.is_null() {
        return Err(Failure::invalid(format!("{name} is NULL")));
    }
    CStr::from_ptr(s).to_str().map_err(|_| Failure::invalid(format!("{name} is not valid UTF-8")))
}

/// The out parameter `out` as a reference, or the failure that names it.
///
/// # Safety
/// `out` must be NULL or valid for a write for the lifetime `'a`.
unsafe fn output<'a, T>(out: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    out.as_mut().ok_or_else(|| Failure::invalid(format!("{name} is NULL")))
}

/// # Safety
/// `cache` must be NULL or a live cache for the lifetime `'a`.
unsafe fn cache_ref<'a>(cache: *const wasm_ecds_cache) -> Result<&'a Cache, Failure> {
    cache.as_ref().map(|c| &c.cache).ok_or_else(|| Failure::invalid("cache is NULL"))
}

fn into_bytes(v: Vec<u8>) -> wasm_ecds_bytes {
    if v.is_empty() {
        return wasm_ecds_bytes { data: ptr::null_mut(), len: 0 };
    }
    let boxed = v.into_boxed_slice();
    let len = boxed.len();
    wasm_ecds_bytes { data: Box::into_raw(boxed) as *mut u8, len }
}

/// The library's version, e.g. "0.2.0"; its major and minor numbers are `WASM_ECDS_VERSION_MAJOR` and
/// `WASM_ECDS_VERSION_MINOR` of the header it was built with.
///
/// Ownership: a static string; never free it. Thread-safe.
#[no_mangle]
pub extern "C" fn wasm_ecds_version() -> *const c_char {
    VERSION_CSTR.as_ptr()
}

/// Opens a cache: creates the cache directory if missing and reuses the modules an earlier process left
/// there (a read-only directory, e.g. seeded into an image, opens too). `options_json` is a JSON object of
/// options; NULL, "" or "{}" means defaults. Environment fallbacks are read now.
///
/// Keys (all optional; the README's Options table has each default and meaning): `cache_dir`,
/// `enable_conversion`, `module_expiry_secs`, `purge_interval_secs`, `default_fetch_timeout_ms`,
/// `http_request_timeout_ms`, `max_attempts`, `retry_initial_backoff_ms`, `retry_max_backoff_ms`,
/// `max_module_bytes`, `insecure_hosts`, `ca_file`, `blocked_cidrs`, `on_fetch_failure`, and for `oci://`
/// modules `plain_http_hosts` (a list of `host[:port]` as in the URL, or `"*"`: registries spoken to over
/// plain HTTP) and `registry_mirrors` (an object mapping a registry host as in the URL to a list of
/// endpoints `http(s)://host[:port]` tried in order before the registry itself).
///
/// - `WASM_ECDS_OK`: `*out` holds the cache.
/// - `WASM_ECDS_INVALID_ARGUMENT`: an unknown key or a bad value (named in `*reason`; a `ca_file` that
///   cannot be read is one), options that are not UTF-8 or not JSON, or `out` is NULL.
/// - `WASM_ECDS_IO_ERROR`: the cache directory cannot be created, locked or used; `*reason` names the path
///   and the operating system's error.
/// - `WASM_ECDS_INTERNAL_ERROR`: a bug in the library.
///
/// Ownership: free the cache with `wasm_ecds_cache_free`, and `*reason` with `wasm_ecds_string_free`.
/// Thread-safe; several caches may share a directory, also across processes.
///
/// # Safety
/// `options_json` is NULL or a NUL-terminated string; `out` is NULL or valid for a write; `reason` is NULL
/// or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_cache_new(
    options_json: *const c_char,
    out: *mut *mut wasm_ecds_cache,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let out = output(out, "out")?;
        let json = if options_json.is_null() { "" } else { input_str(options_json, "options_json")? };
        let options = Options::from_json(json).map_err(|e| Failure::from_error(WASM_ECDS_INVALID_ARGUMENT, &e))?;
        let cache = Cache::new(options).map_err(|e| {
            let status = match e {
                OpenError::Options(_) => WASM_ECDS_INVALID_ARGUMENT,
                OpenError::CacheDir(_) => WASM_ECDS_IO_ERROR,
            };
            Failure::from_error(status, &e)
        })?;
        *out = Box::into_raw(Box::new(wasm_ecds_cache { cache }));
        Ok(())
    })
}

/// Frees a cache; NULL is fine. Modules stay on disk for the next process.
///
/// Ownership: takes `cache` back; free each cache exactly once. Not thread-safe for that cache: no other
/// call may use it during or after this one.
///
/// # Safety
/// `cache` is NULL or a pointer from `wasm_ecds_cache_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_cache_free(cache: *mut wasm_ecds_cache) {
    if !cache.is_null() {
        guarded(ptr::null_mut(), || {
            drop(Box::from_raw(cache));
            Ok(())
        });
    }
}

type ConvertFn = fn(&Cache, &[u8]) -> Result<Vec<u8>, crate::Rejection>;

/// # Safety
/// As `wasm_ecds_convert`.
unsafe fn convert_with(
    convert: ConvertFn,
    cache: *const wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let cache = cache_ref(cache)?;
        let out = output(out, "out")?;
        let response = input(response, response_len, "response")?;
        let converted = convert(cache, response)
            .map_err(|rejection| Failure { status: WASM_ECDS_REJECTED, reason: rejection.reason })?;
        *out = into_bytes(converted);
        Ok(())
    })
}

/// Converts a serialized `envoy.service.discovery.v3.DiscoveryResponse`: every Wasm filter whose module is
/// remote gets it from the cache (downloading it if needed) and loads it from a local file.
///
/// - `WASM_ECDS_OK`: `*out` holds the response to forward to Envoy.
/// - `WASM_ECDS_REJECTED`: forward nothing; `*reason` holds the message for the NACK's `error_detail` (see
///   `wasm_ecds_nack`).
/// - `WASM_ECDS_INVALID_ARGUMENT`: `cache` or `out` is NULL, or `response` is NULL with a length.
/// - `WASM_ECDS_INTERNAL_ERROR`: a bug in the library.
///
/// Ownership: free `*out` with `wasm_ecds_bytes_free` and `*reason` with `wasm_ecds_string_free`.
/// Thread-safe: blocks until every module is fetched or has failed; concurrent calls wanting the same module
/// share one download.
///
/// # Safety
/// `cache` is NULL or a live cache; `response` is NULL or valid for reads of `response_len` bytes; `out` is
/// NULL or valid for a write; `reason` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_convert(
    cache: *const wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    convert_with(Cache::convert, cache, response, response_len, out, reason)
}

/// As `wasm_ecds_convert`, for a serialized `envoy.service.discovery.v3.DeltaDiscoveryResponse`; removed
/// resource names pass through unchanged. NACK a rejection with `wasm_ecds_nack_delta`.
///
/// Ownership and thread safety as `wasm_ecds_convert`.
///
/// # Safety
/// As `wasm_ecds_convert`.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_convert_delta(
    cache: *const wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    convert_with(Cache::convert_delta, cache, response, response_len, out, reason)
}

/// Builds the serialized `envoy.service.discovery.v3.DiscoveryRequest` that NACKs a rejected
/// `DiscoveryResponse`: the response's `type_url`, `response_nonce` = its nonce, `version_info` =
/// `last_acked_version`, and `error_detail { code: 13 (INTERNAL), message: error_detail }`. Needs no cache.
///
/// - `WASM_ECDS_OK`: `*out` holds the request to send to the control plane.
/// - `WASM_ECDS_INVALID_ARGUMENT`: a pointer is NULL, a string is not UTF-8, or the response does not
///   parse; `*reason` says which.
/// - `WASM_ECDS_INTERNAL_ERROR`: a bug in the library.
///
/// Ownership: free `*out` with `wasm_ecds_bytes_free` and `*reason` with `wasm_ecds_string_free`. The
/// strings stay the caller's. Thread-safe.
///
/// # Safety
/// `response` is NULL or valid for reads of `response_len` bytes; `last_acked_version` and `error_detail`
/// are NULL or NUL-terminated strings; `out` is NULL or valid for a write; `reason` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_nack(
    response: *const u8,
    response_len: usize,
    last_acked_version: *const c_char,
    error_detail: *const c_char,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let out = output(out, "out")?;
        let response = input(response, response_len, "response")?;
        let version = input_str(last_acked_version, "last_acked_version")?;
        let detail = input_str(error_detail, "error_detail")?;
        let nack =
            crate::nack(response, version, detail).map_err(|e| Failure::from_error(WASM_ECDS_INVALID_ARGUMENT, &e))?;
        *out = into_bytes(nack);
        Ok(())
    })
}

/// Builds the serialized `envoy.service.discovery.v3.DeltaDiscoveryRequest` that NACKs a rejected
/// `DeltaDiscoveryResponse`: its `type_url`, `response_nonce` = its nonce, and
/// `error_detail { code: 13 (INTERNAL), message: error_detail }`. Needs no cache.
///
/// Statuses, ownership and thread safety as `wasm_ecds_nack`.
///
/// # Safety
/// As `wasm_ecds_nack`.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_nack_delta(
    response: *const u8,
    response_len: usize,
    error_detail: *const c_char,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let out = output(out, "out")?;
        let response = input(response, response_len, "response")?;
        let detail = input_str(error_detail, "error_detail")?;
        let nack =
            crate::nack_delta(response, detail).map_err(|e| Failure::from_error(WASM_ECDS_INVALID_ARGUMENT, &e))?;
        *out = into_bytes(nack);
        Ok(())
    })
}

/// The cache's counters in Prometheus text exposition format (with `# HELP` and `# TYPE`); NULL if `cache`
/// is NULL (or on an internal error, which is logged).
///
/// Ownership: free the text with `wasm_ecds_string_free`. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_metrics(cache: *const wasm_ecds_cache) -> *mut c_char {
    let mut text: *mut c_char = ptr::null_mut();
    guarded(ptr::null_mut(), || {
        text = into_c_string(&cache_ref(cache)?.metrics_text());
        Ok(())
    });
    text
}

/// Purges now: deletes the modules unused for longer than the expiry (`module_expiry_secs`) that the latest
/// converted ECDS state does not reference, and writes the cache's index. (Calls to `wasm_ecds_convert`
/// also purge, at most every `purge_interval_secs`.)
///
/// - `WASM_ECDS_OK`: `*removed` holds how many modules were removed.
/// - `WASM_ECDS_INVALID_ARGUMENT`: `cache` or `removed` is NULL.
/// - `WASM_ECDS_IO_ERROR`: the cache directory could not be written; `*reason` names the path and the
///   operating system's error.
/// - `WASM_ECDS_INTERNAL_ERROR`: a bug in the library.
///
/// Ownership: free `*reason` with `wasm_ecds_string_free`. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache; `removed` is NULL or valid for a write; `reason` is NULL or valid for a
/// write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_purge(
    cache: *const wasm_ecds_cache,
    removed: *mut u64,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let cache = cache_ref(cache)?;
        let removed = output(removed, "removed")?;
        let n = cache.purge().map_err(|e| Failure::from_error(WASM_ECDS_IO_ERROR, &e))?;
        *removed = n as u64;
        Ok(())
    })
}

/// Frees bytes returned by the library; `{NULL, 0}` is fine.
///
/// Ownership: takes `bytes` back; free each exactly once. Thread-safe.
///
/// # Safety
/// `bytes` is `{NULL, 0}` or was returned by this library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_bytes_free(bytes: wasm_ecds_bytes) {
    if !bytes.data.is_null() {
        drop(Box::from_raw(ptr::slice_from_raw_parts_mut(bytes.data, bytes.len)));
    }
}

/// Frees a string returned by the library (a `*reason` or metrics text); NULL is fine.
///
/// Ownership: takes `s` back; free each exactly once. Thread-safe.
///
/// # Safety
/// `s` is NULL or was returned by this library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_string_free(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

/// Routes the library's log records at `max_level` (one of `WASM_ECDS_LOG_*`) and more severe to
/// `callback`, with `user_data` passed back as is. A NULL `callback` or `max_level` 0 turns logging off
/// (the default: the library never prints). The message of a bug caught inside the library (see
/// `WASM_ECDS_INTERNAL_ERROR`) is logged at `WASM_ECDS_LOG_ERROR`.
///
/// - `WASM_ECDS_OK`, or `WASM_ECDS_INVALID_ARGUMENT` when `max_level` is not 0 or a `WASM_ECDS_LOG_*`
///   level (nothing changes then).
///
/// Thread-safe; process-wide: the latest call wins, for every cache.
///
/// # Safety
/// `callback` must stay callable, and `user_data` valid, from any thread, until logging is turned off or
/// the callback replaced.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_set_log_callback(
    callback: wasm_ecds_log_callback,
    max_level: i32,
    user_data: *mut c_void,
) -> i32 {
    guarded(ptr::null_mut(), || {
        log_bridge::set_callback(callback, max_level, user_data)
            .ok_or_else(|| Failure::invalid("max_level is not a WASM_ECDS_LOG_* level"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    thread_local! {
        static PANIC_NEXT_CALL: Cell<Option<&'static str>> = const { Cell::new(None) };
        static LOGGED_HERE: RefCell<Vec<(i32, String)>> = const { RefCell::new(Vec::new()) };
    }

    /// The test-only way to make the library panic: the next entry point called on this thread panics with
    /// `message` inside its guard.
    pub(super) fn panic_if_asked() {
        if let Some(message) = PANIC_NEXT_CALL.with(Cell::take) {
            panic!("{message}");
        }
    }

    unsafe extern "C" fn record_here(_: *mut c_void, level: i32, _: *const c_char, message: *const c_char) {
        let message = CStr::from_ptr(message).to_string_lossy().into_owned();
        LOGGED_HERE.with(|l| l.borrow_mut().push((level, message)));
    }

    fn take_reason(reason: *mut c_char) -> String {
        assert!(!reason.is_null(), "a reason was written");
        // SAFETY: a string from the library, freed here once.
        let text = unsafe { CStr::from_ptr(reason) }.to_string_lossy().into_owned();
        unsafe { wasm_ecds_string_free(reason) };
        text
    }

    fn open_cache(dir: &std::path::Path) -> *mut wasm_ecds_cache {
        let options = CString::new(format!(r#"{{"cache_dir": {:?}}}"#, dir.to_str().unwrap())).unwrap();
        let mut cache = ptr::null_mut();
        let status = unsafe { wasm_ecds_cache_new(options.as_ptr(), &mut cache, ptr::null_mut()) };
        assert_eq!(status, WASM_ECDS_OK);
        cache
    }

    #[test]
    fn a_panic_inside_a_call_is_an_internal_error_with_its_message_and_is_logged() {
        let _hooks = log_bridge::tests::GLOBAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        unsafe { wasm_ecds_set_log_callback(Some(record_here), WASM_ECDS_LOG_TRACE, ptr::null_mut()) };

        PANIC_NEXT_CALL.with(|p| p.set(Some("an injected bug")));
        let (mut removed, mut reason) = (7u64, ptr::null_mut());
        let status = unsafe { wasm_ecds_purge(cache, &mut removed, &mut reason) };

        unsafe { wasm_ecds_set_log_callback(None, 0, ptr::null_mut()) };
        assert_eq!(status, WASM_ECDS_INTERNAL_ERROR);
        assert_eq!(take_reason(reason), "internal error: an injected bug");
        assert_eq!(removed, 7, "out parameters are written only on success");
        let logged = LOGGED_HERE.with(RefCell::take);
        assert!(
            logged.iter().any(|(level, m)| *level == WASM_ECDS_LOG_ERROR && m.contains("an injected bug")),
            "{logged:?}"
        );

        let (mut removed, mut reason) = (7u64, ptr::null_mut());
        assert_eq!(unsafe { wasm_ecds_purge(cache, &mut removed, &mut reason) }, WASM_ECDS_OK, "still usable");
        assert_eq!((removed, reason), (0, ptr::null_mut()));
        unsafe { wasm_ecds_cache_free(cache) };
    }

    #[test]
    fn a_cache_dir_under_a_file_is_an_io_error_naming_the_path_and_the_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let wanted = file.join("cache");
        let options = CString::new(format!(r#"{{"cache_dir": {:?}}}"#, wanted.to_str().unwrap())).unwrap();
        let (mut cache, mut reason) = (ptr::null_mut(), ptr::null_mut());
        let status = unsafe { wasm_ecds_cache_new(options.as_ptr(), &mut cache, &mut reason) };
        assert_eq!(status, WASM_ECDS_IO_ERROR);
        assert!(cache.is_null());
        let reason = take_reason(reason);
        let os_error = std::fs::create_dir(&wanted).unwrap_err().to_string();
        assert_eq!(reason, format!("cache directory {}: {os_error}", wanted.display()));
    }

    #[test]
    fn a_bad_option_and_an_unreadable_ca_file_are_invalid_arguments_naming_the_key() {
        for (json, key) in [
            (r#"{"cache_dirr": "/tmp/x"}"#, "cache_dirr"),
            (r#"{"cache_dir": "/tmp/x", "ca_file": "/nonexistent/ca.pem"}"#, "ca_file"),
        ] {
            let options = CString::new(json).unwrap();
            let (mut cache, mut reason) = (ptr::null_mut(), ptr::null_mut());
            let status = unsafe { wasm_ecds_cache_new(options.as_ptr(), &mut cache, &mut reason) };
            assert_eq!(status, WASM_ECDS_INVALID_ARGUMENT, "{json}");
            assert!(cache.is_null());
            let reason = take_reason(reason);
            assert!(reason.contains(key), "{reason}");
        }
        let status = unsafe { wasm_ecds_cache_new(ptr::null(), ptr::null_mut(), ptr::null_mut()) };
        assert_eq!(status, WASM_ECDS_INVALID_ARGUMENT, "NULL out");
    }

    #[test]
    fn a_purge_that_cannot_write_the_cache_directory_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open_cache(dir.path());
        std::fs::remove_dir_all(dir.path()).unwrap();
        let (mut removed, mut reason) = (7u64, ptr::null_mut());
        let status = unsafe { wasm_ecds_purge(cache, &mut removed, &mut reason) };
        unsafe { wasm_ecds_cache_free(cache) };
        assert_eq!(status, WASM_ECDS_IO_ERROR);
        assert_eq!(removed, 7);
        let reason = take_reason(reason);
        let os_error = std::fs::read_dir(dir.path()).unwrap_err().to_string();
        let expected = format!("cache directory {}: {os_error}", dir.path().display());
        assert!(reason.starts_with(&expected), "{reason:?} does not start with {expected:?}");
    }

    /// A cache seeded read-only (e.g. into an image) opens. Run as root, as in some containers, the modes do
    /// not bind and this proves less.
    #[test]
    fn a_read_only_cache_dir_opens() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let seeded = dir.path().join("seeded");
        unsafe { wasm_ecds_cache_free(open_cache(&seeded)) };
        for d in [seeded.join("modules"), seeded.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        let cache = open_cache(&seeded);
        unsafe { wasm_ecds_cache_free(cache) };
        std::fs::set_permissions(&seeded, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
