//! A part that stalls without dying is a failure too. One of two orchestrators (real `baton run`
//! processes on one PostgreSQL database) is frozen with SIGSTOP for 60 s under the load of 16
//! clients: the broker notices within its heartbeats, gives the frozen instance's deliveries to
//! the other one, and the other takes over its outbox rows. From 15 s into the freeze the
//! throughput is at least half of what it was; no request sent from then on gets a 504; once it
//! is let go (SIGCONT) every saga ends and the audit finds nothing inconsistent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_tests::{TestEnv, every_saga_ends, free_port, pid_of, signal, spawn_baton, wait_for};
use rustix::process::Signal;
use tokio::process::Child;

const CLIENTS: usize = 16;
const FREEZE: Duration = Duration::from_secs(60);

fn run(env: &TestEnv, component: &str, instance: &str, extra: &[&str]) -> Child {
    let args = [&["run", component, "--instance", instance][..], extra].concat();
    spawn_baton(env, &args, &[], &format!("{component}-{instance}.log"))
}

/// One answer: when the request was sent, when it was answered, its status.
type Answer = (Instant, Instant, u16);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_orchestrators_frozen_for_a_minute_stalls_nothing() {
    let env = TestEnv::on_postgres().await;
    let mut procs: Vec<Child> =
        baton_protocol::Service::ALL.iter().map(|s| run(&env, s.name(), "i1", &[])).collect();
    let o1 = run(&env, "orchestrator", "o1", &[]);
    procs.push(run(&env, "orchestrator", "o2", &[]));
    let http = format!("127.0.0.1:{}", free_port());
    procs.push(run(&env, "gateway", "g1", &["--http", &http]));
    let gateway = format!("http://{http}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    wait_for("the gateway to be ready", Duration::from_secs(60), || async {
        let r = client.get(format!("{gateway}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // Both orchestrators consume before the load starts.
    wait_for("two consumers on orchestrator.commands", Duration::from_secs(60), || async {
        (env.queue_consumers("orchestrator.commands").await? >= 2).then_some(())
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(std::sync::Mutex::new(Vec::<Answer>::new()));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let (client, gateway, stop, answers) =
                (client.clone(), gateway.clone(), Arc::clone(&stop), Arc::clone(&answers));
            tokio::spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let body = serde_json::json!({"name": format!("f{w}-{i}"), "owner": format!("o{w}-{i}")});
                    let sent = Instant::now();
                    let status = match client.post(format!("{gateway}/spaces")).json(&body).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    answers.lock().unwrap().push((sent, Instant::now(), status));
                }
            })
        })
        .collect();

    // Throughput before: answers in 10 s of steady load.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let frozen_at = Instant::now();
    let before = count_between(&answers, before_from, frozen_at);
    signal(pid_of(&o1), Signal::STOP).unwrap();
    tokio::time::sleep(FREEZE).await;
    let thawed_at = Instant::now();
    signal(pid_of(&o1), Signal::CONT).unwrap();
    let during = count_between(&answers, frozen_at + Duration::from_secs(15), thawed_at);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(90), w).await.expect("the clients stop").unwrap();
    }

    let answers = answers.lock().unwrap().clone();
    let rate_before = before as f64 / 10.0;
    let rate_during = during as f64 / (thawed_at - frozen_at - Duration::from_secs(15)).as_secs_f64();
    let late_504: Vec<&Answer> = answers
        .iter()
        .filter(|(sent, _, status)| *status == 504 && *sent >= frozen_at + Duration::from_secs(15))
        .collect();
    let bad: Vec<u16> =
        answers.iter().map(|a| a.2).filter(|s| !matches!(s, 200 | 400..=499 | 503 | 504)).collect();
    println!(
        "sagas/s before the freeze {rate_before:.1}, from 15 s into it {rate_during:.1} ({:.2}x); {} answers, \
         {} 504 in all, {} sent 15 s or more into the freeze",
        rate_during / rate_before,
        answers.len(),
        answers.iter().filter(|a| a.2 == 504).count(),
        late_504.len()
    );
    assert!(bad.is_empty(), "answers that are neither done nor refused: {bad:?}");
    assert!(rate_during >= rate_before / 2.0, "{rate_during:.1} sagas/s during, {rate_before:.1} before");
    assert!(late_504.is_empty(), "{} requests sent 15 s into the freeze got a 504", late_504.len());
    every_saga_ends(&env, Duration::from_secs(90)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    drop(o1);
    drop(procs);
}

fn count_between(answers: &std::sync::Mutex<Vec<Answer>>, from: Instant, to: Instant) -> usize {
    answers.lock().unwrap().iter().filter(|(_, at, _)| *at >= from && *at < to).count()
}
