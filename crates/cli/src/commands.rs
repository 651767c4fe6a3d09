//! What each subcommand does.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use baton_node::Component;
use baton_services::ServiceConfig;
use baton_services::config::parse_pairs;
use baton_workflow::Workflow;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use baton_faults::FaultPlan;
use baton_protocol::Mode;

use crate::args::{
    BenchArgs, Broker, ChaosArgs, Cli, Command, CompareArgs, DataDir, DlqCommand, UpArgs, WorkflowsCommand,
};
use crate::{inject, shutdown};

pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Up(args) => up(args, None).await,
        Command::Run { component, args } => up(args, Some(component)).await,
        Command::CreateSpace { name, owner, gateway } => create_space(&gateway, &name, &owner).await,
        Command::Audit { data, json } => audit(&data, json),
        Command::Reconcile { data, amqp_url, older_than, every, json } => {
            reconcile(data, amqp_url, older_than, every, json).await
        }
        Command::Load { requests, concurrency, gateway, seed, refusal_rate, json } => {
            load(requests, concurrency, gateway, seed, refusal_rate, json).await
        }
        Command::Compare(args) => compare(args).await,
        Command::Chaos(args) => chaos(args).await,
        Command::Bench(args) => bench(args).await,
        Command::Workflows { command: WorkflowsCommand::Retry { id, data, broker } } => {
            retry(id, data, broker).await
        }
        Command::Workflows { command } => workflows(command),
        Command::Dlq { command } => dlq(command).await,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a failed write, and a reader such
            // as `head` may close the pipe early.
            let mut script = Vec::new();
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "baton",
                &mut script,
            );
            match std::io::Write::write_all(&mut std::io::stdout(), &script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow!(e).context("writing the completion script to stdout"))
                }
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

fn service_config(args: &UpArgs) -> anyhow::Result<ServiceConfig> {
    let mut cfg = ServiceConfig::default();
    if let Some(s) = &args.shards {
        cfg.shards = parse_pairs(s, "shard").map_err(|e| anyhow!(e))?;
    }
    if let Some(p) = &args.plans {
        cfg.plans = parse_pairs(p, "plan").map_err(|e| anyhow!(e))?;
    }
    for (owner, plan) in &args.owner_plans {
        if !cfg.plans.iter().any(|(p, _)| p == plan) {
            bail!("--owner-plan {owner}={plan}: there is no plan `{plan}`; the plans are {:?}", cfg.plans);
        }
        cfg.owner_plans.insert(owner.clone(), plan.clone());
    }
    cfg.reserved = args.reserved.iter().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()).collect();
    Ok(cfg)
}

fn workflows_of(args: &UpArgs) -> anyhow::Result<Vec<Workflow>> {
    let all = Workflow::bundled_and(&args.workflow_files)?;
    if !all.iter().any(|w| w.name == args.workflow) {
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        bail!("--workflow {}: no such workflow; known: {}", args.workflow, names.join(", "));
    }
    Ok(all)
}

type Task = (String, anyhow::Result<()>);

/// The configuration of the components of this process, from the flags.
fn node_config(args: &UpArgs, mode: Mode, faults: FaultPlan) -> anyhow::Result<baton_node::Config> {
    let mut config = baton_node::Config::new(mode, args.amqp_url.clone(), args.data.data_dir.clone());
    for c in Component::ALL {
        let url = component_url(c.name(), &args.amqp_url)?;
        if url != args.amqp_url {
            config.own_amqp_urls.insert(c, url);
        }
    }
    config.instance = args.instance.clone();
    config.prefetch = args.prefetch;
    config.services = service_config(args)?;
    config.service_delay = args.service_delay;
    config.faults = faults;
    config.workflows = workflows_of(args)?;
    config.workflow = args.workflow.clone();
    config.http = args.http;
    config.deadline = args.deadline.unwrap_or(baton_node::default_deadline(mode));
    config.max_in_flight = args.max_in_flight;
    config.limits = baton_gateway::HttpLimits {
        header_timeout: args.http_header_timeout,
        body_timeout: args.http_body_timeout,
        max_connections: args.http_max_connections.unwrap_or_else(baton_gateway::default_max_connections),
    };
    Ok(config)
}

