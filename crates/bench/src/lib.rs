//! `baton bench`: how close Baton's sagas run to the broker's own floor, measured in one run on
//! one broker.
//!
//! Owns: the raw floor (bare durable request/reply round trips with Baton's AMQP plumbing and no
//! database: an echo responder and a requester in this process, in a vhost of their own,
//! [`Floor`]); create-space sagas of each mode with every component as its own `baton run`
//! process in a fresh vhost and data dir, driven through the HTTP gateway one at a time and with
//! each window in flight, and in workflow mode straight into the orchestrator too
//! ([`ModeReport`]); the CPU time and peak RSS of each component (from `/proc`); the ratios to the
//! floor ([`Ratios`]); and the [`Report`] with its [`table`] for people (JSON through `serde`).
//!
//! Must not touch: component internals (it drives them from the outside, as an operator or a
//! client would), the CLI (which parses flags into [`Options`] and calls [`run`]), or time
//! assertions: figures depend on the machine and are reported, never judged here.
//!
//! The component processes, their readiness and what they cost are `baton-fleet`'s.
//!
//! Layout: `floor` (the raw floor), `sagas` (one mode's runs), `rpc` (request/reply over AMQP,
//! the echo responder), `drive` (one at a time, closed loop), `stats` ([`Latency`],
//! [`Throughput`]), `table`.

mod drive;
mod floor;
mod rpc;
mod sagas;
mod stats;
mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use baton_compare::mgmt::Mgmt;
use baton_fleet::cpu_ms;
use baton_protocol::{Mode, Service};
use serde::Serialize;

pub use baton_fleet::ComponentUsage;
pub use floor::Floor;
pub use sagas::{MessageCount, ModeReport};
pub use stats::{Latency, Throughput};
pub use table::table;

/// Longest wait for one answer (a reply, a saga's outcome, an HTTP response); the gateway's
/// deadline is set to it too, in both modes.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Round trips a saga is compared with: the five steps of create-space.
pub const STEPS: usize = Service::ALL.len();

/// Progress lines for stderr.
pub(crate) type Say = dyn Fn(&str) + Send + Sync;

/// What to measure, and how long. [`Options::new`] gives the defaults of a full run (a few
/// minutes).
#[derive(Debug, Clone)]
pub struct Options {
    /// The `baton` binary that runs the components.
    pub baton_bin: PathBuf,
    /// The broker without a vhost: `amqp://guest:guest@127.0.0.1:5672`.
    pub amqp_base: String,
    pub mgmt: Mgmt,
    /// Where each mode's data dir and component logs go (`<out>/workflow`, `<out>/events`).
    pub out_dir: PathBuf,
    /// Requests measured one at a time (after the warm-up), for each kind of one-at-a-time run.
    pub sequential: usize,
    /// Requests sent before each one-at-a-time run, not measured.
    pub warmup: usize,
    /// Requests kept in flight through HTTP, one loaded run per entry.
    pub windows: Vec<usize>,
    /// Length of each loaded saga run.
    pub duration: Duration,
    /// Requests kept in flight for the loaded floor and the loaded run straight into the
    /// orchestrator.
    pub in_flight: usize,
    /// Length of the loaded floor run.
    pub floor_duration: Duration,
    /// The modes to run, in this order.
    pub modes: Vec<Mode>,
    /// The workflow each saga runs.
    pub workflow: String,
    /// Extra flags for every `baton run <component>` (for instance `--prefetch 256`).
    pub component_args: Vec<String>,
    /// Keep the vhosts (to look at them in the management UI) instead of deleting them.
    pub keep_vhosts: bool,
    /// Print what is being measured to stderr as it starts.
    pub progress: bool,
}

impl Options {
    /// A full run: 500 one at a time after 50 warm-up, 64 and 256 in flight for 20 s each, the
    /// floor and the orchestrator with 64 in flight, both modes.
    pub fn new(baton_bin: PathBuf, amqp_base: String, mgmt: Mgmt, out_dir: PathBuf) -> Options {
        Options {
            baton_bin,
            amqp_base,
            mgmt,
            out_dir,
            sequential: 500,
            warmup: 50,
            windows: vec![64, 256],
            duration: Duration::from_secs(20),
            in_flight: 64,
            floor_duration: floor::DEFAULT_DURATION,
            modes: vec![Mode::Workflow, Mode::Events],
            workflow: "create-space".into(),
            component_args: Vec::new(),
            keep_vhosts: false,
            progress: false,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.sequential == 0 {
            bail!("the number of requests one at a time must be at least 1");
        }
        if self.in_flight == 0 || self.windows.contains(&0) {
            bail!("every window must hold at least 1 request in flight");
        }
        if self.duration.is_zero() || self.floor_duration.is_zero() {
            bail!("each loaded run must last some time; give a duration such as 20s");
        }
        if self.modes.is_empty() {
            bail!("give at least one mode to measure: workflow, events or both");
        }
        if !self.baton_bin.exists() {
            bail!("the baton binary {} does not exist", self.baton_bin.display());
        }
        Ok(())
    }
}

/// The machine the figures were taken on.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Machine {
    pub cpus: usize,
    /// `/proc/loadavg` when the bench started (1, 5 and 15 minutes): other work disturbs the
    /// figures.
    pub load_average: [f64; 3],
}

