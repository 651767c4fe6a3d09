//! `baton up --faults` carries out the plan's crashes and connection drops itself: with crash
//! items every component runs as a `baton run` child of `up`, and a crashed one is killed with
//! SIGKILL (its consumers leave their queues, the gateway's port closes,
//! nothing of it stays behind), it comes back after its pause, and under load across the faults
//! every saga still ends and the audit is clean.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use baton_tests::{TestEnv, every_saga_ends, free_port, mgmt_base, spawn_baton, wait_for};

/// Consumers on `queue` right now (a passive declare), or `None` if the broker did not say.
async fn consumers(broker: &baton_amqp::Broker, queue: &str) -> Option<u32> {
    let ch = broker.channel().await.ok()?;
    let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch.queue_declare(queue.into(), opts, lapin::types::FieldTable::default()).await.ok()?;
    let _ = ch.close(200, "probed".into()).await;
    Some(q.consumer_count())
}

fn log_of(env: &TestEnv) -> String {
    std::fs::read_to_string(env.data_dir().join("up.log")).unwrap_or_default()
}

async fn log_says(env: &TestEnv, what: &str, timeout: Duration) {
    wait_for(&format!("`{what}` in the log of baton up"), timeout, || async {
        log_of(env).contains(what).then_some(())
    })
    .await
}

const BEFORE: u8 = 0;
const DOWN: u8 = 1;
const AFTER: u8 = 2;
/// What a client notes when the gateway gave no answer (its connection refused or cut).
const NO_ANSWER: u16 = 0;

