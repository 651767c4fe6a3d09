//! The crashes and connection drops of a fault plan, carried out by `baton up` itself.
//!
//! `baton compare` and `baton chaos` place a plan's points at shares of the requests sent (or
//! of the run's duration). `baton up` has neither: it runs until Ctrl-C. Here the points are
//! shares of a window (`--fault-window`, 60 s by default) that starts when the components are
//! spawned and repeats until Ctrl-C: with `crash.routing=40%+6s,drop=70%`, routing is crashed
//! 24 s into every minute and comes back 6 s later, and every connection of the vhost is closed
//! 42 s into every minute.
//!
//! A crash aborts the component's task without any cleanup: the task owns everything the
//! component runs (relay, consumers and their handlers, the orchestrator's timer, the gateway's
//! HTTP listener and connections: `JoinSet`s in each `run`), so they go with it, their channels
//! close and the broker hands their unacked deliveries to the next incarnation, which `up`
//! starts after the pause exactly as at start (database opened again, fresh connection, the
//! gateway's port bound again). The orchestrator's next incarnation resumes the sagas in flight
//! from its database. A drop closes every connection of the vhost through the management API,
//! as `baton compare` does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::Mode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use baton_node::Component;

/// What the driver asks of `up`'s loop, which owns the components' tasks.
#[derive(Debug)]
pub enum Order {
    /// Abort `component`'s task now; start it again after `down`.
    Crash { component: Component, down: Duration, round: u64 },
}

/// What was injected so far, by kind (`crash routing`, `connections dropped`).
#[derive(Debug, Clone, Default)]
pub struct Injected(Arc<Mutex<BTreeMap<String, usize>>>);

impl Injected {
    /// Add `n` to `kind`; returns the new total.
    pub fn add(&self, kind: &str, n: usize) -> usize {
        let mut all = self.0.lock().expect("injected faults");
        let total = all.entry(kind.to_owned()).or_default();
        *total += n;
        *total
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().expect("injected faults").is_empty()
    }

    /// `crash routing 2, connections dropped 14`.
    pub fn summary(&self) -> String {
        let all = self.0.lock().expect("injected faults");
        all.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", ")
    }
}

/// The component a plan's crash item names, if `up` can crash it.
fn crashable(name: &str) -> Option<Component> {
    Component::parse(name)
}

/// Whether the plan holds items that whoever drives the components carries out (crashes,
/// drops, broker restarts, bad messages, full disks), rather than the components themselves.
pub fn has_driven_items(plan: &FaultPlan) -> bool {
    !plan.crashes.is_empty()
        || !plan.connection_drops.is_empty()
        || !plan.broker_restarts.is_empty()
        || plan.poison > 0
        || !plan.clock_jumps.is_empty()
        || !plan.disk_full.is_empty()
}

/// Refuse, before anything starts, the items `up` cannot carry out.
pub fn check(plan: &FaultPlan, window: Duration, mode: Mode) -> anyhow::Result<()> {
    for c in &plan.crashes {
        match crashable(&c.component) {
            None => bail!("--faults: `baton up` has no component `{}` to crash", c.component),
            Some(Component::Orchestrator) if mode == Mode::Events => bail!(
                "--faults: crash.orchestrator, but the orchestrator has no part in events mode; drop the item or use --mode workflow"
            ),
            Some(_) => {}
        }
    }
    if !plan.broker_restarts.is_empty() {
        bail!(
            "--faults: `baton up` does not restart the broker; use `baton chaos --broker-ctl ...` for restart-broker"
        );
    }
    if plan.poison > 0 {
        bail!("--faults: `baton up` does not send bad messages; use `baton chaos` for poison");
    }
    if !plan.clock_jumps.is_empty() {
        bail!(
            "--faults: `baton up` runs every component in one process and cannot move one clock; use `baton chaos` or `baton compare` for clock"
        );
    }
    if !plan.disk_full.is_empty() {
        bail!(
            "--faults: `baton up` does not fill the disk of its own data dir; use `baton chaos` (as root) for disk-full"
        );
    }
    if has_driven_items(plan) && window.is_zero() {
        bail!("--fault-window must be longer than 0");
    }
    Ok(())
}

