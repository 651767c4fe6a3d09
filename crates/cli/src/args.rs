//! The command line: a clap `Subcommand` enum whose doc comments are the help text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton_node::Component;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Baton: one business flow over RabbitMQ, coordinated by events or by a saga orchestrator.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about,
    propagate_version = true,
    after_help = "Exit codes: 0 ok; 1 the command ran and found problems (audit inconsistencies, a \
                  refused space, a reconcile that could not undo everything); 2 bad usage, or it could not run."
)]
pub struct Cli {
    /// Log filter (logs go to stderr), e.g. `debug` or `info,baton_orchestrator=debug`; the
    /// flag beats RUST_LOG, which beats the default.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info", value_name = "FILTER", value_parser = parse_log_filter)]
    pub log: String,
    /// How log lines are written: `text`, or `json` (one object per line, for a log
    /// collector). Colour only when stderr is a terminal.
    #[arg(long, global = true, env = "BATON_LOG_FORMAT", default_value = "text", value_name = "FORMAT", value_parser = parse_log_format)]
    pub log_format: baton_telemetry::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The name this process's spans are exported under (`OTEL_SERVICE_NAME` beats it): the
    /// component that `run` starts, `baton` for anything else.
    pub fn service_name(&self) -> String {
        match &self.command {
            Command::Run { component } => component.parts().component.to_string(),
            _ => "baton".into(),
        }
    }
}