/// `baton up` in workflow mode with `faults` over a 100 s window (long enough for the plan to
/// run once in a test), once its gateway answers. Returns the process and the gateway's address.
async fn start_up(env: &TestEnv, faults: &str) -> (tokio::process::Child, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let up = spawn_baton(
        env,
        &[
            "up",
            "--mode",
            "workflow",
            "--http",
            &http,
            "--faults",
            faults,
            "--fault-window",
            "100s",
            "--mgmt-url",
            &mgmt_base(),
        ],
        &[],
        "up.log",
    );
    let client = reqwest::Client::new();
    wait_for("the gateway of baton up", Duration::from_secs(30), || {
        let (c, url) = (client.clone(), format!("http://{http}/health"));
        async move { c.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    (up, http)
}

/// Four clients sending one request after the other, each space and owner new (no business
/// refusal), each request noted with the phase it was sent in and the one it was answered in.
struct Load {
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    clients: tokio::task::JoinSet<Vec<Sent>>,
}

/// `(phase sent in, phase answered in, status or NO_ANSWER)`.
type Sent = (u8, u8, u16);

impl Load {
    fn start(http: &str) -> Load {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let (client, url) = (client.clone(), format!("http://{http}/spaces"));
            let (phase, stop, next, answered) =
                (Arc::clone(&phase), Arc::clone(&stop), Arc::clone(&next), Arc::clone(&answered));
            clients.spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let sent_in = phase.load(Ordering::SeqCst);
                    let body = serde_json::json!({"name": format!("s-{i}"), "owner": format!("o-{i}")});
                    match client.post(&url).json(&body).send().await {
                        Ok(r) => {
                            seen.push((sent_in, phase.load(Ordering::SeqCst), r.status().as_u16()));
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            seen.push((sent_in, phase.load(Ordering::SeqCst), NO_ANSWER));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                seen
            });
        }
        Load { phase, stop, answered, clients }
    }

    fn enter(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Wait for 20 more answers, then stop the clients and return every request.
    async fn finish(mut self, what: &str) -> Vec<Sent> {
        let before = self.answered.load(Ordering::SeqCst);
        wait_for(&format!("20 more answers {what}"), Duration::from_secs(60), || async {
            (self.answered.load(Ordering::SeqCst) >= before + 20).then_some(())
        })
        .await;
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        let join = async {
            while let Some(seen) = self.clients.join_next().await {
                all.extend(seen.expect("a client task"));
            }
        };
        tokio::time::timeout(Duration::from_secs(90), join).await.expect("every client gets its answers");
        all
    }
}

/// Wait until each of `queues` has exactly one consumer: nothing of a crashed component stayed.
async fn one_consumer_each(probe: &baton_amqp::Broker, queues: impl IntoIterator<Item = String>) {
    for q in queues {
        wait_for(&format!("exactly one consumer on {q}"), Duration::from_secs(30), || async {
            (consumers(probe, &q).await == Some(1)).then_some(())
        })
        .await;
    }
}

/// Stop `baton up` with SIGTERM; it must exit cleanly. Returns its summary of the faults.
async fn stop_up(mut up: tokio::process::Child, env: &TestEnv) -> String {
    baton_tests::signal(baton_tests::pid_of(&up), rustix::process::Signal::TERM)
        .expect("SIGTERM to baton up");
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("baton up stops within 30 s")
        .unwrap();
    let log = log_of(env);
    assert!(status.success(), "baton up stopped cleanly: {status}\n{log}");
    log.lines()
        .find(|l| l.contains("faults injected by this run"))
        .unwrap_or_else(|| panic!("no summary of the faults injected:\n{log}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_crashes_routing_and_drops_connections_and_every_saga_still_ends() {
    let env = TestEnv::new().await;
    // Routing crashed 3 s after the start for 3 s, every connection dropped at 10 s.
    let (up, http) = start_up(&env, "crash.routing=3%+3s,drop=10%").await;
    let load = Load::start(&http);

    // The crash: routing's consumer leaves its queue while it is down (its process was killed,
    // not left running behind), and comes back with the restart.
    let probe = env.broker().await;
    log_says(&env, "fault injected: component crashed", Duration::from_secs(60)).await;
    load.enter(DOWN);
    let consumer_gone = AtomicBool::new(false);
    wait_for("routing to be restarted", Duration::from_secs(30), || async {
        if consumers(&probe, "routing.commands").await == Some(0) {
            consumer_gone.store(true, Ordering::SeqCst);
        }
        log_of(&env).contains("component restarted after its crash").then_some(())
    })
    .await;
    load.enter(AFTER);
    assert!(
        consumer_gone.load(Ordering::SeqCst),
        "routing.commands kept a consumer while routing was crashed:\n{}",
        log_of(&env)
    );

    // The drop, then more load on the recovered system.
    log_says(&env, "fault injected: the broker closed every connection", Duration::from_secs(60)).await;
    let statuses = load.finish("after the drop").await;
    let count = |p: u8| statuses.iter().filter(|(sent_in, _, _)| *sent_in == p).count();
    eprintln!(
        "requests sent before the crash {}, while routing was down {}, after it came back {}",
        count(BEFORE),
        count(DOWN),
        count(AFTER)
    );
    assert!(count(BEFORE) > 0 && count(AFTER) > 0, "the load ran across the crash");
    // An injected fault may cost a request a 503 after a true rollback (the audit checks that);
    // nothing else but a 200, and every request is answered.
    assert!(statuses.iter().all(|(_, _, s)| [200, 503].contains(s)), "{statuses:?}");
    assert!(
        statuses.iter().any(|(p, _, s)| *p == AFTER && *s == 200),
        "the restarted routing works: {statuses:?}"
    );

    every_saga_ends(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    let ok = statuses.iter().filter(|(_, _, s)| *s == 200).count();
    assert_eq!(report.complete, ok, "one complete space per 200");
    one_consumer_each(&probe, baton_protocol::Service::ALL.map(|s| format!("{s}.commands"))).await;

    // A clean stop after the faults, with the count of what was injected.
    let summary = stop_up(up, &env).await;
    assert!(summary.contains("crash routing 1"), "{summary}");
    assert!(summary.contains("connections dropped"), "{summary}");
    probe.close().await;
}

/// The line of the log of `baton up` that says `what` of `component`, if any.
fn logged(env: &TestEnv, what: &str, component: &str) -> bool {
    let tag = format!("component={component}");
    log_of(env).lines().map(plain).any(|l| l.contains(what) && l.contains(&tag))
}

/// A log line without its colours (`\x1b[...m`).
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find('\x1b') {
        out.push_str(&rest[..i]);
        rest = rest[i..].find('m').map_or("", |j| &rest[i + j + 1..]);
    }
    out.push_str(rest);
    out
}

const ORCH_DOWN: u8 = 3;
const BETWEEN: u8 = 4;
const GATEWAY_DOWN: u8 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_crashes_the_orchestrator_and_the_gateway_and_every_saga_still_ends() {
    let env = TestEnv::new().await;
    // The orchestrator crashed 5 s after the start for 3 s, the gateway at 15 s for 2 s.
    let (up, http) = start_up(&env, "crash.orchestrator=5%+3s,crash.gateway=15%+2s").await;
    let load = Load::start(&http);

    // The orchestrator's crash: its consumers leave both its queues while it is down.
    let probe = env.broker().await;
    let (commands, replies) = ("orchestrator.commands", "orchestrator.replies");
    wait_for("the orchestrator's crash", Duration::from_secs(60), || async {
        logged(&env, "fault injected: component crashed", "orchestrator").then_some(())
    })
    .await;
    load.enter(ORCH_DOWN);
    // A request sent while the orchestrator is down waits on its queue for the next one.
    let while_down = tokio::spawn({
        let url = format!("http://{http}/spaces");
        async move {
            let body = serde_json::json!({"name": "while-down", "owner": "while-down"});
            let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
            client.post(url).json(&body).send().await.map(|r| r.status().as_u16())
        }
    });
    let orchestrator_gone = AtomicBool::new(false);
    wait_for("the orchestrator to be restarted", Duration::from_secs(30), || async {
        if consumers(&probe, commands).await == Some(0) && consumers(&probe, replies).await == Some(0) {
            orchestrator_gone.store(true, Ordering::SeqCst);
        }
        logged(&env, "component restarted after its crash", "orchestrator").then_some(())
    })
    .await;
    load.enter(BETWEEN);
    assert!(
        orchestrator_gone.load(Ordering::SeqCst),
        "the orchestrator's queues kept a consumer while it was crashed:\n{}",
        log_of(&env)
    );

    // The gateway's crash: its port closes and its outcome consumer leaves while it is down.
    wait_for("the gateway's crash", Duration::from_secs(60), || async {
        logged(&env, "fault injected: component crashed", "gateway").then_some(())
    })
    .await;
    load.enter(GATEWAY_DOWN);
    let (port_closed, gateway_gone) = (AtomicBool::new(false), AtomicBool::new(false));
    wait_for("the gateway to be restarted", Duration::from_secs(30), || async {
        if tokio::net::TcpStream::connect(&http).await.is_err() {
            port_closed.store(true, Ordering::SeqCst);
        }
        if consumers(&probe, "gateway.main.outcomes").await == Some(0) {
            gateway_gone.store(true, Ordering::SeqCst);
        }
        logged(&env, "component restarted after its crash", "gateway").then_some(())
    })
    .await;
    // Restarted is not yet serving: the gateway's window ends when the new one answers.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    wait_for("the restarted gateway to answer", Duration::from_secs(30), || async {
        let r = client.get(format!("http://{http}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    load.enter(AFTER);
    assert!(port_closed.load(Ordering::SeqCst), "the crashed gateway's port stayed open:\n{}", log_of(&env));
    assert!(
        gateway_gone.load(Ordering::SeqCst),
        "gateway.main.outcomes kept a consumer while the gateway was crashed:\n{}",
        log_of(&env)
    );

    // More load on the recovered system, then stop the clients.
    let statuses = load.finish("after the gateway came back").await;
    let count = |p: u8| statuses.iter().filter(|(sent_in, _, _)| *sent_in == p).count();
    eprintln!(
        "requests sent before the crashes {}, while the orchestrator was down {}, between {}, while the gateway was down {}, after {}",
        count(BEFORE),
        count(ORCH_DOWN),
        count(BETWEEN),
        count(GATEWAY_DOWN),
        count(AFTER)
    );
    // Only the gateway's crash costs answers; a request sent while the orchestrator was down
    // waits for it and gets its outcome.
    assert!(statuses.iter().all(|(_, _, s)| [200, 503, NO_ANSWER].contains(s)), "{statuses:?}");
    assert!(
        statuses.iter().all(|(p, _, s)| *s != NO_ANSWER || [BETWEEN, GATEWAY_DOWN].contains(p)),
        "no answer to a request sent away from the gateway's crash: {statuses:?}"
    );
    let while_down = while_down.await.expect("the request sent while the orchestrator was down");
    assert_eq!(
        while_down.ok(),
        Some(200),
        "a request sent while the orchestrator was down ends once it is back"
    );
    assert!(
        statuses.iter().any(|(sent, answered, s)| *sent == BEFORE && *answered >= BETWEEN && *s == 200),
        "requests in flight when the orchestrator crashed got their outcome after its restart"
    );
    assert!(
        statuses.iter().any(|(p, _, s)| *p == AFTER && *s == 200),
        "the restarted gateway works: {statuses:?}"
    );

    every_saga_ends(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    let ok = statuses.iter().filter(|(_, _, s)| *s == 200).count() + 1;
    // Each 200 is a complete space; a request the crashed gateway left unanswered may be one too.
    assert!(report.complete >= ok, "one complete space per 200: {} < {ok}", report.complete);
    let queues = baton_tests::publishers()
        .map(|s| format!("{s}.commands"))
        .chain([replies.to_owned(), "gateway.main.outcomes".to_owned()]);
    one_consumer_each(&probe, queues).await;

    let summary = stop_up(up, &env).await;
    assert!(summary.contains("crash orchestrator 1"), "{summary}");
    assert!(summary.contains("crash gateway 1"), "{summary}");
    probe.close().await;
}
