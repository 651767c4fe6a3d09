//! Fault plans: what to inject, where and when, decided by a seed so that a run can be repeated
//! and both modes see exactly the same faults.
//!
//! Owns: the plan's two forms (a compact flag, `refuse=0.05,delay.routing=20ms,duplicate=0.02,
//! crash.routing=30%+1s,drop=60%`, or a JSON file given as `@plan.json`), and the deterministic
//! decisions ([`FaultPlan::refuses`], [`FaultPlan::duplicates`]) keyed by what is the same in
//! both modes (the space's name and the step). Must not touch: I/O. Components apply the
//! decisions; the driver of a run applies the rest at the planned points: `baton compare` and
//! `baton chaos` the crashes, connection drops, broker restarts, bad messages and clock jumps,
//! `baton up` the crashes and connection drops.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use baton_protocol::{Component, Service};
use serde::{Deserialize, Serialize};

/// A component crash: at `at_percent` of the requests sent, kill `component`, restart it after
/// `down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Crash {
    pub component: String,
    pub at_percent: u32,
    pub down_ms: u64,
}

/// The orchestrator's wall clock set to `offset_s` from the true time at `at_percent` of the run,
/// while it runs (libfaketime; its monotonic clock stays true, as when NTP or an operator steps
/// a real clock). From `-3600` to `0` is a jump forward of an hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClockJump {
    pub at_percent: u32,
    pub offset_s: i64,
}

/// What to inject. The default injects nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    pub seed: u64,
    /// Extra refusal rate per step (0..1), besides the natural refusals of the rules.
    pub refuse: BTreeMap<Service, f64>,
    /// Latency added before each step is done (compensations are not delayed).
    pub delay_ms: BTreeMap<Service, u64>,
    /// Rate (0..1) at which a step's compensation fails (a technical failure, retried).
    pub undo_fails: BTreeMap<Service, f64>,
    /// Rate (0..1) at which a step's handler fails on a message without an answer, so the
    /// message is requeued until the queue's delivery limit dead-letters it.
    pub nack: BTreeMap<Service, f64>,
    /// Rate (0..1) at which a service's outgoing message is delivered twice.
    pub duplicate: f64,
    pub crashes: Vec<Crash>,
    /// Points (percent of requests sent) at which the broker drops every connection.
    pub connection_drops: Vec<u32>,
    /// Points at which the broker's application is stopped, and for how long.
    pub broker_restarts: Vec<Restart>,
    /// Bad messages published straight onto the work queues, spread evenly over the run: each
    /// must end in its queue's dead-letter queue with the reason, and change nothing.
    pub poison: u32,
    /// Jumps of the orchestrator's wall clock (workflow mode only).
    pub clock_jumps: Vec<ClockJump>,
    /// Points at which the data dir's filesystem is filled up, and for how long: every
    /// component's store then fails to commit (the components share the data dir).
    pub disk_full: Vec<DiskFull>,
}

/// The data dir's filesystem full at `at_percent` of the run, for `for_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskFull {
    pub at_percent: u32,
    pub for_ms: u64,
}

/// The broker stopped at `at_percent` of the run, started again `down_ms` later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    pub at_percent: u32,
    pub down_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("fault plan item `{item}`: {problem}")]
pub struct PlanError {
    pub item: String,
    pub problem: String,
}

/// SplitMix64: a good 64-bit mix, so that a decision depends on every byte of its key.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A number in [0, 1) fixed by the seed and the key.
pub fn roll(seed: u64, key: &str) -> f64 {
    let mut h = mix(seed);
    for chunk in key.as_bytes().chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(b));
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// humantime's grammar, as every flag of the CLI (`5ms`, `1s`, `2m`); a bare number is refused.
fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s).ok()
}

/// A signed clock offset: `-1h`, `+30m`, `+0`, `-90s` (no unit: seconds).
fn parse_offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (n, unit) = rest.find(|c: char| !c.is_ascii_digit()).map_or((rest, "s"), |i| rest.split_at(i));
    let n: i64 = n.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    Some(sign * n * scale)
}

fn parse_percent(s: &str) -> Option<u32> {
    s.strip_suffix('%')?.parse().ok().filter(|p| *p <= 100)
}

/// A rate between 0 and 1.
fn parse_rate(s: &str) -> Option<f64> {
    s.parse().ok().filter(|r| (0.0..=1.0).contains(r))
}