impl Machine {
    fn now() -> Machine {
        let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut l = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_average: [l.next().unwrap_or(0.0), l.next().unwrap_or(0.0), l.next().unwrap_or(0.0)],
        }
    }
}

/// The settings a report was measured with.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Settings {
    pub sequential: usize,
    pub warmup: usize,
    pub windows: Vec<usize>,
    pub duration_s: f64,
    pub in_flight: usize,
    pub floor_duration_s: f64,
    pub workflow: String,
    /// Round trips in the latency ratio's denominator.
    pub steps: usize,
}

/// The broker messages per second one loaded saga run achieved, and its share of the floor's.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MessageRate {
    pub in_flight: usize,
    /// Messages per saga times sagas per second.
    pub messages_per_second: f64,
    /// `messages_per_second` / the floor's messages per second (target: at least 0.5).
    pub of_floor: f64,
}

/// One mode's figures next to the floor's.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Ratios {
    /// HTTP p50 one at a time / (`STEPS` x the floor's p50) (target: at most 1.5).
    pub http_latency: f64,
    /// The same straight into the orchestrator (workflow mode).
    pub direct_latency: Option<f64>,
    /// One per HTTP window.
    pub http_messages: Vec<MessageRate>,
    /// Straight into the orchestrator (workflow mode).
    pub direct_messages: Option<MessageRate>,
}

impl Ratios {
    fn of(floor: &Floor, m: &ModeReport) -> Ratios {
        let latency = |l: &Latency| l.p50_ms / (STEPS as f64 * floor.sequential.p50_ms);
        let rate = |t: &Throughput| {
            let messages_per_second = m.messages_per_saga * t.per_second;
            MessageRate {
                in_flight: t.in_flight,
                messages_per_second,
                of_floor: messages_per_second / floor.messages_per_second,
            }
        };
        Ratios {
            http_latency: latency(&m.http_sequential),
            direct_latency: m.direct_sequential.as_ref().map(latency),
            http_messages: m.http_loaded.iter().map(rate).collect(),
            direct_messages: m.direct_loaded.as_ref().map(rate),
        }
    }
}

/// Everything one bench measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub floor: Floor,
    pub modes: Vec<ModeReport>,
    /// CPU time of the bench process itself (load generator, the floor's requester and echo
    /// responder), over the whole run.
    pub bench_cpu_ms: f64,
    pub elapsed_s: f64,
}

/// Measure the floor, then each mode, and compare them.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    opts.check()?;
    let started = Instant::now();
    let cpu = cpu_ms("self").unwrap_or(0.0);
    let machine = Machine::now();
    let progress = opts.progress;
    let say = move |line: &str| {
        if progress {
            eprintln!("bench: {line}");
        }
    };
    std::fs::create_dir_all(&opts.out_dir)?;
    let floor = floor::measure(opts, &say).await?;
    let mut modes = Vec::new();
    for &mode in &opts.modes {
        let mut m = sagas::run_mode(opts, mode, &say).await?;
        m.ratios = Ratios::of(&floor, &m);
        modes.push(m);
    }
    Ok(Report {
        machine,
        settings: Settings {
            sequential: opts.sequential,
            warmup: opts.warmup,
            windows: opts.windows.clone(),
            duration_s: opts.duration.as_secs_f64(),
            in_flight: opts.in_flight,
            floor_duration_s: opts.floor_duration.as_secs_f64(),
            workflow: opts.workflow.clone(),
            steps: STEPS,
        },
        floor,
        modes,
        bench_cpu_ms: cpu_ms("self").unwrap_or(0.0) - cpu,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// Six hex digits that tell one run's vhosts and names from another's.
pub(crate) fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// The broker URL of `vhost`.
pub(crate) fn amqp_url(opts: &Options, vhost: &str) -> String {
    format!("{}/{vhost}", opts.amqp_base.trim_end_matches('/'))
}
