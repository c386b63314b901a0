//! Timestamps for the per-call conversion duration and the lazy purge schedule.
//!
//! A repeated push is answered in about half a microsecond, and every call reads the clock twice:
//! `Instant::now()` (`clock_gettime`) costs about 25 ns each here, `rdtsc` about 10. Where the kernel itself
//! keeps time with the TSC (Linux on x86_64 with clocksource `tsc`: the kernel found it invariant and in step
//! across CPUs), a timestamp is one `rdtsc` scaled by a rate measured against the monotonic clock, from the
//! clock's origin to its first reading at least [`CALIBRATION`] later that pairs the two clocks tightly enough.
//! Nothing waits or spins for it (`minstant` spins 20 ms at load, `quanta` up to a second at first use); until
//! then, and everywhere else, a timestamp is `Instant`.

use std::time::{Duration, Instant};

/// Nanoseconds since the clock's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp(u64);

impl Stamp {
    /// Time from `earlier` to this stamp (zero if `earlier` is later: two CPUs may read a few ticks apart).
    pub fn since(self, earlier: Stamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Nanoseconds from the clock's origin.
    pub fn nanos(self) -> u64 {
        self.0
    }
}

/// How long after its origin a clock first tries to measure the TSC rate; it succeeds once the uncertainty of
/// the paired readings (tens of nanoseconds) is below [`RATE_TOLERANCE`] of the time since the origin.
#[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]
const CALIBRATION: Duration = Duration::from_millis(20);

/// Where Linux names the clocksource it keeps time with.
#[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]
const CLOCKSOURCE_FILE: &str = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/// 100 ppm: 100 ns on a 1 ms conversion.
#[cfg_attr(not(all(target_arch = "x86_64", target_os = "linux")), allow(dead_code))]
const RATE_TOLERANCE: f64 = 1e-4;

pub(crate) struct Clock {
    origin: Instant,
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    tsc: Option<tsc::Tsc>,
}

impl Clock {
    pub fn new() -> Clock {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some((tsc, origin)) = tsc::Tsc::start() {
            return Clock { origin, tsc: Some(tsc) };
        }
        Clock {
            origin: Instant::now(),
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            tsc: None,
        }
    }

    #[inline]
    pub fn now(&self) -> Stamp {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(tsc) = &self.tsc {
            return tsc.now(self.origin);
        }
        Stamp(nanos(self.origin.elapsed()))
    }

    /// Whether timestamps are now TSC readings (tests and diagnostics).
    #[cfg(test)]
    pub fn uses_tsc(&self) -> bool {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if let Some(tsc) = &self.tsc {
            return tsc.rate().is_some();
        }
        false
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tsc {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use once_cell::sync::Lazy;

    use super::{nanos, Stamp, CALIBRATION, CLOCKSOURCE_FILE, RATE_TOLERANCE};

    /// The kernel keeps time with the TSC: it checked that the TSC is invariant and synchronized across CPUs.
    static KERNEL_USES_TSC: Lazy<bool> =
        Lazy::new(|| std::fs::read_to_string(CLOCKSOURCE_FILE).is_ok_and(|s| s.trim() == "tsc"));

    pub(super) struct Tsc {
        /// The TSC at the clock's origin: the middle of two readings taken around it.
        origin_ticks: u64,
        /// Half the ticks between those two readings: how far `origin_ticks` may be off.
        origin_spread: u64,
        /// Nanoseconds per tick as `f64` bits; 0 until measured.
        nanos_per_tick: AtomicU64,
    }

    #[inline]
    fn ticks() -> u64 {
        // SAFETY: `rdtsc` exists on every x86_64 CPU and has no preconditions.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    /// The TSC around a reading of the monotonic clock: (middle, half the spread, the reading).
    fn paired() -> (u64, u64, Instant) {
        let before = ticks();
        let instant = Instant::now();
        let after = ticks().max(before);
        (before + (after - before) / 2, (after - before).div_ceil(2), instant)
    }

    impl Tsc {
        /// The TSC and the monotonic reading it is paired with, which becomes the clock's origin.
        pub(super) fn start() -> Option<(Tsc, Instant)> {
            if !*KERNEL_USES_TSC {
                return None;
            }
            // The tightest of three pairings: the first reading of a process can be slow.
            let (origin_ticks, origin_spread, origin) =
                (0..3).map(|_| paired()).min_by_key(|&(_, spread, _)| spread).expect("three pairings");
            Some((Tsc { origin_ticks, origin_spread, nanos_per_tick: AtomicU64::new(0) }, origin))
        }

        pub(super) fn rate(&self) -> Option<f64> {
            let rate = f64::from_bits(self.nanos_per_tick.load(Ordering::Relaxed));
            (rate > 0.0).then_some(rate)
        }

        #[inline]
        pub(super) fn now(&self, origin: Instant) -> Stamp {
            match self.rate() {
                Some(rate) => Stamp((ticks().saturating_sub(self.origin_ticks) as f64 * rate) as u64),
                None => self.calibrating(origin),
            }
        }

        /// A monotonic-clock stamp; measures the rate once the clock is old enough and the readings paired
        /// tightly enough (a thread preempted between them just tries again on its next call).
        #[cold]
        fn calibrating(&self, origin: Instant) -> Stamp {
            let (mid, spread, instant) = paired();
            let elapsed = nanos(instant.duration_since(origin));
            if elapsed >= nanos(CALIBRATION) && mid > self.origin_ticks {
                let ticks = mid - self.origin_ticks;
                let rate = elapsed as f64 / ticks as f64;
                // A TSC between 100 MHz and 10 GHz; anything else is not a clock to trust.
                if (spread + self.origin_spread) as f64 <= ticks as f64 * RATE_TOLERANCE && (0.1..=10.0).contains(&rate)
                {
                    self.nanos_per_tick.store(rate.to_bits(), Ordering::Relaxed);
                }
            }
            Stamp(elapsed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_measure_what_the_monotonic_clock_measures() {
        let clock = Clock::new();
        let a = clock.now();
        std::thread::sleep(Duration::from_millis(25));
        // Past the calibration point: where the TSC is used, the rate is measured now.
        let b = clock.now();
        assert!(b.since(a) >= Duration::from_millis(25), "{:?}", b.since(a));
        for _ in 0..3 {
            let (start, instant) = (clock.now(), Instant::now());
            std::thread::sleep(Duration::from_millis(30));
            let (measured, reference) = (clock.now().since(start), instant.elapsed());
            let diff = measured.abs_diff(reference);
            assert!(diff < Duration::from_micros(200), "clock {measured:?} vs Instant {reference:?}");
        }
        assert!(clock.now().nanos() >= 115_000_000);
    }

    #[test]
    fn the_tsc_is_used_exactly_where_the_kernel_keeps_time_with_it() {
        let clock = Clock::new();
        std::thread::sleep(CALIBRATION);
        // A pairing spoilt by an interrupt or a slow first reading is retried on the next reading.
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(5));
            clock.now();
            if clock.uses_tsc() {
                break;
            }
        }
        let kernel = std::fs::read_to_string(CLOCKSOURCE_FILE).map(|s| s.trim().to_owned()).unwrap_or_default();
        let expected = cfg!(all(target_arch = "x86_64", target_os = "linux")) && kernel == "tsc";
        assert_eq!(clock.uses_tsc(), expected, "kernel clocksource {kernel:?}");
    }

    #[test]
    fn a_stamp_before_the_earlier_one_gives_zero() {
        assert_eq!(Stamp(5).since(Stamp(9)), Duration::ZERO);
        assert_eq!(Stamp(9).since(Stamp(5)), Duration::from_nanos(4));
    }
}