// Parsed once per process: the size of `Up` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every component, each with its own connection, until Ctrl-C (in this process; with
    /// crash items in --faults, each as a `baton run` process of its own); with --faults, also
    /// crash components and drop connections as the plan says (see --fault-window).
    Up(UpArgs),
    /// Run one component as its own process; start several to share a queue's work.
    Run {
        #[command(subcommand)]
        component: RunCommand,
    },
    /// Create one space through the gateway and print the outcome as JSON.
    CreateSpace {
        /// The space's name: 1 to 63 of a-z, 0-9 and -.
        #[arg(long)]
        name: String,
        /// Who owns it (their plan's quota applies).
        #[arg(long)]
        owner: String,
        /// The gateway's base URL.
        #[arg(long, env = "BATON_GATEWAY", default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Send it with this `Idempotency-Key`: run the command again with the same key (and
        /// name and owner) after a 504 or a lost answer, and it prints the first request's
        /// outcome instead of making a second one.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Check the cross-service invariant over a data dir: one line per inconsistent space and
    /// per uncertain one (told 504, all or nothing); exit 1 only for an inconsistency.
    Audit {
        #[command(flatten)]
        data: DataDir,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Find what failed or stuck flows left behind (events mode) and undo it through the
    /// services' own compensations; print what was found, what was fixed, how long it took.
    Reconcile {
        #[command(flatten)]
        data: DataDir,
        /// The broker the services listen on (a cluster: its nodes' URLs separated by commas).
        #[arg(
            long,
            env = "AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
            hide_env_values = true,
            value_parser = AmqpUrls
        )]
        amqp_url: String,
        /// Leave alone spaces younger than this: their flow may still be moving.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        older_than: Duration,
        /// Run again at this interval, like a cron job, until Ctrl-C. A run that fails (the
        /// broker away, a database locked) is logged and tried again at the next tick; without
        /// --every a failed run is the command's error.
        #[arg(long, value_parser = parse_duration)]
        every: Option<Duration>,
        /// With --every: serve GET /metrics (Prometheus) on this address, with what the runs
        /// found and fixed.
        #[arg(long, value_name = "ADDR", requires = "every")]
        metrics: Option<SocketAddr>,
        #[arg(long)]
        json: bool,
    },
    /// Send N create-space requests at concurrency C through the gateway and sum up the answers.
    Load {
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, env = "BATON_GATEWAY", default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Seed of the names and owners drawn.
        #[arg(long, env = "BATON_SEED", default_value_t = 1)]
        seed: u64,
        /// Share of requests drawn to be refused by a business rule (reserved keys, a taken
        /// name, an owner over quota).
        #[arg(long, default_value_t = 0.1)]
        refusal_rate: f64,
        /// Print every answer as JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Send each request with an `Idempotency-Key`, and send one answered 504 (or not at all)
        /// again with it, up to N times (3 when no N is given): the retry gets the first request's
        /// outcome, or waits on its saga.
        #[arg(long, num_args = 0..=1, default_missing_value = "3", value_name = "N")]
        retry_timeouts: Option<u32>,
    },
    /// Run both modes on the same load and fault plan, each in a fresh vhost and data dir;
    /// print the table side by side and write an HTML report.
    Compare(CompareArgs),
    /// Run one mode under the full fault plan (crashes of every component, connection drops, a
    /// broker restart, duplicates, refusals, delays) for a while, and print what it survived.
    Chaos(ChaosArgs),
    /// Measure: the broker's own floor (bare durable round trips) and, in the same run, sagas in
    /// both modes one at a time and under load, through HTTP and straight into the orchestrator.
    Bench(BenchArgs),
    /// Print a completion script for a shell to stdout, e.g.
    /// `baton completions bash > ~/.local/share/bash-completion/completions/baton`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Look at the dead-letter queues, or put their messages back after a fix.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Look at sagas: the list, or the timeline of one; retry a rollback, cancel a saga.
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
    },
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    pub scale: ScaleArgs,
    /// The modes to run, one after the other, each a column of the table.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "workflow,events")]
    pub modes: Vec<CliMode>,
    /// Requests sent through each mode's gateway.
    #[arg(long, default_value_t = 500, help_heading = "Load")]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16, help_heading = "Load")]
    pub concurrency: usize,
    /// The fault plan, the same for both modes: `none`, a compact plan such as
    /// `refuse=0.02,delay=1ms,duplicate=0.02,crash.routing=40%+6s,drop=70%` (the default), or
    /// `@plan.json`.
    #[arg(long, default_value = baton_faults::FaultPlan::DEFAULT, help_heading = "Faults")]
    pub faults: String,
    #[arg(long, env = "BATON_SEED", default_value_t = 1, help_heading = "Faults")]
    pub seed: u64,
    /// Where to write the HTML report.
    #[arg(long, default_value = "reports/compare.html", help_heading = "Output")]
    pub report: PathBuf,
    /// Share of requests drawn to be refused by a business rule.
    #[arg(long, default_value_t = 0.1, help_heading = "Load")]
    pub refusal_rate: f64,
    #[command(flatten)]
    pub broker: RunBroker,
    /// Where the two data dirs go.
    #[arg(long, default_value = "data/compare", help_heading = "Output")]
    pub out_dir: PathBuf,
    /// Keep the two vhosts afterwards, to look at them in the management UI.
    #[arg(long, help_heading = "Output")]
    pub keep_vhosts: bool,
    /// Longest wait for each mode to settle after the load.
    #[arg(long, default_value = "60s", value_parser = parse_duration, help_heading = "Load")]
    pub settle_timeout: Duration,
    /// Print the results as JSON instead of the table.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// How long each gateway waits for an outcome before a 504, the same in both modes
    /// (default: each mode's own, 30s in workflow mode and 5s in events mode).
    #[arg(long, value_parser = parse_duration, help_heading = "Gateway")]
    pub deadline: Option<Duration>,
    /// Send each request with an `Idempotency-Key`, and send one answered 504 (or not at all)
    /// again with it, up to N times (3 when no N is given): the retry gets the first request's
    /// outcome, or waits on its saga.
    #[arg(long, num_args = 0..=1, default_missing_value = "3", value_name = "N", help_heading = "Load")]
    pub retry_timeouts: Option<u32>,
    /// The workflow the gateway runs in workflow mode (create-space-nested, ...; default:
    /// create-space).
    #[arg(long, help_heading = "Gateway")]
    pub workflow: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests measured one at a time (after the warm-up).
    #[arg(long, default_value_t = 500)]
    pub sequential: usize,
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Requests in flight of the loaded HTTP runs.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub windows: Vec<usize>,
    /// Length of each loaded run.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Which modes to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "workflow,events")]
    pub modes: Vec<CliMode>,
    /// The workflow each saga runs in workflow mode: create-space, create-space-parallel, or
    /// one named in a --workflow-file (hybrid mode runs create-space-hybrid unless this one
    /// has an event step).
    #[arg(long, default_value = "create-space")]
    pub workflow: String,
    /// Workflow definition files (JSON) given to every component, e.g.
    /// crates/workflow/workflows/bench/bench-16-steps.json; the latency ratio divides by the
    /// chosen workflow's steps.
    #[arg(long = "workflow-file", value_name = "FILE")]
    pub workflow_files: Vec<PathBuf>,
    /// Processes of each of the five services and of the orchestrator, competing for their
    /// queues on one store (each its own --instance i1, i2...); the gateway runs once.
    #[arg(long, default_value_t = 1, value_parser = parse_instances)]
    pub instances: usize,
    /// Keep the components' state in PostgreSQL (a database per mode, created and dropped on
    /// this server) instead of SQLite files.
    #[arg(long, value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Option<String>,
    /// After the modes, measure workflow mode with 1, 2 and 3 orchestrators (and as many of
    /// each service) on SQLite and on the PostgreSQL server at this URL (a database per run,
    /// created and dropped): the instance and backend table.
    #[arg(long, value_name = "POSTGRES_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub scaling: Option<String>,
    /// After the modes, measure workflow mode without instrumentation (the gateway with
    /// --no-metrics), with metrics on every component, and with metrics and every span exported
    /// over OTLP/HTTP to a sink in the bench: what seeing the sagas costs. Each twice, in
    /// mirrored order; the loaded run uses the first --windows.
    #[arg(long)]
    pub instrumentation: bool,
    /// The kind of the components' work queues in every run (the floor keeps quorum queues):
    /// quorum, or classic (no delivery limit; see `baton up --help`).
    #[arg(long, env = "BATON_QUEUE_TYPE", default_value = "quorum", value_name = "quorum|classic")]
    pub queue_type: baton_amqp::topology::QueueType,
    /// After the modes, run workflow mode again on classic queues: the row "classic" (workflow,
    /// classic queues), next to the same floor.
    #[arg(long)]
    pub classic_row: bool,
    /// Also time each stage of a hop (decode, hand-off, commit, ack, relay wake-up, publish,
    /// confirm...) in every component over the one-at-a-time run, and print a table of them:
    /// each process serves its /metrics, which the bench reads before and after.
    #[arg(long)]
    pub stages: bool,
    /// Create-space sagas to run through HTTP (256 in flight) before measuring each mode, so
    /// that the databases already hold that many spaces; they are not counted.
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// Sagas to hold in flight at once in the orchestrator after the modes (a fleet of its own
    /// whose services never answer), to read its RSS; 0 skips that phase.
    #[arg(long, default_value_t = 10_000)]
    pub hold: usize,
    /// Every component's `--retain` (their default, 7 days, when not given): with a short one,
    /// the prefill's sagas, inbox rows and tombstones are purged while the modes are measured.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retain: Option<Duration>,
    #[command(flatten)]
    pub broker: RunBroker,
    #[arg(long, default_value = "data/bench")]
    pub out_dir: PathBuf,
    /// Print the report as JSON on stdout; the table then goes to stderr, after the progress.
    #[arg(long)]
    pub json: bool,
}

