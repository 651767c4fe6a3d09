//! `baton up --faults` carries out the plan's crashes and connection drops itself: a crashed
//! service's tasks are aborted (its consumer leaves the queue, nothing of it stays behind), it
//! comes back after its pause, and under load across both faults every saga still ends and the
//! audit is clean.

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
