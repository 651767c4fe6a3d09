//! Figures from samples: latency percentiles of one-at-a-time runs, throughput of loaded runs,
//! both from [`Latencies`] (the loaded runs' corrected for coordinated omission, as the
//! comparison's are).

use std::time::Duration;

use baton_load::Latencies;
use serde::Serialize;

/// Requests sent one at a time, after a warm-up: how long each took.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    /// Requests measured (the warm-up not counted).
    pub samples: usize,
    /// Requests that did not succeed (not counted in the percentiles).
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
}

/// Requests kept `in_flight` at once for a while: how many finished, and how long each took.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Throughput {
    pub in_flight: usize,
    pub seconds: f64,
    /// Requests that succeeded within the run.
    pub completed: usize,
    pub errors: usize,
    /// Completed per second.
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU time of the processes doing the work (the components; for the floor, the bench
    /// process itself), per completed request, in ms.
    pub cpu_ms_per_op: f64,
}

/// What one request ended with: its latency in µs when it succeeded.
pub(crate) type Sample = Result<u64, String>;

/// Latencies in µs of the successes, and the number of failures (the first few failure
/// reasons are logged, so a run full of errors says why).
fn split(samples: &[Sample], what: &str) -> (Vec<u64>, usize) {
    let ok: Vec<u64> = samples.iter().filter_map(|s| s.as_ref().ok().copied()).collect();
    let errors: Vec<&String> = samples.iter().filter_map(|s| s.as_ref().err()).collect();
    for e in errors.iter().take(3) {
        tracing::warn!(run = what, error = %e, "a request failed");
    }
    (ok, errors.len())
}

impl Latency {
    pub(crate) fn of(samples: &[Sample], what: &str) -> Latency {
        let (ok, errors) = split(samples, what);
        let mean = if ok.is_empty() { 0.0 } else { ok.iter().sum::<u64>() as f64 / ok.len() as f64 };
        // One request at a time measures what a request costs, not a load's pace: the values
        // stand as measured.
        let lat = Latencies::measured(&ok);
        Latency {
            samples: samples.len(),
            errors,
            p50_ms: lat.quantile_ms(0.50),
            p99_ms: lat.quantile_ms(0.99),
            mean_ms: mean / 1000.0,
            max_ms: lat.max_ms(),
        }
    }
}

impl Throughput {
    pub(crate) fn of(
        samples: &[Sample],
        in_flight: usize,
        elapsed: Duration,
        cpu_ms: f64,
        what: &str,
    ) -> Throughput {
        let (ok, errors) = split(samples, what);
        let seconds = elapsed.as_secs_f64().max(1e-9);
        let lat = Latencies::corrected(&ok, Latencies::closed_loop_interval_us(&ok));
        Throughput {
            in_flight,
            seconds,
            completed: ok.len(),
            errors,
            per_second: ok.len() as f64 / seconds,
            p50_ms: lat.quantile_ms(0.50),
            p99_ms: lat.quantile_ms(0.99),
            cpu_ms_per_op: cpu_ms / ok.len().max(1) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_apart_from_the_percentiles() {
        let samples: Vec<Sample> = vec![Ok(1000), Ok(3000), Err("504".into()), Ok(2000)];
        let l = Latency::of(&samples, "t");
        assert_eq!((l.samples, l.errors), (4, 1));
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (2.0, 3.0, 3.0));
        assert_eq!(l.mean_ms, 2.0);
        let t = Throughput::of(&samples, 8, Duration::from_secs(2), 30.0, "t");
        assert_eq!((t.completed, t.errors, t.per_second, t.cpu_ms_per_op), (3, 1, 1.5, 10.0));
    }
}