/// `PERCENT+DURATION` (`40%+1s`): a point of the run and how long (in ms); the problem, one
/// phrase, when it is not one (`example` shows the form, `span` what the duration is).
fn point_and_span(value: &str, example: &str, span: &str) -> Result<(u32, u64), String> {
    let (at, d) =
        value.split_once('+').ok_or_else(|| format!("expected PERCENT+DURATION, e.g. {example}"))?;
    let at = parse_percent(at).ok_or("a point such as 40% of the requests sent, or of the run")?;
    let d = parse_duration(d).ok_or(span)?;
    Ok((at, d.as_millis() as u64))
}

/// The steps a `refuse` or `delay` item without a step applies to.
fn targets(step: Option<&str>, item: &str, allow_notifier: bool) -> Result<Vec<Service>, PlanError> {
    match step {
        None => Ok(Service::ALL.into_iter().filter(|s| allow_notifier || *s != Service::Notifier).collect()),
        Some(name) => {
            let s = Service::parse(name).ok_or_else(|| PlanError {
                item: item.into(),
                problem: format!(
                    "`{name}` is not a step; use records, placement, entitlements, routing or notifier"
                ),
            })?;
            if s == Service::Notifier && !allow_notifier {
                return Err(PlanError { item: item.into(), problem: "the notifier never refuses".into() });
            }
            Ok(vec![s])
        }
    }
}

impl FaultPlan {
    /// The plan `baton compare` uses unless told otherwise: a few refusals at every step, a
    /// little latency, some duplicates, a crash of routing longer than the events-mode deadline
    /// (5 s), and one connection drop.
    pub const DEFAULT: &'static str = "refuse=0.02,delay=1ms,duplicate=0.02,crash.routing=40%+6s,drop=70%";

    /// The plan of `baton chaos`: every component crashed once (the search index in hybrid mode
    /// only, the orchestrator not in events mode), connections dropped twice, the
    /// broker restarted, 20 bad messages on the work queues, the data dir's disk full for 3 s,
    /// the orchestrator's clock set back an hour and then forward an hour (to the true time, so
    /// the skew against the gateway's clock lasts only the window between; the orchestrator's
    /// crash falls inside it, so the sagas it resumes were timed on a clock an hour ahead of its
    /// own), and the refusals, delays and duplicates of the default plan.
    pub const CHAOS: &'static str = "refuse=0.02,delay=1ms,duplicate=0.02,crash.records=8%+1s,\
        crash.placement=18%+1s,crash.entitlements=28%+1s,crash.routing=52%+1s,crash.notifier=62%+1s,\
        crash.orchestrator=56%+1s,crash.search=70%+1s,crash.gateway=85%+1s,drop=12%,drop=78%,restart-broker=40%+3s,poison=20,\
        disk-full=31%+3s,clock=45%-1h,clock=66%+0";

