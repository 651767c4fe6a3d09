//! The load generator: N create-space requests at concurrency C through the HTTP gateway, drawn
//! from a seed so that both modes get exactly the same requests, with natural refusals (reserved
//! route keys, a name taken, an owner over quota) at a chosen rate.
//!
//! Owns: the request plan ([`plan`]), sending it ([`run`]), with each timed-out request sent
//! again under its `Idempotency-Key` when asked ([`Spec::retry_timeouts`]), and the statistics
//! of the answers ([`Stats`], with percentiles from [`latency`]), and what `baton load` shows
//! of its progress ([`Progress`]).
//! Must not touch: the broker or any database; it only speaks HTTP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_faults::roll;
use serde::Serialize;

pub mod latency;

pub use latency::Latencies;

/// What a request is meant to run into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Intent {
    /// Should succeed, unless a fault is injected.
    Plain,
    /// A reserved route key: refused at routing.
    Reserved,
    /// A name many requests want: one wins, the others are refused at records.
    TakenName,
    /// An owner past the free plan's quota: refused at entitlements once three exist.
    OverQuota,
}

/// One request of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    pub index: usize,
    pub name: String,
    pub owner: String,
    pub intent: Intent,
}

/// How much load, and how it is drawn.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The gateway's base URL, e.g. http://127.0.0.1:8080.
    pub gateway: String,
    pub requests: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// Share (0..1) of requests drawn to be refused by a business rule.
    pub refusal_rate: f64,
    /// Give up on one request after this long (the gateway's own deadline is shorter).
    pub timeout: Duration,
    /// Stop sending new requests after this long, even if the plan has more (a timed run).
    pub stop_after: Option<Duration>,
    /// Send every request with an `Idempotency-Key`, and send one answered 504 (or not at
    /// all) again with it, up to this many times: the retry learns what became of the first.
    pub retry_timeouts: Option<u32>,
}

/// The requests of a run: the same for the same seed, whatever the mode.
pub fn plan(spec: &Spec) -> Vec<Request> {
    const RESERVED: [&str; 4] = ["admin", "api", "www", "status"];
    let seed = spec.seed;
    (0..spec.requests)
        .map(|i| {
            let r = roll(seed, &format!("load/{i}"));
            let third = spec.refusal_rate / 3.0;
            let plain_owner = format!("o{seed}-{}", i / 2);
            let (name, owner, intent) = if r < third {
                (RESERVED[i % RESERVED.len()].to_string(), plain_owner, Intent::Reserved)
            } else if r < 2.0 * third {
                (format!("taken-{seed}"), plain_owner, Intent::TakenName)
            } else if r < spec.refusal_rate {
                (format!("q{seed}-{i}"), format!("full-{seed}"), Intent::OverQuota)
            } else {
                (format!("s{seed}-{i}"), plain_owner, Intent::Plain)
            };
            Request { index: i, name, owner, intent }
        })
        .collect()
}

/// One answer.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub index: usize,
    pub intent: Intent,
    /// The HTTP status, or 0 when no answer came (connection error, client timeout).
    pub status: u16,
    /// The step that refused, when the body names one.
    pub step: Option<String>,
    /// When it was first sent, from the start of the run.
    pub sent_us: u64,
    /// From the first send to the last answer, retries included.
    pub latency_us: u64,
    /// The first answer, before any retry (the same as `status` when there was none).
    pub first_status: u16,
    /// Times the request was sent again with its key.
    pub retries: u32,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub elapsed_ms: u64,
}

/// Send the plan at the spec's concurrency. `on_sent(n)` is called as the n-th request leaves
/// (a driver injects its faults there).
pub async fn run(
    spec: &Spec,
    on_sent: Arc<dyn Fn(usize) + Send + Sync>,
    on_done: Arc<dyn Fn(usize) + Send + Sync>,
) -> Outcome {
    let client = reqwest::Client::builder()
        .timeout(spec.timeout)
        .pool_max_idle_per_host(spec.concurrency.max(1))
        .build()
        .expect("an HTTP client");
    let requests = Arc::new(plan(spec));
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/spaces", spec.gateway.trim_end_matches('/'));
    // Keys of their own to this run: another run on the same gateway must not replay these.
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let retry_timeouts = spec.retry_timeouts;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..spec.concurrency.max(1) {
        let (client, requests, next, done, url, run_id) = (
            client.clone(),
            Arc::clone(&requests),
            Arc::clone(&next),
            Arc::clone(&done),
            url.clone(),
            run_id.clone(),
        );
        let (on_sent, on_done) = (Arc::clone(&on_sent), Arc::clone(&on_done));
        let stop_after = spec.stop_after;
        workers.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(req) = requests.get(i) else { break };
                if stop_after.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                on_sent(i + 1);
                let t = Instant::now();
                let key = retry_timeouts.map(|_| format!("load-{run_id}-{i}"));
                let (mut status, mut step) = send(&client, &url, req, key.as_deref()).await;
                let first_status = status;
                let mut retries = 0;
                while matches!(status, 0 | 504) && retry_timeouts.is_some_and(|max| retries < max) {
                    retries += 1;
                    (status, step) = send(&client, &url, req, key.as_deref()).await;
                }
                samples.push(Sample {
                    index: i,
                    intent: req.intent,
                    status,
                    step,
                    sent_us: t.duration_since(started).as_micros() as u64,
                    latency_us: t.elapsed().as_micros() as u64,
                    first_status,
                    retries,
                });
                on_done(done.fetch_add(1, Ordering::SeqCst) + 1);
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(spec.requests);
    while let Some(part) = workers.join_next().await {
        samples.extend(part.expect("a load worker does not panic"));
    }
    samples.sort_by_key(|s| s.index);
    Outcome { samples, elapsed_ms: started.elapsed().as_millis() as u64 }
}

/// Send one request (with `key` as its `Idempotency-Key`): the status (0 when no answer came)
/// and the step that refused, if the body names one.
async fn send(
    client: &reqwest::Client,
    url: &str,
    req: &Request,
    key: Option<&str>,
) -> (u16, Option<String>) {
    let mut post = client.post(url).json(&serde_json::json!({"name": req.name, "owner": req.owner}));
    if let Some(key) = key {
        post = post.header("idempotency-key", key);
    }
    match post.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body.get("step").and_then(|s| s.as_str()).map(String::from))
        }
        Err(_) => {
            // Nobody answers (the gateway is down): back off as a client would, rather than
            // count a thousand refused connections a second.
            tokio::time::sleep(Duration::from_millis(200)).await;
            (0, None)
        }
    }
}