/// The broker a compare or chaos run makes its fresh vhosts on.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Broker")]
pub struct RunBroker {
    /// The broker, without a vhost (each run gets a fresh one).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672")]
    pub amqp_url: String,
    #[command(flatten)]
    pub mgmt: MgmtArgs,
}

/// RabbitMQ's management API and its login.
#[derive(Debug, Clone, Args)]
pub struct MgmtArgs {
    /// RabbitMQ's management API: it makes the vhosts of a run, and closes the connections of a
    /// `drop`.
    #[arg(long, env = "BATON_MGMT_URL", default_value = "http://127.0.0.1:15672")]
    pub mgmt_url: String,
    /// The management API's user (it needs the administrator tag to make vhosts).
    #[arg(long, env = "BATON_MGMT_USER", default_value = "guest")]
    pub mgmt_user: String,
    /// The management API user's password (never printed, not even by --help).
    #[arg(long, env = "BATON_MGMT_PASSWORD", default_value = "guest", hide_env_values = true)]
    pub mgmt_password: String,
}

impl MgmtArgs {
    pub fn client(&self) -> baton_mgmt::Mgmt {
        baton_mgmt::Mgmt::new(&self.mgmt_url, &self.mgmt_user, &self.mgmt_password)
    }
}

impl RunBroker {
    pub fn mgmt(&self) -> baton_mgmt::Mgmt {
        self.mgmt.client()
    }
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub scale: ScaleArgs,
    #[arg(long, value_enum, default_value = "workflow")]
    pub mode: CliMode,
    /// How long to run the load.
    #[arg(long, default_value = "60s", value_parser = parse_duration, help_heading = "Load")]
    pub duration: Duration,
    #[arg(long, default_value_t = 16, help_heading = "Load")]
    pub concurrency: usize,
    /// The fault plan; times are shares of the duration.
    #[arg(long, default_value = baton_faults::FaultPlan::CHAOS, help_heading = "Faults")]
    pub faults: String,
    #[arg(long, env = "BATON_SEED", default_value_t = 1, help_heading = "Faults")]
    pub seed: u64,
    /// How to stop and start the broker for `restart-broker` (`stop_app`, `start_app` are
    /// appended); without it the restart is skipped.
    #[arg(long, value_delimiter = ' ', num_args = 1.., value_name = "COMMAND", help_heading = "Faults")]
    pub broker_ctl: Option<Vec<String>>,
    /// Share of requests drawn to be refused by a business rule.
    #[arg(long, default_value_t = 0.1, help_heading = "Load")]
    pub refusal_rate: f64,
    #[command(flatten)]
    pub broker: RunBroker,
    #[arg(long, default_value = "data/chaos", help_heading = "Output")]
    pub out_dir: PathBuf,
    #[arg(long, help_heading = "Output")]
    pub keep_vhost: bool,
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// The workflow the gateway runs in workflow mode (create-space-nested, ...; default:
    /// create-space).
    #[arg(long, help_heading = "Gateway")]
    pub workflow: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct Broker {
    /// The broker: one URL, or the URLs of a cluster's nodes separated by commas (the first
    /// that answers is used, the next one when it is lost).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = AmqpUrls
    )]
    pub amqp_url: String,
    /// Instance name of the orchestrator and the gateway.
    #[arg(long, env = "BATON_INSTANCE", default_value = "main")]
    pub instance: String,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Every dead-letter queue with its count, and the reasons of its first messages.
    List {
        #[command(flatten)]
        broker: Broker,
        /// Messages to show per queue.
        #[arg(long, default_value_t = 5)]
        peek: u16,
        /// Show empty dead-letter queues too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Put the messages of `<queue>.dlq` back on `<queue>` (after fixing what made them fail).
    Replay {
        /// The work queue, e.g. records.commands.
        queue: String,
        #[command(flatten)]
        broker: Broker,
        /// At most this many messages.
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum WorkflowsCommand {
    /// The latest sagas, newest first.
    List {
        #[command(flatten)]
        data: DataDir,
        /// Only sagas in this state (a closed list: a typo is an error, not an empty answer).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
            baton_workflow::SagaStatus::ALL.map(baton_workflow::SagaStatus::as_str)))]
        state: Option<String>,
        /// At most this many sagas.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Finish the rollback of a saga that stopped in compensation_failed, once the cause is
    /// fixed, or go on with one stopped in definition_missing, once an orchestrator has stored
    /// its definition again; waits for the new state.
    Retry {
        id: uuid::Uuid,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        broker: Broker,
    },
    /// Cancel a running saga: no further step starts, the completed ones are undone in reverse
    /// order, its client is told 409, and it ends `cancelled`; waits for that (up to 60 s). Exit 1
    /// when the saga cannot be cancelled (it ended, or is past its last compensable step).
    Cancel {
        /// The workflow id (as in `workflow_id` of a response).
        id: uuid::Uuid,
        /// Coordination mode: the events mode has no saga to cancel.
        #[arg(long, env = "BATON_MODE", value_enum, default_value = "workflow")]
        mode: CliMode,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        broker: Broker,
    },
    /// Every stored version of each workflow: its content hash, when it was first seen, and
    /// how many sagas started on it are running, done, or waiting for an operator.
    Versions {
        #[command(flatten)]
        data: DataDir,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One saga: its steps and its timeline.
    Show {
        /// The workflow id (as in `workflow_id` of a response).
        id: uuid::Uuid,
        #[command(flatten)]
        data: DataDir,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where and how many: the store's backend and the processes of each component of a run.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Keep the components' state in PostgreSQL (a database per mode, created and dropped on
    /// this server; the user needs CREATEDB) instead of SQLite files in the data dirs.
    #[arg(long, value_parser = parse_database_url, hide_env_values = true, help_heading = "Scale")]
    pub database_url: Option<String>,
    /// Processes of the orchestrator and of each service, competing for their queues on one
    /// store (each its own --instance); the gateway runs once.
    #[arg(long, default_value_t = 1, value_parser = parse_instances, help_heading = "Scale")]
    pub instances: usize,
}

#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// Where the components keep their databases (<data-dir>/<component>.db), and their logs.
    #[arg(long, env = "BATON_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Keep every component's state in this PostgreSQL database instead, a schema per
    /// component (postgres://user@host:port/db), so that instances on several machines share
    /// it. The SQLite files of --data-dir are then not used.
    #[arg(long, env = "BATON_DATABASE_URL", value_parser = parse_database_url, hide_env_values = true)]
    pub database_url: Option<String>,
}

impl DataDir {
    /// Where the components keep their state: PostgreSQL when a database URL is given.
    pub fn store(&self) -> baton_store::Location {
        baton_store::Location::new(&self.data_dir, self.database_url.as_deref())
    }
}

/// Processes of a component: 1 to 16.
fn parse_instances(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=16) => Ok(n),
        _ => Err(format!("`{s}` is not a number of processes; give 1 to 16")),
    }
}

