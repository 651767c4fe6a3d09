//! The one driver of the faults a plan has done *to* components from the outside: crashes
//! (SIGKILL, then a restart after the downtime), connection drops (every connection of the
//! vhost closed through the management API), broker restarts (`--broker-ctl`), and, through
//! [`Hooks`] its caller gives, what only that caller can do (bad messages, clock jumps, a full
//! disk). `baton compare`, `baton chaos` and `baton up` all drive their faults with it; they
//! differ only in when each fires ([`FaultDriver::on_count`], [`FaultDriver::on_schedule`]).

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::{Component, Mode};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::Fleet;

/// One fault, at one point of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Kill `component` (SIGKILL), start it again after `down`.
    Crash { component: String, down: Duration },
    /// Close every connection of the vhost.
    Drop,
    /// Stop the broker's application, start it again after `down`.
    BrokerRestart { down: Duration },
    /// The `n`-th bad message of the run.
    Poison { n: usize },
    /// Set the orchestrator's wall clock to this offset from the true time.
    Clock { offset_s: i64 },
    /// Fill the data dir's filesystem, and free it after `for_`.
    DiskFull { for_: Duration },
}

impl Fault {
    /// The items of `plan` that whoever drives the components carries out, each with its point
    /// (a share of the run, in percent), leaving out those with no part in `mode` (the
    /// orchestrator's crashes and clock in events mode).
    pub fn points(plan: &FaultPlan, mode: Mode) -> Vec<(u32, Fault)> {
        let ms = Duration::from_millis;
        let workflow = mode.runs_sagas();
        let mut points: Vec<(u32, Fault)> = Vec::new();
        // A crash of a component that has no part in the mode (the orchestrator in events mode,
        // the search index outside hybrid mode) has nothing to kill.
        let runs = |name: &str| Component::parse(name).is_none_or(|c| c.runs_in(mode));
        for c in plan.crashes.iter().filter(|c| runs(&c.component)) {
            points.push((c.at_percent, Fault::Crash { component: c.component.clone(), down: ms(c.down_ms) }));
        }
        points.extend(plan.connection_drops.iter().map(|p| (*p, Fault::Drop)));
        for j in plan.clock_jumps.iter().filter(|_| workflow) {
            points.push((j.at_percent, Fault::Clock { offset_s: j.offset_s }));
        }
        for r in &plan.broker_restarts {
            points.push((r.at_percent, Fault::BrokerRestart { down: ms(r.down_ms) }));
        }
        for d in &plan.disk_full {
            points.push((d.at_percent, Fault::DiskFull { for_: ms(d.for_ms) }));
        }
        for (n, pct) in plan.poison_points().into_iter().enumerate() {
            points.push((pct, Fault::Poison { n }));
        }
        points
    }
}

/// What was injected so far, by kind (`crash routing`, `connections dropped`), and when.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    counts: Arc<Mutex<BTreeMap<String, usize>>>,
    windows: Arc<Mutex<Vec<Window>>>,
}

/// When one fault was in force: from its injection to its end (a crashed component started
/// again, the broker back, the disk freed); the two are close for an instant fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub kind: String,
    pub from: Instant,
    pub to: Instant,
}

impl Injected {
    /// Add `n` to `kind`; returns the new total.
    pub fn add(&self, kind: &str, n: usize) -> usize {
        let mut all = self.counts.lock().expect("injected faults");
        let total = all.entry(kind.to_owned()).or_default();
        *total += n;
        *total
    }

    /// Note that a fault of `kind` was in force from `from` until now.
    pub fn lasted(&self, kind: &str, from: Instant) {
        let window = Window { kind: kind.to_owned(), from, to: Instant::now() };
        self.windows.lock().expect("fault windows").push(window);
    }

    /// Every kind with its count.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.counts.lock().expect("injected faults").clone()
    }

    /// When each fault was in force, in the order they ended.
    pub fn windows(&self) -> Vec<Window> {
        self.windows.lock().expect("fault windows").clone()
    }

    /// `crash routing 2, connections dropped 14`.
    pub fn summary(&self) -> String {
        let all = self.counts.lock().expect("injected faults");
        all.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    }
}

