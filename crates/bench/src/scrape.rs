//! The components' own figures, read from their `/metrics` (Prometheus text): the stage
//! timings of a hop (`baton_stage_duration_seconds`, summed over every process and component)
//! and the store conflicts retried. Two scrapes, before and after a run, give that run's share.
//!
//! Pure parsing and arithmetic, and one `GET` per process.

use std::collections::BTreeMap;

use baton_metrics::Stage;
use baton_metrics::names::{STAGE_SECONDS, STORE_CONFLICTS};
use serde::Serialize;

/// One histogram: cumulative counts by upper bound (seconds), their sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
struct Hist {
    /// `le` bound to cumulative count, in rising order of bound (`+Inf` left out).
    buckets: BTreeMap<Bound, f64>,
    sum: f64,
    count: f64,
}

/// A bucket bound, ordered as a number.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound(f64);

impl Eq for Bound {}

impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl Hist {
    fn add(&mut self, other: &Hist, sign: f64) {
        for (b, c) in &other.buckets {
            *self.buckets.entry(*b).or_default() += sign * c;
        }
        self.sum += sign * other.sum;
        self.count += sign * other.count;
    }

    fn mean_us(&self) -> f64 {
        if self.count > 0.0 { self.sum / self.count * 1e6 } else { 0.0 }
    }

    /// The median by linear interpolation within the bucket that holds it, as Prometheus's
    /// `histogram_quantile` does; the last bound when it lies beyond every bucket.
    fn p50_us(&self) -> f64 {
        if self.count <= 0.0 {
            return 0.0;
        }
        let rank = self.count / 2.0;
        let (mut lower, mut below) = (0.0, 0.0);
        for (Bound(upper), &cum) in &self.buckets {
            if cum >= rank {
                let inside = (cum - below).max(f64::MIN_POSITIVE);
                return (lower + (upper - lower) * (rank - below) / inside) * 1e6;
            }
            (lower, below) = (*upper, cum);
        }
        lower * 1e6
    }
}

/// What the processes' `/metrics` said at one moment, summed over them.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Scrape {
    stages: BTreeMap<Stage, Hist>,
    /// `baton_store_conflicts_retried_total`, every component.
    pub(crate) conflicts: f64,
    /// Processes that answered.
    pub(crate) answered: usize,
}

/// The value of `name` in a series' labels `{a="x",b="y"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

impl Scrape {
    /// Read one exposition into this scrape (adding to what it holds).
    pub(crate) fn read(&mut self, text: &str) {
        self.answered += 1;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            if name == STORE_CONFLICTS {
                self.conflicts += value;
                continue;
            }
            let Some(part) = name.strip_prefix(STAGE_SECONDS) else { continue };
            let Some(stage) = label(labels, "stage").and_then(Stage::parse) else { continue };
            let hist = self.stages.entry(stage).or_default();
            match part {
                "_sum" => hist.sum += value,
                "_count" => hist.count += value,
                "_bucket" => {
                    if let Some(Ok(le)) = label(labels, "le").map(str::parse::<f64>)
                        && le.is_finite()
                    {
                        *hist.buckets.entry(Bound(le)).or_default() += value;
                    }
                }
                _ => {}
            }
        }
    }

    /// What happened between `before` and this scrape.
    pub(crate) fn since(&self, before: &Scrape) -> Scrape {
        let mut diff = self.clone();
        for (stage, h) in &before.stages {
            diff.stages.entry(*stage).or_default().add(h, -1.0);
        }
        diff.conflicts -= before.conflicts;
        diff
    }

    /// One row per stage that was timed, in a hop's order, over `sagas` sagas.
    pub(crate) fn rows(&self, sagas: u64) -> Vec<StageRow> {
        self.stages
            .iter()
            .filter(|(_, h)| h.count > 0.0)
            .map(|(stage, h)| StageRow {
                stage: stage.as_str().to_owned(),
                per_saga: h.count / sagas.max(1) as f64,
                mean_us: h.mean_us(),
                p50_us: h.p50_us(),
            })
            .collect()
    }
}

/// One stage of a hop over a run: how often it happened per saga and what it took.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageRow {
    pub stage: String,
    /// Times this stage ran per saga (every component's: a five-step saga commits a dozen times).
    pub per_saga: f64,
    pub mean_us: f64,
    /// Interpolated within the histogram's bucket (bounds about 1.5x apart).
    pub p50_us: f64,
}

/// The stages of one run (`--stages`): the one-at-a-time HTTP sagas, warm-up included.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stages {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub sagas: u64,
    /// Processes whose `/metrics` answered both scrapes.
    pub processes: usize,
    pub rows: Vec<StageRow>,
}

/// GET every URL's exposition and add it up; a process that does not answer is left out
/// (and said so), so the caller can tell from [`Scrape::answered`].
pub(crate) async fn scrape(client: &reqwest::Client, urls: &[String]) -> Scrape {
    let mut all = Scrape::default();
    for url in urls {
        let got = async { client.get(url).send().await?.error_for_status()?.text().await };
        match got.await {
            Ok(text) => all.read(&text),
            Err(e) => tracing::warn!(%url, error = %e, "cannot read the metrics of a component"),
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"# TYPE baton_stage_duration_seconds histogram
baton_stage_duration_seconds_bucket{instance="main",component="records",stage="commit",le="0.0001"} 1
baton_stage_duration_seconds_bucket{instance="main",component="records",stage="commit",le="0.0002"} 3
baton_stage_duration_seconds_bucket{instance="main",component="records",stage="commit",le="0.0005"} 4
baton_stage_duration_seconds_bucket{instance="main",component="records",stage="commit",le="+Inf"} 4
baton_stage_duration_seconds_sum{instance="main",component="records",stage="commit"} 0.0008
baton_stage_duration_seconds_count{instance="main",component="records",stage="commit"} 4
baton_store_conflicts_retried_total{instance="main",component="records"} 2
baton_requests_total{instance="main",component="gateway",mode="workflow",status="200"} 9
"#;

    #[test]
    fn a_stage_reads_its_mean_and_its_interpolated_median() {
        let mut s = Scrape::default();
        s.read(ONE);
        let rows = s.rows(2);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.stage.as_str(), r.per_saga), ("commit", 2.0));
        assert!((r.mean_us - 200.0).abs() < 1e-6, "{r:?}");
        // The median (rank 2 of 4) is halfway through the bucket of 100 to 200 µs.
        assert!((r.p50_us - 150.0).abs() < 1e-6, "{r:?}");
        assert_eq!((s.conflicts, s.answered), (2.0, 1));
    }

    #[test]
    fn processes_add_up_and_a_later_scrape_less_an_earlier_is_the_run_between() {
        let mut before = Scrape::default();
        before.read(ONE);
        let mut after = Scrape::default();
        after.read(ONE);
        after.read(&ONE.replace("records", "routing"));
        let run = after.since(&before);
        assert_eq!(run.conflicts, 2.0);
        let r = &run.rows(4)[0];
        assert_eq!(r.per_saga, 1.0);
        assert!((r.mean_us - 200.0).abs() < 1e-6 && (r.p50_us - 150.0).abs() < 1e-6, "{r:?}");
        assert!(before.since(&before).rows(1).is_empty(), "nothing ran between");
    }

    #[test]
    fn lines_it_does_not_know_are_skipped() {
        let mut s = Scrape::default();
        s.read("garbage\nbaton_stage_duration_seconds_count{stage=\"nope\"} 3\nx{} notanumber\n");
        assert!(s.rows(1).is_empty());
        assert_eq!(s.conflicts, 0.0);
    }
}