/// A PostgreSQL URL, checked before anything starts.
fn parse_database_url(s: &str) -> Result<String, String> {
    let url = s.trim().to_owned();
    baton_store::Location::Postgres(url.clone()).check().map_err(|e| e.to_string())?;
    Ok(url)
}

/// How the components coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliMode {
    /// An orchestrator runs each request as a saga (commands, replies, compensations).
    Workflow,
    /// Choreography: each service reacts to the previous one's event.
    Events,
    /// A saga for the steps that may need undoing, then `space.created` for the follow-ups
    /// (the email and the search index) to react to.
    Hybrid,
}

/// Baton's one duration grammar, humantime's (`500ms`, `30s`, `2m`, `1h`, `1h 30m`), used by
/// every flag and the fault plans alike; a bare number is refused rather than guessed at.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a duration ({e}); write a number with its unit, e.g. 500ms, 30s or 1h")
    })
}

/// The owner is normalised as the gateway does, so that `Alice=team` is alice's plan.
/// A tracing filter, checked here so that a typo is a usage error rather than silence.
/// `AMQP_URL`: one broker URL or a comma-separated list of one cluster's nodes, checked here so
/// that a bad list is a usage error (exit 2) before anything starts. A parser of its own rather
/// than a function: clap's error would quote the value, password and all; this one says what
/// is wrong with the URLs redacted.
#[derive(Debug, Clone, Copy)]
struct AmqpUrls;

