//! `baton up` (every component) and `baton run` (one of them): the flags made into a
//! [`baton_node::Config`], and the components run until Ctrl-C. With crash items in its fault
//! plan, `up` runs each component as a `baton run` child instead, so that a crash is a SIGKILL
//! of a real process (as `compare` and `chaos` do it), and starts it again after its pause.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use baton_faults::FaultPlan;
use baton_node::Component;
use baton_protocol::Mode;
use baton_services::ServiceConfig;
use baton_services::config::parse_pairs;
use baton_workflow::Workflow;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{DriverArgs, RunCommand, RunParts, ServiceArgs, UpArgs, WorkflowFiles};
use crate::{inject, shutdown};

fn service_config(args: &ServiceArgs) -> anyhow::Result<ServiceConfig> {
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

/// The bundled workflows and those of the files; `workflow`, when given, must be one of them.
fn workflows_of(files: &WorkflowFiles, workflow: Option<&str>) -> anyhow::Result<Vec<Workflow>> {
    let all = Workflow::bundled_and(&files.workflow_files)?;
    if let Some(wanted) = workflow.filter(|w| !all.iter().any(|known| known.name == *w)) {
        let names: Vec<&str> = all.iter().map(|w| w.name.as_str()).collect();
        bail!("--workflow {wanted}: no such workflow; known: {}", names.join(", "));
    }
    Ok(all)
}

type Task = (String, anyhow::Result<()>);

/// The configuration of the components of this process, from the flags they take; what a
/// component takes no flag for keeps [`baton_node::Config::new`]'s default.
fn node_config(parts: &RunParts<'_>, mode: Mode, faults: FaultPlan) -> anyhow::Result<baton_node::Config> {
    let node = parts.node;
    let mut config = baton_node::Config::new(mode, node.amqp_url.clone(), node.data.store());
    for c in Component::ALL {
        let url = component_url(c.name(), &node.amqp_url)?;
        if url != node.amqp_url {
            config.own_amqp_urls.insert(c, url.into());
        }
    }
    config.instance = node.instance.clone();
    config.retain = node.retain;
    config.queue_type = node.queue_type;
    config.faults = faults;
    if let Some(consumers) = parts.consumers {
        config.prefetch = consumers.prefetch;
    }
    if let Some(services) = parts.services {
        config.services = service_config(services)?;
        config.service_delay = services.service_delay;
    }
    if let Some(files) = parts.workflows {
        config.workflows = workflows_of(files, parts.gateway.and_then(|g| g.workflow.as_deref()))?;
    }
    if let Some(gateway) = parts.gateway {
        if let Some(workflow) = &gateway.workflow {
            config.workflow = workflow.clone();
        }
        config.http = gateway.http;
        config.deadline = gateway.deadline.unwrap_or(baton_node::default_deadline(mode));
        config.max_in_flight = gateway.max_in_flight;
        config.idempotency_ttl = gateway.idempotency_ttl;
        config.gateway_metrics = !gateway.no_metrics;
        config.limits = baton_gateway::HttpLimits {
            header_timeout: gateway.http_header_timeout,
            body_timeout: gateway.http_body_timeout,
            max_connections: gateway
                .http_max_connections
                .unwrap_or_else(baton_gateway::default_max_connections),
        };
    }
    Ok(config)
}

/// The broker URL of one component: its own credentials if it has them
/// (`BATON_<COMPONENT>_AMQP_URL`, or a file named by `BATON_<COMPONENT>_AMQP_URL_FILE`), else
/// the shared `--amqp-url`.
pub(crate) fn component_url(component: &str, shared: &str) -> anyhow::Result<String> {
    component_url_in(component, shared, |var| std::env::var(var).ok())
}

/// [`component_url`] with the environment read through `env` (the tests pass a map).
fn component_url_in(
    component: &str,
    shared: &str,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<String> {
    let var = format!("BATON_{}_AMQP_URL", component.to_uppercase());
    // Checked like --amqp-url: one URL, or a cluster's nodes separated by commas.
    let checked = |url: String, from: &str| {
        baton_amqp::parse_urls(&url).map(|_| url).with_context(|| format!("{from}: not a broker URL list"))
    };
    if let Some(url) = env(&var) {
        return checked(url, &var);
    }
    if let Some(file) = env(&format!("{var}_FILE")) {
        let url =
            std::fs::read_to_string(&file).with_context(|| format!("{var}_FILE: cannot read {file}"))?;
        return checked(url.trim().to_owned(), &format!("{var}_FILE ({file})"));
    }
    Ok(shared.to_owned())
}

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

/// `baton up`: every component of the mode.
pub(super) async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    start(args.parts(Component::Gateway), Some(&args.driver)).await
}

/// `baton run <component>`.
pub(super) async fn run(cmd: RunCommand) -> anyhow::Result<ExitCode> {
    start(cmd.parts(), None).await
}

/// Run the components (every one of the mode with a fault driver, as `up`; else the one of
/// `parts`, as `run`) until Ctrl-C or one fails.
async fn start(parts: RunParts<'_>, driver: Option<&DriverArgs>) -> anyhow::Result<ExitCode> {
    let node = parts.node;
    let mode = Mode::from(node.mode);
    let only = driver.is_none().then_some(parts.component);
    if let Some(c) = only.filter(|c| !c.runs_in(mode)) {
        bail!("the {c} has no part in {mode} mode; run it with --mode workflow");
    }
    let faults = match parts.services {
        Some(s) => FaultPlan::parse(&s.faults, s.seed).map_err(|e| anyhow!("--faults: {e}"))?,
        None => FaultPlan::default(),
    };
    // Crashes, drops and broker restarts are done to components, by whoever drives them: `up`
    // for its own components, `compare` and `chaos` for their processes (which they start with
    // the whole plan), never a `baton run` process to itself.
    let drives_faults = driver.is_some() && inject::has_driven_items(&faults);
    if let Some(driver) = driver {
        inject::check(&faults, driver.fault_window, mode)?;
    } else if inject::has_driven_items(&faults) {
        tracing::info!(
            "the plan's crash, drop, restart-broker, poison and disk-full items are carried out by whoever drives the components (baton up, compare, chaos), not by `baton run`: ignored here"
        );
    }
    let config = node_config(&parts, mode, faults)?;
    std::fs::create_dir_all(&node.data.data_dir)
        .with_context(|| format!("cannot create the data dir {}", node.data.data_dir.display()))?;
    if only.is_none() || only == Some(Component::Gateway) {
        check_port_free(&config.http)?;
    }
    let cancel = CancellationToken::new();
    shutdown::on_signal(cancel.clone());
    let components: Vec<Component> = match only {
        Some(c) => vec![c],
        None => Component::of_mode(mode).collect(),
    };
    // A crash is a SIGKILL of a real process, as `compare` and `chaos` do it: with crash items,
    // every component runs as a `baton run` child of this one.
    let as_processes = driver.is_some() && !config.faults.crashes.is_empty();
    if as_processes && node.metrics.is_some() {
        bail!(
            "--metrics with crash items: each component then runs as a process of its own, which \
             cannot share one address; drop --metrics (the gateway still serves /metrics) or the crash items"
        );
    }
    if as_processes && node.health.is_some() {
        bail!(
            "--health with crash items: each component then runs as a process of its own, and the \
             gateway's /health/ready answers for itself only; drop --health or the crash items"
        );
    }
    if only.is_none() || only == Some(Component::Gateway) {
        tracing::info!(
            api = %format!("http://{}", config.http),
            broker = %baton_amqp::redact(&node.amqp_url),
            store = %node.data.store(),
            %mode,
            faults = %config.faults,
            "starting; Ctrl-C stops"
        );
    }
    let fleet =
        if as_processes { Some(Arc::new(process_fleet(&components, &node.data.data_dir)?)) } else { None };
    let fault_driver = driver.filter(|_| drives_faults).map(|driver| {
        tracing::info!(
            window = ?driver.fault_window,
            "crashes and connection drops happen at their shares of every fault window, from now until Ctrl-C"
        );
        let reach = (driver.mgmt.client(), baton_mgmt::vhost_of(&node.amqp_url));
        inject::start_driver(&config.faults, mode, driver.fault_window, fleet.clone(), reach)
    });
    let ran = match &fleet {
        Some(fleet) => in_processes(fleet, &cancel).await,
        None => in_this_process(&config, &components, node.health, node.metrics, &cancel).await,
    };
    // No restart after the stop below: the driver is stopped first.
    if let Some(driver) = fault_driver {
        let injected = driver.stop().await;
        if !injected.is_empty() {
            let summary: Vec<String> = injected.iter().map(|(k, n)| format!("{k} {n}")).collect();
            tracing::warn!(injected = %summary.join(", "), "faults injected by this run");
        }
    }
    if let Some(fleet) = fleet {
        fleet.stop().await;
    }
    ran
}

/// Run `components` as tasks of this process until `cancel` (then wait for them, within the
/// grace period) or until one fails or stops on its own.
async fn in_this_process(
    config: &baton_node::Config,
    components: &[Component],
    health: Option<std::net::SocketAddr>,
    metrics: Option<std::net::SocketAddr>,
    cancel: &CancellationToken,
) -> anyhow::Result<ExitCode> {
    // Bound before anything starts (a bad address fails the start), served once the components
    // are spawned: each registers its checks as it starts, so that an early question finds them.
    let listener = match health {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--health {addr}: cannot listen there; pick a free address"))?,
        ),
        None => None,
    };
    let metrics = match metrics {
        Some(addr) => Some(baton_metrics::bind(addr).await.map_err(|e| anyhow!(e))?),
        None => None,
    };
    let mut set: JoinSet<Task> = JoinSet::new();
    // Before any component starts, so that each registers what it collects at a scrape.
    if metrics.is_some() || (components.contains(&Component::Gateway) && config.gateway_metrics) {
        baton_metrics::install(&config.instance);
    }
    if let Some(listener) = metrics {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics");
        let (health, cancel) = (config.health.clone(), cancel.clone());
        set.spawn(async move {
            let served = baton_metrics::serve(listener, health, cancel).await;
            ("metrics endpoint".to_owned(), served.context("serving /metrics"))
        });
    }
    for &c in components {
        let (config, cancel) = (config.clone(), cancel.clone());
        set.spawn(async move { (c.name().to_owned(), baton_node::run(c, &config, cancel).await) });
    }
    if let Some(listener) = listener {
        tracing::info!(addr = ?listener.local_addr().ok(), "serving /health/live and /health/ready");
        let (health, cancel) = (config.health.clone(), cancel.clone());
        set.spawn(async move {
            let served = baton_health::serve(listener, health, cancel).await;
            ("health endpoint".to_owned(), served.context("serving /health"))
        });
    }
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
            next = set.join_next() => match next {
                None => break,
                Some(Ok((name, result))) => match result {
                    Ok(()) if !cancel.is_cancelled() => {
                        failure.get_or_insert_with(|| anyhow!("{name} stopped on its own"));
                        cancel.cancel();
                    }
                    Ok(()) => {}
                    Err(e) => {
                        failure.get_or_insert(e.context(format!("{name} failed")));
                        cancel.cancel();
                    }
                },
                Some(Err(join)) => {
                    failure.get_or_insert_with(|| anyhow!("a component task died: {join}"));
                    cancel.cancel();
                }
            },
            _ = cancel.cancelled(), if grace_until.is_none() => {
                grace_until = Some(tokio::time::Instant::now() + shutdown::GRACE);
            }
            _ = grace => {
                tracing::warn!(grace = ?shutdown::GRACE, "components did not stop within the grace period; aborting them");
                set.abort_all();
                break;
            }
        }
    }
    failure.map_or(Ok(ExitCode::SUCCESS), Err)
}

