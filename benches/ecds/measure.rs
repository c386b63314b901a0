//! In-process timing: warm-up, calibration to samples of a few milliseconds, interleaved sampling of the
//! figures compared with each other (so drift on a shared machine hits them alike), median and spread.

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
    pub samples: usize,
    pub iters: u64,
}

impl Stats {
    pub fn json(&self) -> Value {
        json!({
            "median_ns": self.median_ns, "p10_ns": self.p10_ns, "p90_ns": self.p90_ns, "min_ns": self.min_ns,
            "samples": self.samples, "iters_per_sample": self.iters,
        })
    }
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

pub fn stats_of(mut per_iter: Vec<f64>, iters: u64) -> Stats {
    per_iter.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Stats {
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
    for _ in 0..rounds {
        for (i, case) in cases.iter_mut().enumerate() {
            let t = Instant::now();
            (case.run)(iters[i]);
            samples[i].push(t.elapsed().as_nanos() as f64 / iters[i] as f64);
        }
    }
    cases.iter().zip(samples).zip(iters).map(|((c, s), n)| (c.name, stats_of(s, n))).collect()
}
