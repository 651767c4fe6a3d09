//! The memory target: the orchestrator with many sagas in flight at once. A fleet of its own
//! (fresh vhost and data dir, no gateway) whose services sleep on every command longer than the
//! phase lasts, and whose workflow is the run's with every step's timeout raised as far, so that
//! no saga ends, times out or retries while it is measured; the bench publishes the starts
//! straight to the orchestrator, waits until its database holds them all unfinished and its
//! outbox is empty, reads its RSS, and kills the fleet (nothing of it is kept).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use baton_amqp::topology::{self, ORCHESTRATOR};
use baton_fleet::{Fleet, Process, peak_rss_kb, rss_kb};
use baton_protocol::{Mode, Service};
use baton_workflow::Workflow;
use serde::Serialize;

use crate::drive::fixed_count;
use crate::rpc::Rpc;
use crate::sagas::{owner, space_name, start_message};
use crate::{Options, Say};

/// How long each service sleeps before it handles a command during the hold: longer than the
/// phase can last, so that no saga moves past its first step.
const SERVICE_DELAY: Duration = Duration::from_secs(600);

/// Every step's timeout during the hold (ms): longer than the phase can last, so that no
/// timeout or retry fires.
const STEP_TIMEOUT_MS: u64 = 3_600_000;

/// Starts published at once.
const PUBLISH_IN_FLIGHT: usize = 256;

/// Longest wait for the processes to take work.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the wait prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the orchestrator's process held with many sagas in flight.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hold {
    /// Starts published.
    pub requested: usize,
    /// Sagas not finished in the orchestrator's database when its RSS was read: `requested`,
    /// unless the wait for them gave up.
    pub sagas: usize,
    /// The orchestrator's RSS then (VmRSS).
    pub orchestrator_rss_kb: u64,
    /// Its peak RSS since it started (VmHWM): taking the starts in included.
    pub orchestrator_peak_rss_kb: u64,
    /// From the first start published until all were in flight and its outbox was empty.
    pub seconds_to_fill: f64,
}

/// The workflow of the run with every step's timeout raised to [`STEP_TIMEOUT_MS`].
fn patient(mut wf: Workflow) -> Workflow {
    for step in &mut wf.steps {
        for action in &mut step.actions {
            action.timeout_ms = STEP_TIMEOUT_MS;
        }
    }
    wf
}

/// Unfinished sagas and outbox rows in the orchestrator's database, read-only.
async fn orchestrator_counts(dir: &Path) -> Option<(i64, i64)> {
    let db =
        baton_store::Db::reader(&baton_store::Location::Dir(dir.to_owned()), ORCHESTRATOR).await.ok()??;
    db.call(|tx| {
        let sagas = baton_orchestrator::query::in_flight_count(tx)?;
        Ok((sagas, baton_store::outbox::len(tx)?))
    })
    .await
    .ok()
}