/// The broker URL of one component: its own credentials if it has them
/// (`BATON_<COMPONENT>_AMQP_URL`, or a file named by `BATON_<COMPONENT>_AMQP_URL_FILE`), else
/// the shared `--amqp-url`.
fn component_url(component: &str, shared: &str) -> anyhow::Result<String> {
    component_url_in(component, shared, |var| std::env::var(var).ok())
}

/// [`component_url`] with the environment read through `env` (the tests pass a map).
fn component_url_in(
    component: &str,
    shared: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    let var = format!("BATON_{}_AMQP_URL", component.to_uppercase());
    if let Some(url) = env(&var) {
        return Ok(url);
    }
    if let Some(file) = env(&format!("{var}_FILE")) {
        let url =
            std::fs::read_to_string(&file).with_context(|| format!("{var}_FILE: cannot read {file}"))?;
        return Ok(url.trim().to_owned());
    }
    Ok(shared.to_owned())
}

/// Start `component` as a task of `set`; its handle aborts it (a crash in `up`).
fn spawn_component(
    set: &mut JoinSet<Task>,
    component: Component,
    config: &baton_node::Config,
    cancel: &CancellationToken,
) -> AbortHandle {
    let (config, cancel) = (config.clone(), cancel.clone());
    set.spawn(async move { (component.name().to_owned(), baton_node::run(component, &config, cancel).await) })
}

/// `up` (every component) or `run` (one of them).
/// Fail before anything starts when the gateway's address is taken (by the demo, say), rather
/// than after every service has connected.
fn check_port_free(addr: &std::net::SocketAddr) -> anyhow::Result<()> {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => bail!(
            "{addr} is already in use (is `scripts/demo.sh` or another `baton up` running?); give the \
             gateway another address with --http, e.g. --http {}:{}",
            addr.ip(),
            addr.port().wrapping_add(1)
        ),
        Err(e) => Err(anyhow!(e).context(format!("the gateway cannot listen on {addr}"))),
    }
}

