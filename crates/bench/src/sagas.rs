//! Create-space sagas of one mode: the components as `baton run` processes in a fresh vhost and
//! data dir (each service `instances` times), the prefill through the HTTP gateway (not
//! counted), requests through the gateway (one at a time, then each window for the run's
//! duration), and in workflow mode the same straight into the orchestrator.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use baton_amqp::topology::{self, COMMANDS, ORCHESTRATOR, QueueType};
use baton_amqp::{Outgoing, TraceParent};
use baton_fleet::{ComponentUsage, Fleet, Process, free_port};
use baton_protocol::{Context, Mode, SCHEMA, START, SagaOutcome, Service, StartSaga};
use baton_store::Location;
use serde::Serialize;
use uuid::Uuid;

use crate::drive::{closed_loop, fixed_count, one_at_a_time};
use crate::rpc::Rpc;
use crate::scrape::{Scrape, Stages, scrape};
use crate::stats::{Latency, Throughput};
use crate::{Options, PREFILL_IN_FLIGHT, REPLY_TIMEOUT, Ratios, Say};

/// Broker messages of one successful saga of `steps` round trips: in workflow mode the start,
/// one command and one reply per action, and the answer (12 for create-space); in events mode
/// `space.requested` and the event each service emits (6); in hybrid mode the workflow's
/// messages and the one `space.created` the follow-ups share (11 for create-space-hybrid).
pub fn nominal_messages(mode: Mode, steps: usize) -> f64 {
    match mode {
        Mode::Workflow => (2 * steps + 2) as f64,
        Mode::Events => (steps + 1) as f64,
        Mode::Hybrid => (2 * steps + 3) as f64,
    }
}

/// The label of workflow mode run on classic queues, in the table: "workflow, classic queues".
pub(crate) const CLASSIC: &str = "classic";

impl ModeReport {
    /// What the table calls this run: its mode, or [`CLASSIC`] for a run on classic queues.
    pub fn label(&self) -> &'static str {
        match self.queue_type {
            QueueType::Classic => CLASSIC,
            QueueType::Quorum => self.mode.as_str(),
        }
    }
}

/// Longest wait for each wave of processes to take work.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the prefill prints its progress.
const PREFILL_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the messages-per-saga figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageCount {
    /// The relays' `relay_stats.published` in every database, plus one per request (the
    /// gateway's or the bench's own start, published without a relay), over the sagas started.
    Databases,
    /// The databases could not be read: [`nominal_messages`] (12 per create-space saga in
    /// workflow mode, 6 per saga in events mode).
    Nominal,
}

/// The create-space sagas run through HTTP before a mode was measured, so that its databases
/// already held that many spaces; none of them is counted in the mode's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prefill {
    /// Sagas sent.
    pub requested: usize,
    /// Of those, the spaces created (200): what the databases held before the measured runs.
    pub spaces: usize,
    pub failed: usize,
    /// The first failure's reason, when one failed.
    pub first_error: Option<String>,
    pub in_flight: usize,
    pub seconds: f64,
}

/// The figures of one mode.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModeReport {
    pub mode: Mode,
    pub vhost: String,
    pub data_dir: PathBuf,
    /// Through HTTP, one at a time.
    pub http_sequential: Latency,
    /// Through HTTP, one entry per window, for the run's duration each.
    pub http_loaded: Vec<Throughput>,
    /// Straight into the orchestrator (workflow mode only), one at a time.
    pub direct_sequential: Option<Latency>,
    /// Straight into the orchestrator with `in_flight` outstanding.
    pub direct_loaded: Option<Throughput>,
    /// Round trips of one saga: the workflow's actions in workflow mode, the five services of
    /// the chain in events mode; the latency ratio divides by it.
    pub steps: usize,
    /// Processes of each service.
    pub instances: usize,
    /// The sagas run before the measured ones, when asked for.
    pub prefill: Option<Prefill>,
    /// Sagas started over all the measured runs of this mode (warm-ups included, the prefill
    /// not).
    pub sagas: u64,
    pub messages_per_saga: f64,
    pub messages_counted: MessageCount,
    /// Whether every outbox emptied and every saga finished after the last run.
    pub settled: bool,
    /// Each component process's CPU time and peak RSS over the mode (the prefill included),
    /// read just before it was stopped.
    pub components: Vec<ComponentUsage>,
    pub ratios: Ratios,
    /// The stage timings of the one-at-a-time HTTP run (`--stages`).
    pub stages: Option<Stages>,
    /// The kind of the components' work queues.
    pub queue_type: QueueType,
    /// PostgreSQL transactions retried after a conflict with another instance's, over the
    /// mode (the prefill included), when the components' metrics were read.
    pub conflicts_retried: Option<f64>,
}