/// Answers counted and latencies summed up.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    pub requests: usize,
    pub ok: usize,
    pub client_errors: usize,
    pub server_errors: usize,
    pub timeouts: usize,
    pub no_answer: usize,
    pub by_status: BTreeMap<u16, usize>,
    /// Percentiles corrected for coordinated omission ([`Latencies::corrected`]) at the pace of
    /// `interval_ms`: a stall of the load counts the requests it held back.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The pace each worker of the load sent at when nothing stalled it: the median latency.
    pub interval_ms: f64,
    /// Percentiles as measured, one value per request answered.
    pub measured_p50_ms: f64,
    pub measured_p99_ms: f64,
    pub per_second: f64,
    /// Requests first answered 504 (or not at all), before any retry.
    pub first_timeouts: usize,
    /// Requests sent again with their key at least once, and the retries sent in all.
    pub retried: usize,
    pub retries: usize,
    /// Requests first answered 504 (or not at all) that a retry got a definite answer for.
    pub fixed_by_retry: usize,
    /// Latency of the retried requests, from the first send to the last answer.
    pub retried_p50_ms: f64,
    pub retried_max_ms: f64,
}

impl Stats {
    pub fn of(outcome: &Outcome) -> Stats {
        let lat: Vec<u64> = outcome.samples.iter().map(|s| s.latency_us).collect();
        let interval = Latencies::closed_loop_interval_us(&lat);
        let (measured, corrected) = (Latencies::measured(&lat), Latencies::corrected(&lat, interval));
        let mut st = Stats {
            requests: outcome.samples.len(),
            p50_ms: corrected.quantile_ms(0.50),
            p95_ms: corrected.quantile_ms(0.95),
            p99_ms: corrected.quantile_ms(0.99),
            max_ms: corrected.max_ms(),
            interval_ms: interval as f64 / 1000.0,
            measured_p50_ms: measured.quantile_ms(0.50),
            measured_p99_ms: measured.quantile_ms(0.99),
            per_second: outcome.samples.len() as f64 / (outcome.elapsed_ms.max(1) as f64 / 1000.0),
            ..Stats::default()
        };
        let retried: Vec<u64> =
            outcome.samples.iter().filter(|s| s.retries > 0).map(|s| s.latency_us).collect();
        let retried_latency = Latencies::measured(&retried);
        st.retried = retried.len();
        st.retried_p50_ms = retried_latency.quantile_ms(0.50);
        st.retried_max_ms = retried_latency.max_ms();
        for s in &outcome.samples {
            let timed_out = |status: u16| matches!(status, 0 | 504);
            st.retries += s.retries as usize;
            if timed_out(s.first_status) {
                st.first_timeouts += 1;
                if !timed_out(s.status) {
                    st.fixed_by_retry += 1;
                }
            }
            *st.by_status.entry(s.status).or_default() += 1;
            match s.status {
                0 => st.no_answer += 1,
                200 => st.ok += 1,
                504 => st.timeouts += 1,
                400..=499 => st.client_errors += 1,
                _ => st.server_errors += 1,
            }
        }
        st
    }
}

/// What `baton load` writes of its progress on stderr. On a terminal, one line redrawn in
/// place (`\r`) as the percentage moves, and a newline at the end; elsewhere (a log file, a
/// pipe, CI) a whole line at most every [`Progress::EVERY`], so that a file holds no hundred
/// fragments of a line and a short run writes nothing.
pub struct Progress {
    total: usize,
    tty: bool,
    started: Instant,
    /// The percentage drawn last, and when the last line was written.
    shown: Mutex<(Option<usize>, Instant)>,
}

