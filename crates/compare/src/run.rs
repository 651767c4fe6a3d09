//! One mode's run.

use baton_gateway::read::Requests;
use baton_orchestrator::Sagas;
use baton_services::read::Holdings;
use baton_store::{Location, StoreCounts};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use baton_amqp::topology;
use baton_fleet::{Fault, FaultDriver, Fleet, OnCount, Process, Reach, free_port};
use baton_load::{Outcome, Spec, Stats};
use baton_protocol::{Mode, Service};

use crate::clock::FakeClock;
use crate::hooks::RunHooks;
use crate::{FaultMark, ModeRun, Options};

/// The processes of `component`: the default instance, then `i2`, `i3`...
fn instances(component: &'static str, n: usize) -> impl Iterator<Item = Process> {
    (1..=n.max(1)).map(move |i| {
        if i == 1 { Process::new(component) } else { Process::instance(component, format!("i{i}")) }
    })
}

/// Run one mode from a fresh vhost and data dir to its audited results.
pub async fn run_mode(opts: &Options, mode: Mode) -> anyhow::Result<ModeRun> {
    let vhost = format!("baton-compare-{mode}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let dir = fresh_dir(opts, mode)?;
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
    let fs = disk_to_fill(opts, &dir);
    let amqp_url = format!("{}/{vhost}", opts.amqp_base.trim_end_matches('/'));
    let port = free_port()?;
    let fleet = Arc::new(fleet(opts, mode, &dir, &amqp_url, port, scratch.as_ref())?);
    let clock = fake_clock(opts, mode, &dir)?;
    let components = components(opts, mode, clock.as_ref());
    let started: anyhow::Result<()> = components.iter().try_for_each(|c| fleet.spawn(c)).map_err(Into::into);
    // A component that exits on its own is started again; one that keeps exiting ends the run
    // at once, with its log, rather than leaving the load and the settling to wait it out.
    let supervisor = fleet.supervise();
    let hooks = Arc::new(RunHooks::new(mode, &amqp_url, clock, fs.as_ref().map(|m| m.fs())));
    let run = Run {
        opts,
        mode,
        vhost: vhost.clone(),
        amqp_url,
        gateway: format!("http://127.0.0.1:{port}"),
        fleet: Arc::clone(&fleet),
        store,
    };
    let result = match started {
        Ok(()) => tokio::select! {
            r = drive(&run, hooks) => r,
            e = fleet.failed() => Err(anyhow::Error::from(e).context(format!("the {mode} run stopped"))),
        },
        Err(e) => Err(e),
    };
    drop(supervisor);
    fleet.stop().await;
    clean_up(opts, &vhost, fs).await;
    result
}

/// The mode's data dir under the output dir, empty.
fn fresh_dir(opts: &Options, mode: Mode) -> anyhow::Result<PathBuf> {
    let dir = opts.out_dir.join(mode.as_str());
    // A run that ended before its clean-up (killed) may have left its tmpfs mounted here.
    crate::tmpfs::remove_stale_mount(&dir)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A filesystem of the run's own for the plan's full disk to fill, if it has one and it can be
/// mounted. Unmounted when dropped: on every way out of the run, errors included.
fn disk_to_fill(opts: &Options, dir: &Path) -> Option<crate::tmpfs::Mounted> {
    if opts.faults.disk_full.is_empty() {
        return None;
    }
    match crate::tmpfs::Mounted::mount(dir) {
        Ok(fs) => Some(fs),
        Err(why) => {
            tracing::warn!(
                %why,
                "the plan fills the disk, but the data dir cannot be put on a tmpfs of its own (run as root); disk-full skipped"
            );
            None
        }
    }
}

/// The fleet of the mode's components: their shared flags, the gateway's address and
/// deadline, and the services' fault plan (written next to their data).
fn fleet(
    opts: &Options,
    mode: Mode,
    dir: &Path,
    amqp_url: &str,
    port: u16,
    scratch: Option<&baton_store::scratch::ScratchDatabase>,
) -> anyhow::Result<Fleet> {
    let plan_file = dir.join("faults.json");
    std::fs::write(&plan_file, opts.faults.to_json())?;
    let deadline = opts.deadline.map(|d| vec!["--deadline".to_owned(), format!("{}ms", d.as_millis())]);
    let workflow = opts.workflow.iter().filter(|_| mode == Mode::Workflow);
    let workflow = workflow.flat_map(|w| ["--workflow".to_owned(), w.clone()]);
    let services = Service::ALL.map(Service::name);
    let common: Vec<String> = [
        "--mode".into(),
        mode.as_str().into(),
        "--amqp-url".into(),
        amqp_url.to_owned(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--log".into(),
        "warn".into(),
    ]
    .into_iter()
    .chain(scratch.iter().flat_map(|s| ["--database-url".to_owned(), s.url().to_owned()]))
    .collect();
    Ok(Fleet::new(&opts.baton_bin, common, dir)
        .with_args_for(
            &["gateway"],
            ["--http".into(), format!("127.0.0.1:{port}")]
                .into_iter()
                .chain(deadline.into_iter().flatten())
                .chain(workflow)
                .collect(),
        )
        .with_args_for(
            &services,
            vec![
                "--faults".into(),
                format!("@{}", plan_file.display()),
                "--seed".into(),
                opts.seed.to_string(),
            ],
        ))
}

/// The orchestrator's clock, when the plan makes it jump: only its clock jumps, as it is the one
/// whose timers the fault is about. Without libfaketime the clock items are skipped with a note,
/// as a broker restart is without --broker-ctl: the rest of the plan still runs.
fn fake_clock(opts: &Options, mode: Mode, dir: &Path) -> anyhow::Result<Option<FakeClock>> {
    if !mode.runs_sagas() || opts.faults.clock_jumps.is_empty() {
        return Ok(None);
    }
    if FakeClock::library().is_none() {
        tracing::warn!("{}", FakeClock::MISSING);
        return Ok(None);
    }
    Ok(Some(FakeClock::new(dir)?))
}

/// The processes of the mode: each service's instances, the orchestrator's (workflow mode, on
/// the fake clock if any), and one gateway.
fn components(opts: &Options, mode: Mode, clock: Option<&FakeClock>) -> Vec<Process> {
    let mut components: Vec<Process> =
        mode.services().iter().flat_map(|s| instances(s.name(), opts.instances)).collect();
    if mode.runs_sagas() {
        let env = clock.map(FakeClock::env).unwrap_or_default();
        components.extend(instances("orchestrator", opts.instances).map(|p| p.with_env(env.clone())));
    }
    components.push(Process::new("gateway"));
    components
}

/// Clean-up comes after the results, and its failure costs only a leftover mount or vhost.
async fn clean_up(opts: &Options, vhost: &str, fs: Option<crate::tmpfs::Mounted>) {
    if let Some(fs) = fs
        && let Err(e) = fs.unmount_keeping()
    {
        tracing::warn!(
            error = format!("{e:#}"),
            "could not take the data dir off its tmpfs (the results stand)"
        );
    }
    if !opts.keep_vhosts {
        opts.mgmt.clean_up_vhost(vhost).await;
    }
}

/// What the phases of one mode's run share.
struct Run<'a> {
    opts: &'a Options,
    mode: Mode,
    vhost: String,
    amqp_url: String,
    /// The gateway's base URL.
    gateway: String,
    fleet: Arc<Fleet>,
    store: Location,
}

/// The components started: wait for them, load them with the plan's faults at their points,
/// then gather what happened.
async fn drive(run: &Run<'_>, hooks: Arc<RunHooks>) -> anyhow::Result<ModeRun> {
    run.fleet.wait_healthy(&run.gateway, Duration::from_secs(60)).await?;
    let driver = FaultDriver::start(Reach {
        fleet: Some(Arc::clone(&run.fleet)),
        mgmt: run.opts.mgmt.clone(),
        vhost: run.vhost.clone(),
        broker_ctl: run.opts.broker_ctl.clone(),
        hooks: Some(Arc::clone(&hooks) as Arc<dyn baton_fleet::Hooks>),
    });
    let log = driver.injected();
    let loaded = run.load(&driver).await;
    let injected = driver.finish().await;
    hooks.close().await;
    let (outcome, started) = loaded?;
    let faults = log.windows().iter().map(|w| FaultMark::of(w, started)).collect();
    run.aftermath(outcome, injected, faults).await
}

impl Run<'_> {
    /// The load, with each fault of the plan fired at its share of the requests sent, or of
    /// the time in a timed run. Returns what the load measured, and when it started.
    async fn load(&self, driver: &FaultDriver) -> anyhow::Result<(Outcome, Instant)> {
        let opts = self.opts;
        let total = opts.duration.map_or(opts.requests as u64, |d| d.as_millis() as u64);
        let at = |pct: u32| ((total * u64::from(pct)) / 100).max(1);
        let points = Fault::points(&opts.faults, self.mode).into_iter();
        let (timer, on_sent) = match opts.duration {
            Some(_) => {
                let points = points.map(|(pct, f)| (Duration::from_millis(at(pct)), f)).collect();
                let none: OnCount = Arc::new(|_| {});
                (Some(driver.on_schedule(points, None)), none)
            }
            None => (None, driver.on_count(points.map(|(pct, f)| (at(pct) as usize, f)).collect())),
        };
        let (on_done, ticker) = self.progress();
        let spec = Spec {
            gateway: self.gateway.clone(),
            requests: opts.requests,
            concurrency: opts.concurrency,
            seed: opts.seed,
            refusal_rate: opts.refusal_rate,
            timeout: Duration::from_secs(60),
            stop_after: opts.duration,
            retry_timeouts: opts.retry_timeouts,
        };
        let started = Instant::now();
        let outcome = baton_load::run(&spec, on_sent, on_done).await;
        if let Some(timer) = timer {
            timer.await.context("the fault timer")?;
        }
        if let Some(t) = ticker {
            t.abort();
        }
        if opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            eprintln!();
        }
        Ok((outcome, started))
    }

    /// What the load reports each answer to, and, in a timed run shown to a person, the task
    /// that says every 10 s how far it is.
    fn progress(&self) -> (OnCount, Option<tokio::task::JoinHandle<()>>) {
        let (opts, mode) = (self.opts, self.mode);
        let Some(d) = opts.duration else {
            let progress = crate::report::Progress::new(mode, opts.requests, opts.progress);
            return (Arc::new(move |n| progress.update(n)), None);
        };
        let done = Arc::new(AtomicUsize::new(0));
        let ticker = opts.progress.then(|| {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let start = Instant::now();
                while start.elapsed() < d {
                    tokio::time::sleep(Duration::from_secs(10).min(d)).await;
                    eprintln!(
                        "{mode}: {:>4} s of {} s, {} requests answered",
                        start.elapsed().as_secs(),
                        d.as_secs(),
                        done.load(Ordering::Relaxed)
                    );
                }
            })
        });
        (Arc::new(move |n| done.store(n, Ordering::Relaxed)), ticker)
    }

    /// After the load: wait for the system to settle, then count what got through and what
    /// did not, and audit the stores (reconciled first in events mode).
    async fn aftermath(
        &self,
        outcome: Outcome,
        mut injected: BTreeMap<String, usize>,
        faults: Vec<FaultMark>,
    ) -> anyhow::Result<ModeRun> {
        let (opts, mode, store) = (self.opts, self.mode, &self.store);
        let started = Instant::now();
        // A handler holds its message for as long as its planned delay: the inboxes must stay
        // still for longer than that before the run counts as settled.
        let slowest = opts.faults.delay_ms.values().copied().max().unwrap_or(0);
        let stillness = Duration::from_secs(1) + Duration::from_millis(slowest);
        let quiescent =
            quiesce(&self.amqp_url, &opts.mgmt, &self.vhost, store, mode, stillness, opts.quiesce_timeout)
                .await?;
        let quiesce_ms = started.elapsed().as_millis() as u64;
        // The broker confirmed each relay's messages; the gateway published one per request.
        let counts = StoreCounts::total(store).await?;
        let messages = counts.published + Requests::at(store).count().await?;
        for service in Service::ALL {
            for (kind, n) in Holdings::at(store, service).injected_by_kind().await? {
                *injected.entry(kind).or_default() += n;
            }
        }
        // What did not get through: sagas still open, messages still in an outbox, dead letters.
        let by_status = Sagas::at(store).counts_by_status().await?;
        let unfinished = by_status.iter().filter(|(s, _)| !s.is_settled()).map(|(_, n)| n).sum();
        let dead_letters = self.dead_letters().await?;
        let audit = baton_audit::audit(store).await?;
        let (reconcile, audit_after_reconcile) = if mode == Mode::Events {
            let r = baton_reconcile::reconcile(&baton_reconcile::Options {
                amqp_url: self.amqp_url.clone().into(),
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
            vhost: self.vhost.clone(),
            data_dir: self.fleet.dir().to_owned(),
            latencies_us: outcome.samples.iter().map(|s| s.latency_us).collect(),
            sent_us: outcome.samples.iter().map(|s| s.sent_us).collect(),
            statuses: outcome.samples.iter().map(|s| s.status).collect(),
            refused_at: outcome.samples.iter().map(|s| s.step.clone()).collect(),
            stats: Stats::of(&outcome),
            messages,
            quiescent,
            quiesce_ms,
            audit,
            reconcile,
            audit_after_reconcile,
            injected,
            faults,
            unfinished,
            left_in_outbox: counts.unsent(),
            dead_letters,
            restarted: self.fleet.restarted(),
        })
    }

    /// Every dead-letter queue that holds something (up to a bound of messages each, to tell
    /// the run's own bad messages apart).
    async fn dead_letters(&self) -> anyhow::Result<Vec<baton_amqp::dlq::DeadQueue>> {
        let broker = baton_amqp::Broker::connect(&self.amqp_url, "compare").await?;
        let queues: Vec<_> = topology::all_queues("main")
            .into_iter()
            .chain(if self.mode == Mode::Hybrid { topology::followup_queues() } else { Vec::new() })
            .filter(|q| self.mode.runs_sagas() || q.name != "orchestrator.replies")
            .collect();
        let all = baton_amqp::dlq::list(&broker, &queues, 500).await?;
        broker.close().await;
        Ok(all.into_iter().filter(|q| q.count > 0).collect())
    }
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
        // Hybrid mode's follow-ups have queues of their own, declared in that mode only.
        .chain(if mode == Mode::Hybrid { topology::followup_queues() } else { Vec::new() })
        .map(|q| q.name)
        // Events mode has no orchestrator, so nobody declared its reply queue.
        .filter(|q| mode.runs_sagas() || q != "orchestrator.replies")
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
        let working = if mode.runs_sagas() {
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
            let sagas = if mode.runs_sagas() {
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