/// The processes of `mode` in the waves they start in: first one process of each service (run
/// as `--instance i1` when there are several), the orchestrator (workflow mode) and the gateway;
/// then each further instance of every service (`i2`, `i3`...), a wave each. A wave starts once
/// the one before it consumes: the processes of one service open and migrate one SQLite file,
/// and do not all do it at the same moment.
fn waves(mode: Mode, instances: usize) -> Vec<Vec<Process>> {
    let of = |i: usize| -> Vec<Process> {
        mode.services()
            .iter()
            .map(|s| match instances {
                1 => Process::new(s.name()),
                _ => Process::instance(s.name(), format!("i{i}")),
            })
            .collect()
    };
    let orchestrator = |i: usize| match instances {
        1 => Process::new(ORCHESTRATOR),
        _ => Process::instance(ORCHESTRATOR, format!("i{i}")),
    };
    let mut first = of(1);
    if mode.runs_sagas() {
        first.push(orchestrator(1));
    }
    first.push(Process::new("gateway"));
    let more = (2..=instances).map(|i| {
        let mut wave = of(i);
        if mode.runs_sagas() {
            wave.push(orchestrator(i));
        }
        wave
    });
    std::iter::once(first).chain(more).collect()
}

/// Run one mode from a fresh vhost and data dir to its figures (ratios not filled in yet).
/// `steps`: the round trips of one saga of this mode.
pub(crate) async fn run_mode(
    opts: &Options,
    mode: Mode,
    steps: usize,
    say: &Say,
) -> anyhow::Result<ModeReport> {
    let vhost = format!("baton-bench-{mode}-{}", crate::short_id());
    let dir = opts.out_dir.join(mode.as_str());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = match &opts.database_url {
        Some(url) => Some(
            baton_store::scratch::ScratchDatabase::create(url, &format!("baton_bench_{mode}"))
                .context("creating the run's PostgreSQL database (the user needs CREATEDB)")?,
        ),
        None => None,
    };
    let store = scratch.as_ref().map_or_else(|| Location::Dir(dir.clone()), |s| s.location().clone());
    opts.mgmt.fresh_vhost(&vhost).await?;
    let amqp_url = crate::amqp_url(opts, &vhost);
    let port = free_port()?;
    let mut args: Vec<String> = [
        "--mode",
        mode.as_str(),
        "--amqp-url",
        &amqp_url,
        "--data-dir",
        &dir.display().to_string(),
        "--log",
        "warn",
    ]
    .map(String::from)
    .to_vec();
    args.extend(opts.component_args.iter().cloned());
    if opts.queue_type != QueueType::default() {
        args.extend(["--queue-type".to_owned(), opts.queue_type.to_string()]);
    }
    if let Some(s) = &scratch {
        args.extend(["--database-url".to_owned(), s.url().to_owned()]);
    }
    let gateway: Vec<String> = [
        "--http",
        &format!("127.0.0.1:{port}"),
        "--workflow",
        opts.workflow_of(mode),
        // The same patience in both modes (events mode's default is 5 s): a slow answer under
        // load is measured as slow, not turned into a 504.
        "--deadline",
        &format!("{}ms", REPLY_TIMEOUT.as_millis()),
    ]
    .map(String::from)
    .to_vec();
    let gateway = [gateway, opts.gateway_args.clone()].concat();
    let fleet = Fleet::new(&opts.baton_bin, args, &dir)
        .with_args_for(&["gateway"], gateway)
        .with_args_for(&["orchestrator", "gateway"], opts.workflow_file_args());
    let gateway = format!("http://127.0.0.1:{port}");
    let env = &opts.component_env;
    let waves = waves(mode, opts.instances)
        .into_iter()
        .map(|w| w.into_iter().map(|p| p.with_env(env.clone())).collect());
    let (waves, metrics) = with_metrics(waves.collect(), opts.scrapes(), &gateway)?;
    let stage =
        Stage { mode, amqp_url: &amqp_url, dir: &dir, store: &store, gateway, fleet: &fleet, metrics };
    let result = drive(opts, &stage, &waves, say).await;
    fleet.stop().await;
    if !opts.keep_vhosts {
        opts.mgmt.clean_up_vhost(&vhost).await;
    }
    let (runs, components, settled) = result?;
    let backend = if scratch.is_some() { "postgres" } else { "sqlite" };
    let stages = runs.stages.as_ref().map(|(scrape, sagas)| Stages {
        backend: backend.into(),
        sagas: *sagas,
        processes: scrape.answered,
        rows: scrape.rows(*sagas),
    });
    let conflicts_retried = runs.conflicts;
    let (sagas, messages_per_saga, messages_counted) =
        count_messages(&store, mode, steps, runs.direct_sent, runs.baseline).await;
    Ok(ModeReport {
        mode,
        vhost,
        data_dir: dir,
        http_sequential: runs.http_sequential,
        http_loaded: runs.http_loaded,
        direct_sequential: runs.direct_sequential,
        direct_loaded: runs.direct_loaded,
        steps,
        instances: opts.instances,
        prefill: runs.prefill,
        sagas,
        messages_per_saga,
        messages_counted,
        settled,
        components,
        ratios: Ratios::default(),
        stages,
        queue_type: opts.queue_type,
        conflicts_retried,
    })
}

