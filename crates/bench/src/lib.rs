//! `baton bench`: how close Baton's sagas run to the broker's own floor, measured in one run on
//! one broker.
//!
//! Owns: the raw floor (bare durable request/reply round trips with Baton's AMQP plumbing and no
//! database: an echo responder and a requester in this process, in a vhost of their own,
//! [`Floor`]); create-space sagas of each mode with every component as its own `baton run`
//! process (each service `instances` times, competing on its queues) in a fresh vhost and data
//! dir, optionally prefilled with spaces ([`Prefill`]), driven through the HTTP gateway one at a
//! time and with each window in flight, and in workflow mode straight into the orchestrator too
//! ([`ModeReport`]); the ratios to the floor ([`Ratios`]), which divide by the round trips of
//! the workflow actually run; the orchestrator's RSS with many sagas in flight at once, in a
//! fleet of its own whose services never answer during that phase ([`Hold`]); the stages of a
//! hop and the store conflicts, read from the components' own `/metrics` ([`Stages`]); and the
//! [`Report`] with its [`table`] for people (JSON through `serde`).
//!
//! Must not touch: component internals (it drives them from the outside, as an operator or a
//! client would, through `baton-fleet`, which owns the processes and what they cost), the CLI
//! (which parses flags into [`Options`] and calls [`run`]), or time assertions: figures depend
//! on the machine and are reported, never judged here.
//!
//! Layout: `floor` (the raw floor), `sagas` (one mode's runs and its prefill), `hold` (the
//! sagas held in flight), `rpc`
//! (request/reply over AMQP, the echo responder), `drive` (one at a time, closed loop, a fixed
//! count), `stats` ([`Latency`], [`Throughput`]), `scrape` (the components' `/metrics`),
//! `table`.

mod drive;
mod floor;
mod hold;
mod instrument;
mod rpc;
mod sagas;
mod scrape;
mod stats;
mod table;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use baton_amqp::topology::QueueType;
use baton_fleet::cpu_ms;
use baton_mgmt::Mgmt;
use baton_protocol::{Mode, Service};
use baton_workflow::Workflow;
use serde::Serialize;

pub use baton_fleet::ComponentUsage;
pub use floor::Floor;
pub use hold::Hold;
pub use instrument::{InstrumentRow, Instrumentation};
pub use sagas::{MessageCount, ModeReport, Prefill, nominal_messages};
pub use scrape::{StageRow, Stages};
pub use stats::{Latency, Throughput};
pub use table::table;

/// Longest wait for one answer (a reply, a saga's outcome, an HTTP response); the gateway's
/// deadline is set to it too, in both modes.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests in flight while a mode is prefilled.
pub const PREFILL_IN_FLIGHT: usize = 256;

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
    /// The workflow each saga runs (workflow mode): a bundled one or one of `workflow_files`.
    pub workflow: String,
    /// Workflow definition files (JSON) given to every component (`--workflow-file`), each
    /// adding a workflow or replacing the bundled one of its name.
    pub workflow_files: Vec<PathBuf>,
    /// Processes of each of the five services and of the orchestrator (competing consumers on
    /// the same queues, sharing their store, each its own `--instance i<n>` when more than
    /// one); the gateway runs once.
    pub instances: usize,
    /// A PostgreSQL server for the components' state (each mode in a database of its own,
    /// created and dropped by the run) instead of SQLite files in the mode's data dir.
    pub database_url: Option<String>,
    /// After the modes, workflow mode again with 1, 2 and 3 orchestrators (and as many of each
    /// service) on SQLite and on this PostgreSQL server: the scaling table.
    pub scaling: Option<String>,
    /// Create-space sagas run through HTTP before a mode is measured, not counted, so that the
    /// databases already hold that many spaces.
    pub prefill: usize,
    /// Sagas held in flight at once in the orchestrator, after the modes, to read its RSS
    /// (0: skip that phase).
    pub hold: usize,
    /// Extra flags for every `baton run <component>` (for instance `--prefetch 256`).
    pub component_args: Vec<String>,
    /// Extra flags for the gateway only (`--no-metrics`).
    pub gateway_args: Vec<String>,
    /// Environment variables of every component process (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub component_env: Vec<(String, String)>,
    /// After the modes, workflow mode without instrumentation, with metrics, and with metrics
    /// and exported traces: what seeing the sagas costs.
    pub instrumentation: bool,
    /// Keep the vhosts (to look at them in the management UI) instead of deleting them.
    pub keep_vhosts: bool,
    /// Print what is being measured to stderr as it starts.
    pub progress: bool,
    /// Read every component's stage timings (`/metrics`, each process serving its own) over
    /// the one-at-a-time HTTP run: the stage table.
    pub stages: bool,
    /// The kind of the components' work queues (`--queue-type`) in every run but the floor's.
    pub queue_type: QueueType,
    /// After the modes, workflow mode again on classic queues: the row "workflow, classic
    /// queues" (labelled `classic`).
    pub classic_row: bool,
    /// Read the components' `/metrics` even without `stages` (the scaling rows' conflicts).
    read_metrics: bool,
}