/// Hold `opts.hold` sagas in flight in a fleet of their own and read the orchestrator's RSS.
pub(crate) async fn measure(opts: &Options, workflow: &Workflow, say: &Say) -> anyhow::Result<Hold> {
    let n = opts.hold;
    let vhost = format!("baton-bench-hold-{}", crate::short_id());
    let dir = opts.out_dir.join("hold");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let wf_file = dir.join("hold-workflow.json");
    std::fs::write(&wf_file, serde_json::to_string_pretty(&patient(workflow.clone()))?)
        .with_context(|| format!("writing {}", wf_file.display()))?;
    let wf_file = std::path::absolute(&wf_file).unwrap_or(wf_file);
    opts.mgmt.fresh_vhost(&vhost).await?;
    let amqp_url = crate::amqp_url(opts, &vhost);
    let mut args: Vec<String> = [
        "--mode",
        Mode::Workflow.as_str(),
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
    let mut files = opts.workflow_file_args();
    // Last, so that it replaces the workflow of its name.
    files.extend(["--workflow-file".to_owned(), wf_file.display().to_string()]);
    let services = baton_protocol::Service::ALL.map(baton_protocol::Service::name);
    let fleet = Fleet::new(&opts.baton_bin, args, &dir)
        .with_args_for(&["gateway"], vec!["--workflow".into(), opts.workflow.clone()])
        .with_args_for(&["orchestrator", "gateway"], files)
        .with_args_for(&services, vec!["--service-delay".into(), format!("{}s", SERVICE_DELAY.as_secs())]);
    let result = hold(opts, &amqp_url, &dir, &fleet, say).await;
    // Nothing of the phase is kept: no graceful stop waiting on sleeping handlers.
    fleet.crash_all().await;
    if !opts.keep_vhosts {
        opts.mgmt.clean_up_vhost(&vhost).await;
    }
    let hold = result?;
    if hold.sagas < n {
        tracing::warn!(held = hold.sagas, wanted = n, "not every saga was in flight when the RSS was read");
    }
    Ok(hold)
}

async fn hold(opts: &Options, amqp_url: &str, dir: &Path, fleet: &Fleet, say: &Say) -> anyhow::Result<Hold> {
    let n = opts.hold;
    let mut processes: Vec<Process> = Service::ALL.iter().map(|s| Process::new(s.name())).collect();
    processes.push(Process::new(ORCHESTRATOR));
    let names: Vec<String> = processes.iter().map(Process::name).collect();
    say(&format!("hold: starting {} (logs in {})", names.join(", "), dir.display()));
    for p in &processes {
        fleet.spawn(p)?;
    }
    let mut queues: Vec<(String, u32)> =
        Service::ALL.iter().map(|s| (topology::command_queue(s.name()), 1)).collect();
    queues.push((topology::command_queue(ORCHESTRATOR), 1));
    queues.push((topology::ORCHESTRATOR_REPLIES.to_owned(), 1));
    fleet.wait_consumers(amqp_url, &queues, READY_TIMEOUT).await?;

    let run = crate::short_id();
    let rpc = Arc::new(Rpc::start(amqp_url, "bench hold", &format!("bench.{run}")).await?);
    say(&format!(
        "hold: {n} sagas started straight into the orchestrator, {PUBLISH_IN_FLIGHT} publishes at once"
    ));
    let started = Instant::now();
    let publish = {
        let (rpc, workflow) = (Arc::clone(&rpc), opts.workflow.clone());
        move |i: usize| {
            let (_, msg) = start_message(&rpc, &workflow, space_name(&run, "k", i), owner(&run, "k", i));
            let rpc = Arc::clone(&rpc);
            async move { rpc.send(&msg).await }
        }
    };
    let sent = fixed_count(n, PUBLISH_IN_FLIGHT, publish, PROGRESS_EVERY, |done, failed| {
        say(&format!("hold: {done} of {n} starts published ({failed} failed)"))
    })
    .await;
    if sent.failed > 0 {
        rpc.stop().await;
        anyhow::bail!(
            "hold: {} of {n} starts could not be published; the first: {}",
            sent.failed,
            sent.first_error.as_deref().unwrap_or("(no reason)")
        );
    }

    // All in flight once the orchestrator's database holds them unfinished and its outbox has
    // sent each one's first command; about 50 starts a second is the slowest we wait for.
    let timeout = Duration::from_secs(60).max(Duration::from_millis(20 * n as u64));
    let deadline = Instant::now() + timeout;
    let mut last_say = Instant::now();
    let mut held = 0;
    loop {
        fleet.check_alive()?;
        let counts = orchestrator_counts(dir).await;
        if let Some((sagas, _)) = counts {
            held = usize::try_from(sagas).unwrap_or(0);
        }
        if matches!(counts, Some((sagas, 0)) if sagas as usize >= n) {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(?counts, "hold: gave up waiting for every saga to be in flight after {timeout:?}");
            break;
        }
        if last_say.elapsed() >= PROGRESS_EVERY {
            say(&format!("hold: {held} of {n} sagas in flight (outbox {:?})", counts.map(|c| c.1)));
            last_say = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seconds_to_fill = started.elapsed().as_secs_f64();
    let pid = fleet.pid(ORCHESTRATOR).context("hold: the orchestrator is not running")?.to_string();
    let (rss, peak) = (rss_kb(&pid).unwrap_or(0), peak_rss_kb(&pid).unwrap_or(0));
    say(&format!(
        "hold: {held} sagas in flight after {seconds_to_fill:.1} s; orchestrator RSS {:.1} MB (peak {:.1} MB)",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    ));
    rpc.stop().await;
    Ok(Hold {
        requested: n,
        sagas: held,
        orchestrator_rss_kb: rss,
        orchestrator_peak_rss_kb: peak,
        seconds_to_fill,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hold_workflow_only_waits_longer() {
        let wf = Workflow::bundled().into_iter().find(|w| w.name == "create-space").unwrap();
        let p = patient(wf.clone());
        assert_eq!((p.name.as_str(), p.steps.len()), ("create-space", wf.steps.len()));
        assert!(p.steps.iter().flat_map(|s| &s.actions).all(|a| a.timeout_ms == STEP_TIMEOUT_MS));
        // What the components read back is valid, and the same workflow otherwise.
        let back = Workflow::from_json(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.actions().count(), wf.actions().count());
    }
}
