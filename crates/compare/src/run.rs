//! One mode's run.

use baton_gateway::read::Requests;
use baton_orchestrator::Sagas;
use baton_services::read::Holdings;
use baton_store::{Location, StoreCounts};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use baton_amqp::topology;
use baton_fleet::{Fleet, Process, free_port};
use baton_load::{Spec, Stats};
use baton_protocol::{Mode, Service};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::clock::FakeClock;
use crate::{ModeRun, Options};

/// What the fault task is asked to do.
enum Fault {
    Crash {
        component: String,
        down: Duration,
    },
    Drop,
    BrokerRestart {
        down: Duration,
    },
    /// The `n`-th bad message of the run.
    Poison {
        n: usize,
    },
    /// Set the orchestrator's wall clock to this offset from the true time.
    Clock {
        offset_s: i64,
    },
    /// Fill the data dir's filesystem, and free it after `for_`.
    DiskFull {
        for_: Duration,
    },
}

/// The processes of `component`: the default instance, then `i2`, `i3`...
fn instances(component: &'static str, n: usize) -> impl Iterator<Item = Process> {
    (1..=n.max(1)).map(move |i| {
        if i == 1 { Process::new(component) } else { Process::instance(component, format!("i{i}")) }
    })
}

/// Run one mode from a fresh vhost and data dir to its audited results.
pub async fn run_mode(opts: &Options, mode: Mode) -> anyhow::Result<ModeRun> {
    let vhost = format!("baton-compare-{mode}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let dir = opts.out_dir.join(mode.as_str());
    // A run that ended before its clean-up (killed) may have left its tmpfs mounted here.
    crate::tmpfs::remove_stale_mount(&dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    // The components' state: SQLite files in the data dir, or a database of this run's own.
    let scratch = match &opts.database_url {
        Some(url) => Some(
            baton_store::scratch::ScratchDatabase::create(url, &format!("baton_compare_{mode}"))
                .context("creating the run's PostgreSQL database (the user needs CREATEDB)")?,
        ),
        None => None,
    };
    let store = scratch.as_ref().map_or_else(|| Location::Dir(dir.clone()), |s| s.location().clone());
    opts.mgmt.fresh_vhost(&vhost).await?;
    // A full disk needs a filesystem of the run's own to fill.
    let fs = if opts.faults.disk_full.is_empty() {
        None
    } else {
        // Unmounted when dropped: on every way out of this function, errors included.
        match crate::tmpfs::Mounted::mount(&dir) {
            Ok(fs) => Some(fs),
            Err(why) => {
                tracing::warn!(
                    %why,
                    "the plan fills the disk, but the data dir cannot be put on a tmpfs of its own (run as root); disk-full skipped"
                );
                None
            }
        }
    };
    let amqp_url = format!("{}/{vhost}", opts.amqp_base.trim_end_matches('/'));
    let plan_file = dir.join("faults.json");
    std::fs::write(&plan_file, opts.faults.to_json())?;
    let port = free_port()?;
    let deadline = opts.deadline.map(|d| vec!["--deadline".to_owned(), format!("{}ms", d.as_millis())]);
    let services = baton_protocol::Service::ALL.map(baton_protocol::Service::name);
    let fleet = Fleet::new(
        &opts.baton_bin,
        [
            "--mode".into(),
            mode.as_str().into(),
            "--amqp-url".into(),
            amqp_url.clone(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--log".into(),
            "warn".into(),
        ]
        .into_iter()
        .chain(scratch.iter().flat_map(|s| ["--database-url".to_owned(), s.url().to_owned()]))
        .collect(),
        &dir,
    )
    .with_args_for(
        &["gateway"],
        ["--http".into(), format!("127.0.0.1:{port}")]
            .into_iter()
            .chain(deadline.into_iter().flatten())
            .collect(),
    )
    .with_args_for(
        &services,
        vec!["--faults".into(), format!("@{}", plan_file.display()), "--seed".into(), opts.seed.to_string()],
    );
    let fleet = Arc::new(fleet);
    // Only the orchestrator's clock jumps: it is the one whose timers the fault is about.
    // Without libfaketime the clock items are skipped with a note, as a broker restart is
    // without --broker-ctl: the rest of the plan still runs.
    let clock = if mode == Mode::Workflow && !opts.faults.clock_jumps.is_empty() {
        if FakeClock::library().is_some() {
            Some(FakeClock::new(&dir)?)
        } else {
            tracing::warn!("{}", FakeClock::MISSING);
            None
        }
    } else {
        None
    };
    let mut components: Vec<Process> =
        Service::ALL.iter().flat_map(|s| instances(s.name(), opts.instances)).collect();
    if mode == Mode::Workflow {
        let env = clock.as_ref().map(FakeClock::env).unwrap_or_default();
        components.extend(instances("orchestrator", opts.instances).map(|p| p.with_env(env.clone())));
    }
    components.push(Process::new("gateway"));
    let started: anyhow::Result<()> = components.iter().try_for_each(|c| fleet.spawn(c)).map_err(Into::into);
    // A component that exits on its own is started again; one that keeps exiting ends the run
    // at once, with its log, rather than leaving the load and the settling to wait it out.
    let supervisor = fleet.supervise();
    let result = match started {
        Ok(()) => tokio::select! {
            r = drive(opts, mode, &vhost, &amqp_url, port, &fleet, &store, clock, fs.as_ref().map(|m| m.fs())) => r,
            e = fleet.failed() => Err(anyhow::Error::from(e).context(format!("the {mode} run stopped"))),
        },
        Err(e) => Err(e),
    };
    drop(supervisor);
    fleet.stop().await;
    // Clean-up comes after the results, and its failure costs only a leftover mount or vhost.
    if let Some(fs) = fs
        && let Err(e) = fs.unmount_keeping()
    {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not take the data dir off its tmpfs (the results stand)"
        );
    }
    if !opts.keep_vhosts {
        opts.mgmt.clean_up_vhost(&vhost).await;
    }
    result
}

// The parts of one run, each used all through it; a struct of them would only be unpacked.
#[allow(clippy::too_many_arguments)]
async fn drive(
    opts: &Options,
    mode: Mode,
    vhost: &str,
    amqp_url: &str,
    port: u16,
    fleet: &Arc<Fleet>,
    store: &Location,
    clock: Option<FakeClock>,
    fs: Option<crate::tmpfs::DataDirFs>,
) -> anyhow::Result<ModeRun> {
    // The run's data dir, where the fleet keeps its logs too.
    let dir = fleet.dir();
    let gateway = format!("http://127.0.0.1:{port}");
    fleet.wait_healthy(&gateway, Duration::from_secs(60)).await?;

    // Faults at their planned points of the load, carried out by a task of their own.
    let (tx, mut rx) = mpsc::unbounded_channel::<Fault>();
    let injected = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let fault_task = {
        let (fleet, injected, mgmt, vhost) =
            (Arc::clone(fleet), Arc::clone(&injected), opts.mgmt.clone(), vhost.to_owned());
        let ctl = opts.broker_ctl.clone();
        let amqp_url = amqp_url.to_owned();
        tokio::spawn(async move {
            let mut restarts = tokio::task::JoinSet::new();
            // The connection the bad messages go out on, opened at the first one.
            let mut poisoner: Option<baton_amqp::Broker> = None;
            while let Some(f) = rx.recv().await {
                match f {
                    Fault::Poison { n } => {
                        // The broker may be restarting or the connection just dropped: retry a
                        // while, as a client would.
                        for attempt in 1..=20 {
                            let broker = match &poisoner {
                                Some(b) => b,
                                None => match baton_amqp::Broker::connect(&amqp_url, "chaos").await {
                                    Ok(b) => poisoner.insert(b),
                                    Err(e) => {
                                        tracing::warn!(error = %e, attempt, "cannot send a bad message yet");
                                        tokio::time::sleep(Duration::from_millis(500)).await;
                                        continue;
                                    }
                                },
                            };
                            match crate::poison::send(broker, mode, n).await {
                                Ok(what) => {
                                    tracing::info!(what, "sent a bad message");
                                    *injected
                                        .lock()
                                        .expect("faults")
                                        .entry("bad input".into())
                                        .or_default() += 1;
                                    break;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, attempt, "cannot send a bad message yet");
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                }
                            }
                        }
                    }
                    Fault::Clock { offset_s } => match clock.as_ref().map(|c| c.set(offset_s)) {
                        Some(Ok(())) => {
                            tracing::info!(offset_s, "the orchestrator's wall clock jumped");
                            *injected.lock().expect("faults").entry("clock jumps".into()).or_default() += 1;
                        }
                        Some(Err(e)) => tracing::error!(error = %e, "moving the orchestrator's clock failed"),
                        None => {}
                    },
                    Fault::DiskFull { for_ } => match &fs {
                        Some(fs) => {
                            let (fs, injected) = (fs.clone(), Arc::clone(&injected));
                            restarts.spawn(async move {
                                match tokio::task::spawn_blocking(move || fs.fill()).await {
                                    Ok(Ok(filler)) => {
                                        *injected
                                            .lock()
                                            .expect("faults")
                                            .entry("disk full".into())
                                            .or_default() += 1;
                                        tokio::time::sleep(for_).await;
                                        if let Err(e) = std::fs::remove_file(&filler) {
                                            tracing::error!(error = %e, "freeing the full disk failed");
                                        }
                                    }
                                    Ok(Err(e)) => tracing::error!(error = %e, "filling the disk failed"),
                                    Err(e) => tracing::error!(error = %e, "the task filling the disk died"),
                                }
                            });
                        }
                        None => tracing::debug!("disk-full skipped: the data dir is not on a tmpfs"),
                    },
                    Fault::Crash { component, down } => {
                        if fleet.crash(&component).await {
                            *injected
                                .lock()
                                .expect("faults")
                                .entry(format!("crash {component}"))
                                .or_default() += 1;
                            let fleet = Arc::clone(&fleet);
                            restarts.spawn(async move {
                                tokio::time::sleep(down).await;
                                if let Err(e) = fleet.restart(&component) {
                                    tracing::error!(error = %e, "restarting a crashed component failed");
                                }
                            });
                        }
                    }
                    Fault::BrokerRestart { down } => match &ctl {
                        Some(ctl) => {
                            if let Err(e) = broker_ctl(ctl, "stop_app").await {
                                tracing::error!(error = %e, "stopping the broker failed");
                                continue;
                            }
                            *injected.lock().expect("faults").entry("broker restarts".into()).or_default() +=
                                1;
                            tokio::time::sleep(down).await;
                            if let Err(e) = broker_ctl(ctl, "start_app").await {
                                tracing::error!(error = %e, "starting the broker again failed");
                            }
                        }
                        None => tracing::warn!(
                            "the plan restarts the broker, but no --broker-ctl says how; skipped"
                        ),
                    },
                    Fault::Drop => match mgmt.drop_connections_once_listed(&vhost).await {
                        Ok(0) => tracing::warn!("the management API listed no connection to drop"),
                        Ok(n) => {
                            *injected
                                .lock()
                                .expect("faults")
                                .entry("connections dropped".into())
                                .or_default() += n
                        }
                        Err(e) => tracing::error!(error = %e, "dropping connections failed"),
                    },
                }
            }
            while restarts.join_next().await.is_some() {}
            if let Some(b) = poisoner {
                b.close().await;
            }
        })
    };
    // When each fault fires: at a share of the requests sent, or of the time (a timed run).
    let mut triggers: Vec<(usize, Fault)> = Vec::new();
    let total = match opts.duration {
        Some(d) => d.as_millis() as u64,
        None => opts.requests as u64,
    };
    let at = |pct: u32| ((total * u64::from(pct)) / 100).max(1) as usize;
    for c in &opts.faults.crashes {
        if c.component == "orchestrator" && mode == Mode::Events {
            continue;
        }
        triggers.push((
            at(c.at_percent),
            Fault::Crash { component: c.component.clone(), down: Duration::from_millis(c.down_ms) },
        ));
    }
    for p in &opts.faults.connection_drops {
        triggers.push((at(*p), Fault::Drop));
    }
    for j in opts.faults.clock_jumps.iter().filter(|_| mode == Mode::Workflow) {
        triggers.push((at(j.at_percent), Fault::Clock { offset_s: j.offset_s }));
    }
    for r in &opts.faults.broker_restarts {
        triggers.push((at(r.at_percent), Fault::BrokerRestart { down: Duration::from_millis(r.down_ms) }));
    }
    for d in &opts.faults.disk_full {
        triggers.push((at(d.at_percent), Fault::DiskFull { for_: Duration::from_millis(d.for_ms) }));
    }
    for (n, pct) in opts.faults.poison_points().into_iter().enumerate() {
        triggers.push((at(pct), Fault::Poison { n }));
    }
    let timer = opts.duration.map(|_| {
        // A timed run: a clock fires the faults, not the count of requests.
        let mut pending = std::mem::take(&mut triggers);
        pending.sort_by_key(|(when, _)| *when);
        let tx = tx.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (when, f) in pending {
                tokio::time::sleep_until(start + Duration::from_millis(when as u64)).await;
                let _ = tx.send(f);
            }
        })
    });
    let triggers = Arc::new(Mutex::new(triggers));
    let on_sent: Arc<dyn Fn(usize) + Send + Sync> = {
        let (triggers, tx) = (Arc::clone(&triggers), tx.clone());
        Arc::new(move |n| {
            let mut t = triggers.lock().expect("triggers");
            while let Some(i) = t.iter().position(|(when, _)| *when <= n) {
                let (_, f) = t.swap_remove(i);
                let _ = tx.send(f);
            }
        })
    };
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let on_done: Arc<dyn Fn(usize) + Send + Sync> = match opts.duration {
        None => {
            let progress = crate::report::Progress::new(mode, opts.requests, opts.progress);
            Arc::new(move |n| progress.update(n))
        }
        Some(_) => {
            let done = Arc::clone(&done);
            Arc::new(move |n| done.store(n, std::sync::atomic::Ordering::Relaxed))
        }
    };
    let ticker = opts.duration.filter(|_| opts.progress).map(|d| {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let start = Instant::now();
            while start.elapsed() < d {
                tokio::time::sleep(Duration::from_secs(10).min(d)).await;
                eprintln!(
                    "{mode}: {:>4} s of {} s, {} requests answered",
                    start.elapsed().as_secs(),
                    d.as_secs(),
                    done.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        })
    });
    let spec = Spec {
        gateway: gateway.clone(),
        requests: opts.requests,
        concurrency: opts.concurrency,
        seed: opts.seed,
        refusal_rate: opts.refusal_rate,
        timeout: Duration::from_secs(60),
        stop_after: opts.duration,
        retry_timeouts: opts.retry_timeouts,
    };
    let outcome = baton_load::run(&spec, on_sent, on_done).await;
    if let Some(timer) = timer {
        timer.await.context("the fault timer")?;
    }
    if let Some(t) = ticker {
        t.abort();
    }
    drop(tx);
    fault_task.await.context("the fault task")?;
    if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    let stats = Stats::of(&outcome);

    let started = Instant::now();
    // A handler holds its message for as long as its planned delay: the inboxes must stay
    // still for longer than that before the run counts as settled.
    let slowest = opts.faults.delay_ms.values().copied().max().unwrap_or(0);
    let stillness = Duration::from_secs(1) + Duration::from_millis(slowest);
    let quiescent =
        quiesce(amqp_url, &opts.mgmt, vhost, store, mode, stillness, opts.quiesce_timeout).await?;
    let quiesce_ms = started.elapsed().as_millis() as u64;
    // The broker confirmed each relay's messages; the gateway published one per request.
    let counts = StoreCounts::total(store).await?;
    let messages = counts.published + Requests::at(store).count().await?;
    let mut injected = injected.lock().expect("faults").clone();
    for service in Service::ALL {
        for (kind, n) in Holdings::at(store, service).injected_by_kind().await? {
            *injected.entry(kind).or_default() += n;
        }
    }
    // What did not get through: sagas still open, messages still in an outbox, dead letters.
    let by_status = Sagas::at(store).counts_by_status().await?;
    let unfinished = by_status.iter().filter(|(s, _)| !s.is_settled()).map(|(_, n)| n).sum();
    let left_in_outbox = counts.unsent();
    let dead_letters = {
        let broker = baton_amqp::Broker::connect(amqp_url, "compare").await?;
        let queues: Vec<_> = topology::all_queues("main")
            .into_iter()
            .filter(|q| mode == Mode::Workflow || q.name != "orchestrator.replies")
            .collect();
        // Look at every dead letter (up to a bound) to tell the run's own bad messages apart.
        let all = baton_amqp::dlq::list(&broker, &queues, 500).await?;
        broker.close().await;
        all.into_iter().filter(|q| q.count > 0).collect()
    };
    let audit = baton_audit::audit(store).await?;
    let (reconcile, audit_after_reconcile) = if mode == Mode::Events {
        let r = baton_reconcile::reconcile(&baton_reconcile::Options {
            amqp_url: amqp_url.to_owned(),
            store: store.clone(),
            older_than: Duration::ZERO,
            timeout: Duration::from_secs(60),
        })
        .await?;
        (Some(r), Some(baton_audit::audit(store).await?))
    } else {
        (None, None)
    };
    Ok(ModeRun {
        mode,
        vhost: vhost.to_owned(),
        data_dir: dir.to_owned(),
        latencies_us: outcome.samples.iter().map(|s| s.latency_us).collect(),
        statuses: outcome.samples.iter().map(|s| s.status).collect(),
        refused_at: outcome.samples.iter().map(|s| s.step.clone()).collect(),
        stats,
        messages,
        quiescent,
        quiesce_ms,
        audit,
        reconcile,
        audit_after_reconcile,
        injected,
        unfinished,
        left_in_outbox,
        dead_letters,
        restarted: fleet.restarted(),
    })
}

