//! The Istio agent's Wasm counters, one set per cache handle, and their Prometheus text exposition.
//! Lock-free atomics: counting must never block a conversion or take a lock that a caller might hold.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// `istio_agent_wasm_remote_fetch_count{result}`: one per network fetch, however many attempts it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchResult {
    Success,
    DownloadFailure,
    ManifestFailure,
    ChecksumMismatched,
    FetchFailure,
}

impl FetchResult {
    const ALL: [FetchResult; 5] = [
        FetchResult::Success,
        FetchResult::DownloadFailure,
        FetchResult::ManifestFailure,
        FetchResult::ChecksumMismatched,
        FetchResult::FetchFailure,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FetchResult::Success => "success",
            FetchResult::DownloadFailure => "download_failure",
            FetchResult::ManifestFailure => "manifest_failure",
            FetchResult::ChecksumMismatched => "checksum_mismatched",
            FetchResult::FetchFailure => "fetch_failure",
        }
    }
}

/// `istio_agent_wasm_config_conversion_count{result}`: one per ECDS resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversionResult {
    Success,
    NoRemoteLoad,
    MarshalFailure,
    UnmarshalFailure,
    FetchFailure,
    MissRemoteFetchHint,
}

impl ConversionResult {
    const ALL: [ConversionResult; 6] = [
        ConversionResult::Success,
        ConversionResult::NoRemoteLoad,
        ConversionResult::MarshalFailure,
        ConversionResult::UnmarshalFailure,
        ConversionResult::FetchFailure,
        ConversionResult::MissRemoteFetchHint,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConversionResult::Success => "success",
            ConversionResult::NoRemoteLoad => "no_remote_load",
            ConversionResult::MarshalFailure => "marshal_failure",
            ConversionResult::UnmarshalFailure => "unmarshal_failure",
            ConversionResult::FetchFailure => "fetch_failure",
            ConversionResult::MissRemoteFetchHint => "miss_remote_fetch_hint",
        }
    }
}

/// Upper bounds (milliseconds) of `istio_agent_wasm_config_conversion_duration`, as in Istio.
const DURATION_BUCKETS_MS: [u64; 15] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384];