/// What the runs of one mode measured.
struct Runs {
    http_sequential: Latency,
    http_loaded: Vec<Throughput>,
    direct_sequential: Option<Latency>,
    direct_loaded: Option<Throughput>,
    /// Starts the bench published itself (straight into the orchestrator).
    direct_sent: u64,
    prefill: Option<Prefill>,
    /// What the databases counted before the measured runs (the prefill's messages and
    /// requests), taken off the totals; `None` when they could not be read.
    baseline: Option<Counts>,
    /// What the components timed over the one-at-a-time HTTP run, and its sagas.
    stages: Option<(Scrape, u64)>,
    /// Store conflicts retried over the mode, when the components' metrics were read.
    conflicts: Option<f64>,
}

/// The queues that have consumers once every component of `mode` is up, with how many: one per
/// process of a service or of the orchestrator (`instances`), one for the gateway's.
fn work_queues(mode: Mode, instances: usize) -> Vec<(String, u32)> {
    let mut qs: Vec<String> = match mode {
        Mode::Workflow | Mode::Hybrid => {
            Service::ALL.iter().map(|s| topology::command_queue(s.name())).collect()
        }
        Mode::Events => Service::ALL.iter().map(|s| topology::event_queue(s.name())).collect(),
    };
    if mode == Mode::Hybrid {
        qs.extend(topology::followup_queues().into_iter().map(|q| q.name));
    }
    match mode {
        Mode::Workflow | Mode::Hybrid => {
            qs.push(topology::command_queue(ORCHESTRATOR));
            qs.push(topology::ORCHESTRATOR_REPLIES.to_owned());
            qs.push(topology::outcome_queue("main"));
        }
        Mode::Events => qs.push(topology::gateway_event_queue("main").name),
    }
    // Every queue but the gateway's (the last) has one consumer per instance.
    let last = qs.len() - 1;
    let each = u32::try_from(instances).unwrap_or(u32::MAX);
    qs.into_iter().enumerate().map(|(i, q)| (q, if i < last { each } else { 1 })).collect()
}

/// A space name of 63 characters at most, unique within the mode: `b<run>-<phase>-<i>`.
pub(crate) fn space_name(run: &str, phase: &str, i: usize) -> String {
    format!("b{run}-{phase}-{i}")
}

/// Three spaces per owner: what the free plan allows.
pub(crate) fn owner(run: &str, phase: &str, i: usize) -> String {
    format!("o{run}-{phase}-{}", i / 3)
}

/// `POST /spaces` on the gateway; success is a 200.
struct Http {
    client: reqwest::Client,
    url: String,
}

impl Http {
    async fn create(&self, name: String, owner: String) -> Result<(), String> {
        let r = self
            .client
            .post(&self.url)
            .json(&serde_json::json!({"name": name, "owner": owner}))
            .send()
            .await
            .map_err(|e| format!("POST {}: {e}", self.url))?;
        let status = r.status();
        // Read the whole body: the answer is only complete then, and the connection is reused.
        let body = r.bytes().await.map_err(|e| format!("reading the answer: {e}"))?;
        if status == reqwest::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
        }
    }
}