/// Run the broker control command with one more argument (`stop_app`, `start_app`).
async fn broker_ctl(ctl: &[String], arg: &str) -> anyhow::Result<()> {
    let (cmd, args) = ctl.split_first().context("an empty --broker-ctl")?;
    let out =
        Command::new(cmd).args(args).arg(arg).output().await.with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{} {arg}: {}", ctl.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Wait until nothing moves: no message ready in any queue nor held by a consumer, every outbox
/// empty, no saga still working, and the inboxes unchanged for `stillness`. Returns whether that
/// happened in time.
async fn quiesce(
    amqp_url: &str,
    mgmt: &baton_mgmt::Mgmt,
    vhost: &str,
    store: &Location,
    mode: Mode,
    stillness: Duration,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let broker = baton_amqp::Broker::connect(amqp_url, "compare").await?;
    let queues: Vec<String> = topology::all_queues("main")
        .into_iter()
        .map(|q| q.name)
        // Events mode has no orchestrator, so nobody declared its reply queue.
        .filter(|q| mode == Mode::Workflow || q != "orchestrator.replies")
        .collect();
    let deadline = Instant::now() + timeout;
    let mut last: Option<(i64, Instant)> = None;
    let settled = loop {
        let mut ready = 0u64;
        let ch = broker.channel().await?;
        for q in &queues {
            let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
            match ch.queue_declare(q.as_str().into(), opts, lapin::types::FieldTable::default()).await {
                Ok(info) => ready += u64::from(info.message_count()),
                // Every queue of the list exists once the components have started; a failure
                // here is not "empty".
                Err(e) => anyhow::bail!("cannot read the depth of {q}: {e}"),
            }
        }
        let _ = ch.close(200, "probed".into()).await;
        let counts = StoreCounts::total(store).await.unwrap_or_default();
        let (outbox, handled) = (counts.outbox, counts.handled);
        let working = if mode == Mode::Workflow {
            baton_orchestrator::Sagas::at(store).in_flight().await.unwrap_or(0)
        } else {
            0
        };
        if ready == 0 && outbox == 0 && working == 0 {
            match last {
                Some((h, since)) if h == handled && since.elapsed() >= stillness => {
                    // The last check, the one the management API is needed for: nothing
                    // delivered and still unacked.
                    match mgmt.unacked(vhost).await {
                        Ok(0) => break true,
                        Ok(_) => last = None,
                        Err(e) => anyhow::bail!("cannot read the unacked messages of {vhost}: {e}"),
                    }
                }
                Some((h, _)) if h == handled => {}
                _ => last = Some((handled, Instant::now())),
            }
        } else {
            last = None;
        }
        if Instant::now() > deadline {
            // Say what is still moving: the one clue a failed CI run leaves.
            let sagas = if mode == Mode::Workflow {
                let counts = Sagas::at(store).counts_by_status().await.unwrap_or_default();
                let open = counts.iter().filter(|(s, _)| !s.is_settled());
                open.map(|(s, n)| format!("{} {n}", s.as_str())).collect::<Vec<_>>().join(", ")
            } else {
                "-".into()
            };
            let mut outboxes: Vec<String> = Vec::new();
            for c in baton_protocol::Component::ALL {
                if let Ok(Some(n)) = StoreCounts::of(store, c).await
                    && n.outbox > 0
                {
                    outboxes.push(format!("{c} {}", n.outbox));
                }
            }
            tracing::warn!(
                ready_in_queues = ready,
                outbox_rows = %outboxes.join(", "),
                %sagas,
                "the system did not settle in time"
            );
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    broker.close().await;
    Ok(settled)
}
