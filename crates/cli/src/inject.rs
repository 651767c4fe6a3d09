//! The crashes and connection drops of a fault plan, carried out by `baton up` itself through
//! `baton-fleet`'s `FaultDriver`, the one `baton compare` and `baton chaos` use.
//!
//! `baton compare` and `baton chaos` place a plan's points at shares of the requests sent (or
//! of the run's duration). `baton up` has neither: it runs until Ctrl-C. Here the points are
//! shares of a window (`--fault-window`, 60 s by default) that starts when the components are
//! spawned and repeats until Ctrl-C: with `crash.routing=40%+6s,drop=70%`, routing is crashed
//! 24 s into every minute and comes back 6 s later, and every connection of the vhost is closed
//! 42 s into every minute.
//!
//! With crash items every component runs as a `baton run` process of its own, and a crash is a
//! SIGKILL of it: no cleanup, its channels close and the broker hands its unacked deliveries to
//! the next incarnation, started after the pause exactly as at start (database opened again,
//! fresh connection, the gateway's port bound again). The orchestrator's next incarnation
//! resumes the sagas in flight from its database. A drop closes every connection of the vhost through the management API,
//! as `baton compare` does.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use baton_faults::FaultPlan;
use baton_fleet::{Fault, FaultDriver, Fleet, Reach};
use baton_mgmt::Mgmt;
use baton_protocol::Mode;

use baton_node::Component;

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
                "--faults: crash.orchestrator, but the orchestrator has no part in events mode; drop the item or use --mode workflow or hybrid"
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

/// Start the driver of the plan's crashes and drops: each at its share of every `window`, from
/// now until the driver is stopped. Crashes need `fleet`, the components as processes.
pub fn start_driver(
    plan: &FaultPlan,
    mode: Mode,
    window: Duration,
    fleet: Option<Arc<Fleet>>,
    (mgmt, vhost): (Mgmt, String),
) -> FaultDriver {
    let driver = FaultDriver::start(Reach { fleet, mgmt, vhost, broker_ctl: None, hooks: None });
    let at = |pct: u32| window.mul_f64(f64::from(pct) / 100.0);
    let points = Fault::points(plan, mode).into_iter().map(|(pct, f)| (at(pct), f)).collect();
    // Runs until the driver stops: nobody waits for it.
    drop(driver.on_schedule(points, Some(window)));
    driver
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
