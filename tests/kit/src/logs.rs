//! Captures what the library logs (through the `log` crate) in memory, so tests can assert that a secret
//! never reaches a log line. The logger is process-wide: [`capture`] installs it once (at `Trace`) and every
//! test of the binary shares it, so assertions look for their own unique strings.

use std::sync::Mutex;

struct Capture {
    lines: Mutex<Vec<String>>,
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        self.lines.lock().unwrap().push(line);
    }

    fn flush(&self) {}
}

static CAPTURE: Capture = Capture { lines: Mutex::new(Vec::new()) };

/// Installs the capturing logger if no logger is installed yet; true if the capture is the logger.
pub fn capture() -> bool {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
    std::ptr::eq(log::logger() as *const dyn log::Log as *const (), &CAPTURE as *const Capture as *const ())
}

/// Every line logged since [`capture`] was first called, in order.
pub fn lines() -> Vec<String> {
    CAPTURE.lines.lock().unwrap().clone()
}