/// `components` as `baton run <component>` children (through `baton-fleet`, their logs on
/// this process's stderr), each with the flags of this command line that it takes, started.
fn process_fleet(components: &[Component], data_dir: &std::path::Path) -> anyhow::Result<baton_fleet::Fleet> {
    let bin = std::env::current_exe().context("finding the baton binary")?;
    let typed: Vec<String> = std::env::args().skip(1).collect();
    let mut fleet = baton_fleet::Fleet::new(&bin, Vec::new(), data_dir).with_stderr_inherited();
    for &c in components {
        fleet = fleet.with_args_for(&[c.name()], forwarded(&typed, c));
    }
    for &c in components {
        fleet.spawn(&baton_fleet::Process::new(c.name()))?;
    }
    tracing::info!("every component runs as a `baton run` process of its own, to be crashed for real");
    Ok(fleet)
}

/// Watch the processes of `fleet` (which the fault driver crashes and starts again) until
/// `cancel`, or until one exits on its own.
async fn in_processes(fleet: &baton_fleet::Fleet, cancel: &CancellationToken) -> anyhow::Result<ExitCode> {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
            _ = tick.tick() => {
                // A Ctrl-C reaches the children too (one process group): their exit is no failure.
                if cancel.is_cancelled() {
                    return Ok(ExitCode::SUCCESS);
                }
                if let Err(e) = fleet.check_alive() {
                    return Err(match e {
                        baton_fleet::FleetError::Exited { name, status, .. } => {
                            anyhow!("{name} stopped on its own ({status}); its log is above")
                        }
                        e => e.into(),
                    });
                }
            }
        }
    }
}