impl Options {
    /// A full run: 500 one at a time after 50 warm-up, 64 and 256 in flight for 20 s each, the
    /// floor and the orchestrator with 64 in flight, both modes, then 10,000 sagas held in
    /// flight.
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
            workflow_files: Vec::new(),
            instances: 1,
            database_url: None,
            scaling: None,
            prefill: 0,
            hold: 10_000,
            component_args: Vec::new(),
            gateway_args: Vec::new(),
            component_env: Vec::new(),
            instrumentation: false,
            keep_vhosts: false,
            progress: false,
            stages: false,
            queue_type: QueueType::default(),
            classic_row: false,
            read_metrics: false,
        }
    }

    /// The workflow sagas run in workflow mode, loaded as the components load it: the bundled
    /// ones, replaced or joined by `workflow_files`, then the one named `workflow`.
    /// The workflow the gateway runs in `mode`: `--workflow`, except that hybrid mode runs
    /// create-space-hybrid unless `--workflow` names one with an event step.
    pub(crate) fn workflow_of(&self, mode: Mode) -> &str {
        let emits = self.load_workflow().is_ok_and(|w| w.emits_events());
        if mode == Mode::Hybrid && !emits { "create-space-hybrid" } else { &self.workflow }
    }

    /// Whether the components serve and the bench reads their `/metrics`: the recorder costs
    /// a little, so only when a figure needs it.
    pub(crate) fn scrapes(&self) -> bool {
        self.stages || self.read_metrics
    }

    pub fn load_workflow(&self) -> anyhow::Result<Workflow> {
        let mut all = Workflow::bundled_and(&self.workflow_files)?;
        match all.iter().position(|w| w.name == self.workflow) {
            Some(i) => Ok(all.swap_remove(i)),
            None => {
                let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
                bail!("--workflow {}: no such workflow; known: {}", self.workflow, names.join(", "))
            }
        }
    }

    /// `--workflow-file <absolute path>` for each of `workflow_files`, for the components'
    /// command lines (absolute, so that they find it whatever their working dir).
    pub(crate) fn workflow_file_args(&self) -> Vec<String> {
        self.workflow_files
            .iter()
            .flat_map(|file| {
                let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
                ["--workflow-file".to_owned(), file.display().to_string()]
            })
            .collect()
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
        if self.instances == 0 {
            bail!("each service needs at least 1 instance");
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

/// Round trips of one saga of `mode`: the actions of `workflow` in workflow mode, the five
/// services of the chain in events mode (which runs no workflow), the awaited actions of
/// create-space-hybrid in hybrid mode (its follow-ups are not waited for).
pub fn steps(workflow: &Workflow, mode: Mode) -> usize {
    match mode {
        Mode::Workflow => workflow.actions().count(),
        Mode::Events => Service::ALL.len(),
        Mode::Hybrid if workflow.emits_events() => workflow.actions().count(),
        Mode::Hybrid => Workflow::create_space_hybrid().actions().count(),
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
    pub workflow_files: Vec<PathBuf>,
    /// Round trips of one workflow-mode saga (the workflow's actions), in that mode's latency
    /// ratio's denominator; each mode's own is in [`ModeReport::steps`].
    pub steps: usize,
    /// Processes of each service.
    pub instances: usize,
    /// Create-space sagas run before each mode, not counted.
    pub prefill: usize,
    /// Sagas held in flight for the orchestrator's RSS (0: not measured).
    pub hold: usize,
}

/// The broker messages per second one loaded saga run achieved, and its share of the floor's.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MessageRate {
    pub in_flight: usize,
    /// Messages per saga times sagas per second.
    pub messages_per_second: f64,
    /// `messages_per_second` / the floor's messages per second (targets: workflow at least 0.6 at 64
    /// in flight and 0.75 at 256, events at least 0.75).
    pub of_floor: f64,
}

/// One mode's figures next to the floor's.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Ratios {
    /// HTTP p50 one at a time / (the mode's steps x the floor's p50) (targets: workflow at
    /// most 1.5, events at most 1.0).
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
        let latency = |l: &Latency| l.p50_ms / (m.steps as f64 * floor.sequential.p50_ms);
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

/// Workflow mode on one backend with `instances` orchestrators and as many of each service.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScaleRow {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub instances: usize,
    /// Through HTTP, one at a time.
    pub sequential: Latency,
    /// Through HTTP, the first window's in flight.
    pub loaded: Throughput,
    pub ratios: Ratios,
    /// The components' CPU time per saga of the loaded run (its `cpu_ms_per_op`).
    pub cpu_ms_per_saga: f64,
    /// PostgreSQL transactions retried after a conflict, per 1,000 sagas of the row (its
    /// every run); `None` when the components' metrics could not be read.
    pub conflicts_per_1000_sagas: Option<f64>,
    /// The stage timings of its one-at-a-time run (`--stages`).
    pub stages: Option<Stages>,
    /// Its CPU per saga over one instance's at the same sagas/s (interpolated between the
    /// one-instance row's probes), with more than one instance: what an instance adds, apart
    /// from what a lighter load on each process costs. `None` outside the probes' range.
    pub cpu_vs_one_at_same_rate: Option<f64>,
    /// With one instance, loaded runs at fewer in flight than the row's (sagas/s, CPU ms per
    /// saga): the probes the other rows are compared with.
    pub probes: Vec<Throughput>,
}

/// The in-flight counts of the one-instance scaling rows' probes, as fractions of the first
/// window: low enough to reach the throughput of three instances on two cores.
const PROBE_DIVISORS: [usize; 4] = [16, 8, 4, 2];

/// `points`' CPU per saga at `rate` sagas/s, linear between the two points around it; `None`
/// outside their range.
fn cpu_at_rate(points: &[Throughput], rate: f64) -> Option<f64> {
    let mut sorted: Vec<&Throughput> = points.iter().filter(|p| p.per_second > 0.0).collect();
    sorted.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    sorted.windows(2).find(|w| w[0].per_second <= rate && rate <= w[1].per_second).map(|w| {
        let (a, b) = (w[0], w[1]);
        let span = b.per_second - a.per_second;
        if span <= 0.0 {
            return a.cpu_ms_per_op;
        }
        a.cpu_ms_per_op + (rate - a.per_second) / span * (b.cpu_ms_per_op - a.cpu_ms_per_op)
    })
}

/// The backends and instance counts of the scaling table.
pub const SCALING_INSTANCES: [usize; 3] = [1, 2, 3];

/// Everything one bench measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub floor: Floor,
    pub modes: Vec<ModeReport>,
    /// The orchestrator with `settings.hold` sagas in flight, when asked for.
    pub hold: Option<Hold>,
    /// Workflow mode by backend and number of instances, when asked for (`--scaling`).
    pub scaling: Vec<ScaleRow>,
    /// Workflow mode by instrumentation, when asked for (`--instrumentation`).
    pub instrumentation: Vec<InstrumentRow>,
    /// CPU time of the bench process itself (load generator, the floor's requester and echo
    /// responder), over the whole run.
    pub bench_cpu_ms: f64,
    pub elapsed_s: f64,
}