/// A callback given each count (of requests sent, or answered) as it grows.
pub type OnCount = Arc<dyn Fn(usize) + Send + Sync>;

/// A fault under way in a hook; resolves to the kind to count it under once it was injected,
/// `None` when it was skipped or failed (the hook says why in the log).
pub type Injection = Pin<Box<dyn Future<Output = Option<&'static str>> + Send>>;

/// The faults only the caller can carry out: bad messages, clock jumps, a full disk.
pub trait Hooks: Send + Sync + 'static {
    fn inject(self: Arc<Self>, fault: Fault) -> Injection;
}

/// What the driver reaches the components and the broker through.
pub struct Reach {
    /// The component processes, for crashes; `None` when they are not processes of their own.
    pub fleet: Option<Arc<Fleet>>,
    pub mgmt: Mgmt,
    pub vhost: String,
    /// The command that stops (`stop_app`) and starts (`start_app`) the broker, if any.
    pub broker_ctl: Option<Vec<String>>,
    pub hooks: Option<Arc<dyn Hooks>>,
}

/// Carries out faults as they fire, each in order; crashes and hooks' faults run on, in tasks
/// of their own, until their downtime ends.
pub struct FaultDriver {
    tx: mpsc::UnboundedSender<(Fault, u64)>,
    task: JoinHandle<()>,
    injected: Injected,
    /// Aborts what is under way (a pending restart, a timer).
    stop: CancellationToken,
}

impl FaultDriver {
    pub fn start(reach: Reach) -> FaultDriver {
        let (tx, rx) = mpsc::unbounded_channel();
        let injected = Injected::default();
        let stop = CancellationToken::new();
        let executor = Executor { reach: Arc::new(reach), injected: injected.clone(), down: Arc::default() };
        let task = tokio::spawn(executor.run(rx, stop.clone()));
        FaultDriver { tx, task, injected, stop }
    }

    /// What was injected so far.
    pub fn injected(&self) -> Injected {
        self.injected.clone()
    }

    /// Carry out `fault` now (`round`: which repetition of a schedule, for the log).
    pub fn fire(&self, fault: Fault, round: u64) {
        let _ = self.tx.send((fault, round));
    }

    /// A callback for a load's count of requests sent: it fires each of `points` (a count of
    /// requests each) once that many are sent.
    pub fn on_count(&self, points: Vec<(usize, Fault)>) -> OnCount {
        let (points, tx) = (Mutex::new(points), self.tx.clone());
        Arc::new(move |n| {
            let mut t = points.lock().expect("fault points");
            while let Some(i) = t.iter().position(|(when, _)| *when <= n) {
                let (_, f) = t.swap_remove(i);
                let _ = tx.send((f, 1));
            }
        })
    }

    /// Fire each of `points` at its time from now; with `every`, again every `every` (round
    /// 2, 3...) until [`FaultDriver::stop`]. Returns once the last has fired (never, with
    /// `every`).
    pub fn on_schedule(&self, mut points: Vec<(Duration, Fault)>, every: Option<Duration>) -> JoinHandle<()> {
        points.sort_by_key(|(when, _)| *when);
        let (tx, stop) = (self.tx.clone(), self.stop.clone());
        tokio::spawn(async move {
            let mut start = tokio::time::Instant::now();
            for round in 1u64.. {
                for (when, fault) in &points {
                    tokio::select! {
                        _ = tokio::time::sleep_until(start + *when) => {}
                        _ = stop.cancelled() => return,
                    }
                    if tx.send((fault.clone(), round)).is_err() {
                        return;
                    }
                }
                let Some(every) = every.filter(|e| !e.is_zero()) else { return };
                start += every;
            }
        })
    }