impl Progress {
    /// How often a line is written when stderr is not a terminal.
    pub const EVERY: Duration = Duration::from_secs(5);

    pub fn new(total: usize, tty: bool, now: Instant) -> Progress {
        Progress { total: total.max(1), tty, started: now, shown: Mutex::new((None, now)) }
    }

    /// What to write once `done` requests are answered, at `now`, if anything.
    pub fn after(&self, done: usize, now: Instant) -> Option<String> {
        let pct = done * 100 / self.total;
        let mut shown = self.shown.lock().expect("progress");
        let line = format!("load: {done}/{} requests ({pct}%)", self.total);
        if self.tty {
            // Answers arrive out of order: draw each percentage once, never going back.
            if shown.0.is_some_and(|p| p >= pct) {
                return None;
            }
            shown.0 = Some(pct);
            return Some(format!("\r{line}"));
        }
        if now.duration_since(shown.1) < Progress::EVERY || done >= self.total {
            return None;
        }
        *shown = (Some(pct), now);
        Some(format!("{line}, {} s\n", now.duration_since(self.started).as_secs()))
    }

    /// What to write at the end: the newline that closes a line drawn in place.
    pub fn finish(&self) -> Option<&'static str> {
        (self.tty && self.shown.lock().expect("progress").0.is_some()).then_some("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rate: f64) -> Spec {
        Spec {
            gateway: "http://x".into(),
            requests: 3000,
            concurrency: 4,
            seed: 5,
            refusal_rate: rate,
            timeout: Duration::from_secs(1),
            stop_after: None,
            retry_timeouts: None,
        }
    }

    #[test]
    fn the_plan_is_fixed_by_the_seed_and_refuses_at_the_rate() {
        let a = plan(&spec(0.3));
        assert_eq!(a, plan(&spec(0.3)));
        let refused = a.iter().filter(|r| r.intent != Intent::Plain).count();
        assert!((800..1000).contains(&refused), "about 30%: {refused}");
        for r in &a {
            assert!(
                r.name.len() <= 63
                    && r.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                r.name
            );
        }
        // Plain owners stay within the free plan (3 spaces).
        let mut per_owner: BTreeMap<&str, usize> = BTreeMap::new();
        for r in a.iter().filter(|r| r.intent != Intent::OverQuota) {
            *per_owner.entry(&r.owner).or_default() += 1;
        }
        assert!(per_owner.values().all(|n| *n <= 3));
        assert!(plan(&spec(0.0)).iter().all(|r| r.intent == Intent::Plain));
    }

    #[test]
    fn retries_are_counted_and_what_they_fixed() {
        let sample = |first_status, status, retries, latency_us| Sample {
            index: 0,
            intent: Intent::Plain,
            status,
            step: None,
            sent_us: 0,
            latency_us,
            first_status,
            retries,
        };
        let outcome = Outcome {
            samples: vec![
                sample(200, 200, 0, 1_000),
                sample(504, 200, 1, 9_000),
                sample(504, 504, 3, 20_000),
                sample(0, 409, 2, 5_000),
            ],
            elapsed_ms: 1000,
        };
        let st = Stats::of(&outcome);
        assert_eq!((st.first_timeouts, st.retried, st.retries, st.fixed_by_retry), (3, 3, 6, 2));
        assert_eq!((st.ok, st.timeouts, st.client_errors), (2, 1, 1));
        assert_eq!((st.retried_p50_ms, st.retried_max_ms), (9.0, 20.0));
    }

    #[test]
    fn progress_off_a_terminal_is_a_whole_line_every_few_seconds_and_nothing_for_a_short_run() {
        let t0 = Instant::now();
        let p = Progress::new(1000, false, t0);
        // A run of 2 s: 1000 answers, not one line.
        let written: Vec<String> =
            (1..=1000).filter_map(|n| p.after(n, t0 + Duration::from_millis(2 * n as u64))).collect();
        assert!(written.is_empty(), "{written:?}");
        assert_eq!(p.finish(), None);
        // A run of 20 s: a line every 5 s, each whole.
        let p = Progress::new(1000, false, t0);
        let written: Vec<String> =
            (1..=1000).filter_map(|n| p.after(n, t0 + Duration::from_millis(20 * n as u64))).collect();
        assert_eq!(written.len(), 3, "{written:?}");
        assert!(written.iter().all(|l| l.ends_with('\n') && !l.contains('\r')), "{written:?}");
        assert_eq!(written[0], "load: 250/1000 requests (25%), 5 s\n");
    }

    #[test]
    fn progress_on_a_terminal_is_redrawn_in_place_once_per_percent() {
        let t0 = Instant::now();
        let p = Progress::new(1000, true, t0);
        let written: Vec<String> = (1..=1000).filter_map(|n| p.after(n, t0)).collect();
        assert_eq!(written.len(), 101, "0 % to 100 %");
        assert!(written.iter().all(|l| l.starts_with('\r') && !l.contains('\n')));
        assert_eq!(p.after(500, t0), None, "an answer out of order draws nothing");
        assert_eq!(p.finish(), Some("\n"));
    }
}
