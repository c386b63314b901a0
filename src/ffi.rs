//! The C ABI, and only that: opaque handle, status codes, buffers and strings. Every entry point checks its
//! pointers and catches panics (a library inside the agent must never take its host down); the logic lives
//! in the Rust modules. `include/wasm_ecds.h` is generated from this file by cbindgen.
//!
//! Conventions: inputs are `(const uint8_t *, size_t)` because protobuf bytes contain zeros; `(NULL, 0)` is
//! empty, `(NULL, n > 0)` is `WASM_ECDS_INVALID_ARGUMENT`. Outputs are written only on success (`*out`), or
//! with the reason on failure (`*reason`). Memory the library returns is freed only with
//! `wasm_ecds_bytes_free` / `wasm_ecds_string_free`.

#![allow(non_camel_case_types)]
// The safety contract of every function is its `# Safety` section; clippy would have them all `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use crate::{log_bridge, Cache, Options};

/// Success: the output parameter holds the result.
pub const WASM_ECDS_OK: i32 = 0;
/// The response must not reach Envoy: `*reason` holds the message for the NACK's `error_detail`.
pub const WASM_ECDS_REJECTED: i32 = 1;
/// The caller broke the contract (NULL pointer, invalid UTF-8, ...): `*reason` says which.
pub const WASM_ECDS_INVALID_ARGUMENT: i32 = -1;
/// A bug inside the library (a caught panic): `*reason` says what; the cache is still usable.
pub const WASM_ECDS_INTERNAL_ERROR: i32 = -2;

/// `log` levels passed to the log callback.
pub const WASM_ECDS_LOG_ERROR: i32 = 1;
pub const WASM_ECDS_LOG_WARN: i32 = 2;
pub const WASM_ECDS_LOG_INFO: i32 = 3;
pub const WASM_ECDS_LOG_DEBUG: i32 = 4;
pub const WASM_ECDS_LOG_TRACE: i32 = 5;

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

/// Receives log records: `level` is one of `WASM_ECDS_LOG_*`; `target` and `message` are NUL-terminated and
/// valid only during the call. Called on whichever thread logs, never while the library holds a lock; it
/// must not call back into the library's log functions.
pub type wasm_ecds_log_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, target: *const c_char, message: *const c_char)>;

static VERSION_CSTR: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
    Ok(s) => s,
    Err(_) => panic!("version contains NUL"),
};

/// Runs `body`, turning a panic into `WASM_ECDS_INTERNAL_ERROR` with the panic's message as reason.
fn guarded(reason: *mut *mut c_char, body: impl FnOnce() -> Result<i32, (i32, String)>) -> i32 {
    log_bridge::quiet_panics();
    let outcome = catch_unwind(AssertUnwindSafe(body)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err((WASM_ECDS_INTERNAL_ERROR, format!("internal error: {what}")))
    });
    match outcome {
        Ok(status) => status,
        Err((status, message)) => {
            set_string(reason, &message);
            status
        }
    }
}

fn invalid(message: &str) -> (i32, String) {
    (WASM_ECDS_INVALID_ARGUMENT, message.to_owned())
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
unsafe fn input<'a>(data: *const u8, len: usize, name: &str) -> Result<&'a [u8], (i32, String)> {
    if data.is_null() {
        return if len == 0 { Ok(&[]) } else { Err(invalid(&format!("{name} is NULL with length {len}"))) };
    }
    Ok(std::slice::from_raw_parts(data, len))
}

/// # Safety
/// `s` must be NULL or a NUL-terminated string.
unsafe fn input_str<'a>(s: *const c_char, name: &str) -> Result<&'a str, (i32, String)> {
    if s.is_null() {
        return Err(invalid(&format!("{name} is NULL")));
    }
    CStr::from_ptr(s).to_str().map_err(|_| invalid(&format!("{name} is not valid UTF-8")))
}

fn into_bytes(v: Vec<u8>) -> wasm_ecds_bytes {
    if v.is_empty() {
        return wasm_ecds_bytes { data: ptr::null_mut(), len: 0 };
    }
    let boxed = v.into_boxed_slice();
    let len = boxed.len();
    wasm_ecds_bytes { data: Box::into_raw(boxed) as *mut u8, len }
}

/// The library version, e.g. "0.1.0". Static; never free it.
#[no_mangle]
pub extern "C" fn wasm_ecds_version() -> *const c_char {
    VERSION_CSTR.as_ptr()
}

/// Opens a cache. `options_json` is a JSON object of options (NULL or "{}" for defaults); unknown keys and
/// bad values are errors that name them. Environment fallbacks are read now.
///
/// Returns the cache, or NULL with `*error` set (if `error` is not NULL) to a message the caller frees with
/// `wasm_ecds_string_free`. Free the cache with `wasm_ecds_cache_free`.
///
/// # Safety
/// `options_json` is NULL or a NUL-terminated string; `error` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_cache_new(
    options_json: *const c_char,
    error: *mut *mut c_char,
) -> *mut wasm_ecds_cache {
    let mut handle: *mut wasm_ecds_cache = ptr::null_mut();
    guarded(error, || {
        let json = if options_json.is_null() { "" } else { input_str(options_json, "options_json")? };
        let options = Options::from_json(json).map_err(|e| invalid(&e.to_string()))?;
        let cache = Cache::new(options).map_err(|e| invalid(&e.to_string()))?;
        handle = Box::into_raw(Box::new(wasm_ecds_cache { cache }));
        Ok(WASM_ECDS_OK)
    });
    handle
}

