//! Routes `log` records to a callback the host registers (Go, Python, C++ show them their own way). Without a
//! callback nothing is printed: the library never writes to stdout or stderr.

use std::ffi::{c_char, c_void, CString};
use std::sync::RwLock;

use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::ffi::wasm_ecds_log_callback;

struct Sink {
    callback: unsafe extern "C" fn(*mut c_void, i32, *const c_char, *const c_char),
    user_data: *mut c_void,
}

// SAFETY: the host promised (in `wasm_ecds_set_log_callback`) that the callback may be called from any
// thread with this user_data.
unsafe impl Send for Sink {}
unsafe impl Sync for Sink {}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);

struct Bridge;

static BRIDGE: Bridge = Bridge;

impl Log for Bridge {
    /// The library's own records at the host's level; its dependencies' (ureq, rustls) only at WARN and
    /// above: their debug and trace output dumps raw HTTP traffic, headers included, which must not reach
    /// the host's logs.
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
            && (metadata.target().starts_with(env!("CARGO_CRATE_NAME")) || metadata.level() <= Level::Warn)
    }

    /// `record.level() as i32` is the C level: log::Level is Error = 1 ... Trace = 5, as WASM_ECDS_LOG_*.
    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Format before taking the lock, so a slow Display never holds it; the callback itself runs under
        // the read lock only, which blocks nothing but a concurrent re-registration.
        let target = CString::new(record.target().replace('\0', " ")).unwrap_or_default();
        let message = CString::new(record.args().to_string().replace('\0', " ")).unwrap_or_default();
        let guard = SINK.read().unwrap_or_else(|e| e.into_inner());
        if let Some(sink) = guard.as_ref() {
            // SAFETY: see `Sink`; the strings live until the call returns.
            unsafe { (sink.callback)(sink.user_data, record.level() as i32, target.as_ptr(), message.as_ptr()) };
        }
    }

    fn flush(&self) {}
}

/// Installs (or removes, with `None`) the host's callback. `max_level` 0 turns logging off.
pub(crate) fn set_callback(callback: wasm_ecds_log_callback, max_level: i32, user_data: *mut c_void) {
    // Installing the logger fails only if another logger is installed in this process (e.g. a Rust host
    // that uses `log` itself); then records go to that logger and the callback stays unused.
    let _ = log::set_logger(&BRIDGE);
    let filter = match (callback.is_some(), max_level) {
        (false, _) | (_, 0) => LevelFilter::Off,
        (_, 1) => LevelFilter::Error,
        (_, 2) => LevelFilter::Warn,
        (_, 3) => LevelFilter::Info,
        (_, 4) => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = callback.map(|callback| Sink { callback, user_data });
    log::set_max_level(filter);
}

/// Routes panic messages to the log callback instead of stderr. Installed on the first call through the
/// C ABI: its hosts (Go, Python, C++) have no Rust panic hook of their own, and the library must never
/// write to their stderr; the panic itself is caught and returned as `WASM_ECDS_INTERNAL_ERROR`.
pub(crate) fn quiet_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| std::panic::set_hook(Box::new(|info| log::error!("internal error: {info}"))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_records_below_warn_are_withheld() {
        log::set_max_level(LevelFilter::Trace);
        let ours = Metadata::builder().level(Level::Trace).target("wasm_ecds::store").build();
        let ureq_debug = Metadata::builder().level(Level::Debug).target("ureq::unversioned::transport").build();
        let ureq_warn = Metadata::builder().level(Level::Warn).target("ureq::pool").build();
        assert!(BRIDGE.enabled(&ours));
        assert!(!BRIDGE.enabled(&ureq_debug));
        assert!(BRIDGE.enabled(&ureq_warn));
    }
}