enum Point {
    Crash { component: Component, down: Duration },
    Drop,
}

/// Fire the plan's crashes (as orders to `up`'s loop) and drops (itself) at their shares of
/// every `window`, from now until `cancel`.
pub fn spawn_driver(
    plan: &FaultPlan,
    window: Duration,
    mgmt: Mgmt,
    vhost: String,
    orders: mpsc::UnboundedSender<Order>,
    injected: Injected,
    cancel: CancellationToken,
) {
    let at = |pct: u32| window.mul_f64(f64::from(pct) / 100.0);
    let mut points: Vec<(Duration, Point)> = Vec::new();
    for c in &plan.crashes {
        let component = crashable(&c.component).expect("checked before the start");
        points.push((at(c.at_percent), Point::Crash { component, down: Duration::from_millis(c.down_ms) }));
    }
    points.extend(plan.connection_drops.iter().map(|p| (at(*p), Point::Drop)));
    if points.is_empty() {
        return;
    }
    points.sort_by_key(|(when, _)| *when);
    tokio::spawn(async move {
        let mut start = tokio::time::Instant::now();
        for round in 1u64.. {
            for (when, point) in &points {
                tokio::select! {
                    _ = tokio::time::sleep_until(start + *when) => {}
                    _ = cancel.cancelled() => return,
                }
                match point {
                    Point::Crash { component, down } => {
                        let order = Order::Crash { component: *component, down: *down, round };
                        if orders.send(order).is_err() {
                            return;
                        }
                    }
                    Point::Drop => {
                        let (mgmt, vhost, injected) = (mgmt.clone(), vhost.clone(), injected.clone());
                        tokio::spawn(drop_connections(mgmt, vhost, injected, round));
                    }
                }
            }
            start += window;
        }
    });
}

/// Close every connection of `vhost` through the management API.
async fn drop_connections(mgmt: Mgmt, vhost: String, injected: Injected, round: u64) {
    match mgmt.drop_connections_once_listed(&vhost).await {
        Ok(0) => {
            tracing::warn!(fault = "drop", %vhost, round, "the management API listed no connection to drop")
        }
        Ok(n) => {
            let total = injected.add("connections dropped", n);
            tracing::warn!(
                fault = "drop",
                %vhost,
                connections = n,
                total,
                round,
                "fault injected: the broker closed every connection of the vhost"
            );
        }
        Err(e) => {
            tracing::error!(fault = "drop", %vhost, error = %format!("{e:#}"), "dropping connections through the management API failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_refuses_what_it_cannot_do() {
        let (minute, wf, ev) = (Duration::from_secs(60), Mode::Workflow, Mode::Events);
        let ok = FaultPlan::parse("crash.routing=40%+6s,drop=70%,refuse=0.1", 1).unwrap();
        assert!(check(&ok, minute, wf).is_ok());
        assert!(check(&ok, Duration::ZERO, wf).is_err());
        let all = FaultPlan::parse("crash.gateway=40%+1s,crash.orchestrator=20%+2s", 1).unwrap();
        assert!(check(&all, minute, wf).is_ok());
        let gw = FaultPlan::parse("crash.gateway=40%+1s", 1).unwrap();
        assert!(check(&gw, minute, ev).is_ok());
        let orch = FaultPlan::parse("crash.orchestrator=40%+1s", 1).unwrap();
        assert!(check(&orch, minute, ev).unwrap_err().to_string().contains("events mode"));
        let broker = FaultPlan::parse("restart-broker=40%+3s", 1).unwrap();
        assert!(check(&broker, minute, wf).is_err());
        let poison = FaultPlan::parse("poison=3", 1).unwrap();
        assert!(has_driven_items(&poison) && check(&poison, minute, wf).is_err());
        let full = FaultPlan::parse("disk-full=40%+3s", 1).unwrap();
        assert!(
            has_driven_items(&full) && check(&full, minute, wf).unwrap_err().to_string().contains("chaos")
        );
        assert!(!has_driven_items(&FaultPlan::parse("refuse=0.1", 1).unwrap()));
    }
}
