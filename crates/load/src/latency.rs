//! Latency percentiles, one implementation for the load, the comparison and the benchmarks: an
//! HdrHistogram (three significant digits, from 1 µs to an hour), optionally corrected for
//! coordinated omission.
//!
//! A closed-loop client (each worker sends its next request once the last is answered) that
//! waits out an outage sends nothing meanwhile, so a plain histogram holds one slow value per
//! worker and hides the requests that a steady client would have sent into the outage.
//! [`Latencies::corrected`] adds them back: for a value longer than the client's expected
//! interval, the values it would have measured had it kept sending at that interval.

use hdrhistogram::Histogram;

/// Recorded latencies, in µs.
#[derive(Debug, Clone)]
pub struct Latencies {
    hist: Histogram<u64>,
    /// The longest value recorded, exact (the histogram keeps three digits).
    max_us: u64,
}

impl Latencies {
    /// The longest latency kept apart; longer ones count as this.
    pub const HIGHEST_US: u64 = 3_600_000_000;
    /// The shortest expected interval a correction uses: a shorter one would add a value per µs
    /// of an outage, for no better figure.
    pub const MIN_INTERVAL_US: u64 = 1_000;

    fn empty() -> Latencies {
        let hist = Histogram::new_with_bounds(1, Self::HIGHEST_US, 3).expect("valid histogram bounds");
        Latencies { hist, max_us: 0 }
    }

    /// Each value as measured, one per request.
    pub fn measured(values_us: &[u64]) -> Latencies {
        let mut l = Latencies::empty();
        for &v in values_us {
            l.hist.saturating_record(v);
            l.max_us = l.max_us.max(v);
        }
        l
    }

    /// Corrected for coordinated omission, for a client expected to send a request every
    /// `interval_us` (at least [`Latencies::MIN_INTERVAL_US`]).
    pub fn corrected(values_us: &[u64], interval_us: u64) -> Latencies {
        let interval = interval_us.max(Self::MIN_INTERVAL_US);
        let mut l = Latencies::empty();
        for &v in values_us {
            // Clamped to the bounds, a value cannot be refused.
            let _ = l.hist.record_correct(v.min(Self::HIGHEST_US), interval);
            l.max_us = l.max_us.max(v);
        }
        l
    }

    /// The pace of a closed-loop client: each worker sends again as soon as it is answered, so
    /// it sends at the latency it usually sees, the median.
    pub fn closed_loop_interval_us(values_us: &[u64]) -> u64 {
        Latencies::measured(values_us).quantile_us(0.5)
    }

    /// Values recorded, the added ones of a correction included.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The value below which `q` (0..=1) of the values fall (nearest rank, to three significant
    /// digits); 0 when there are none.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            return 0;
        }
        if q >= 1.0 {
            return self.max_us;
        }
        self.hist.lowest_equivalent(self.hist.value_at_quantile(q)).min(self.max_us)
    }

    /// [`Latencies::quantile_us`] in ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.quantile_us(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.max_us as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        let l = Latencies::measured(&v);
        assert_eq!((l.quantile_us(0.5), l.quantile_us(0.99), l.quantile_us(1.0)), (50, 99, 100));
        assert_eq!(Latencies::measured(&[]).quantile_us(0.5), 0);
        // Three significant digits: a long value is reported to within 0.1 %.
        let long = Latencies::measured(&[1_234_567]);
        assert!(long.quantile_us(0.5).abs_diff(1_234_567) <= 1_235, "{}", long.quantile_us(0.5));
        assert_eq!(long.max_ms(), 1234.567);
    }

    #[test]
    fn an_outage_that_stalls_a_closed_loop_client_counts_the_requests_it_held_back() {
        // 4 workers at 10 ms a request for 1 s (400 requests); then each waits out a 2 s outage.
        let mut v = vec![10_000; 400];
        v.extend([2_000_000; 4]);
        let measured = Latencies::measured(&v);
        assert_eq!(measured.quantile_ms(0.99), 10.0, "as measured, the outage hides past p99");
        let interval = Latencies::closed_loop_interval_us(&v);
        assert_eq!(interval, 10_000);
        let corrected = Latencies::corrected(&v, interval);
        // Each worker would have sent 199 more requests into the outage: 1 % and more of all.
        assert_eq!(corrected.count(), 400 + 4 * 200);
        assert!(corrected.quantile_ms(0.5) > 10.0, "{}", corrected.quantile_ms(0.5));
        assert!(corrected.quantile_ms(0.99) > 1_900.0, "{}", corrected.quantile_ms(0.99));
        assert_eq!(corrected.max_ms(), 2_000.0);
    }

    #[test]
    fn a_tiny_interval_is_raised_and_a_huge_value_clamped() {
        let l = Latencies::corrected(&[5_000, u64::MAX], 0);
        assert_eq!(l.count(), 5 + Latencies::HIGHEST_US / Latencies::MIN_INTERVAL_US);
    }
}