impl clap::builder::TypedValueParser for AmqpUrls {
    type Value = String;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let flag = arg.and_then(|a| a.get_long()).map_or("the broker URL".into(), |l| format!("--{l}"));
        let refuse = |why: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{flag}: {why}\n"))
                .with_cmd(cmd)
        };
        let s = value.to_str().ok_or_else(|| refuse("not valid UTF-8".into()))?;
        baton_amqp::parse_urls(s).map(|_| s.to_owned()).map_err(|e| refuse(e.to_string()))
    }
}

fn parse_log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s).map(|_| s.to_owned()).map_err(|e| {
        format!("`{s}` is not a log filter ({e}); write e.g. info, debug or info,baton_gateway=debug")
    })
}

fn parse_log_format(s: &str) -> Result<baton_telemetry::LogFormat, String> {
    s.parse()
}

fn parse_owner_plan(s: &str) -> Result<(String, String), String> {
    let (owner, plan) = s
        .split_once('=')
        .map(|(o, p)| (o.trim(), p.trim()))
        .filter(|(o, p)| !o.is_empty() && !p.is_empty())
        .ok_or_else(|| format!("`{s}` is not of the form owner=plan (e.g. alice=team)"))?;
    let owner = baton_gateway::normalise_owner(owner).map_err(|e| e.message)?;
    Ok((owner, plan.to_owned()))
}

/// Flags of `up`: every component's, and those of the fault driver.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Those of every component, the consumers and the services.
    #[command(flatten)]
    pub common: ServiceRun,
    #[command(flatten)]
    pub workflows: WorkflowFiles,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub driver: DriverArgs,
}

/// `baton run <component>`: each component with the flags it uses, and no others.
#[derive(Debug, Subcommand)]
pub enum RunCommand {
    /// The records service (`records.db`): a space's name and owner.
    Records(ServiceRun),
    /// The placement service (`placement.db`): the shard a space lives on (--shards).
    Placement(ServiceRun),
    /// The entitlements service (`entitlements.db`): an owner's quota (--plans, --owner-plan).
    Entitlements(ServiceRun),
    /// The routing service (`routing.db`): a space's route key (--reserved).
    Routing(ServiceRun),
    /// The notifier service (`notifier.db`): the welcome email.
    Notifier(ServiceRun),
    /// The search index (`search.db`; hybrid mode only): indexes each space the orchestrator
    /// announces with `space.created`.
    Search(ServiceRun),
    /// The saga orchestrator (`orchestrator.db`; workflow and hybrid modes).
    Orchestrator {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        consumers: ConsumerArgs,
        #[command(flatten)]
        workflows: WorkflowFiles,
    },
    /// The HTTP gateway (`gateway.db`).
    Gateway {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        workflows: WorkflowFiles,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
}

/// The flags of `run <service>`.
#[derive(Debug, Clone, Args)]
pub struct ServiceRun {
    #[command(flatten)]
    pub node: NodeArgs,
    #[command(flatten)]
    pub consumers: ConsumerArgs,
    #[command(flatten)]
    pub services: ServiceArgs,
}

impl ServiceRun {
    fn parts(&self, component: Component) -> RunParts<'_> {
        RunParts {
            component,
            node: &self.node,
            consumers: Some(&self.consumers),
            services: Some(&self.services),
            workflows: None,
            gateway: None,
        }
    }
}

