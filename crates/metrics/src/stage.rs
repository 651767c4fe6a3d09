//! The stages of one hop, each timed on the hot path (issue: halve the cost of a hop): a
//! message's consume and decode, the hand-off to the database thread, the handler's statements,
//! the group commit, the way back to the handler, the ack; then the relay's wake-up after the
//! commit, the publish and the broker's confirm. `baton bench --stages` reads them back.
//!
//! A [`Stopwatch`] holds no time while no recorder is installed: an uninstrumented process pays
//! one atomic load per stage, and reads no clock.

use std::cell::RefCell;
use std::time::Instant;

use metrics::{Histogram, histogram};

use crate::names::STAGE_SECONDS;

/// One stage of a hop, in the order a message meets them. Its name is the `stage` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// The delivery read into an envelope (properties, body, trace context).
    Decode,
    /// A transaction waiting on the async side for the database thread to take it.
    Handoff,
    /// The transaction's own statements, on the database thread.
    Run,
    /// From its statements' end to the group's commit (other members, then COMMIT).
    Commit,
    /// From the commit to the handler running again on an async worker.
    Resume,
    /// The whole handler of a delivery: decode excluded, every try and the commit included.
    Handle,
    /// The ack, sent after the commit, until lapin has written it.
    Ack,
    /// From a commit that added outbox rows to the relay taking them.
    RelayWake,
    /// One message handed to the broker (lapin's publish, until it is written).
    Publish,
    /// From the publish to the broker's confirm.
    Confirm,
    /// The confirmed rows deleted from the outbox (one transaction per batch).
    Delete,
}

impl Stage {
    pub const ALL: [Stage; 11] = [
        Stage::Decode,
        Stage::Handoff,
        Stage::Run,
        Stage::Commit,
        Stage::Resume,
        Stage::Handle,
        Stage::Ack,
        Stage::RelayWake,
        Stage::Publish,
        Stage::Confirm,
        Stage::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Handoff => "handoff",
            Stage::Run => "run",
            Stage::Commit => "commit",
            Stage::Resume => "resume",
            Stage::Handle => "handle",
            Stage::Ack => "ack",
            Stage::RelayWake => "relay_wake",
            Stage::Publish => "publish",
            Stage::Confirm => "confirm",
            Stage::Delete => "delete",
        }
    }

    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

thread_local! {
    /// The histogram of each component's stages, looked up once per thread: registering one
    /// (building its key, hashing it, finding it in the recorder) at every record cost more
    /// than the timing itself, a dozen times a hop. The recorder is installed once per process,
    /// before any stopwatch runs, so a handle stays valid. A list, not a map: a process runs
    /// a handful of components, and comparing their short names costs less than hashing one.
    static HISTOGRAMS: RefCell<Vec<(Box<str>, Slots)>> = const { RefCell::new(Vec::new()) };
}

/// One component's histograms, by stage.
type Slots = [Option<Histogram>; Stage::ALL.len()];

/// A start time, taken only while metrics are recorded; `Copy`, so it crosses threads in the
/// closures that carry it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stopwatch(Option<Instant>);

impl Stopwatch {
    /// Now, if a recorder is installed; otherwise nothing (no clock read).
    pub fn start() -> Stopwatch {
        Stopwatch(crate::enabled().then(Instant::now))
    }

    /// Record the time since [`Stopwatch::start`] as `stage` of `component`; nothing when no
    /// recorder was installed at the start.
    pub fn record(self, component: &str, stage: Stage) {
        if let Some(at) = self.0 {
            let seconds = at.elapsed().as_secs_f64();
            HISTOGRAMS.with_borrow_mut(|known| {
                let at = match known.iter().position(|(name, _)| **name == *component) {
                    Some(at) => at,
                    None => {
                        known.push((component.into(), Default::default()));
                        known.len() - 1
                    }
                };
                known[at].1[stage as usize]
                    .get_or_insert_with(|| {
                        histogram!(STAGE_SECONDS, "component" => component.to_owned(), "stage" => stage.as_str())
                    })
                    .record(seconds);
            });
        }
    }

    /// [`Stopwatch::record`], then a fresh start for the next stage; a stopwatch that holds no
    /// time stays so (what is not timed from the start is not timed midway).
    pub fn lap(&mut self, component: &str, stage: Stage) {
        if self.running() {
            self.record(component, stage);
            *self = Stopwatch::start();
        }
    }

    /// Whether this holds a time (a recorder was installed at the start).
    pub fn running(&self) -> bool {
        self.0.is_some()
    }
}

/// Bucket bounds, in seconds, of [`STAGE_SECONDS`]: a stage costs microseconds, so the buckets
/// run from 5 µs to 1 s, about six to a decade, for a p50 read within a few percent.
pub(crate) const STAGE_BUCKETS: &[f64] = &[
    0.000_005, 0.000_007, 0.000_01, 0.000_015, 0.000_02, 0.000_03, 0.000_05, 0.000_07, 0.000_1, 0.000_15,
    0.000_2, 0.000_3, 0.000_5, 0.000_7, 0.001, 0.001_5, 0.002, 0.003, 0.005, 0.007, 0.01, 0.015, 0.02, 0.03,
    0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_has_a_name_that_reads_back() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stage::parse("nope"), None);
    }

    #[test]
    fn each_stage_indexes_its_own_slot() {
        for (i, s) in Stage::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i, "{s:?}");
        }
    }

    #[test]
    fn a_stopwatch_that_holds_no_time_stays_so_across_laps() {
        let mut idle = Stopwatch::default();
        idle.lap("records", Stage::Handoff);
        assert!(!idle.running(), "an untimed transaction is not timed from its second stage on");
    }

    #[test]
    fn the_buckets_rise() {
        assert!(STAGE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