/// Frees a cache. NULL is fine. No other call may use `cache` during or after this one. Modules stay on
/// disk for the next process.
///
/// # Safety
/// `cache` is NULL or a pointer from `wasm_ecds_cache_new` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_cache_free(cache: *mut wasm_ecds_cache) {
    if !cache.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| drop(Box::from_raw(cache))));
    }
}

type ConvertFn = fn(&Cache, &[u8]) -> Result<Vec<u8>, crate::Rejection>;

unsafe fn convert_with(
    convert: ConvertFn,
    cache: *mut wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    guarded(reason, || {
        let cache = cache.as_ref().ok_or_else(|| invalid("cache is NULL"))?;
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let response = input(response, response_len, "response")?;
        match convert(&cache.cache, response) {
            Ok(bytes) => {
                *out = into_bytes(bytes);
                Ok(WASM_ECDS_OK)
            }
            Err(rejection) => Err((WASM_ECDS_REJECTED, rejection.reason)),
        }
    })
}

/// Converts a serialized `envoy.service.discovery.v3.DiscoveryResponse`.
///
/// - `WASM_ECDS_OK`: `*out` holds the response to forward to Envoy (free with `wasm_ecds_bytes_free`).
/// - `WASM_ECDS_REJECTED`: `*reason` holds the message for the NACK's `error_detail`; forward nothing.
/// - negative: a caller error or an internal error, with `*reason` set.
///
/// `reason` may be NULL when the caller does not want it; otherwise free it with `wasm_ecds_string_free`.
/// Blocks until every module is fetched or has failed. Thread-safe.
///
/// # Safety
/// `cache` is a live cache; `response` is NULL or valid for `response_len` bytes; `out` is valid for a
/// write; `reason` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_convert(
    cache: *mut wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    convert_with(Cache::convert, cache, response, response_len, out, reason)
}

/// As `wasm_ecds_convert`, for a serialized `envoy.service.discovery.v3.DeltaDiscoveryResponse`. Removed
/// resource names pass through unchanged.
///
/// # Safety
/// As `wasm_ecds_convert`.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_convert_delta(
    cache: *mut wasm_ecds_cache,
    response: *const u8,
    response_len: usize,
    out: *mut wasm_ecds_bytes,
    reason: *mut *mut c_char,
) -> i32 {
    convert_with(Cache::convert_delta, cache, response, response_len, out, reason)
}

/// Runs `build` under the panic guard and stores its bytes in `*out` (which must not be NULL).
///
/// # Safety
/// `out` is NULL or valid for a write.
unsafe fn build_into(out: *mut wasm_ecds_bytes, build: impl FnOnce() -> Result<Vec<u8>, (i32, String)>) -> i32 {
    guarded(ptr::null_mut(), || {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        *out = into_bytes(build()?);
        Ok(WASM_ECDS_OK)
    })
}