    /// Parse a compact plan (`refuse=0.05,delay.routing=20ms,...`), `none`, or `@file.json`.
    pub fn parse(text: &str, seed: u64) -> Result<FaultPlan, PlanError> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix('@') {
            let raw = std::fs::read_to_string(path).map_err(|e| PlanError {
                item: text.into(),
                problem: format!("cannot read the file: {e}"),
            })?;
            let mut plan: FaultPlan = serde_json::from_str(&raw)
                .map_err(|e| PlanError { item: text.into(), problem: format!("not a valid plan: {e}") })?;
            if plan.seed == 0 {
                plan.seed = seed;
            }
            return Ok(plan);
        }
        let mut plan = FaultPlan { seed, ..FaultPlan::default() };
        if text.is_empty() || text == "none" {
            return Ok(plan);
        }
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            plan.add(item)?;
        }
        Ok(plan)
    }

    /// Add one item of the compact form (`refuse.routing=0.5`) to the plan.
    fn add(&mut self, item: &str) -> Result<(), PlanError> {
        let err = |problem: &str| PlanError { item: item.into(), problem: problem.into() };
        let (key, value) = item.split_once('=').ok_or_else(|| err("expected key=value"))?;
        let (kind, step) = match key.split_once('.') {
            Some((k, s)) => (k, Some(s)),
            None => (key, None),
        };
        let rate = || parse_rate(value).ok_or_else(|| err("a rate between 0 and 1"));
        match kind {
            "refuse" | "fail-undo" | "nack" => {
                let rate = rate()?;
                let map = match kind {
                    "refuse" => &mut self.refuse,
                    "nack" => &mut self.nack,
                    _ => &mut self.undo_fails,
                };
                // The notifier never refuses, and has no undo to fail; a nack may hit it.
                for s in targets(step, item, kind == "nack")? {
                    map.insert(s, rate);
                }
            }
            "delay" => {
                let d = parse_duration(value).ok_or_else(|| err("a duration such as 5ms or 1s"))?;
                for s in targets(step, item, true)? {
                    self.delay_ms.insert(s, d.as_millis() as u64);
                }
            }
            "duplicate" => self.duplicate = rate()?,
            "crash" => {
                let component = step.ok_or_else(|| err("name the component: crash.routing=40%+1s"))?;
                if Component::parse(component).is_none() {
                    let all: Vec<&str> = Component::ALL.map(Component::name).into();
                    return Err(err(&format!("crash one of {}", all.join(", "))));
                }
                let (at_percent, down) =
                    point_and_span(value, "40%+1s", "a downtime such as 1s").map_err(|p| err(&p))?;
                self.crashes.push(Crash { component: component.into(), at_percent, down_ms: down });
            }
            "clock" => {
                let sign =
                    value.find(['+', '-']).ok_or_else(|| err("expected PERCENT±OFFSET, e.g. 45%-1h"))?;
                let (at, offset) = value.split_at(sign);
                self.clock_jumps.push(ClockJump {
                    at_percent: parse_percent(at).ok_or_else(|| err("a point such as 45% of the run"))?,
                    offset_s: parse_offset(offset)
                        .ok_or_else(|| err("an offset from the true time such as -1h, +30m or +0"))?,
                });
            }
            "poison" => {
                self.poison =
                    value.parse().ok().ok_or_else(|| err("a number of bad messages, such as 20"))?;
            }
            "drop" => {
                self.connection_drops.push(parse_percent(value).ok_or_else(|| err("a point such as 70%"))?)
            }
            "restart-broker" => {
                let (at_percent, down_ms) =
                    point_and_span(value, "40%+3s", "a downtime such as 3s").map_err(|p| err(&p))?;
                self.broker_restarts.push(Restart { at_percent, down_ms });
            }
            "disk-full" => {
                if step.is_some() {
                    return Err(err(
                        "the components share one data dir, so a full disk is full for all of them: \
                         write disk-full=40%+5s",
                    ));
                }
                let (at_percent, for_ms) =
                    point_and_span(value, "40%+5s", "a duration such as 5s").map_err(|p| err(&p))?;
                self.disk_full.push(DiskFull { at_percent, for_ms });
            }
            _ => {
                return Err(err(
                    "unknown fault; use refuse, delay, duplicate, fail-undo, nack, crash, drop, restart-broker, \
                     poison, clock or disk-full",
                ));
            }
        }
        Ok(())
    }

    /// Whether the plan refuses `step` for the space named `name`, beyond the rules.
    pub fn refuses(&self, step: Service, name: &str) -> bool {
        self.refuse.get(&step).is_some_and(|rate| roll(self.seed, &format!("refuse/{step}/{name}")) < *rate)
    }

    /// Whether the compensation of `step` fails for the space named `name`.
    pub fn undo_fails(&self, step: Service, name: &str) -> bool {
        self.undo_fails.get(&step).is_some_and(|rate| roll(self.seed, &format!("undo/{step}/{name}")) < *rate)
    }

    /// Whether `step`'s handler fails on the message `message_key` (each delivery of it).
    pub fn nacks(&self, step: Service, message_key: &str) -> bool {
        self.nack
            .get(&step)
            .is_some_and(|rate| roll(self.seed, &format!("nack/{step}/{message_key}")) < *rate)
    }

    /// Whether the outgoing message `message_key` (stable in both modes) is sent twice.
    pub fn duplicates(&self, message_key: &str) -> bool {
        self.duplicate > 0.0 && roll(self.seed, &format!("duplicate/{message_key}")) < self.duplicate
    }

    /// Whether the plan injects anything into `step`'s own handling of messages (refusals,
    /// latency, failing undos, failures, duplicates), beside what the driver of a run does to it.
    pub fn injects_into(&self, step: Service) -> bool {
        self.refuse.contains_key(&step)
            || self.delay_ms.contains_key(&step)
            || self.undo_fails.contains_key(&step)
            || self.nack.contains_key(&step)
            || self.duplicate > 0.0
    }

    pub fn delay(&self, step: Service) -> Duration {
        Duration::from_millis(self.delay_ms.get(&step).copied().unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.refuse.is_empty()
            && self.delay_ms.is_empty()
            && self.undo_fails.is_empty()
            && self.nack.is_empty()
            && self.duplicate == 0.0
            && self.crashes.is_empty()
            && self.connection_drops.is_empty()
            && self.broker_restarts.is_empty()
            && self.poison == 0
            && self.clock_jumps.is_empty()
            && self.disk_full.is_empty()
    }

    /// Where in the run (a share, 1..100 %) each of the plan's bad messages is sent.
    pub fn poison_points(&self) -> Vec<u32> {
        let n = self.poison;
        (1..=n).map(|i| (i * 100 / (n + 1)).max(1)).collect()
    }

    /// The plan as one JSON line, to hand to child processes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plans serialise")
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "no faults (seed {})", self.seed);
        }
        let mut parts = Vec::new();
        for (s, r) in &self.refuse {
            parts.push(format!("refuse {s} {:.1}%", r * 100.0));
        }
        for (s, d) in &self.delay_ms {
            parts.push(format!("delay {s} {d}ms"));
        }
        for (s, r) in &self.undo_fails {
            parts.push(format!("fail undo {s} {:.1}%", r * 100.0));
        }
        for (s, r) in &self.nack {
            parts.push(format!("nack {s} {:.1}%", r * 100.0));
        }
        if self.duplicate > 0.0 {
            parts.push(format!("duplicate {:.1}%", self.duplicate * 100.0));
        }
        for c in &self.crashes {
            parts.push(format!("crash {} at {}% for {}ms", c.component, c.at_percent, c.down_ms));
        }
        for d in &self.connection_drops {
            parts.push(format!("drop connections at {d}%"));
        }
        for r in &self.broker_restarts {
            parts.push(format!("restart the broker at {}% for {}ms", r.at_percent, r.down_ms));
        }
        if self.poison > 0 {
            parts.push(format!("{} bad messages", self.poison));
        }
        for j in &self.clock_jumps {
            parts.push(format!("orchestrator clock at {:+}s from true at {}%", j.offset_s, j.at_percent));
        }
        for d in &self.disk_full {
            parts.push(format!("disk full at {}% for {}ms", d.at_percent, d.for_ms));
        }
        write!(f, "{} (seed {})", parts.join(", "), self.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_compact_form() {
        let p = FaultPlan::parse(
            "refuse=0.1,refuse.routing=0.5,delay.routing=20ms,duplicate=0.02,crash.routing=40%+1s,drop=70%",
            7,
        )
        .unwrap();
        assert_eq!(p.refuse[&Service::Records], 0.1);
        assert_eq!(p.refuse[&Service::Routing], 0.5);
        assert!(!p.refuse.contains_key(&Service::Notifier));
        assert_eq!(p.delay(Service::Routing), Duration::from_millis(20));
        assert_eq!(p.delay(Service::Records), Duration::ZERO);
        assert_eq!(p.crashes, vec![Crash { component: "routing".into(), at_percent: 40, down_ms: 1000 }]);
        assert_eq!(p.connection_drops, vec![70]);
        assert!(FaultPlan::parse(FaultPlan::DEFAULT, 1).is_ok());
        let chaos = FaultPlan::parse(FaultPlan::CHAOS, 1).unwrap();
        assert_eq!(chaos.crashes.len(), 8, "every component, the search index too (hybrid mode)");
        assert_eq!(chaos.broker_restarts, vec![Restart { at_percent: 40, down_ms: 3000 }]);
        assert_eq!(chaos.poison, 20);
        assert_eq!(
            chaos.clock_jumps,
            vec![ClockJump { at_percent: 45, offset_s: -3600 }, ClockJump { at_percent: 66, offset_s: 0 }]
        );
        assert_eq!(FaultPlan::parse("clock=10%+30m", 1).unwrap().clock_jumps[0].offset_s, 1800);
        assert_eq!(FaultPlan::parse("poison=3", 1).unwrap().poison_points(), vec![25, 50, 75]);
        let p = FaultPlan::parse("fail-undo.placement=1,nack.records=1", 3).unwrap();
        assert!(p.undo_fails(Service::Placement, "x") && !p.undo_fails(Service::Records, "x"));
        assert!(p.nacks(Service::Records, "m") && !p.nacks(Service::Routing, "m"));
        assert!(FaultPlan::parse("none", 1).unwrap().is_empty());
        assert!(p.injects_into(Service::Records) && !p.injects_into(Service::Routing));
        assert!(FaultPlan::parse("duplicate=0.1", 1).unwrap().injects_into(Service::Notifier));
        assert!(!FaultPlan::parse("crash.routing=40%+1s", 1).unwrap().injects_into(Service::Routing));
    }

    #[test]
    fn a_full_disk_is_a_point_and_a_duration() {
        let p = FaultPlan::parse("disk-full=40%+5s", 1).unwrap();
        assert_eq!(p.disk_full, vec![DiskFull { at_percent: 40, for_ms: 5000 }]);
        assert!(p.to_string().contains("disk full at 40% for 5000ms"));
        assert!(!FaultPlan::parse(FaultPlan::CHAOS, 1).unwrap().disk_full.is_empty());
    }

    #[test]
    fn mistakes_name_the_item() {
        for (text, words) in [
            ("refuse=2", "between 0 and 1"),
            ("refuse.notifier=0.1", "never refuses"),
            ("refuse.nobody=0.1", "not a step"),
            ("crash=40%+1s", "name the component"),
            ("crash.nobody=40%+1s", "crash one of"),
            ("crash.routing=140%+1s", "40% of the requests"),
            ("explode=1", "unknown fault"),
            ("delay=fast", "duration"),
            ("poison=many", "number of bad messages"),
            ("clock=45%", "PERCENT±OFFSET"),
            ("clock=45%-1d", "offset from the true time"),
            ("clock=145%-1h", "45% of the run"),
            ("disk-full.records=40%+5s", "share one data dir"),
            ("disk-full=40%", "PERCENT+DURATION"),
            ("disk-full=40%+soon", "a duration"),
        ] {
            let e = FaultPlan::parse(text, 1).unwrap_err();
            assert!(e.to_string().contains(words), "{text}: {e}");
        }
    }

    #[test]
    fn decisions_are_fixed_by_the_seed_and_follow_the_rate() {
        let p = FaultPlan::parse("refuse=0.25,duplicate=0.5", 42).unwrap();
        let names: Vec<String> = (0..4000).map(|i| format!("space-{i}")).collect();
        let picks = |p: &FaultPlan| names.iter().filter(|n| p.refuses(Service::Placement, n)).count();
        assert_eq!(picks(&p), picks(&FaultPlan::parse("refuse=0.25,duplicate=0.5", 42).unwrap()));
        let n = picks(&p);
        assert!((850..1150).contains(&n), "about a quarter: {n}");
        let other = FaultPlan::parse("refuse=0.25", 43).unwrap();
        let same: usize = names
            .iter()
            .filter(|n| p.refuses(Service::Placement, n) == other.refuses(Service::Placement, n))
            .count();
        assert!(same < 3900, "another seed gives other faults");
        let dups = |p: &FaultPlan| names.iter().filter(|n| p.duplicates(n)).cloned().collect::<Vec<_>>();
        let again = FaultPlan::parse("refuse=0.25,duplicate=0.5", 42).unwrap();
        assert_eq!(dups(&p), dups(&again), "the same seed duplicates the same messages");
        assert_ne!(dups(&p), dups(&FaultPlan::parse("duplicate=0.5", 43).unwrap()));
        let chaos = |seed| FaultPlan::parse(FaultPlan::CHAOS, seed).unwrap();
        assert_eq!(
            (chaos(5).crashes, chaos(5).connection_drops, chaos(5).poison_points()),
            (chaos(6).crashes, chaos(6).connection_drops, chaos(6).poison_points()),
            "crashes, drops and bad messages are placed by the plan, not drawn"
        );
    }

    #[test]
    fn json_round_trips() {
        let p = FaultPlan::parse(FaultPlan::DEFAULT, 9).unwrap();
        let back: FaultPlan = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(back, p);
        assert!(p.to_string().contains("crash routing at 40%"));
    }
}
