//! What the library says to its host: `log` records go to a callback the host registers (Go, Python, C++
//! show them their own way), and the panic hook keeps the library's own (caught) panics off stderr. Without
//! a callback nothing is printed: the library never writes to stdout or stderr. The callback's C type and
//! levels are declared here (the header takes them from here); the entry points are `ffi`'s, which uses this
//! module, never the reverse.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::marker::PhantomData;
use std::panic::{self, PanicHookInfo};
use std::sync::{Once, RwLock};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Log level of a record: an error. The levels are ordered: a higher number is more verbose.
pub const WASM_ECDS_LOG_ERROR: i32 = 1;
/// Log level of a record: a warning (e.g. a rejected response).
pub const WASM_ECDS_LOG_WARN: i32 = 2;
/// Log level of a record: information (e.g. a module downloaded).
pub const WASM_ECDS_LOG_INFO: i32 = 3;
/// Log level of a record: debugging detail (e.g. one line per conversion).
pub const WASM_ECDS_LOG_DEBUG: i32 = 4;
/// Log level of a record: tracing detail.
pub const WASM_ECDS_LOG_TRACE: i32 = 5;

/// Receives log records: `level` is one of `WASM_ECDS_LOG_*`; `target` (the Rust module that logged) and
/// `message` are NUL-terminated and valid only during the call; `user_data` is what was registered.
/// Called on whichever thread logs, possibly on several threads at once, never while the library holds a
/// lock on its data. It must not call `wasm_ecds_set_log_callback`.
#[allow(non_camel_case_types)]
pub type wasm_ecds_log_callback =
    Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, target: *const c_char, message: *const c_char)>;

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
            unsafe { (sink.callback)(sink.user_data, c_level(record.level()), target.as_ptr(), message.as_ptr()) };
        }
    }

    fn flush(&self) {}
}

fn c_level(level: Level) -> i32 {
    match level {
        Level::Error => WASM_ECDS_LOG_ERROR,
        Level::Warn => WASM_ECDS_LOG_WARN,
        Level::Info => WASM_ECDS_LOG_INFO,
        Level::Debug => WASM_ECDS_LOG_DEBUG,
        Level::Trace => WASM_ECDS_LOG_TRACE,
    }
}

/// Installs (or removes, with `None`) the host's callback for records at `max_level` (a `WASM_ECDS_LOG_*`
/// level; 0 is none) and more severe. `None` when `max_level` is not a level.
pub(crate) fn set_callback(callback: wasm_ecds_log_callback, max_level: i32, user_data: *mut c_void) -> Option<()> {
    let filter = match max_level {
        0 => LevelFilter::Off,
        WASM_ECDS_LOG_ERROR => LevelFilter::Error,
        WASM_ECDS_LOG_WARN => LevelFilter::Warn,
        WASM_ECDS_LOG_INFO => LevelFilter::Info,
        WASM_ECDS_LOG_DEBUG => LevelFilter::Debug,
        WASM_ECDS_LOG_TRACE => LevelFilter::Trace,
        _ => return None,
    };
    // Installing the logger fails only if another logger is installed in this process (e.g. a Rust host
    // that uses `log` itself); then records go to that logger and the callback stays unused.
    let _ = log::set_logger(&BRIDGE);
    let filter = if callback.is_some() { filter } else { LevelFilter::Off };
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = callback.map(|callback| Sink { callback, user_data });
    log::set_max_level(filter);
    Some(())
}

