//! The orchestrator's wall clock jumps an hour back, then two hours forward, while sagas wait
//! at a step whose service is down: the step still times out within its bound after the
//! backward jump, the forward jump fires no timer early, new requests while it runs ahead of
//! the gateway's clock are refused at once (504, nothing left), and once the clock is true and
//! the service is back every saga completes and the audit is clean.
//!
//! The orchestrator runs as a real process under libfaketime (Debian package `faketime`), its
//! offset read from a file at every call (`FAKETIME_TIMESTAMP_FILE`, `FAKETIME_NO_CACHE=1`), so
//! the test moves the clock of the running process. `DONT_FAKE_MONOTONIC=1` keeps the monotonic
//! clock true, as it is when NTP or an operator steps a real wall clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::Service;
use baton_tests::{System, SystemConfig, TestEnv, every_saga_ends, spawn_baton, spawn_service, wait_for};

/// Requests per phase.
const N: usize = 8;

/// Routing's timeout in this test's workflow: long enough that a timer fired early by a jump
/// cannot be mistaken for one that was due.
const ROUTING_TIMEOUT: Duration = Duration::from_secs(10);

/// libfaketime, or a clear failure: the test script installs it.
fn libfaketime() -> PathBuf {
    let candidates = [
        std::env::var("BATON_TEST_LIBFAKETIME").unwrap_or_default(),
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1".into(),
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1".into(),
        "/usr/lib/faketime/libfaketimeMT.so.1".into(),
    ];
    candidates.iter().filter(|c| !c.is_empty()).map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "libfaketime is not installed (looked in {candidates:?}); install the Debian package `faketime` \
             (scripts/test.sh does) or point BATON_TEST_LIBFAKETIME at libfaketimeMT.so.1"
        )
    })
}

/// The offset of the orchestrator's wall clock, changed while it runs.
struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        let clock = FakeClock { file: dir.join("faketime") };
        clock.set("+0");
        clock
    }

    /// A libfaketime offset such as `-1h`; written whole (rename), so no read sees half of it.
    fn set(&self, offset: &str) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn envs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", libfaketime().display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("DONT_FAKE_MONOTONIC", "1".into()),
        ]
    }
}

/// `create-space` with routing's timeout set to [`ROUTING_TIMEOUT`].
fn workflow_file(dir: &Path) -> PathBuf {
    let text = include_str!("../../crates/workflow/workflows/create-space.json");
    let mut wf: serde_json::Value = serde_json::from_str(text).unwrap();
    for step in wf["steps"].as_array_mut().unwrap() {
        if step["name"] == "publish-route" {
            step["actions"][0]["timeout_ms"] = (ROUTING_TIMEOUT.as_millis() as u64).into();
        }
    }
    let path = dir.join("create-space.json");
    std::fs::write(&path, wf.to_string()).unwrap();
    path
}

/// History events of routing's `do` for the sagas of spaces named `<prefix>-*`.
fn routing_events(env: &TestEnv, prefix: &str, event: &str) -> i64 {
    let of_routing = |h: &baton_orchestrator::query::HistoryRow| {
        h.step.as_deref() == Some("routing") && h.action.as_deref() == Some("do") && h.event == event
    };
    baton_tests::sagas(&env.store())
        .iter()
        .filter(|v| v.context.name.starts_with(&format!("{prefix}-")) && v.history.iter().any(of_routing))
        .count() as i64
}

fn spawn_requests(
    sys: &Arc<System>,
    prefix: &str,
    calls: &mut tokio::task::JoinSet<(String, u16)>,
) -> Instant {
    for i in 0..N {
        let sys = Arc::clone(sys);
        let name = format!("{prefix}-{i}");
        calls.spawn(async move {
            let (status, body) = sys.create(&name, &format!("owner-{name}")).await;
            (format!("{name}: {body}"), status)
        });
    }
    Instant::now()
}

