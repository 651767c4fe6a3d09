//! `baton compare`: both modes, side by side, under the same load and the same faults.
//!
//! Owns: one run per mode (a fresh vhost and data dir, every component as its own `baton run`
//! process, the load, the faults at their planned points: SIGKILL and restart of a component,
//! the broker dropping every connection, the orchestrator's wall clock jumping ([`clock`]), the
//! data dir's disk full on a tmpfs of its own), the wait for quiescence, the audit, the reconcile of
//! the events run, and the results ([`Comparison`]) with their table and HTML report
//! ([`report`]). Must not touch: component internals; it drives them from the outside, as an
//! operator would, through `baton-fleet` (which spawns, crashes, restarts and stops them, and
//! whose `FaultDriver` fires the plan's faults: `hooks` gives it the ones only a comparison
//! can inject), and reads their stores through their read models.

pub mod clock;
mod hooks;
pub mod poison;
pub mod report;
mod run;
pub mod timeline;
pub mod tmpfs;
pub mod verdict;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use baton_faults::FaultPlan;
use baton_load::Stats;
use baton_protocol::Mode;
use serde::Serialize;

pub use run::run_mode;

/// One mode under the full fault plan for a while: `baton chaos`.
pub async fn chaos(opts: &Options, mode: Mode) -> anyhow::Result<ModeRun> {
    run_mode(opts, mode).await
}

/// How to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// The modes [`compare`] runs, in order (`--modes`); chaos runs one mode and ignores it.
    pub modes: Vec<Mode>,
    /// The `baton` binary that runs the components.
    pub baton_bin: PathBuf,
    /// The broker without a vhost: `amqp://guest:guest@127.0.0.1:5672`.
    pub amqp_base: String,
    pub mgmt: baton_mgmt::Mgmt,
    /// Where each mode's data dir goes (`<out>/workflow`, `<out>/events`).
    pub out_dir: PathBuf,
    pub requests: usize,
    pub concurrency: usize,
    pub seed: u64,
    pub refusal_rate: f64,
    pub faults: FaultPlan,
    /// Longest wait for the system to settle after the load.
    pub quiesce_timeout: Duration,
    /// Keep the vhosts (to look at them in the management UI) instead of deleting them.
    pub keep_vhosts: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// A timed run (`baton chaos`): send requests for this long (at most `requests` of them),
    /// and place the plan's faults at shares of the time instead of the requests.
    pub duration: Option<Duration>,
    /// How to stop and start the broker for the plan's `restart-broker`, e.g.
    /// `["rabbitmqctl", "-n", "rabbit@localhost"]` (`stop_app` / `start_app` are appended).
    pub broker_ctl: Option<Vec<String>>,
    /// The gateways' deadline, the same in both modes; `None` keeps each mode's own.
    pub deadline: Option<Duration>,
    /// A PostgreSQL server to keep the components' state on (each mode in a database of its
    /// own, created and dropped by the run) instead of SQLite files in the mode's data dir.
    pub database_url: Option<String>,
    /// Processes of the orchestrator and of each service (competing consumers sharing their
    /// store); the gateway runs once, the load's one address.
    pub instances: usize,
    /// Send each request with an `Idempotency-Key` and retry one answered 504 (or not at all)
    /// with it, up to this many times ([`baton_load::Spec::retry_timeouts`]).
    pub retry_timeouts: Option<u32>,
    /// The workflow the gateway runs in workflow mode (`--workflow`); `None` keeps the default.
    pub workflow: Option<String>,
}

impl Options {
    /// A comparison of the defaults of `baton compare`: 500 requests at concurrency 16, seed 1,
    /// 10 % natural refusals, the default fault plan, a minute to settle, no progress bar.
    pub fn new(baton_bin: PathBuf, amqp_base: String, mgmt: baton_mgmt::Mgmt, out_dir: PathBuf) -> Options {
        Options {
            modes: vec![Mode::Workflow, Mode::Events],
            baton_bin,
            amqp_base,
            mgmt,
            out_dir,
            requests: 500,
            concurrency: 16,
            seed: 1,
            refusal_rate: 0.1,
            faults: FaultPlan::parse(FaultPlan::DEFAULT, 1).expect("the default plan parses"),
            quiesce_timeout: Duration::from_secs(60),
            keep_vhosts: false,
            progress: false,
            duration: None,
            broker_ctl: None,
            deadline: None,
            database_url: None,
            instances: 1,
            retry_timeouts: None,
            workflow: None,
        }
    }
}