/// A start of a create-space saga of `workflow` for the orchestrator, answered to `rpc`'s key;
/// returns the saga's id with it.
pub(crate) fn start_message(rpc: &Rpc, workflow: &str, name: String, owner: String) -> (Uuid, Outgoing) {
    let saga_id = Uuid::new_v4();
    let start = StartSaga {
        schema: SCHEMA,
        saga_id,
        space_id: Uuid::new_v4(),
        workflow: workflow.to_owned(),
        input: Context { name, owner, ..Default::default() },
        deadline: None,
    };
    // Sent as the gateway (`app_id`), which the bench stands in for: the orchestrator takes a
    // start only from a gateway, by name on the shared user the bench's vhosts use.
    let msg =
        Outgoing::new(COMMANDS, ORCHESTRATOR, START, saga_id, "gateway", TraceParent::new_root(), &start)
            .reply_to(rpc.key())
            .mode(Mode::Workflow.as_str());
    (saga_id, msg)
}

/// One start straight into the orchestrator; success is an outcome of 200.
async fn start_saga(rpc: &Rpc, workflow: &str, name: String, owner: String) -> Result<(), String> {
    let (saga_id, msg) = start_message(rpc, workflow, name, owner);
    let env = rpc.call(&msg, REPLY_TIMEOUT).await?;
    let outcome: SagaOutcome = env.json().map_err(|e| e.to_string())?;
    if outcome.status == 200 {
        Ok(())
    } else {
        Err(format!(
            "saga {saga_id} ended {}: {}",
            outcome.status,
            outcome.error.map(|e| e.error).unwrap_or_default()
        ))
    }
}

/// One mode's system, as [`drive`] runs it: its processes, where they keep their state, and
/// how to reach them.
struct Stage<'a> {
    mode: Mode,
    amqp_url: &'a str,
    /// The data dir, which also holds the processes' logs.
    dir: &'a Path,
    store: &'a Location,
    /// The gateway's base URL, `http://127.0.0.1:<port>`.
    gateway: String,
    fleet: &'a Fleet,
    /// The `/metrics` of every process, when they are read (`--stages`, the scaling rows):
    /// each process but the gateway serves them on an address of its own.
    metrics: Vec<String>,
}

/// `waves` with each process but the gateway serving its `/metrics` on a free port of its own
/// (`BATON_METRICS`), when `scrape`; returns them with every process's `/metrics` URL (the
/// gateway's on its own `gateway` listener).
fn with_metrics(
    waves: Vec<Vec<Process>>,
    scrape: bool,
    gateway: &str,
) -> anyhow::Result<(Vec<Vec<Process>>, Vec<String>)> {
    if !scrape {
        return Ok((waves, Vec::new()));
    }
    let mut urls = vec![format!("{gateway}/metrics")];
    let mut out = Vec::new();
    for wave in waves {
        let mut each = Vec::new();
        for p in wave {
            if p.component == "gateway" {
                each.push(p);
                continue;
            }
            let addr = format!("127.0.0.1:{}", free_port()?);
            urls.push(format!("http://{addr}/metrics"));
            each.push(p.with_env(vec![("BATON_METRICS".into(), addr)]));
        }
        out.push(each);
    }
    Ok((out, urls))
}

/// Start one mode's processes, wave after wave, each wave once the one before it consumes.
async fn start_waves(stage: &Stage<'_>, waves: &[Vec<Process>], say: &Say) -> anyhow::Result<()> {
    let Stage { mode, amqp_url, dir, fleet, .. } = *stage;
    for (i, wave) in waves.iter().enumerate() {
        let names: Vec<String> = wave.iter().map(Process::name).collect();
        say(&format!("{mode}: starting {} (logs in {})", names.join(", "), dir.display()));
        for p in wave {
            fleet.spawn(p)?;
        }
        let queues = work_queues(mode, i + 1);
        if i == 0 {
            fleet.wait_ready(&stage.gateway, amqp_url, &queues, READY_TIMEOUT).await?;
        } else {
            fleet.wait_consumers(amqp_url, &queues, READY_TIMEOUT).await?;
        }
    }
    Ok(())
}