async fn all_at_routing(env: &TestEnv, prefix: &str) {
    wait_for(&format!("the {prefix}-* sagas to wait at routing"), Duration::from_secs(30), || async {
        (routing_events(env, prefix, "sent") == N as i64).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_timers_survive_the_orchestrators_clock_jumping_back_and_forward() {
    let env = TestEnv::new().await;
    // Routing is down: every saga waits at its step, whose command nobody answers.
    let cfg = SystemConfig {
        with_orchestrator: false,
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(180),
        ..SystemConfig::default()
    };
    let sys = Arc::new(System::start(&env, cfg.clone()).await);
    let clock = FakeClock::new(env.data_dir());
    let file = workflow_file(env.data_dir());
    let envs = clock.envs();
    let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut orchestrator = spawn_baton(
        &env,
        &["run", "orchestrator", "--instance", "main", "--workflow-file", file.to_str().unwrap()],
        &envs,
        "orchestrator.log",
    );
    let mut calls = tokio::task::JoinSet::new();

    // Back an hour while the a-* sagas wait: their routing step still times out on time.
    spawn_requests(&sys, "a", &mut calls);
    all_at_routing(&env, "a").await;
    clock.set("-1h");
    let jumped = Instant::now();
    let bound = ROUTING_TIMEOUT + Duration::from_secs(4);
    wait_for("routing to time out after the clock went back an hour", bound, || async {
        (routing_events(&env, "a", "timed_out") == N as i64).then_some(())
    })
    .await;
    assert!(jumped.elapsed() <= bound);

    // Forward two hours (an hour ahead) while the b-* sagas wait: no timer fires early.
    let sent = spawn_requests(&sys, "b", &mut calls);
    all_at_routing(&env, "b").await;
    clock.set("+1h");
    let jumped = Instant::now();
    // None is due before its send plus the timeout (every send came after `sent`).
    let due = sent + ROUTING_TIMEOUT - Duration::from_millis(500);
    assert!(
        due > jumped + Duration::from_secs(2),
        "the b-* sagas took too long to reach routing to check this"
    );
    while Instant::now() < due {
        assert_eq!(routing_events(&env, "b", "timed_out"), 0, "a timer fired early after the forward jump");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // New requests while the orchestrator's clock runs an hour ahead of the gateway's: their
    // client deadline (the gateway's wall-clock instant) has passed by this clock, so the saga
    // starts no step and answers 503 at once (rolled back, nothing done); nothing is left
    // behind (the audit below). Safe,
    // not silent: the orchestrator says why at WARN.
    let mut skewed = tokio::task::JoinSet::new();
    spawn_requests(&sys, "c", &mut skewed);
    let answers = tokio::time::timeout(Duration::from_secs(30), skewed.join_all())
        .await
        .expect("a start past its deadline is answered at once");
    assert!(answers.iter().all(|(_, s)| *s == 503), "{answers:#?}");
    assert_eq!(routing_events(&env, "c", "sent"), 0, "no step of theirs started");

    // Back to the true time, more load, then routing comes back: every saga completes.
    clock.set("+0");
    spawn_requests(&sys, "d", &mut calls);
    all_at_routing(&env, "d").await;
    let (routing, routing_task) = spawn_service(&env, Service::Routing, &cfg);
    let mut outcomes = Vec::new();
    let all = async {
        while let Some(r) = calls.join_next().await {
            outcomes.push(r.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all).await.expect("every client gets an answer");
    let failed: Vec<&(String, u16)> = outcomes.iter().filter(|(_, s)| *s != 200).collect();
    assert!(failed.is_empty(), "every request succeeds once routing is back: {failed:#?}");
    every_saga_ends(&env, Duration::from_secs(60)).await;
    assert_eq!(baton_tests::held(&env.store(), Service::Notifier), 3 * N);
    // The c-* clients were told 503 (rolled back, nothing done), and nothing of their spaces
    // exists anywhere: consistent, and nobody was left not knowing.
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "{:#?}", report.uncertain);
    assert_eq!(report.complete, 3 * N);
    let log = std::fs::read_to_string(env.data_dir().join("orchestrator.log")).unwrap();
    assert!(!log.contains("ERROR") && !log.contains("panicked"), "{log}");
    assert!(log.contains("past its client's deadline"), "the skew is reported: {log}");
    assert!(orchestrator.try_wait().unwrap().is_none(), "the orchestrator is still running: {log}");

    orchestrator.start_kill().unwrap();
    let _ = orchestrator.wait().await;
    routing.cancel();
    routing_task.await.unwrap().unwrap();
    Arc::into_inner(sys).expect("no request holds the system").stop().await;
}