/// The results of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct ModeRun {
    pub mode: Mode,
    pub vhost: String,
    pub data_dir: PathBuf,
    pub stats: Stats,
    /// Latency of every request, in µs, in request order.
    pub latencies_us: Vec<u64>,
    /// When each request was first sent, in µs from the start of the load, in request order.
    pub sent_us: Vec<u64>,
    /// HTTP status of every request (0: no answer), in request order.
    pub statuses: Vec<u16>,
    /// The step that refused each request, when one did.
    pub refused_at: Vec<Option<String>>,
    /// Messages the broker confirmed: every component's relay, plus the gateway's requests.
    pub messages: i64,
    pub quiescent: bool,
    pub quiesce_ms: u64,
    pub audit: baton_audit::Report,
    pub reconcile: Option<baton_reconcile::Summary>,
    pub audit_after_reconcile: Option<baton_audit::Report>,
    /// Faults actually injected, by kind.
    pub injected: BTreeMap<String, usize>,
    /// When each fault injected was in force, from the start of the load.
    pub faults: Vec<FaultMark>,
    /// Sagas neither completed, rolled back nor cancelled once the system settled.
    pub unfinished: i64,
    /// Messages still waiting in an outbox (or set aside as unroutable) once it settled.
    pub left_in_outbox: i64,
    /// Dead-letter queues holding messages, with the reasons of the first ones.
    pub dead_letters: Vec<baton_amqp::dlq::DeadQueue>,
    /// Processes that exited on their own and were started again by the fleet's supervisor,
    /// with how many times (the plan's own crashes are not counted here).
    pub restarted: BTreeMap<String, u32>,
}

impl ModeRun {
    /// Nothing lost: every saga ended, every outbox emptied, and no message dead-lettered but
    /// the run's own bad messages, each of which did reach a dead-letter queue.
    pub fn nothing_lost(&self) -> bool {
        let (planned, other) = poison::tally(&self.dead_letters);
        self.unfinished == 0
            && self.left_in_outbox == 0
            && other == 0
            && planned as usize >= self.bad_inputs_sent()
    }

    /// Bad messages the plan put on the work queues.
    pub fn bad_inputs_sent(&self) -> usize {
        self.injected.get("bad input").copied().unwrap_or(0)
    }

    pub fn messages_per_request(&self) -> f64 {
        self.messages as f64 / self.stats.requests.max(1) as f64
    }

    /// Requests answered 504 whose space completed later, and those whose space never did.
    pub fn timeouts_split(&self) -> (usize, usize) {
        let completed =
            self.audit.uncertain.iter().filter(|v| v.kind == baton_audit::Kind::TimedOutButCompleted).count();
        (completed, self.stats.timeouts.saturating_sub(completed))
    }
}

/// When one fault was in force, in ms from the start of the load: a crash from the kill to the
/// restart, the broker from its stop to its start, a full disk until it was freed; an instant
/// fault (dropped connections, a clock jump, a bad message) for as long as injecting it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultMark {
    /// As counted in [`ModeRun::injected`]: `crash routing`, `connections dropped`.
    pub kind: String,
    pub from_ms: u64,
    pub to_ms: u64,
}

impl FaultMark {
    /// `window` in ms from `start`; one before the start counts from the start.
    pub fn of(window: &baton_fleet::Window, start: std::time::Instant) -> FaultMark {
        let ms = |t: std::time::Instant| t.saturating_duration_since(start).as_millis() as u64;
        FaultMark { kind: window.kind.clone(), from_ms: ms(window.from), to_ms: ms(window.to) }
    }
}

/// Both runs, with what they had in common.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub requests: usize,
    pub concurrency: usize,
    pub seed: u64,
    pub refusal_rate: f64,
    pub plan: String,
    /// Timed-out requests were retried with their key, up to this many times.
    pub retry_timeouts: Option<u32>,
    pub runs: Vec<ModeRun>,
}

/// Run each of `opts.modes`, one after the other, on the same load and the same plan.
pub async fn compare(opts: &Options) -> anyhow::Result<Comparison> {
    let mut runs = Vec::new();
    for &mode in &opts.modes {
        runs.push(run_mode(opts, mode).await?);
    }
    Ok(Comparison {
        requests: opts.requests,
        concurrency: opts.concurrency,
        seed: opts.seed,
        refusal_rate: opts.refusal_rate,
        plan: opts.faults.to_string(),
        retry_timeouts: opts.retry_timeouts,
        runs,
    })
}

/// Text made safe to put in the report's HTML and SVG.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