/// Start the processes of `stage`, then measure: the prefill, HTTP one at a time and in flight,
/// then (workflow mode) sagas started straight into the orchestrator.
async fn drive(
    opts: &Options,
    stage: &Stage<'_>,
    waves: &[Vec<Process>],
    say: &Say,
) -> anyhow::Result<(Runs, Vec<ComponentUsage>, bool)> {
    let Stage { mode, store, fleet, .. } = *stage;
    start_waves(stage, waves, say).await?;
    let scraper = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let read_metrics = || scrape(&scraper, &stage.metrics);
    let at_start = read_metrics().await;
    let gateway = &stage.gateway;
    let run = crate::short_id();
    let widest = opts.windows.iter().copied().max().unwrap_or(1).max(PREFILL_IN_FLIGHT);
    let http = Arc::new(Http {
        client: reqwest::Client::builder()
            .timeout(REPLY_TIMEOUT + Duration::from_secs(5))
            .pool_max_idle_per_host(widest)
            .build()?,
        url: format!("{gateway}/spaces"),
    });
    let via_http = |phase: String| {
        let (http, run) = (Arc::clone(&http), run.clone());
        move |i: usize| {
            let http = Arc::clone(&http);
            let (name, owner) = (space_name(&run, &phase, i), owner(&run, &phase, i));
            async move { http.create(name, owner).await }
        }
    };

    let (prefill, baseline) = if opts.prefill > 0 {
        let p = run_prefill(opts.prefill, mode, via_http("p".into()), say).await?;
        fleet.check_alive()?;
        if !settle(store, mode, Duration::from_secs(120)).await {
            tracing::warn!(%mode, "work was still going on 120 s after the prefill");
        }
        (Some(p), counts(store).await)
    } else {
        (None, Some(Counts::default()))
    };

    say(&format!("{mode}: HTTP, one at a time ({} after {} warm-up)", opts.sequential, opts.warmup));
    let before = read_metrics().await;
    let samples = one_at_a_time(opts.warmup, opts.sequential, via_http("s".into()))
        .await
        .with_context(|| format!("{mode}: create-space through HTTP failed"))?;
    let http_sequential = Latency::of(&samples, &format!("{mode}, HTTP, one at a time"));
    fleet.check_alive()?;
    settle(store, mode, Duration::from_secs(30)).await;
    let stages = if opts.stages {
        let mut run = read_metrics().await.since(&before);
        run.answered = run.answered.min(before.answered);
        Some((run, (opts.warmup + samples.len()) as u64))
    } else {
        None
    };

    let mut http_loaded = Vec::new();
    for &w in &opts.windows {
        say(&format!("{mode}: HTTP, {w} in flight for {} s", opts.duration.as_secs_f64()));
        let cpu = fleet.cpu_ms();
        let (samples, took) = closed_loop(w, opts.duration, via_http(format!("h{w}"))).await;
        let cpu = fleet.cpu_ms() - cpu;
        http_loaded.push(Throughput::of(&samples, w, took, cpu, &format!("{mode}, HTTP, {w} in flight")));
        fleet.check_alive()?;
        settle(store, mode, Duration::from_secs(30)).await;
    }

    let direct = if mode == Mode::Workflow { Some(direct_runs(opts, stage, &run, say).await?) } else { None };
    let (direct_sequential, direct_loaded, direct_sent) = match direct {
        Some(d) => (d.sequential, Some(d.loaded), d.sent),
        None => (None, None, 0),
    };

    let settled = settle(store, mode, Duration::from_secs(60)).await;
    if !settled {
        tracing::warn!(%mode, "work was still going on 60 s after the last run");
    }
    let usage = fleet.usage();
    let conflicts =
        if stage.metrics.is_empty() { None } else { Some(read_metrics().await.since(&at_start).conflicts) };
    let runs = Runs {
        http_sequential,
        http_loaded,
        direct_sequential,
        direct_loaded,
        direct_sent,
        prefill,
        baseline,
        stages,
        conflicts,
    };
    Ok((runs, usage, settled))
}

/// What the sagas started straight into the orchestrator measured (workflow mode).
struct Direct {
    sequential: Option<Latency>,
    loaded: Throughput,
    /// Starts published, for the message count.
    sent: u64,
}

