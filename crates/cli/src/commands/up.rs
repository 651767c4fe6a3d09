//! `baton up` (every component) and `baton run` (one of them): the flags made into a
//! [`baton_node::Config`], and the components run, crashed and restarted until Ctrl-C.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use baton_faults::FaultPlan;
use baton_node::Component;
use baton_protocol::Mode;
use baton_services::ServiceConfig;
use baton_services::config::parse_pairs;
use baton_workflow::Workflow;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::args::UpArgs;
use crate::{inject, shutdown};

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

pub(super) async fn up(args: UpArgs, only: Option<Component>) -> anyhow::Result<ExitCode> {
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

#[cfg(test)]
mod tests {
    use super::component_url_in;
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
}