async fn up(args: UpArgs, only: Option<Component>) -> anyhow::Result<ExitCode> {
    let mode = Mode::from(args.mode);
    if let Some(c) = only.filter(|c| !c.runs_in(mode)) {
        bail!("the {c} has no part in {mode} mode; run it with --mode workflow");
    }
    let faults = FaultPlan::parse(&args.faults, args.seed).map_err(|e| anyhow!("--faults: {e}"))?;
    // Crashes, drops and broker restarts are done to components, by whoever drives them: `up`
    // for its own components, `compare` and `chaos` for their processes (which they start with
    // the whole plan), never a `baton run` process to itself.
    let drives_faults = only.is_none() && inject::has_driven_items(&faults);
    if only.is_none() {
        inject::check(&faults, args.fault_window, mode)?;
    } else if inject::has_driven_items(&faults) {
        tracing::info!(
            "the plan's crash, drop, restart-broker, poison and disk-full items are carried out by whoever drives the components (baton up, compare, chaos), not by `baton run`: ignored here"
        );
    }
    let config = node_config(&args, mode, faults)?;
    std::fs::create_dir_all(&args.data.data_dir)
        .with_context(|| format!("cannot create the data dir {}", args.data.data_dir.display()))?;
    if only.is_none() || only == Some(Component::Gateway) {
        check_port_free(&args.http)?;
    }
    let cancel = CancellationToken::new();
    shutdown::on_signal(cancel.clone());
    let components: Vec<Component> = match only {
        Some(c) => vec![c],
        None => Component::of_mode(mode).collect(),
    };
    let mut set = JoinSet::new();
    if let Some(addr) = args.health {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--health {addr}: cannot listen there; pick a free address"))?;
        tracing::info!(%addr, "serving /health/live and /health/ready");
        let (health, cancel) = (config.health.clone(), cancel.clone());
        set.spawn(async move {
            let served = baton_health::serve(listener, health, cancel).await;
            ("health endpoint".to_owned(), served.context("serving /health"))
        });
    }
    // The task of each running component, to crash it; and the tasks aborted on purpose, whose
    // end is no failure.
    let mut running: HashMap<Component, AbortHandle> = HashMap::new();
    let mut crashed: HashSet<tokio::task::Id> = HashSet::new();
    for c in &components {
        running.insert(*c, spawn_component(&mut set, *c, &config, &cancel));
    }
    if only.is_none() || only == Some(Component::Gateway) {
        tracing::info!(
            api = %format!("http://{}", args.http),
            broker = %baton_amqp::redact(&args.amqp_url),
            data_dir = %args.data.data_dir.display(),
            %mode,
            faults = %config.faults,
            "starting; Ctrl-C stops"
        );
    }
    let (order_tx, mut orders) = mpsc::unbounded_channel::<inject::Order>();
    let injected = inject::Injected::default();
    if drives_faults {
        tracing::info!(
            window = ?args.fault_window,
            "crashes and connection drops happen at their shares of every fault window, from now until Ctrl-C"
        );
        inject::spawn_driver(
            &config.faults,
            args.fault_window,
            baton_mgmt::Mgmt::new(&args.mgmt_url, &args.mgmt_user, &args.mgmt_password),
            baton_mgmt::vhost_of(&args.amqp_url),
            order_tx,
            injected.clone(),
            cancel.clone(),
        );
    } else {
        drop(order_tx);
    }
    // Crashed components waiting out their pause before they start again.
    let mut restarts: JoinSet<Component> = JoinSet::new();
    let mut failure: Option<anyhow::Error> = None;
    let mut grace_until: Option<tokio::time::Instant> = None;
    loop {
        let grace = async {
            match grace_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            next = set.join_next_with_id() => match next {
                None => break,
                Some(Ok((id, _))) if crashed.remove(&id) => {}
                Some(Err(join)) if crashed.remove(&join.id()) => {}
                Some(Ok((id, (name, result)))) => {
                    running.retain(|_, h| h.id() != id);
                    match result {
                        Ok(()) if !cancel.is_cancelled() => {
                            failure.get_or_insert_with(|| anyhow!("{name} stopped on its own"));
                            cancel.cancel();
                        }
                        Ok(()) => {}
                        Err(e) => {
                            failure.get_or_insert(e.context(format!("{name} failed")));
                            cancel.cancel();
                        }
                    }
                }
                Some(Err(join)) => {
                    failure.get_or_insert_with(|| anyhow!("a component task died: {join}"));
                    cancel.cancel();
                }
            },
            Some(order) = orders.recv(), if !cancel.is_cancelled() => {
                let inject::Order::Crash { component, down, round } = order;
                let name = component.name();
                match running.remove(&component) {
                    Some(task) => {
                        task.abort();
                        crashed.insert(task.id());
                        let total = injected.add(&format!("crash {name}"), 1);
                        tracing::warn!(
                            fault = "crash",
                            component = %name,
                            down_ms = down.as_millis() as u64,
                            crashes = total,
                            round,
                            "fault injected: component crashed (its tasks aborted, no cleanup)"
                        );
                        restarts.spawn(async move {
                            tokio::time::sleep(down).await;
                            component
                        });
                    }
                    None => tracing::warn!(
                        fault = "crash",
                        component = %name,
                        round,
                        "the plan crashes a component that is still down from its last crash; skipped"
                    ),
                }
            }
            Some(Ok(component)) = restarts.join_next(), if !restarts.is_empty() && !cancel.is_cancelled() => {
                let name = component.name();
                running.insert(component, spawn_component(&mut set, component, &config, &cancel));
                tracing::warn!(fault = "crash", component = %name, "component restarted after its crash");
            }
            _ = cancel.cancelled(), if grace_until.is_none() => {
                grace_until = Some(tokio::time::Instant::now() + shutdown::GRACE);
                restarts.abort_all();
            }
            _ = grace => {
                tracing::warn!(grace = ?shutdown::GRACE, "components did not stop within the grace period; aborting them");
                set.abort_all();
                break;
            }
        }
    }
    if !injected.is_empty() {
        tracing::warn!(injected = %injected.summary(), "faults injected by this run");
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn create_space(gateway: &str, name: &str, owner: &str) -> anyhow::Result<ExitCode> {
    let url = format!("{}/spaces", gateway.trim_end_matches('/'));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let resp =
        client.post(&url).json(&serde_json::json!({ "name": name, "owner": owner })).send().await.map_err(
            |e| {
                anyhow!("no gateway answered at {gateway} ({e}); start one with `baton up` or pass --gateway")
            },
        )?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the gateway's answer is not JSON")?;
    let printed = serde_json::json!({ "status": status.as_u16(), "body": body });
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn audit(data: &DataDir, json: bool) -> anyhow::Result<ExitCode> {
    let report = baton_audit::audit(&data.data_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for v in &report.violations {
            println!("{v}");
        }
    }
    eprintln!(
        "audited {} spaces in {}: {} complete, {} in flight, {} violation{}",
        report.spaces,
        data.data_dir.display(),
        report.complete,
        report.in_flight,
        report.violations.len(),
        if report.violations.len() == 1 { "" } else { "s" }
    );
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The sagas of the orchestrator of `data`; an error that says where to point when it has none.
fn sagas(data: &DataDir) -> anyhow::Result<baton_orchestrator::Sagas> {
    let sagas = baton_orchestrator::Sagas::in_data_dir(&data.data_dir);
    if !sagas.exists() {
        bail!(
            "{} does not exist; point --data-dir (or BATON_DATA_DIR) at the data dir the orchestrator uses",
            sagas.path().display()
        );
    }
    Ok(sagas)
}

/// A step's phase as `workflows show` prints it: a step still `pending` in a saga that goes no
/// further forward (it is undoing, or has ended without it) never ran, and will not.
fn shown_phase<'a>(saga_status: &str, phase: &'a str) -> &'a str {
    let goes_forward = matches!(saga_status, "running" | "succeeded");
    if phase == "pending" && !goes_forward { "not run" } else { phase }
}

fn workflows(cmd: WorkflowsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowsCommand::List { data, state, limit, json } => {
            let rows = sagas(&data)?.list(state.as_deref(), limit)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<36}  {:<22}  {:<20}  {:>6}  {:<36}",
                    "WORKFLOW ID", "WORKFLOW", "STATUS", "ANSWER", "SPACE ID"
                );
                for r in &rows {
                    let answer = r.answer_status.map_or_else(|| "-".into(), |s| s.to_string());
                    println!(
                        "{:<36}  {:<22}  {:<20}  {:>6}  {}",
                        r.id, r.workflow, r.status, answer, r.space_id
                    );
                }
                eprintln!("{} saga{}", rows.len(), if rows.len() == 1 { "" } else { "s" });
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowsCommand::Retry { .. } => unreachable!("retry is async, dispatched before"),
        WorkflowsCommand::Show { id, data, json } => {
            let Some(view) = sagas(&data)?.describe(id)? else {
                bail!("no workflow {id} in {}", data.data_dir.display());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("workflow {} ({}) for space {}: {}", view.id, view.workflow, view.space_id, view.status);
            if let Some(f) = &view.failure {
                println!("failed at {} ({}): {}", f.service, f.status, f.reason);
            }
            for s in &view.steps {
                println!(
                    "  step {} [{}]: {} after {} attempt(s), {} compensation attempt(s)",
                    s.group + 1,
                    s.step,
                    shown_phase(&view.status, &s.phase),
                    s.attempts,
                    s.compensation_attempts
                );
            }
            let t0 = view.created_at_ms;
            for h in &view.history {
                println!(
                    "  +{:>6} ms  {:<12} {:<4} #{} {}{}",
                    h.at_ms - t0,
                    h.step.as_deref().unwrap_or("saga"),
                    h.action.as_deref().unwrap_or(""),
                    h.attempt,
                    h.event,
                    h.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn reconcile(
    data: DataDir,
    amqp_url: String,
    older_than: Duration,
    every: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let opts = baton_reconcile::Options {
        amqp_url: component_url("reconcile", &amqp_url)?,
        data_dir: data.data_dir,
        older_than,
        timeout: Duration::from_secs(60),
    };
    let cancel = CancellationToken::new();
    shutdown::on_signal(cancel.clone());
    let mut failed_in_a_row = 0u32;
    loop {
        // Ctrl-C during a run abandons it: the compensations it sent are idempotent, and the
        // next run finds whatever they did not undo.
        let run = tokio::select! {
            run = baton_reconcile::reconcile(&opts) => run,
            _ = cancel.cancelled() => {
                tracing::warn!("interrupted during a run; the next run picks up what it left");
                return Ok(if every.is_some() { ExitCode::SUCCESS } else { ExitCode::from(130) });
            }
        };
        let summary = match (run, every) {
            (Ok(summary), _) => summary,
            // One run: its failure is the command's.
            (Err(e), None) => return Err(e),
            // A cron job outlives a failed run (the broker briefly away, a database locked): say
            // why, and try again at the next tick.
            (Err(e), Some(every)) => {
                failed_in_a_row += 1;
                tracing::warn!(
                    error = %format!("{e:#}"),
                    failed_in_a_row,
                    retry_in = ?every,
                    "this reconcile run failed; trying again at the next tick"
                );
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
                }
            }
        };
        failed_in_a_row = 0;
        if json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!("{summary}");
        }
        let Some(every) = every else {
            return Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        };
        if summary.took_ms > every.as_millis() as u64 {
            tracing::warn!(took_ms = summary.took_ms, every = ?every, "this run took longer than the interval between runs");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
        }
    }
}

async fn load(
    requests: usize,
    concurrency: usize,
    gateway: String,
    seed: u64,
    refusal_rate: f64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&refusal_rate) {
        bail!("--refusal-rate {refusal_rate}: give a share between 0 and 1");
    }
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let spec = baton_load::Spec {
        gateway: gateway.clone(),
        requests,
        concurrency,
        seed,
        refusal_rate,
        timeout: Duration::from_secs(60),
        stop_after: None,
    };
    let probe = reqwest::Client::new().get(format!("{}/health", gateway.trim_end_matches('/'))).send().await;
    if probe.is_err() {
        bail!("no gateway answered at {gateway}; start one with `baton up` or pass --gateway");
    }
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let shown = std::sync::Arc::clone(&progress);
    let on_done: std::sync::Arc<dyn Fn(usize) + Send + Sync> = std::sync::Arc::new(move |n| {
        let pct = n * 100 / requests.max(1);
        if shown.swap(pct, std::sync::atomic::Ordering::Relaxed) != pct {
            eprint!("\rload: {n}/{requests} requests ({pct}%)");
        }
    });
    let outcome = baton_load::run(&spec, std::sync::Arc::new(|_| {}), on_done).await;
    eprintln!();
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    let st = baton_load::Stats::of(&outcome);
    println!("requests      {}", st.requests);
    println!(
        "by status     {}",
        st.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "latency (ms)  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        st.p50_ms, st.p95_ms, st.p99_ms, st.max_ms
    );
    println!("throughput    {:.0} requests/s over {} ms", st.per_second, outcome.elapsed_ms);
    Ok(ExitCode::SUCCESS)
}

async fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    if args.requests == 0 || args.concurrency == 0 {
        bail!("--requests and --concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.refusal_rate) {
        bail!("--refusal-rate {}: give a share between 0 and 1", args.refusal_rate);
    }
    let faults = FaultPlan::parse(&args.faults, args.seed).map_err(|e| anyhow!("--faults: {e}"))?;
    let opts = baton_compare::Options {
        baton_bin: std::env::current_exe().context("finding the baton binary")?,
        amqp_base: args.broker.amqp_url.clone(),
        mgmt: args.broker.mgmt(),
        out_dir: args.out_dir.clone(),
        requests: args.requests,
        concurrency: args.concurrency,
        seed: args.seed,
        refusal_rate: args.refusal_rate,
        faults,
        quiesce_timeout: args.settle_timeout,
        keep_vhosts: args.keep_vhosts,
        progress: true,
        duration: None,
        broker_ctl: None,
        deadline: args.deadline,
    };
    eprintln!(
        "comparing workflow and events: {} requests at concurrency {}, faults: {}",
        args.requests, args.concurrency, opts.faults
    );
    let result = baton_compare::compare(&opts).await?;
    if let Some(dir) = args.report.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.report, baton_compare::report::html(&result))
        .with_context(|| format!("writing the report to {}", args.report.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print!("{}", baton_compare::report::table(&result));
    }
    eprintln!("report: {}", args.report.display());
    Ok(ExitCode::SUCCESS)
}

async fn retry(id: uuid::Uuid, data: DataDir, broker: Broker) -> anyhow::Result<ExitCode> {
    let status = |data: &DataDir| -> anyhow::Result<String> {
        let view = sagas(data)?.describe(id)?;
        Ok(view.ok_or_else(|| anyhow!("no workflow {id} in {}", data.data_dir.display()))?.status)
    };
    let before = status(&data)?;
    if before != "compensation_failed" {
        bail!("workflow {id} is {before}, not compensation_failed: there is no rollback to finish");
    }
    baton_orchestrator::request_retry(&broker.amqp_url, &broker.instance, id).await?;
    eprintln!(
        "asked orchestrator `{}` to finish the rollback of {id}; waiting (up to 60 s)",
        broker.instance
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = status(&data)?;
        // Once retried, the saga leaves compensation_failed for compensating, and then ends.
        if now == "rolled_back" {
            println!("{id}: rolled_back");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() > deadline {
            println!("{id}: {now}");
            eprintln!("the rollback did not finish within 60 s; `baton workflows show {id}` tells why");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn dlq(cmd: DlqCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List { broker, peek, all, json } => {
            let b = baton_amqp::Broker::connect(&broker.amqp_url, "operator").await?;
            let queues =
                baton_amqp::dlq::list(&b, &baton_amqp::topology::all_queues(&broker.instance), peek).await?;
            b.close().await;
            let shown: Vec<_> = queues.into_iter().filter(|q| all || q.count > 0).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&shown)?);
            } else {
                for q in &shown {
                    println!("{}: {} message{}", q.queue, q.count, if q.count == 1 { "" } else { "s" });
                    for m in &q.first {
                        println!(
                            "  {} {}: {}",
                            m.message_id.as_deref().unwrap_or("(no id)"),
                            m.kind.as_deref().unwrap_or("(no type)"),
                            m.reason
                        );
                    }
                }
                if shown.is_empty() {
                    eprintln!("every dead-letter queue is empty");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay { queue, broker, max } => {
            let known = baton_amqp::topology::all_queues(&broker.instance);
            if !known.iter().any(|q| q.name == queue) {
                let names: Vec<String> = known.into_iter().map(|q| q.name).collect();
                bail!("`{queue}` is not a work queue of Baton; one of: {}", names.join(", "));
            }
            let b = baton_amqp::Broker::connect(&broker.amqp_url, "operator").await?;
            let n = baton_amqp::dlq::replay(&b, &queue, max).await?;
            b.close().await;
            println!("replayed {n} message{} from {queue}.dlq onto {queue}", if n == 1 { "" } else { "s" });
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn chaos(args: ChaosArgs) -> anyhow::Result<ExitCode> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let faults = FaultPlan::parse(&args.faults, args.seed).map_err(|e| anyhow!("--faults: {e}"))?;
    let mode = Mode::from(args.mode);
    let opts = baton_compare::Options {
        baton_bin: std::env::current_exe().context("finding the baton binary")?,
        amqp_base: args.broker.amqp_url.clone(),
        mgmt: args.broker.mgmt(),
        out_dir: args.out_dir.clone(),
        requests: 10_000_000,
        concurrency: args.concurrency,
        seed: args.seed,
        refusal_rate: args.refusal_rate,
        faults,
        quiesce_timeout: Duration::from_secs(120),
        keep_vhosts: args.keep_vhost,
        progress: true,
        duration: Some(args.duration),
        broker_ctl: args.broker_ctl.clone(),
        deadline: None,
    };
    eprintln!("chaos in {mode} mode for {} s: {}", args.duration.as_secs(), opts.faults);
    if opts.broker_ctl.is_none() && !opts.faults.broker_restarts.is_empty() {
        eprintln!(
            "(no --broker-ctl: the planned broker restart is skipped; e.g. --broker-ctl \"rabbitmqctl -n rabbit@localhost\")"
        );
    }
    let run = baton_compare::chaos(&opts, mode).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&run)?);
    } else {
        print!(
            "{}",
            baton_compare::report::chaos_summary(&run, &opts.faults.to_string(), args.duration.as_secs())
        );
    }
    let ok = run.nothing_lost() && (mode == Mode::Events || run.audit.is_clean());
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn bench(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let mut opts = baton_bench::Options::new(
        std::env::current_exe().context("finding the baton binary")?,
        args.broker.amqp_url.clone(),
        args.broker.mgmt(),
        args.out_dir.clone(),
    );
    opts.sequential = args.sequential;
    opts.warmup = args.warmup;
    opts.windows = args.windows.clone();
    opts.duration = args.duration;
    opts.modes = args.modes.iter().map(|m| Mode::from(*m)).collect();
    opts.workflow = args.workflow.clone();
    opts.workflow_files = args.workflow_files.clone();
    opts.instances = args.instances;
    opts.prefill = args.prefill;
    opts.hold = args.hold;
    opts.progress = true;
    let report = baton_bench::run(&opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprint!("{}", baton_bench::table(&report));
    } else {
        print!("{}", baton_bench::table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::{component_url_in, shown_phase};
    use std::collections::HashMap;

    const SHARED: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn a_component_without_credentials_uses_the_shared_url() {
        let env = lookup(&[("BATON_PLACEMENT_AMQP_URL", "amqp://baton-placement:x@h/%2F")]);
        assert_eq!(component_url_in("records", SHARED, env).unwrap(), SHARED);
    }

    #[test]
    fn the_url_variable_wins_over_the_file_and_the_shared_url() {
        let env = lookup(&[
            ("BATON_RECORDS_AMQP_URL", "amqp://baton-records:a@h/%2F"),
            ("BATON_RECORDS_AMQP_URL_FILE", "/nonexistent/records.url"),
        ]);
        assert_eq!(component_url_in("records", SHARED, env).unwrap(), "amqp://baton-records:a@h/%2F");
    }

    #[test]
    fn the_file_is_read_and_trimmed_and_a_missing_one_is_named() {
        let path = std::env::temp_dir().join(format!("baton-{}.url", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, "amqp://baton-orchestrator:secret@h:5672/%2F\n").unwrap();
        let file = path.to_str().unwrap().to_owned();
        let url =
            component_url_in("orchestrator", SHARED, lookup(&[("BATON_ORCHESTRATOR_AMQP_URL_FILE", &file)]));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(url.unwrap(), "amqp://baton-orchestrator:secret@h:5672/%2F");

        let err = component_url_in("gateway", SHARED, lookup(&[("BATON_GATEWAY_AMQP_URL_FILE", &file)]))
            .expect_err("a missing file is an error, not the shared URL");
        let text = format!("{err:#}");
        assert!(text.contains("BATON_GATEWAY_AMQP_URL_FILE") && text.contains(&file), "{text}");
    }

    #[test]
    fn a_step_that_never_ran_is_shown_as_not_run_once_the_saga_goes_no_further() {
        assert_eq!(shown_phase("rolled_back", "pending"), "not run");
        assert_eq!(shown_phase("compensating", "pending"), "not run");
        assert_eq!(shown_phase("compensation_failed", "pending"), "not run");
        assert_eq!(shown_phase("completed", "pending"), "not run");
        // Still to come: the saga is on its way, or the email waits in the outbox.
        assert_eq!(shown_phase("running", "pending"), "pending");
        assert_eq!(shown_phase("succeeded", "pending"), "pending");
        assert_eq!(shown_phase("rolled_back", "compensated"), "compensated");
    }
}
