//! Liveness and readiness of the components running in one process.
//!
//! Owns: the model (each component registers named checks, each either a liveness or a
//! readiness check, either a state it sets or a probe asked on demand), the [`Report`] of them
//! all, and the HTTP endpoints that serve it ([`routes`]: `GET /health/live`, `GET
//! /health/ready`, and `GET /health`, which is the readiness answer). Must not touch: what a
//! check looks at; each component registers its own (broker connected, store writable,
//! consumers attached, database thread and loops alive).
//!
//! Layout: `lib.rs` (the registry, checks and report), `http` (the endpoints).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

mod http;

pub use http::{answer, routes, serve};

/// Whether a failing check means the process must be restarted, or only that it should not
/// be sent work for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A loop or thread of the process is dead: only a restart brings it back.
    Live,
    /// A dependency is away or a resource is exhausted: the process recovers by itself.
    Ready,
}

type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

enum Source {
    State(Check),
    Probe(Probe),
}

struct Entry {
    kind: Kind,
    source: Source,
}

/// The checks of every component of a process. Cheap to clone; clones share the registry.
/// A component that registers a check under a name it used before (after a restart) replaces
/// the old one.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<(String, String), Entry>>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> =
            self.checks.lock().expect("health").keys().map(|(c, n)| format!("{c}: {n}")).collect();
        f.debug_struct("Health").field("checks", &names).finish()
    }
}

/// A check whose state its owner sets. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Check(Arc<Mutex<Result<(), String>>>);

impl Check {
    /// A check not attached to any registry (for code run without health reporting).
    pub fn detached() -> Check {
        Check(Arc::new(Mutex::new(Ok(()))))
    }

    pub fn pass(&self) {
        *self.0.lock().expect("check") = Ok(());
    }

    pub fn fail(&self, why: impl Into<String>) {
        *self.0.lock().expect("check") = Err(why.into());
    }

    pub fn state(&self) -> Result<(), String> {
        self.0.lock().expect("check").clone()
    }
}

/// How long a probe may take before it counts as failing.
const PROBE_PATIENCE: Duration = Duration::from_secs(3);

impl Health {
    /// Register a check that `component` sets itself; it fails until first passed.
    pub fn check(&self, component: &str, name: &str, kind: Kind) -> Check {
        let check = Check(Arc::new(Mutex::new(Err("not started yet".into()))));
        self.insert(component, name, Entry { kind, source: Source::State(check.clone()) });
        check
    }

    /// Register a check answered by `probe` each time the health is asked for.
    pub fn probe<F, Fut>(&self, component: &str, name: &str, kind: Kind, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let probe: Probe = Arc::new(move || Box::pin(probe()));
        self.insert(component, name, Entry { kind, source: Source::Probe(probe) });
    }

    fn insert(&self, component: &str, name: &str, entry: Entry) {
        self.checks.lock().expect("health").insert((component.to_owned(), name.to_owned()), entry);
    }

    /// Every check, asked now (probes at once, each bounded).
    pub async fn report(&self) -> Report {
        let asked: Vec<_> = {
            let checks = self.checks.lock().expect("health");
            checks
                .iter()
                .map(|((component, name), e)| {
                    let source = match &e.source {
                        Source::State(c) => Err(c.state()),
                        Source::Probe(p) => Ok(p()),
                    };
                    (component.clone(), name.clone(), e.kind, source)
                })
                .collect()
        };
        let checks = futures_util::future::join_all(asked.into_iter().map(
            |(component, check, kind, source)| async move {
                let state = match source {
                    Err(state) => state,
                    Ok(probe) => match tokio::time::timeout(PROBE_PATIENCE, probe).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {} s", PROBE_PATIENCE.as_secs())),
                    },
                };
                CheckReport { component, check, kind, ok: state.is_ok(), reason: state.err() }
            },
        ))
        .await;
        let live = checks.iter().all(|c| c.ok || c.kind != Kind::Live);
        let ready = checks.iter().all(|c| c.ok);
        Report { live, ready, checks }
    }
}

/// Run `fut` (a component's loop) with `check` passing while it runs, and failing once it
/// ended or was dropped: a loop that stops on its own is a dead process part.
pub async fn running<F: Future>(check: Check, fut: F) -> F::Output {
    struct Ended(Check);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.fail("stopped");
        }
    }
    check.pass();
    let _ended = Ended(check);
    fut.await
}

/// The state of every check of a process at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every liveness check passes: the process's loops and threads run.
    pub live: bool,
    /// Every check passes: the process can take work.
    pub ready: bool,
    pub checks: Vec<CheckReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub component: String,
    pub check: String,
    pub kind: Kind,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Report {
    /// The failing checks among those `of_kind` (all of them for `None`), one line each:
    /// `component: check (reason)`.
    pub fn failing(&self, of_kind: Option<Kind>) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.ok && of_kind.is_none_or(|k| c.kind == k))
            .map(|c| format!("{}: {} ({})", c.component, c.check, c.reason.as_deref().unwrap_or("failing")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_needs_every_check_and_live_only_the_liveness_ones() {
        let health = Health::default();
        let store = health.check("records", "store writable", Kind::Ready);
        let thread = health.check("records", "database thread alive", Kind::Live);
        health.probe("records", "broker connected", Kind::Ready, || async { Ok(()) });
        let r = health.report().await;
        assert!(!r.live && !r.ready, "checks fail until first passed: {r:?}");
        thread.pass();
        store.pass();
        let r = health.report().await;
        assert!(r.live && r.ready, "{r:?}");
        store.fail("disk full");
        let r = health.report().await;
        assert!(r.live && !r.ready);
        assert_eq!(r.failing(None), vec!["records: store writable (disk full)".to_owned()]);
        // A restarted component's check replaces its old one.
        health.probe("records", "store writable", Kind::Ready, || async { Ok(()) });
        assert!(health.report().await.ready);
    }

    #[tokio::test]
    async fn a_loop_that_ends_fails_its_check() {
        let health = Health::default();
        let check = health.check("orchestrator", "timer running", Kind::Live);
        running(check.clone(), async { assert!(check.state().is_ok()) }).await;
        let r = health.report().await;
        assert!(!r.live);
        assert_eq!(r.failing(Some(Kind::Live)), vec!["orchestrator: timer running (stopped)".to_owned()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_counts_as_failing() {
        let health = Health::default();
        health.probe("gateway", "broker connected", Kind::Ready, std::future::pending);
        let r = health.report().await;
        assert!(!r.ready && r.live);
        assert!(r.checks[0].reason.as_deref().unwrap().contains("no answer"));
    }
}