    /// Wait for every fault fired to run its course (restarts included), once every callback of
    /// [`FaultDriver::on_count`] is dropped and every schedule has ended; what was injected.
    pub async fn finish(self) -> BTreeMap<String, usize> {
        drop(self.tx);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the fault driver died");
        }
        self.injected.counts()
    }

    /// Abort what is under way (a restart not yet made is not made); what was injected.
    pub async fn stop(self) -> BTreeMap<String, usize> {
        self.stop.cancel();
        self.finish().await
    }
}

/// The driver's task: carries out each fault as it comes.
struct Executor {
    reach: Arc<Reach>,
    injected: Injected,
    /// Components crashed and not yet started again.
    down: Arc<Mutex<HashSet<String>>>,
}

impl Executor {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<(Fault, u64)>, stop: CancellationToken) {
        let mut under_way = JoinSet::new();
        loop {
            let (fault, round) = tokio::select! {
                next = rx.recv() => match next {
                    Some(f) => f,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            match fault {
                Fault::Crash { component, down } => {
                    under_way.spawn(self.crash(component, down, round));
                }
                Fault::Drop => self.drop_connections(round).await,
                Fault::BrokerRestart { down } => self.restart_broker(down).await,
                other => match &self.reach.hooks {
                    Some(hooks) => {
                        let (injection, injected) = (Arc::clone(hooks).inject(other), self.injected.clone());
                        under_way.spawn(async move {
                            let from = Instant::now();
                            if let Some(kind) = injection.await {
                                injected.add(kind, 1);
                                injected.lasted(kind, from);
                            }
                        });
                    }
                    None => tracing::warn!(fault = ?other, "this run cannot inject this fault; skipped"),
                },
            }
        }
        tokio::select! {
            _ = async { while under_way.join_next().await.is_some() {} } => {}
            _ = stop.cancelled() => under_way.abort_all(),
        }
    }

    /// Crash `component` and start it again after `down`, unless it is still down.
    fn crash(
        &self,
        component: String,
        down: Duration,
        round: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (reach, injected, down_now) =
            (Arc::clone(&self.reach), self.injected.clone(), Arc::clone(&self.down));
        async move {
            let Some(fleet) = &reach.fleet else {
                tracing::warn!(fault = "crash", %component, "the components are not processes of their own; skipped");
                return;
            };
            if !down_now.lock().expect("down").insert(component.clone()) {
                tracing::warn!(fault = "crash", %component, round, "still down from its last crash; skipped");
                return;
            }
            let from = Instant::now();
            if fleet.crash(&component).await {
                let kind = format!("crash {component}");
                let total = injected.add(&kind, 1);
                tracing::warn!(
                    fault = "crash",
                    %component,
                    down_ms = down.as_millis() as u64,
                    crashes = total,
                    round,
                    "fault injected: component crashed (its process killed with SIGKILL, no cleanup)"
                );
                tokio::time::sleep(down).await;
                match fleet.restart(&component) {
                    Ok(_) => {
                        tracing::warn!(fault = "crash", %component, "component restarted after its crash")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, %component, "restarting a crashed component failed")
                    }
                }
                injected.lasted(&kind, from);
            }
            down_now.lock().expect("down").remove(&component);
        }
    }

    /// Close every connection of the vhost through the management API.
    async fn drop_connections(&self, round: u64) {
        let vhost = &self.reach.vhost;
        let from = Instant::now();
        match self.reach.mgmt.drop_connections_once_listed(vhost).await {
            Ok(0) => {
                tracing::warn!(fault = "drop", %vhost, round, "the management API listed no connection to drop")
            }
            Ok(n) => {
                let total = self.injected.add("connections dropped", n);
                self.injected.lasted("connections dropped", from);
                tracing::warn!(
                    fault = "drop",
                    %vhost,
                    connections = n,
                    total,
                    round,
                    "fault injected: the broker closed every connection of the vhost"
                );
            }
            Err(e) => tracing::error!(
                fault = "drop",
                %vhost,
                error = %format!("{e:#}"),
                "dropping connections through the management API failed"
            ),
        }
    }

