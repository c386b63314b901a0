//! In-process timing: warm-up, calibration to samples of a few milliseconds, interleaved sampling of the
//! figures compared with each other (so drift on a shared machine hits them alike), median and spread. Each
//! sample also counts the process's minor page faults (outside the timed part): memory the allocator gave
//! back to the kernel during a call and touched again on the next shows up there.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct Case<'a> {
    pub name: &'static str,
    /// Runs the operation `iters` times.
    pub run: Box<dyn FnMut(u64) + 'a>,
}

#[derive(Debug, Clone)]
pub struct Stats {
    pub median_ns: f64,
    pub p10_ns: f64,
    pub p90_ns: f64,
    pub min_ns: f64,
    /// Minor page faults per iteration (median over samples).
    pub faults_per_iter: f64,
    pub samples: usize,
    pub iters: u64,
}

impl Stats {
    pub fn json(&self) -> Value {
        json!({
            "median_ns": self.median_ns, "p10_ns": self.p10_ns, "p90_ns": self.p90_ns, "min_ns": self.min_ns,
            "faults_per_iter": self.faults_per_iter, "samples": self.samples, "iters_per_sample": self.iters,
        })
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

pub fn stats_of(mut per_iter: Vec<f64>, mut faults: Vec<f64>, iters: u64) -> Stats {
    per_iter.sort_by(|a, b| a.partial_cmp(b).unwrap());
    faults.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
        faults_per_iter: percentile(&faults, 0.5),
        median_ns: percentile(&per_iter, 0.5),
        p10_ns: percentile(&per_iter, 0.1),
        p90_ns: percentile(&per_iter, 0.9),
        min_ns: per_iter[0],
        samples: per_iter.len(),
        iters,
    }
}

/// Measures every case: `warmup` of running, then iterations per sample so one sample lasts about
/// `sample`, then `rounds` rounds each taking one sample of every case in turn.
pub fn run_group(
    cases: &mut [Case<'_>],
    warmup: Duration,
    sample: Duration,
    rounds: usize,
) -> Vec<(&'static str, Stats)> {
    let mut iters = Vec::new();
    for case in cases.iter_mut() {
        let start = Instant::now();
        let mut n = 1u64;
        let mut done = 0u64;
        while start.elapsed() < warmup && done < 1_000_000_000 {
            (case.run)(n);
            done += n;
            n = (n * 2).min(1 << 20);
        }
        let per = start.elapsed().as_nanos() as f64 / done.max(1) as f64;
        iters.push(((sample.as_nanos() as f64 / per).ceil() as u64).max(1));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); cases.len()];
    let mut faults: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (i, case) in cases.iter_mut().enumerate() {
            let f = minor_faults();
            let t = Instant::now();
            (case.run)(iters[i]);
            samples[i].push(t.elapsed().as_nanos() as f64 / iters[i] as f64);
            faults[i].push((minor_faults() - f) as f64 / iters[i] as f64);
        }
    }
    let stats = samples.into_iter().zip(faults).zip(iters).map(|((s, f), n)| stats_of(s, f, n));
    cases.iter().map(|c| c.name).zip(stats).collect()
}

/// The process's minor page faults so far (`minflt`, field 10 of `/proc/self/stat`; 0 where there is none).
pub fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}