#[derive(Debug, Default)]
pub struct Metrics {
    lookup_hit: AtomicU64,
    lookup_miss: AtomicU64,
    cache_entries: AtomicU64,
    fetch: [AtomicU64; 5],
    conversion: [AtomicU64; 6],
    /// Non-cumulative per-bucket counts; the last slot is +Inf.
    duration_buckets: [AtomicU64; 16],
    /// Sum of observed durations in nanoseconds (integer, so it can be added atomically).
    duration_sum_nanos: AtomicU64,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn record_lookup(&self, hit: bool) {
        let counter = if hit { &self.lookup_hit } else { &self.lookup_miss };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_cache_entries(&self, entries: usize) {
        self.cache_entries.store(entries as u64, Ordering::Relaxed);
    }

    pub fn record_fetch(&self, result: FetchResult) {
        self.fetch[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_conversion(&self, result: ConversionResult) {
        self.conversion[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One observation per convert call, in milliseconds.
    pub fn observe_conversion_duration(&self, elapsed: Duration) {
        let nanos = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let slot =
            DURATION_BUCKETS_MS.iter().position(|&le| nanos <= le * 1_000_000).unwrap_or(DURATION_BUCKETS_MS.len());
        self.duration_buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn lookups(&self, hit: bool) -> u64 {
        if hit { &self.lookup_hit } else { &self.lookup_miss }.load(Ordering::Relaxed)
    }

    pub fn fetches(&self, result: FetchResult) -> u64 {
        self.fetch[result as usize].load(Ordering::Relaxed)
    }

    pub fn conversions(&self, result: ConversionResult) -> u64 {
        self.conversion[result as usize].load(Ordering::Relaxed)
    }

    pub fn cache_entries(&self) -> u64 {
        self.cache_entries.load(Ordering::Relaxed)
    }

    pub fn conversion_duration_count(&self) -> u64 {
        self.duration_buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        out.push_str("# HELP istio_agent_wasm_cache_lookup_count number of Wasm remote fetch cache lookups.\n");
        out.push_str("# TYPE istio_agent_wasm_cache_lookup_count counter\n");
        let _ = writeln!(out, "istio_agent_wasm_cache_lookup_count{{hit=\"true\"}} {}", load(&self.lookup_hit));
        let _ = writeln!(out, "istio_agent_wasm_cache_lookup_count{{hit=\"false\"}} {}", load(&self.lookup_miss));

        out.push_str("# HELP istio_agent_wasm_cache_entries number of Wasm remote fetch cache entries.\n");
        out.push_str("# TYPE istio_agent_wasm_cache_entries gauge\n");
        let _ = writeln!(out, "istio_agent_wasm_cache_entries {}", load(&self.cache_entries));

        out.push_str("# HELP istio_agent_wasm_remote_fetch_count number of Wasm remote fetches and results, including success, download failure, and checksum mismatch.\n");
        out.push_str("# TYPE istio_agent_wasm_remote_fetch_count counter\n");
        for r in FetchResult::ALL {
            let _ = writeln!(
                out,
                "istio_agent_wasm_remote_fetch_count{{result=\"{}\"}} {}",
                r.label(),
                load(&self.fetch[r as usize])
            );
        }

        out.push_str("# HELP istio_agent_wasm_config_conversion_count number of Wasm config conversion count and results, including success, no remote load, marshal failure, remote fetch failure, and miss remote fetch hint.\n");
        out.push_str("# TYPE istio_agent_wasm_config_conversion_count counter\n");
        for r in ConversionResult::ALL {
            let _ = writeln!(
                out,
                "istio_agent_wasm_config_conversion_count{{result=\"{}\"}} {}",
                r.label(),
                load(&self.conversion[r as usize])
            );
        }

        out.push_str("# HELP istio_agent_wasm_config_conversion_duration Total time in milliseconds istio-agent spends on converting remote load in Wasm config.\n");
        out.push_str("# TYPE istio_agent_wasm_config_conversion_duration histogram\n");
        let mut cumulative = 0u64;
        for (i, le) in DURATION_BUCKETS_MS.iter().enumerate() {
            cumulative += load(&self.duration_buckets[i]);
            let _ = writeln!(out, "istio_agent_wasm_config_conversion_duration_bucket{{le=\"{le}\"}} {cumulative}");
        }
        cumulative += load(&self.duration_buckets[DURATION_BUCKETS_MS.len()]);
        let _ = writeln!(out, "istio_agent_wasm_config_conversion_duration_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum_ms = load(&self.duration_sum_nanos) as f64 / 1e6;
        let _ = writeln!(out, "istio_agent_wasm_config_conversion_duration_sum {sum_ms}");
        // The count line uses the bucket total so that +Inf == _count holds even while observations race.
        let _ = writeln!(out, "istio_agent_wasm_config_conversion_duration_count {cumulative}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inf_equals_count() {
        let m = Metrics::new();
        m.observe_conversion_duration(Duration::from_micros(500));
        m.observe_conversion_duration(Duration::from_millis(3));
        m.observe_conversion_duration(Duration::from_secs(20));
        let text = m.render();
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_bucket{le=\"1\"} 1\n"), "{text}");
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_bucket{le=\"4\"} 2\n"));
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_bucket{le=\"16384\"} 2\n"));
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_count 3\n"));
        assert!(text.contains("istio_agent_wasm_config_conversion_duration_sum 20003.5\n"), "{text}");
    }

    #[test]
    fn every_label_value_is_exposed_from_the_start() {
        let text = Metrics::new().render();
        for r in FetchResult::ALL {
            assert!(text.contains(&format!("istio_agent_wasm_remote_fetch_count{{result=\"{}\"}} 0", r.label())));
        }
        for r in ConversionResult::ALL {
            assert!(text.contains(&format!("istio_agent_wasm_config_conversion_count{{result=\"{}\"}} 0", r.label())));
        }
        assert!(text.contains("istio_agent_wasm_cache_lookup_count{hit=\"true\"} 0"));
        assert!(text.contains("# TYPE istio_agent_wasm_cache_entries gauge"));
    }

    #[test]
    fn counters_count() {
        let m = Metrics::new();
        m.record_fetch(FetchResult::ChecksumMismatched);
        m.record_conversion(ConversionResult::MissRemoteFetchHint);
        m.record_lookup(false);
        m.set_cache_entries(7);
        let text = m.render();
        assert!(text.contains("istio_agent_wasm_remote_fetch_count{result=\"checksum_mismatched\"} 1"));
        assert!(text.contains("istio_agent_wasm_config_conversion_count{result=\"miss_remote_fetch_hint\"} 1"));
        assert!(text.contains("istio_agent_wasm_cache_lookup_count{hit=\"false\"} 1"));
        assert!(text.contains("istio_agent_wasm_cache_entries 7"));
    }
}