/// Start sagas straight into the orchestrator, over AMQP: one at a time, then
/// `opts.in_flight` at once.
async fn direct_runs(opts: &Options, stage: &Stage<'_>, run: &str, say: &Say) -> anyhow::Result<Direct> {
    let Stage { mode, amqp_url, store, fleet, .. } = *stage;
    let (mut direct_sequential, mut direct_sent) = (None, 0u64);
    let rpc = Arc::new(Rpc::start(amqp_url, "bench", &format!("bench.{run}")).await?);
    let direct = |phase: &'static str| {
        let (rpc, run, workflow) = (Arc::clone(&rpc), run.to_owned(), opts.workflow.clone());
        move |i: usize| {
            let (rpc, workflow) = (Arc::clone(&rpc), workflow.clone());
            let (name, owner) = (space_name(&run, phase, i), owner(&run, phase, i));
            async move { start_saga(&rpc, &workflow, name, owner).await }
        }
    };
    say(&format!("{mode}: orchestrator, one at a time ({} after {} warm-up)", opts.sequential, opts.warmup));
    let samples = one_at_a_time(opts.warmup, opts.sequential, direct("d"))
        .await
        .with_context(|| format!("{mode}: sagas started straight into the orchestrator failed"));
    let loaded = match samples {
        Ok(samples) => {
            direct_sent += (opts.warmup + samples.len()) as u64;
            direct_sequential = Some(Latency::of(&samples, "orchestrator, one at a time"));
            settle(store, mode, Duration::from_secs(30)).await;
            let w = opts.in_flight;
            say(&format!("{mode}: orchestrator, {w} in flight for {} s", opts.duration.as_secs_f64()));
            let cpu = fleet.cpu_ms();
            let (samples, took) = closed_loop(w, opts.duration, direct("l")).await;
            let cpu = fleet.cpu_ms() - cpu;
            direct_sent += samples.len() as u64;
            Ok(Throughput::of(&samples, w, took, cpu, &format!("orchestrator, {w} in flight")))
        }
        Err(e) => Err(e),
    };
    rpc.stop().await;
    let direct_loaded = loaded?;
    fleet.check_alive()?;
    Ok(Direct { sequential: direct_sequential, loaded: direct_loaded, sent: direct_sent })
}

/// Run `n` create-space sagas through `create` with [`PREFILL_IN_FLIGHT`] in flight, printing
/// the progress; fails only when none succeeded (the system is down: measuring would fail too).
async fn run_prefill<F, Fut>(n: usize, mode: Mode, create: F, say: &Say) -> anyhow::Result<Prefill>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    say(&format!("{mode}: prefill, {n} create-space sagas through HTTP with {PREFILL_IN_FLIGHT} in flight"));
    let progress = |done: usize, failed: usize| {
        say(&format!("{mode}: prefill, {done} of {n} answered ({failed} failed)"));
    };
    let count = fixed_count(n, PREFILL_IN_FLIGHT, create, PREFILL_PROGRESS_EVERY, progress).await;
    let seconds = count.elapsed.as_secs_f64();
    say(&format!(
        "{mode}: prefill done, {} spaces in {seconds:.1} s ({:.0} per s), {} failed",
        count.succeeded,
        count.succeeded as f64 / seconds.max(1e-9),
        count.failed
    ));
    if count.failed > 0 {
        tracing::warn!(%mode, failed = count.failed, first = ?count.first_error, "prefill requests failed");
    }
    if count.succeeded == 0 {
        anyhow::bail!(
            "{mode}: every prefill request failed; the first: {}",
            count.first_error.as_deref().unwrap_or("(no reason)")
        );
    }
    Ok(Prefill {
        requested: n,
        spaces: count.succeeded,
        failed: count.failed,
        first_error: count.first_error,
        in_flight: PREFILL_IN_FLIGHT,
        seconds,
    })
}

/// Wait (at most `timeout`) until every outbox is empty and, in workflow mode, no saga is still
/// working, so that one run's tail does not weigh on the next. Returns whether that happened.
async fn settle(store: &Location, mode: Mode, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let outbox = baton_store::StoreCounts::total(store).await.ok().map(|c| c.outbox);
        let working = match mode {
            Mode::Workflow | Mode::Hybrid => baton_orchestrator::Sagas::at(store).in_flight().await.ok(),
            Mode::Events => Some(0),
        };
        if outbox == Some(0) && working == Some(0) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the databases counted at one moment: messages the relays published, and requests the
/// gateway took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    published: i64,
    requests: i64,
}

async fn counts(store: &Location) -> Option<Counts> {
    let published = baton_store::StoreCounts::total(store).await.ok()?.published;
    let requests = baton_gateway::read::Requests::at(store).count().await.ok()?;
    Some(Counts { published, requests })
}