/// The flags of `typed` (this command line, after the program's name) that `run <component>`
/// takes, in their order, with their values: a child gets what was given for it, and the rest
/// (the environment, which it inherits, and the defaults) is the same as here.
fn forwarded(typed: &[String], component: Component) -> Vec<String> {
    let root = <crate::Cli as clap::CommandFactory>::command();
    let longs = |cmd: &clap::Command| -> Vec<(String, bool)> {
        cmd.get_arguments()
            .filter_map(|a| Some((a.get_long()?.to_owned(), a.get_action().takes_values())))
            .collect()
    };
    let global = longs(&root);
    let up = root.find_subcommand("up").map(longs).unwrap_or_default();
    let run = root
        .find_subcommand("run")
        .and_then(|run| run.find_subcommand(component.name()))
        .map(longs)
        .unwrap_or_default();
    let known = |list: &[(String, bool)], name: &str| list.iter().find(|(l, _)| l == name).map(|(_, v)| *v);
    let mut out = Vec::new();
    let mut tokens = typed.iter();
    while let Some(token) = tokens.next() {
        // Not a flag: the subcommand (`up`) itself.
        let Some(flag) = token.strip_prefix("--") else { continue };
        let (name, inline) = match flag.split_once('=') {
            Some((name, _)) => (name, true),
            None => (flag, false),
        };
        let takes_value = known(&up, name).or_else(|| known(&global, name)).unwrap_or(false);
        let value = if takes_value && !inline { tokens.next() } else { None };
        if known(&run, name).is_some() || known(&global, name).is_some() {
            out.push(token.clone());
            out.extend(value.cloned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Component, component_url_in, forwarded};
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
    fn a_component_url_may_list_a_cluster_and_a_bad_list_is_named() {
        let list = "amqp://baton-records:a@h1:5681/%2F,amqp://baton-records:a@h2:5682/%2F";
        let url = component_url_in("records", SHARED, lookup(&[("BATON_RECORDS_AMQP_URL", list)]));
        assert_eq!(url.unwrap(), list);

        let bad = "amqp://baton-records:secret@h1/%2F,";
        let err = component_url_in("records", SHARED, lookup(&[("BATON_RECORDS_AMQP_URL", bad)]));
        let text = format!("{:#}", err.expect_err("a trailing comma"));
        assert!(text.contains("BATON_RECORDS_AMQP_URL") && text.contains("URL 2 of 2 is empty"), "{text}");
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn a_child_of_up_gets_the_flags_its_component_takes_with_their_values() {
        let typed: Vec<String> = [
            "--log",
            "warn",
            "up",
            "--mode",
            "events",
            "--http",
            "127.0.0.1:1",
            "--plans",
            "free:2",
            "--fault-window",
            "1m",
            "--owner-plan=alice=free",
            "--amqp-url",
            "amqp://x",
            "--prefetch",
            "8",
        ]
        .map(String::from)
        .to_vec();
        let shared = ["--log", "warn", "--mode", "events"];
        assert_eq!(
            forwarded(&typed, Component::Records),
            [
                &shared[..],
                &["--plans", "free:2", "--owner-plan=alice=free", "--amqp-url", "amqp://x"],
                &["--prefetch", "8"]
            ]
            .concat()
        );
        assert_eq!(
            forwarded(&typed, Component::Gateway),
            [&shared[..], &["--http", "127.0.0.1:1", "--amqp-url", "amqp://x"]].concat()
        );
    }
}