/// The parts of `run`'s flags, each of a component that uses it.
pub struct RunParts<'a> {
    pub component: Component,
    pub node: &'a NodeArgs,
    pub consumers: Option<&'a ConsumerArgs>,
    pub services: Option<&'a ServiceArgs>,
    pub workflows: Option<&'a WorkflowFiles>,
    pub gateway: Option<&'a GatewayArgs>,
}

impl RunCommand {
    pub fn parts(&self) -> RunParts<'_> {
        match self {
            RunCommand::Records(run) => run.parts(Component::Records),
            RunCommand::Placement(run) => run.parts(Component::Placement),
            RunCommand::Entitlements(run) => run.parts(Component::Entitlements),
            RunCommand::Routing(run) => run.parts(Component::Routing),
            RunCommand::Notifier(run) => run.parts(Component::Notifier),
            RunCommand::Search(run) => run.parts(Component::Search),
            RunCommand::Orchestrator { node, consumers, workflows } => RunParts {
                component: Component::Orchestrator,
                node,
                consumers: Some(consumers),
                services: None,
                workflows: Some(workflows),
                gateway: None,
            },
            RunCommand::Gateway { node, workflows, gateway } => RunParts {
                component: Component::Gateway,
                node,
                consumers: None,
                services: None,
                workflows: Some(workflows),
                gateway: Some(gateway),
            },
        }
    }
}

impl UpArgs {
    /// Every part, as `up` runs every component.
    pub fn parts(&self, component: Component) -> RunParts<'_> {
        RunParts {
            workflows: Some(&self.workflows),
            gateway: Some(&self.gateway),
            ..self.common.parts(component)
        }
    }
}

/// Flags of every component.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Coordination mode.
    #[arg(long, env = "BATON_MODE", value_enum, default_value = "workflow")]
    pub mode: CliMode,
    /// The broker: one URL, or the URLs of a cluster's nodes separated by commas (the first
    /// that answers is used, the next one when it is lost).
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true,
        value_parser = AmqpUrls,
        help_heading = "Broker"
    )]
    pub amqp_url: String,
    #[command(flatten, next_help_heading = "Storage")]
    pub data: DataDir,
    /// The kind of every work queue and dead-letter queue, the same for every component of a
    /// deployment: quorum (replicated, with a delivery limit of 5), or classic (durable, one
    /// node's, cheaper; rejected messages are still dead-lettered, but there is no delivery
    /// limit: a message whose handler keeps failing or crashing is redelivered for ever instead
    /// of dead-lettered, and on a cluster the queues are not replicated; docs/reliability.md).
    #[arg(
        long,
        env = "BATON_QUEUE_TYPE",
        default_value = "quorum",
        value_name = "quorum|classic",
        help_heading = "Broker"
    )]
    pub queue_type: baton_amqp::topology::QueueType,
    /// Instance name: the orchestrator's and the gateway's reply queues are named after it, and
    /// several instances of a service (competing consumers on one data dir) each publish the
    /// outbox rows they wrote. Keep it stable across restarts.
    #[arg(long, env = "BATON_INSTANCE", default_value = "main", help_heading = "Broker")]
    pub instance: String,
    /// Also serve GET /health/live and /health/ready (and /health) on this address, for the
    /// components of this process: what `baton run <service|orchestrator>` needs, having no
    /// gateway of its own.
    #[arg(long, env = "BATON_HEALTH", value_name = "ADDR", help_heading = "Health")]
    pub health: Option<SocketAddr>,
    /// Serve GET /metrics (Prometheus) on this address, for the components of this process;
    /// unset, none is served. The gateway also serves /metrics on its own --http address.
    #[arg(long, env = "BATON_METRICS", value_name = "ADDR", help_heading = "Metrics")]
    pub metrics: Option<SocketAddr>,
    /// How long each component keeps finished sagas and their history, inbox rows and
    /// tombstones before a background task purges them; a message older than this is
    /// dead-lettered on arrival, since what made it a no-op may be gone (docs/reliability.md).
    /// Idempotency keys are kept for --idempotency-ttl instead, whatever this is.
    #[arg(long, env = "BATON_RETAIN", default_value = "7days", value_parser = humantime::parse_duration,
          help_heading = "Storage")]
    pub retain: std::time::Duration,
}

/// Flags of the components that consume work queues (the services and the orchestrator).
#[derive(Debug, Clone, Args)]
pub struct ConsumerArgs {
    /// Unacked deliveries each consumer holds.
    #[arg(long, default_value_t = 64, help_heading = "Broker")]
    pub prefetch: u16,
}