    /// Stop the broker's application for `down`, with the run's `--broker-ctl`.
    async fn restart_broker(&self, down: Duration) {
        let Some(ctl) = &self.reach.broker_ctl else {
            tracing::warn!("the plan restarts the broker, but no --broker-ctl says how; skipped");
            return;
        };
        let from = Instant::now();
        if let Err(e) = broker_ctl(ctl, "stop_app").await {
            tracing::error!(error = %e, "stopping the broker failed");
            return;
        }
        self.injected.add("broker restarts", 1);
        tokio::time::sleep(down).await;
        if let Err(e) = broker_ctl(ctl, "start_app").await {
            tracing::error!(error = %e, "starting the broker again failed");
        }
        self.injected.lasted("broker restarts", from);
    }
}

/// Run the broker control command with one more argument (`stop_app`, `start_app`).
async fn broker_ctl(ctl: &[String], arg: &str) -> Result<(), CtlError> {
    let (cmd, args) = ctl.split_first().ok_or(CtlError::Empty)?;
    let out = Command::new(cmd)
        .args(args)
        .arg(arg)
        .output()
        .await
        .map_err(|source| CtlError::Spawn { cmd: cmd.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(CtlError::Failed { line: format!("{} {arg}", ctl.join(" ")), stderr });
    }
    Ok(())
}

/// The broker control command did not do its part: the fault is logged and the run goes on.
#[derive(Debug, thiserror::Error)]
enum CtlError {
    #[error("an empty --broker-ctl")]
    Empty,
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{line}: {stderr}")]
    Failed { line: String, stderr: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plans_points_leave_out_what_has_no_part_in_the_mode() {
        let plan = FaultPlan::parse(
            "crash.orchestrator=20%+1s,crash.routing=40%+1s,crash.search=60%+1s,drop=70%,clock=45%-1h,poison=1",
            1,
        )
        .unwrap();
        let workflow = Fault::points(&plan, Mode::Workflow);
        assert_eq!(workflow.len(), 5);
        let hybrid = Fault::points(&plan, Mode::Hybrid);
        assert_eq!(hybrid.len(), 6, "the search index runs in hybrid mode only");
        assert!(
            hybrid.contains(&(60, Fault::Crash { component: "search".into(), down: Duration::from_secs(1) }))
        );
        let events: Vec<(u32, Fault)> = Fault::points(&plan, Mode::Events);
        assert_eq!(
            events,
            vec![
                (40, Fault::Crash { component: "routing".into(), down: Duration::from_secs(1) }),
                (70, Fault::Drop),
                (50, Fault::Poison { n: 0 }),
            ]
        );
    }

    #[tokio::test]
    async fn faults_fire_at_their_count_and_hooks_count_what_they_injected() {
        struct Count;
        impl Hooks for Count {
            fn inject(self: Arc<Self>, fault: Fault) -> Injection {
                Box::pin(async move { matches!(fault, Fault::Poison { .. }).then_some("bad input") })
            }
        }
        let driver = FaultDriver::start(Reach {
            fleet: None,
            mgmt: Mgmt::new("http://127.0.0.1:1", "guest", "guest"),
            vhost: "none".into(),
            broker_ctl: None,
            hooks: Some(Arc::new(Count)),
        });
        let (before, log) = (Instant::now(), driver.injected());
        let sent = driver.on_count(vec![(2, Fault::Poison { n: 0 }), (3, Fault::Clock { offset_s: 0 })]);
        sent(1);
        sent(2);
        sent(5);
        sent(9);
        drop(sent);
        let injected = driver.finish().await;
        assert_eq!(injected, BTreeMap::from([("bad input".to_owned(), 1)]));
        let windows = log.windows();
        assert_eq!(windows.len(), 1, "only what was injected has a window: {windows:?}");
        assert!(
            windows[0].kind == "bad input" && before <= windows[0].from && windows[0].from <= windows[0].to
        );
    }
}