thread_local! {
    /// How many library calls this thread is inside (more than one when a host callback calls back in).
    static CALL_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Prefix of the names of the threads the library starts for the length of a call (parallel fetches).
const THREAD_NAME_PREFIX: &str = "wasm-ecds-";

/// Marks the current thread as inside a library call for as long as it lives: a panic meanwhile is the
/// library's own (the caller catches it and returns it as an error), so the panic hook routes its message to
/// the log callback instead of the host's hook. Created by every C entry point.
pub(crate) struct LibraryCall {
    /// Bound to its thread: the mark is per thread.
    _not_send: PhantomData<*const ()>,
}

impl LibraryCall {
    pub(crate) fn enter() -> LibraryCall {
        install_panic_hook();
        CALL_DEPTH.with(|d| d.set(d.get() + 1));
        LibraryCall { _not_send: PhantomData }
    }
}

impl Drop for LibraryCall {
    fn drop(&mut self) {
        CALL_DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Whether a panic on this thread now is the library's own: inside a library call, or on one of the
/// library's threads (whose panic reaches the call that started it).
fn panicking_inside_library() -> bool {
    CALL_DEPTH.with(Cell::get) > 0
        || std::thread::current().name().is_some_and(|name| name.starts_with(THREAD_NAME_PREFIX))
}

/// Installs the library's panic hook once per process (on the first call through the C ABI). Its hosts (Go,
/// Python, C++) rarely have a Rust panic hook, and the library must never write to their stderr; a Rust
/// host that has one keeps it for every panic that is not the library's.
fn install_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(chain_panic_hook);
}

/// Puts the library's hook in front of the current one: the library's own panics go to the log callback
/// (the panic itself is caught and returned as `WASM_ECDS_INTERNAL_ERROR`), all others to the hook that was
/// there before (the default one prints to stderr).
fn chain_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
        if panicking_inside_library() {
            log::error!("internal error: {info}");
        } else {
            previous(info);
        }
    }));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Held by the tests that change the process-wide panic hook, log callback or log level, and by those
    /// that depend on them (tests run in parallel).
    pub(crate) static GLOBAL_STATE: Mutex<()> = Mutex::new(());

    #[test]
    fn dependency_records_below_warn_are_withheld() {
        let _global = GLOBAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        log::set_max_level(LevelFilter::Trace);
        let ours = Metadata::builder().level(Level::Trace).target("wasm_ecds::store").build();
        let ureq_debug = Metadata::builder().level(Level::Debug).target("ureq::unversioned::transport").build();
        let ureq_warn = Metadata::builder().level(Level::Warn).target("ureq::pool").build();
        assert!(BRIDGE.enabled(&ours));
        assert!(!BRIDGE.enabled(&ureq_debug));
        assert!(BRIDGE.enabled(&ureq_warn));
    }

    #[test]
    fn an_unknown_level_is_refused() {
        assert!(set_callback(None, 6, std::ptr::null_mut()).is_none());
        assert!(set_callback(None, -1, std::ptr::null_mut()).is_none());
    }

    /// A host's own hook keeps seeing the host's panics once the library's hook is in front of it, and never
    /// sees the library's. (Hooks are process-wide and tests run in parallel: the host hook counts only the
    /// panics this test raises, by their message.)
    #[test]
    fn the_hosts_panic_hook_sees_its_own_panics_and_not_the_librarys() {
        let _global = GLOBAL_STATE.lock().unwrap_or_else(|e| e.into_inner());
        static SEEN_BY_HOST: Mutex<Vec<String>> = Mutex::new(Vec::new());
        const MARK: &str = "panic-hook-test:";
        let before = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let message = info.payload().downcast_ref::<&str>().copied().unwrap_or_default();
            if message.starts_with(MARK) {
                SEEN_BY_HOST.lock().unwrap().push(message.to_owned());
            } else {
                before(info);
            }
        }));
        chain_panic_hook();

        let host = panic::catch_unwind(|| panic!("panic-hook-test: the host's"));
        let library = panic::catch_unwind(|| {
            let _call = LibraryCall::enter();
            panic!("panic-hook-test: the library's")
        });
        let library_thread = std::thread::Builder::new()
            .name(format!("{THREAD_NAME_PREFIX}test"))
            .spawn(|| panic!("panic-hook-test: a library thread's"))
            .unwrap()
            .join();

        assert!(host.is_err() && library.is_err() && library_thread.is_err());
        assert_eq!(*SEEN_BY_HOST.lock().unwrap(), ["panic-hook-test: the host's"]);
        assert_eq!(CALL_DEPTH.with(Cell::get), 0, "the mark is gone once the call is over");
    }
}