/// Measure the floor, then each mode, and compare them.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    opts.check()?;
    let workflow = opts.load_workflow()?;
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
        let wf = if mode == Mode::Hybrid && !workflow.emits_events() {
            Workflow::create_space_hybrid()
        } else {
            workflow.clone()
        };
        let mut m = sagas::run_mode(opts, mode, steps(&wf, mode), &say).await?;
        m.ratios = Ratios::of(&floor, &m);
        modes.push(m);
    }
    if opts.classic_row && opts.queue_type != QueueType::Classic {
        say("workflow mode again, on classic queues");
        let row_opts =
            Options { queue_type: QueueType::Classic, out_dir: opts.out_dir.join("classic"), ..opts.clone() };
        let mut m =
            sagas::run_mode(&row_opts, Mode::Workflow, steps(&workflow, Mode::Workflow), &say).await?;
        m.ratios = Ratios::of(&floor, &m);
        modes.push(m);
    }
    let hold = match opts.hold {
        0 => None,
        _ => Some(hold::measure(opts, &workflow, &say).await?),
    };
    let mut scaling = Vec::new();
    if let Some(url) = &opts.scaling {
        for (backend, database_url) in [("sqlite", None), ("postgres", Some(url.clone()))] {
            let mut probes: Vec<Throughput> = Vec::new();
            for instances in SCALING_INSTANCES {
                say(&format!("scaling: workflow mode on {backend} with {instances} orchestrator(s)"));
                let first = opts.windows.first().copied().unwrap_or(64);
                let mut windows = vec![first];
                if instances == 1 {
                    windows.extend(PROBE_DIVISORS.iter().map(|d| (first / d).max(1)).filter(|w| *w < first));
                    windows.dedup();
                }
                let row_opts = Options {
                    instances,
                    database_url: database_url.clone(),
                    windows,
                    prefill: 0,
                    out_dir: opts.out_dir.join(format!("scaling-{backend}-{instances}")),
                    read_metrics: true,
                    ..opts.clone()
                };
                let mut m =
                    sagas::run_mode(&row_opts, Mode::Workflow, steps(&workflow, Mode::Workflow), &say)
                        .await?;
                m.ratios = Ratios::of(&floor, &m);
                let loaded = m.http_loaded.first().cloned().unwrap_or_default();
                if instances == 1 {
                    probes = m.http_loaded.clone();
                }
                let cpu_vs_one_at_same_rate = (instances > 1)
                    .then(|| cpu_at_rate(&probes, loaded.per_second))
                    .flatten()
                    .filter(|one| *one > 0.0)
                    .map(|one| loaded.cpu_ms_per_op / one);
                scaling.push(ScaleRow {
                    backend: backend.into(),
                    instances,
                    sequential: m.http_sequential,
                    cpu_ms_per_saga: loaded.cpu_ms_per_op,
                    conflicts_per_1000_sagas: m.conflicts_retried.map(|c| per_1000(c, m.sagas)),
                    loaded,
                    ratios: m.ratios,
                    stages: m.stages,
                    cpu_vs_one_at_same_rate,
                    // The row's own window first, then the probes.
                    probes: if instances == 1 { probes[1..].to_vec() } else { Vec::new() },
                });
            }
        }
    }
    let instrumentation = match opts.instrumentation {
        true => instrument::measure(opts, steps(&workflow, Mode::Workflow), &say).await?,
        false => Vec::new(),
    };
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
            workflow_files: opts.workflow_files.clone(),
            steps: steps(&workflow, Mode::Workflow),
            instances: opts.instances,
            prefill: opts.prefill,
            hold: opts.hold,
        },
        floor,
        modes,
        hold,
        scaling,
        instrumentation,
        bench_cpu_ms: cpu_ms("self").unwrap_or(0.0) - cpu,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// `count` per 1,000 of `sagas`.
