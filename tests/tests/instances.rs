//! Baton across machines, on one: three orchestrators, two gateways and two of each service,
//! every one a `baton run` process of its own sharing one PostgreSQL database, under load. One
//! orchestrator is SIGKILLed mid-load and another restarted; the others go on with every saga
//! (replies come to one shared queue, and any instance can continue any saga from the store).
//! Every request gets a definite answer, no saga is left open, and the audit is clean. The
//! services run under a fault plan, whose table two instances create at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_tests::{TestEnv, every_saga_ends, free_port, signal, spawn_baton, wait_for};
use tokio::process::Child;

const REQUESTS: usize = 240;
const CONCURRENCY: usize = 12;

fn run(env: &TestEnv, component: &str, instance: &str, extra: &[&str]) -> Child {
    let args = [&["run", component, "--instance", instance][..], extra].concat();
    spawn_baton(env, &args, &[], &format!("{component}-{instance}.log"))
}

async fn ready(client: &reqwest::Client, gateway: &str) {
    wait_for(&format!("{gateway} to be ready"), Duration::from_secs(60), || async {
        let r = client.get(format!("{gateway}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_orchestrators_on_postgres_lose_nothing_when_one_is_killed_and_another_restarted() {
    let env = TestEnv::on_postgres().await;
    let mut procs: Vec<Child> = Vec::new();
    // Under a fault plan (delays only: every answer stays definite), so that both instances of
    // each service create the decorators' `faults` table at the same moment, as `baton compare
    // --instances 2` does.
    for s in baton_protocol::Service::ALL {
        for i in ["i1", "i2"] {
            procs.push(run(&env, s.name(), i, &["--faults", "delay=1ms"]));
        }
    }
    let mut orchestrators: Vec<Option<Child>> =
        ["o1", "o2", "o3"].iter().map(|i| Some(run(&env, "orchestrator", i, &[]))).collect();
    let gateways: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    for (i, http) in gateways.iter().enumerate() {
        procs.push(run(&env, "gateway", &format!("g{}", i + 1), &["--http", http]));
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let gateways: Vec<String> = gateways.iter().map(|h| format!("http://{h}")).collect();
    for g in &gateways {
        ready(&client, g).await;
    }

    // The load, spread over both gateways; each answer noted with when it came.
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u16, Duration)>::new()));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let (client, gateways, sent, answered, failures) = (
                client.clone(),
                gateways.clone(),
                Arc::clone(&sent),
                Arc::clone(&answered),
                Arc::clone(&failures),
            );
            tokio::spawn(async move {
                loop {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    if n >= REQUESTS {
                        return;
                    }
                    let gateway = &gateways[(n + w) % gateways.len()];
                    let t = Instant::now();
                    let body =
                        serde_json::json!({"name": format!("m{n}"), "owner": format!("owner-{}", n % 40)});
                    let status = match client.post(format!("{gateway}/spaces")).json(&body).send().await {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            if status >= 500 {
                                let body: serde_json::Value = r.json().await.unwrap_or_default();
                                failures.lock().unwrap().push(body);
                            }
                            status
                        }
                        Err(_) => 0,
                    };
                    answered.lock().unwrap().push((Instant::now(), status, t.elapsed()));
                }
            })
        })
        .collect();

    // A third of the way in, o1 dies at once (SIGKILL: no clean-up, its unacked deliveries
    // go back to the queues); at two thirds, o2 is stopped and started again.
    wait_for("a third of the load", Duration::from_secs(120), || async {
        (answered.lock().unwrap().len() >= REQUESTS / 3).then_some(())
    })
    .await;
    let killed_at = Instant::now();
    let mut o1 = orchestrators[0].take().unwrap();
    o1.start_kill().unwrap();
    o1.wait().await.unwrap();
    wait_for("two thirds of the load", Duration::from_secs(120), || async {
        (answered.lock().unwrap().len() >= 2 * REQUESTS / 3).then_some(())
    })
    .await;
    let mut o2 = orchestrators[1].take().unwrap();
    signal(o2.id().unwrap() as i32, rustix::process::Signal::TERM).unwrap();
    tokio::time::timeout(Duration::from_secs(30), o2.wait()).await.expect("o2 stops on SIGTERM").unwrap();
    orchestrators[1] = Some(run(&env, "orchestrator", "o2", &[]));
    for w in workers {
        tokio::time::timeout(Duration::from_secs(180), w).await.expect("the load ends").unwrap();
    }
    let elapsed = started.elapsed();

    // Every request had a definite answer: created, or refused by a rule (a quota, a name);
    // none timed out or failed.
    let answers = answered.lock().unwrap().clone();
    assert_eq!(answers.len(), REQUESTS);
    let bad: Vec<u16> =
        answers.iter().map(|a| a.1).filter(|s| !(*s == 200 || (400..500).contains(s))).collect();
    assert!(bad.is_empty(), "every request gets a definite answer: {bad:?} {:#?}", failures.lock().unwrap());
    // The failover, as clients saw it: the slowest answer to a request in flight at the kill.
    let stalled = answers
        .iter()
        .filter(|(at, _, took)| *at >= killed_at && at.duration_since(killed_at) <= *took)
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();
    let ok = answers.iter().filter(|a| a.1 == 200).count();
    println!(
        "{REQUESTS} requests in {:.1} s ({ok} created), one orchestrator killed, another restarted; \
         slowest answer to a request in flight at the kill: {} ms",
        elapsed.as_secs_f64(),
        stalled.as_millis()
    );
    every_saga_ends(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    assert_eq!(report.complete, ok, "every space told 200 is whole");
    // Nothing was dead-lettered: a reply reaching an instance whose group transaction began
    // before another instance committed the saga's start is looked for again, not refused.
    let mut shared = baton_amqp::topology::shared_queues();
    shared.push(baton_amqp::topology::orchestrator_reply_queue());
    for q in shared {
        let dlq = baton_amqp::topology::dead_letter_queue(&q.name);
        assert_eq!(env.queue_depth(&dlq).await, Some(0), "{dlq} holds dead letters");
    }
    // Every process but the killed one still runs: none stopped on a conflict with another
    // instance (at their start, the instances of a component write the same rows).
    let exited: Vec<String> = procs
        .iter_mut()
        .chain(orchestrators.iter_mut().flatten())
        .enumerate()
        .filter_map(|(i, p)| p.try_wait().unwrap().map(|status| format!("process {i}: {status}")))
        .collect();
    assert!(exited.is_empty(), "{exited:?}; their logs are in {}", env.data_dir().display());
    // The survivors handled sagas the killed one had begun: replies are not tied to an instance.
    for p in procs.iter_mut().chain(orchestrators.iter_mut().flatten()) {
        let _ = p.start_kill();
    }
}