/// Sagas started, messages per saga, and where that figure comes from; what the databases
/// counted before the measured runs (`baseline`) is taken off.
async fn count_messages(
    store: &Location,
    mode: Mode,
    steps: usize,
    direct_sent: u64,
    baseline: Option<Counts>,
) -> (u64, f64, MessageCount) {
    let now = counts(store).await;
    let requests = |c: Counts, b: Counts| (c.requests - b.requests).max(0) as u64;
    match (now, baseline) {
        (Some(c), Some(b)) if requests(c, b) + direct_sent > 0 => {
            let sagas = requests(c, b) + direct_sent;
            let published = (c.published - b.published).max(0) as u64;
            (sagas, (published + sagas) as f64 / sagas as f64, MessageCount::Databases)
        }
        (Some(c), Some(b)) => {
            (requests(c, b) + direct_sent, nominal_messages(mode, steps), MessageCount::Nominal)
        }
        _ => (direct_sent, nominal_messages(mode, steps), MessageCount::Nominal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pass_the_gateway_checks() {
        let name = space_name("0a1b2c", "h256", 999_999_999);
        assert!(name.len() <= 63);
        assert!(name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
        assert_eq!(owner("r", "s", 0), owner("r", "s", 2));
        assert_ne!(owner("r", "s", 2), owner("r", "s", 3));
    }

    #[test]
    fn each_mode_waits_for_its_own_consumers() {
        let names = |mode| work_queues(mode, 1).into_iter().map(|(q, _)| q).collect::<Vec<_>>();
        assert!(names(Mode::Workflow).contains(&"orchestrator.replies".to_string()));
        assert!(names(Mode::Events).contains(&"gateway.main.events".to_string()));
        assert!(!names(Mode::Events).iter().any(|q| q.starts_with("orchestrator")));
    }

    #[test]
    fn each_service_runs_its_instances_and_its_queues_wait_for_them() {
        let names = |ws: Vec<Vec<Process>>| {
            ws.iter().map(|w| w.iter().map(Process::name).collect::<Vec<_>>()).collect::<Vec<_>>()
        };
        let one = names(waves(Mode::Workflow, 1));
        let (scraped, urls) = with_metrics(waves(Mode::Workflow, 2), true, "http://gw").unwrap();
        assert_eq!(urls.len(), 13, "the gateway and 2 x (5 services + orchestrator): {urls:?}");
        assert_eq!(urls[0], "http://gw/metrics");
        let gateway = scraped[0].iter().find(|p| p.component == "gateway").unwrap();
        assert!(gateway.env.is_empty(), "the gateway serves /metrics on its own listener");
        assert!(scraped[1].iter().all(|p| p.env.iter().any(|(k, _)| k == "BATON_METRICS")));
        assert!(with_metrics(waves(Mode::Workflow, 1), false, "http://gw").unwrap().1.is_empty());
        assert_eq!(
            one,
            [["records", "placement", "entitlements", "routing", "notifier", "orchestrator", "gateway"]]
        );
        let two = names(waves(Mode::Events, 2));
        assert_eq!(two.len(), 2);
        assert_eq!(
            two[0],
            ["records-i1", "placement-i1", "entitlements-i1", "routing-i1", "notifier-i1", "gateway"]
        );
        assert_eq!(two[1], ["records-i2", "placement-i2", "entitlements-i2", "routing-i2", "notifier-i2"]);
        for (q, wants) in work_queues(Mode::Workflow, 3) {
            let gateway = q.starts_with("gateway.");
            assert_eq!(wants, if gateway { 1 } else { 3 }, "{q}");
        }
        let three = names(waves(Mode::Workflow, 3));
        assert_eq!(three[2].last().map(String::as_str), Some("orchestrator-i3"), "{three:?}");
        // Hybrid mode runs the search index and the orchestrator, and waits for the follow-ups.
        let hybrid = names(waves(Mode::Hybrid, 1));
        assert!(hybrid[0].contains(&"search".to_string()) && hybrid[0].contains(&"orchestrator".to_string()));
        let queues: Vec<String> = work_queues(Mode::Hybrid, 1).into_iter().map(|(q, _)| q).collect();
        assert!(queues.contains(&"search.followups".to_string()), "{queues:?}");
    }

    #[test]
    fn nominal_messages_follow_the_steps() {
        assert_eq!(nominal_messages(Mode::Workflow, 5), 12.0);
        assert_eq!(nominal_messages(Mode::Workflow, 16), 34.0);
        assert_eq!(nominal_messages(Mode::Events, 5), 6.0);
        assert_eq!(nominal_messages(Mode::Hybrid, 4), 11.0);
    }
}