/// Builds the serialized `DiscoveryRequest` that NACKs a rejected `DiscoveryResponse`: the response's
/// `type_url`, `response_nonce` = its nonce, `version_info` = `last_acked_version`, and
/// `error_detail { code: 13, message: reason }`. Needs no cache.
///
/// `WASM_ECDS_OK` with `*out` set (free with `wasm_ecds_bytes_free`), or `WASM_ECDS_INVALID_ARGUMENT` when a
/// pointer is NULL, a string is not UTF-8 or the response does not parse.
///
/// # Safety
/// `response` is NULL or valid for `response_len` bytes; the strings are NUL-terminated; `out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_nack(
    response: *const u8,
    response_len: usize,
    last_acked_version: *const c_char,
    reason: *const c_char,
    out: *mut wasm_ecds_bytes,
) -> i32 {
    build_into(out, || {
        let response = input(response, response_len, "response")?;
        let version = input_str(last_acked_version, "last_acked_version")?;
        let reason = input_str(reason, "reason")?;
        crate::nack(response, version, reason).map_err(|e| invalid(&e.to_string()))
    })
}

/// Builds the serialized `DeltaDiscoveryRequest` that NACKs a rejected `DeltaDiscoveryResponse`: its
/// `type_url`, `response_nonce` = its nonce, `error_detail { code: 13, message: reason }`.
///
/// # Safety
/// As `wasm_ecds_nack`.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_nack_delta(
    response: *const u8,
    response_len: usize,
    reason: *const c_char,
    out: *mut wasm_ecds_bytes,
) -> i32 {
    build_into(out, || {
        let response = input(response, response_len, "response")?;
        let reason = input_str(reason, "reason")?;
        crate::nack_delta(response, reason).map_err(|e| invalid(&e.to_string()))
    })
}

/// The cache's counters in Prometheus text exposition format (with `# HELP` and `# TYPE`). Free with
/// `wasm_ecds_string_free`. NULL if `cache` is NULL. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_metrics(cache: *const wasm_ecds_cache) -> *mut c_char {
    let mut text: *mut c_char = ptr::null_mut();
    guarded(ptr::null_mut(), || {
        let cache = cache.as_ref().ok_or_else(|| invalid("cache is NULL"))?;
        text = into_c_string(&cache.cache.metrics_text());
        Ok(WASM_ECDS_OK)
    });
    text
}

/// Purges now: deletes modules unused for longer than the expiry, except those the latest converted ECDS
/// state references. Returns the number of modules removed, or a negative status. Thread-safe.
///
/// # Safety
/// `cache` is NULL or a live cache.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_purge(cache: *mut wasm_ecds_cache) -> i64 {
    let mut removed: i64 = 0;
    let status = guarded(ptr::null_mut(), || {
        let cache = cache.as_ref().ok_or_else(|| invalid("cache is NULL"))?;
        let n = cache.cache.purge().map_err(|e| (WASM_ECDS_INTERNAL_ERROR, e.to_string()))?;
        removed = n as i64;
        Ok(WASM_ECDS_OK)
    });
    if status == WASM_ECDS_OK {
        removed
    } else {
        i64::from(status)
    }
}

/// Frees bytes returned by the library. `{NULL, 0}` is fine. Free each exactly once.
///
/// # Safety
/// `bytes` was returned by this library and not yet freed.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_bytes_free(bytes: wasm_ecds_bytes) {
    if !bytes.data.is_null() {
        drop(Box::from_raw(ptr::slice_from_raw_parts_mut(bytes.data, bytes.len)));
    }
}

/// Frees a string returned by the library. NULL is fine.
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
/// `callback`, with `user_data` passed back as is. NULL `callback` turns logging off (the default: the
/// library never prints). Process-wide; the latest call wins.
///
/// # Safety
/// `callback` must stay callable, and `user_data` valid, until logging is turned off or replaced.
#[no_mangle]
pub unsafe extern "C" fn wasm_ecds_set_log_callback(
    callback: wasm_ecds_log_callback,
    max_level: i32,
    user_data: *mut c_void,
) -> i32 {
    guarded(ptr::null_mut(), || {
        if !(0..=WASM_ECDS_LOG_TRACE).contains(&max_level) {
            return Err(invalid("max_level is not a WASM_ECDS_LOG_* level"));
        }
        log_bridge::set_callback(callback, max_level, user_data);
        Ok(WASM_ECDS_OK)
    })
}