fn per_1000(count: f64, sagas: u64) -> f64 {
    count * 1000.0 / sagas.max(1) as f64
}

/// Six hex digits that tell one run's vhosts and names from another's.
pub(crate) fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// The broker URL of `vhost`.
pub(crate) fn amqp_url(opts: &Options, vhost: &str) -> String {
    format!("{}/{vhost}", opts.amqp_base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(workflow: &str, files: &[&str]) -> Options {
        let mgmt = Mgmt::new("http://127.0.0.1:15672", "guest", "guest");
        let mut o = Options::new("baton".into(), "amqp://127.0.0.1".into(), mgmt, "out".into());
        o.workflow = workflow.into();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../workflow/workflows/bench");
        o.workflow_files = files.iter().map(|f| dir.join(f)).collect();
        o
    }

    fn at(per_second: f64, cpu_ms_per_op: f64) -> Throughput {
        Throughput { per_second, cpu_ms_per_op, ..Throughput::default() }
    }

    #[test]
    fn one_instance_cpu_is_read_between_the_probes_around_a_rate_and_never_beyond_them() {
        // In the order the runs were made: the row's own window first, then the probes.
        let probes = [at(460.0, 2.3), at(200.0, 4.4), at(320.0, 3.1), at(0.0, 9.9)];
        assert_eq!(cpu_at_rate(&probes, 200.0), Some(4.4));
        assert!((cpu_at_rate(&probes, 260.0).unwrap() - 3.75).abs() < 1e-9);
        assert!((cpu_at_rate(&probes, 390.0).unwrap() - 2.7).abs() < 1e-9);
        assert_eq!(cpu_at_rate(&probes, 199.0), None, "below the slowest probe");
        assert_eq!(cpu_at_rate(&probes, 461.0), None, "above the fastest");
        assert_eq!(cpu_at_rate(&probes[..1], 460.0), None, "one point is no range");
    }

    #[test]
    fn the_steps_come_from_the_workflow_run() {
        let wf = options("create-space", &[]).load_workflow().unwrap();
        assert_eq!((steps(&wf, Mode::Workflow), steps(&wf, Mode::Events)), (5, 5));
        let files = ["bench-4-steps.json", "bench-16-steps.json"];
        let wf = options("bench-16-steps", &files).load_workflow().unwrap();
        assert_eq!((steps(&wf, Mode::Workflow), steps(&wf, Mode::Events)), (16, 5));
        let wf = options("bench-4-steps", &files).load_workflow().unwrap();
        assert_eq!(steps(&wf, Mode::Workflow), 4);
        let unknown = options("bench-4-steps", &[]).load_workflow().unwrap_err().to_string();
        assert!(unknown.contains("no such workflow") && unknown.contains("create-space"), "{unknown}");
        let missing = options("x", &["nope.json"]).load_workflow().unwrap_err().to_string();
        assert!(missing.contains("cannot read workflow file"), "{missing}");
    }
}