/// Flags of the five services.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Services")]
pub struct ServiceArgs {
    /// Shards and their capacities (placement).
    #[arg(long, env = "BATON_SHARDS", value_name = "NAME:CAPACITY,...")]
    pub shards: Option<String>,
    /// Plans and their quotas (entitlements).
    #[arg(long, env = "BATON_PLANS", value_name = "NAME:QUOTA,...")]
    pub plans: Option<String>,
    /// Owners on another plan than free (entitlements), e.g. --owner-plan alice=team.
    #[arg(long = "owner-plan", value_parser = parse_owner_plan, value_name = "OWNER=PLAN")]
    pub owner_plans: Vec<(String, String)>,
    /// Route keys nobody may take (routing).
    #[arg(long, env = "BATON_RESERVED", value_delimiter = ',', default_value = "admin,api,www,status")]
    pub reserved: Vec<String>,
    /// Latency injected before every command a service handles.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub service_delay: Duration,
    /// A fault plan to inject (the same in both modes), e.g.
    /// `refuse=0.05,delay.routing=20ms,duplicate=0.02`, `none`, or `@plan.json`. `baton up` also
    /// carries out its `crash.<component>=P%+DOWN` items (any service, the orchestrator or the
    /// gateway: then every component runs as a `baton run` process of its own, killed with
    /// SIGKILL and started again after DOWN) and `drop=P%` items (every connection of the vhost
    /// closed through the management API) at P% of every --fault-window; it refuses
    /// restart-broker, poison, clock and disk-full (use `baton chaos`). `baton run` ignores
    /// crash, drop, restart-broker, poison, clock and disk-full items: its driver carries them
    /// out.
    #[arg(long, env = "BATON_FAULTS", default_value = "none", help_heading = "Faults")]
    pub faults: String,
    /// The seed of the fault plan's decisions.
    #[arg(long, env = "BATON_SEED", default_value_t = 1, help_heading = "Faults")]
    pub seed: u64,
}

/// Workflow definitions, which the orchestrator runs and the gateway names.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Workflows")]
pub struct WorkflowFiles {
    /// Extra workflow definition files (JSON), validated at start.
    #[arg(long = "workflow-file", value_name = "FILE")]
    pub workflow_files: Vec<PathBuf>,
}

/// Flags of the gateway.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Gateway")]
pub struct GatewayArgs {
    /// Address of the HTTP gateway.
    #[arg(long, env = "BATON_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// The workflow each request runs: create-space, create-space-parallel,
    /// create-space-hybrid, create-space-nested, or one named in a --workflow-file (default: create-space, and
    /// create-space-hybrid in hybrid mode).
    #[arg(long, env = "BATON_WORKFLOW", help_heading = "Workflows")]
    pub workflow: Option<String>,
    /// How long a client waits for an outcome before a 504 (default: 30s in workflow mode, 5s
    /// in events mode).
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,
    /// Requests the gateway lets wait for an outcome at once; more get a 429 at once.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// How long the gateway keeps an `Idempotency-Key` of POST /spaces: a retry with the same
    /// key and body within it gets the first request's outcome (or waits on its saga); past it
    /// the key is forgotten and counts as new.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    /// How long an HTTP client may take to send a request's headers; also how long a kept-alive
    /// connection may sit idle between requests. Past it the gateway closes the connection.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,
    /// How long an HTTP client may take to send the whole body of a request; past it, a 408.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub http_body_timeout: Duration,
    /// HTTP connections the gateway keeps open at once; one more gets a 503 at once (default:
    /// the open-file limit, `ulimit -n`, less an eighth of it for the rest of the process).
    #[arg(long, value_name = "N")]
    pub http_max_connections: Option<usize>,
    /// Record no metrics and answer 404 at GET /metrics: what `baton bench --instrumentation`
    /// measures the cost of metrics against.
    #[arg(long, help_heading = "Metrics")]
    pub no_metrics: bool,
}

/// Flags of `up`'s fault driver, which crashes components and drops connections.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Faults")]
pub struct DriverArgs {
    /// The window the plan's crash and drop points are shares of. It starts when the components
    /// start and repeats until Ctrl-C: with 60s, `crash.routing=40%+6s` crashes routing 24 s
    /// into every minute, for 6 s.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub fault_window: Duration,
    #[command(flatten)]
    pub mgmt: MgmtArgs,
}

