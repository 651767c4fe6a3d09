//! `baton up --faults` carries out the plan's crashes and connection drops itself: a crashed
//! component's tasks are aborted (its consumers leave their queues, the gateway's port closes,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_crashes_routing_and_drops_connections_and_every_saga_still_ends() {
    let env = TestEnv::new().await;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    // Routing crashed 3 s after the start for 3 s, every connection dropped at 10 s; the window
    // is long enough for the plan to run once in this test.
    let mut up = spawn_baton(
        &env,
        &[
            "up",
            "--mode",
            "workflow",
            "--http",
            &http,
            "--faults",
            "crash.routing=3%+3s,drop=10%",
            "--fault-window",
            "100s",
            "--mgmt-url",
            &mgmt_base(),
        ],
        &[],
        "up.log",
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_for("the gateway of baton up", Duration::from_secs(30), || {
        let (c, url) = (client.clone(), format!("http://{http}/health"));
        async move { c.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;

    // Load across the faults: four clients, one request after the other, each space and owner
    // new (no business refusal), each request marked with the phase it was sent in.
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, http) = (client.clone(), http.clone());
        let (phase, stop, next, answered) =
            (Arc::clone(&phase), Arc::clone(&stop), Arc::clone(&next), Arc::clone(&answered));
        clients.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let sent_in = phase.load(Ordering::SeqCst);
                let r = client
                    .post(format!("http://{http}/spaces"))
                    .json(&serde_json::json!({"name": format!("s-{i}"), "owner": format!("o-{i}")}))
                    .send()
                    .await
                    .expect("the gateway answers");
                seen.push((sent_in, r.status().as_u16()));
                answered.fetch_add(1, Ordering::SeqCst);
            }
            seen
        });
    }

    // The crash: routing's consumer leaves its queue while it is down (its tasks were aborted,
    // not left running behind), and comes back with the restart.
    let probe = env.broker().await;
    log_says(&env, "fault injected: component crashed", Duration::from_secs(60)).await;
    phase.store(DOWN, Ordering::SeqCst);
    let consumer_gone = AtomicBool::new(false);
    wait_for("routing to be restarted", Duration::from_secs(30), || async {
        if consumers(&probe, "routing.commands").await == Some(0) {
            consumer_gone.store(true, Ordering::SeqCst);
        }
        log_of(&env).contains("component restarted after its crash").then_some(())
    })
    .await;
    phase.store(AFTER, Ordering::SeqCst);
    assert!(
        consumer_gone.load(Ordering::SeqCst),
        "routing.commands kept a consumer while routing was crashed:\n{}",
        log_of(&env)
    );

    // The drop, then more load on the recovered system.
    log_says(&env, "fault injected: the broker closed every connection", Duration::from_secs(60)).await;
    let after_drop = answered.load(Ordering::SeqCst);
    wait_for("20 more answers after the drop", Duration::from_secs(60), || async {
        (answered.load(Ordering::SeqCst) >= after_drop + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    let all = async {
        while let Some(seen) = clients.join_next().await {
            statuses.extend(seen.expect("a client task"));
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all).await.expect("every client gets its answers");

    let count = |p: u8| statuses.iter().filter(|(sent_in, _)| *sent_in == p).count();
    eprintln!(
        "requests sent before the crash {}, while routing was down {}, after it came back {}",
        count(BEFORE),
        count(DOWN),
        count(AFTER)
    );
    assert!(count(BEFORE) > 0 && count(AFTER) > 0, "the load ran across the crash");
    // An injected fault may cost a request a 503 after a true rollback (the audit checks that);
    // nothing else but a 200.
    assert!(statuses.iter().all(|(_, s)| [200, 503].contains(s)), "{statuses:?}");
    assert!(
        statuses.iter().any(|(p, s)| *p == AFTER && *s == 200),
        "the restarted routing works: {statuses:?}"
    );

    every_saga_ends(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_clean(), "{:#?}", report.violations);
    let ok = statuses.iter().filter(|(_, s)| *s == 200).count();
    assert_eq!(report.complete, ok, "one complete space per 200");
    // Nothing of the crashed routing stayed behind: one consumer per service queue.
    for q in ["records", "placement", "entitlements", "routing", "notifier"].map(|s| format!("{s}.commands"))
    {
        wait_for(&format!("exactly one consumer on {q}"), Duration::from_secs(30), || async {
            (consumers(&probe, &q).await == Some(1)).then_some(())
        })
        .await;
    }

    // A clean stop after the faults, with the count of what was injected.
    let pid = up.id().expect("baton up is running").to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("baton up stops within 30 s")
        .unwrap();
    let log = log_of(&env);
    assert!(status.success(), "baton up stopped cleanly: {status}\n{log}");
    let summary = log.lines().find(|l| l.contains("faults injected by this run")).unwrap_or_else(|| {
        panic!("no summary of the faults injected:\n{log}");
    });
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
/// What a client notes when the gateway gave no answer (its connection refused or cut).
const NO_ANSWER: u16 = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_crashes_the_orchestrator_and_the_gateway_and_every_saga_still_ends() {
    let env = TestEnv::new().await;
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    // The orchestrator crashed 5 s after the start for 3 s, the gateway at 15 s for 2 s.
    let mut up = spawn_baton(
        &env,
        &[
            "up",
            "--mode",
            "workflow",
            "--http",
            &http,
            "--faults",
            "crash.orchestrator=5%+3s,crash.gateway=15%+2s",
            "--fault-window",
            "100s",
            "--mgmt-url",
            &mgmt_base(),
        ],
        &[],
        "up.log",
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_for("the gateway of baton up", Duration::from_secs(30), || {
        let (c, url) = (client.clone(), format!("http://{http}/health"));
        async move { c.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;

    // Four clients, one request after the other, each marked with the phase it was sent in. A
    // request the crashed gateway leaves without an answer is noted as such.
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    // Successes of requests sent before the orchestrator's crash and answered after its restart.
    let across = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, http) = (client.clone(), http.clone());
        let (phase, stop, next, answered, across) = (
            Arc::clone(&phase),
            Arc::clone(&stop),
            Arc::clone(&next),
            Arc::clone(&answered),
            Arc::clone(&across),
        );
        clients.spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let sent_in = phase.load(Ordering::SeqCst);
                let r = client
                    .post(format!("http://{http}/spaces"))
                    .json(&serde_json::json!({"name": format!("s-{i}"), "owner": format!("o-{i}")}))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let answered_in = phase.load(Ordering::SeqCst);
                        if sent_in == BEFORE && answered_in >= BETWEEN {
                            across.fetch_add(usize::from(r.status().is_success()), Ordering::SeqCst);
                        }
                        seen.push((sent_in, r.status().as_u16()));
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(_) => {
                        seen.push((sent_in, NO_ANSWER));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            seen
        });
    }

    // The orchestrator's crash: its consumers leave both its queues while it is down.
    let probe = env.broker().await;
    let (commands, replies) = ("orchestrator.commands", "orchestrator.main.replies");
    wait_for("the orchestrator's crash", Duration::from_secs(60), || async {
        logged(&env, "fault injected: component crashed", "orchestrator").then_some(())
    })
    .await;
    phase.store(ORCH_DOWN, Ordering::SeqCst);
    // A request sent while the orchestrator is down waits on its queue for the next one.
    let while_down = tokio::spawn({
        let (client, http) = (client.clone(), http.clone());
        async move {
            let body = serde_json::json!({"name": "while-down", "owner": "while-down"});
            client.post(format!("http://{http}/spaces")).json(&body).send().await.map(|r| r.status().as_u16())
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
    phase.store(BETWEEN, Ordering::SeqCst);
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
    phase.store(GATEWAY_DOWN, Ordering::SeqCst);
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
    phase.store(AFTER, Ordering::SeqCst);
    assert!(port_closed.load(Ordering::SeqCst), "the crashed gateway's port stayed open:\n{}", log_of(&env));
    assert!(
        gateway_gone.load(Ordering::SeqCst),
        "gateway.main.outcomes kept a consumer while the gateway was crashed:\n{}",
        log_of(&env)
    );

    // More load on the recovered system, then stop the clients.
    let after = answered.load(Ordering::SeqCst);
    wait_for("20 more answers after the gateway came back", Duration::from_secs(60), || async {
        (answered.load(Ordering::SeqCst) >= after + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut statuses = Vec::new();
    let all = async {
        while let Some(seen) = clients.join_next().await {
            statuses.extend(seen.expect("a client task"));
        }
    };
    tokio::time::timeout(Duration::from_secs(90), all).await.expect("every client gets its answers");

    let count = |p: u8| statuses.iter().filter(|(sent_in, _)| *sent_in == p).count();
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
    assert!(statuses.iter().all(|(_, s)| [200, 503, NO_ANSWER].contains(s)), "{statuses:?}");
    assert!(
        statuses.iter().all(|(p, s)| *s != NO_ANSWER || [BETWEEN, GATEWAY_DOWN].contains(p)),
        "no answer to a request sent away from the gateway's crash: {statuses:?}"
    );
    let while_down = while_down.await.expect("the request sent while the orchestrator was down");
    assert_eq!(
        while_down.ok(),
        Some(200),
        "a request sent while the orchestrator was down ends once it is back"
    );
    assert!(
        across.load(Ordering::SeqCst) > 0,
        "requests in flight when the orchestrator crashed got their outcome after its restart"
    );
    assert!(
        statuses.iter().any(|(p, s)| *p == AFTER && *s == 200),
        "the restarted gateway works: {statuses:?}"
    );

    every_saga_ends(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_clean(), "{:#?}", report.violations);
    let ok = statuses.iter().filter(|(_, s)| *s == 200).count() + 1;
    // Each 200 is a complete space; a request the crashed gateway left unanswered may be one too.
    assert!(report.complete >= ok, "one complete space per 200: {} < {ok}", report.complete);
    // Nothing of the crashed components stayed behind: one consumer per queue.
    let queues = ["records", "placement", "entitlements", "routing", "notifier", "orchestrator"]
        .map(|s| format!("{s}.commands"))
        .into_iter()
        .chain([replies.to_owned(), "gateway.main.outcomes".to_owned()]);
    for q in queues {
        wait_for(&format!("exactly one consumer on {q}"), Duration::from_secs(30), || async {
            (consumers(&probe, &q).await == Some(1)).then_some(())
        })
        .await;
    }

    let pid = up.id().expect("baton up is running").to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("baton up stops within 30 s")
        .unwrap();
    let log = log_of(&env);
    assert!(status.success(), "baton up stopped cleanly: {status}\n{log}");
    let summary = log.lines().find(|l| l.contains("faults injected by this run")).unwrap_or_else(|| {
        panic!("no summary of the faults injected:\n{log}");
    });
    assert!(summary.contains("crash orchestrator 1"), "{summary}");
    assert!(summary.contains("crash gateway 1"), "{summary}");
    probe.close().await;
}
