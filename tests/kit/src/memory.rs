//! The resident memory of this process (Linux `/proc/self/status`), for the tests and benchmarks that bound
//! what one conversion adds to the process.

/// A `kB` field of `/proc/self/status` (`"VmRSS:"`, `"VmHWM:"`), in KiB.
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line =
        status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|e| panic!("{field}: {e}"))
}

/// Gives the allocator's free memory back to the system (glibc `malloc_trim`, which also releases free pages
/// inside the heap), so that what the caller freed cannot hide the growth measured next.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only returns free memory of the allocator to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Runs `f` from an idle process: returns the resident KiB right before it, the peak resident KiB while it
/// ran, and what it returned. Free memory goes back to the system first, then the peak is reset to the
/// resident size (proc(5), `/proc/self/clear_refs` "5"), so the difference is what `f` added.
pub fn peak_of<T>(f: impl FnOnce() -> T) -> (u64, u64, T) {
    release_free_memory();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (/proc/self/clear_refs)");
    let idle = status_kib("VmRSS:");
    let out = f();
    (idle, status_kib("VmHWM:"), out)
}