impl From<CliMode> for baton_protocol::Mode {
    fn from(m: CliMode) -> Self {
        match m {
            CliMode::Workflow => baton_protocol::Mode::Workflow,
            CliMode::Events => baton_protocol::Mode::Events,
            CliMode::Hybrid => baton_protocol::Mode::Hybrid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_and_pairs_parse_with_clear_errors() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(
            parse_duration("7").unwrap_err().contains("with its unit"),
            "a bare number is not guessed at"
        );
        assert!(parse_duration("5 parsecs").unwrap_err().contains("not a duration"));
        assert!(parse_duration("abc").unwrap_err().contains("not a duration"));
        assert_eq!(parse_owner_plan("alice=team"), Ok(("alice".into(), "team".into())));
        assert!(parse_owner_plan("alice").is_err());
        assert_eq!(parse_owner_plan(" Alice =team"), Ok(("alice".into(), "team".into())));
        assert!(parse_owner_plan("\u{200b}alice=team").unwrap_err().contains("U+200B"));
    }

    #[test]
    fn run_takes_only_the_flags_of_its_component() {
        let usage = |args: &[&str]| Cli::try_parse_from(args).map(|_| ()).unwrap_err().kind();
        use clap::error::ErrorKind::UnknownArgument;
        assert_eq!(usage(&["baton", "run", "records", "--http", "127.0.0.1:1"]), UnknownArgument);
        assert_eq!(usage(&["baton", "run", "records", "--workflow", "x"]), UnknownArgument);
        assert_eq!(usage(&["baton", "run", "gateway", "--plans", "free:2"]), UnknownArgument);
        assert_eq!(usage(&["baton", "run", "gateway", "--prefetch", "8"]), UnknownArgument);
        assert_eq!(usage(&["baton", "run", "orchestrator", "--fault-window", "1m"]), UnknownArgument);
        assert!(
            Cli::try_parse_from(["baton", "run", "routing", "--reserved", "a,b", "--prefetch", "8"]).is_ok()
        );
        assert!(Cli::try_parse_from(["baton", "run", "orchestrator", "--workflow-file", "w.json"]).is_ok());
        assert!(Cli::try_parse_from(["baton", "up", "--http", "127.0.0.1:1", "--plans", "free:2"]).is_ok());
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(Cli::try_parse_from(["baton", "up", "--mode", "chaos"]).is_err());
        assert!(Cli::try_parse_from(["baton", "run", "nobody"]).is_err());
        assert!(Cli::try_parse_from(["baton", "workflows", "show", "not-a-uuid"]).is_err());
        let cli = Cli::try_parse_from(["baton", "run", "gateway", "--http", "127.0.0.1:9000"]).unwrap();
        assert!(matches!(cli.command, Command::Run { component: RunCommand::Gateway { .. } }));
    }

    #[test]
    fn chaos_compare_and_bench_take_the_hybrid_mode() {
        let cli = Cli::try_parse_from(["baton", "chaos", "--mode", "hybrid"]).unwrap();
        assert!(matches!(cli.command, Command::Chaos(ChaosArgs { mode: CliMode::Hybrid, .. })));
        for tool in ["compare", "bench"] {
            let cli = Cli::try_parse_from(["baton", tool, "--modes", "workflow,events,hybrid"]).unwrap();
            let modes = match cli.command {
                Command::Compare(a) => a.modes,
                Command::Bench(a) => a.modes,
                _ => panic!("{tool}"),
            };
            assert_eq!(modes, [CliMode::Workflow, CliMode::Events, CliMode::Hybrid], "{tool}");
        }
    }

    #[test]
    fn a_cluster_is_given_as_a_list_of_urls() {
        let list =
            "amqp://u:p@127.0.0.1:5681/%2f,amqp://u:p@127.0.0.1:5682/%2f,amqp://u:p@127.0.0.1:5683/%2f";
        let cli = Cli::try_parse_from(["baton", "run", "records", "--amqp-url", list]).unwrap();
        let Command::Run { component: RunCommand::Records(run) } = cli.command else { panic!("run") };
        assert_eq!(run.node.amqp_url, list);
        for bad in ["amqp://u:p@h1/%2f,,amqp://u:p@h3/%2f", "amqp://u:p@h1/a,amqp://u:p@h2/b", "amqp://h1/v,"]
        {
            for argv in [
                vec!["baton", "up", "--amqp-url", bad],
                vec!["baton", "dlq", "list", "--amqp-url", bad],
                vec!["baton", "reconcile", "--amqp-url", bad],
            ] {
                let e = Cli::try_parse_from(&argv).expect_err(bad);
                assert_eq!(e.exit_code(), 2, "{argv:?}");
                let text = e.to_string();
                assert!(
                    text.contains("--amqp-url: ") && text.contains("separated by commas"),
                    "{argv:?}: {text}"
                );
                assert!(!text.contains(":p@"), "the password is shown: {text}");
            }
        }
    }
}
