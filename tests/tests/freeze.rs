//! A part that stalls without dying is a failure too. Two orchestrators (real `baton run`
//! processes on one PostgreSQL database) share the load of 16 clients, and one of them stops
//! making progress for a minute while the other goes on:
//! - frozen whole with SIGSTOP: the broker notices within its heartbeats, gives the frozen
//!   instance's deliveries to the other one, PostgreSQL ends its open transaction (and frees
//!   its row locks), and the other takes its outbox rows over;
//! - its database thread stalled (a test hook) while its connection lives: the consumer's
//!   watchdog gives its deliveries back to the queue.
//!
//! From 15 s into the stall the throughput is at least half of what it was; no request sent
//! from then on gets a 504; once it is let go every saga ends and the audit finds nothing
//! inconsistent.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_tests::{TestEnv, every_saga_ends, free_port, pid_of, signal, spawn_baton, wait_for};
use rustix::process::Signal;
use tokio::process::Child;

const CLIENTS: usize = 16;
const STALL: Duration = Duration::from_secs(60);
/// How long the survivor has to take over before the throughput is counted.
const TAKE_OVER: Duration = Duration::from_secs(15);

/// One answer: when the request was sent, when it was answered, its status.
type Answer = (Instant, Instant, u16);

/// Services, two orchestrators (`o1`, the one to stall, with `o1_env`) and a gateway, as
/// processes of their own; and the clients' answers.
struct Rig {
    env: TestEnv,
    o1: Child,
    procs: Vec<Child>,
    stop: Arc<AtomicBool>,
    answers: Arc<std::sync::Mutex<Vec<Answer>>>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

fn run(env: &TestEnv, component: &str, instance: &str, extra: &[&str], envs: &[(&str, &str)]) -> Child {
    let args = [&["run", component, "--instance", instance][..], extra].concat();
    spawn_baton(env, &args, envs, &format!("{component}-{instance}.log"))
}

impl Rig {
    async fn start(env: TestEnv, o1_env: &[(&str, &str)]) -> Rig {
        let mut procs: Vec<Child> =
            baton_protocol::Service::ALL.iter().map(|s| run(&env, s.name(), "i1", &[], &[])).collect();
        let o1 = run(&env, "orchestrator", "o1", &[], o1_env);
        procs.push(run(&env, "orchestrator", "o2", &[], &[]));
        let http = format!("127.0.0.1:{}", free_port());
        procs.push(run(&env, "gateway", "g1", &["--http", &http], &[]));
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
        let clients = (0..CLIENTS)
            .map(|w| {
                let (client, gateway, stop, answers) =
                    (client.clone(), gateway.clone(), Arc::clone(&stop), Arc::clone(&answers));
                tokio::spawn(async move {
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let body =
                            serde_json::json!({"name": format!("f{w}-{i}"), "owner": format!("o{w}-{i}")});
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
        Rig { env, o1, procs, stop, answers, clients }
    }

    /// Run the load for 15 s, stall `o1` with `stall` for a minute, let it go with `resume`,
    /// and check what the module's header promises.
    async fn stall_o1(self, stall: impl FnOnce(&Child), resume: impl FnOnce(&Child)) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before_from = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let stalled_at = Instant::now();
        let before = self.count_between(before_from, stalled_at);
        stall(&self.o1);
        tokio::time::sleep(STALL).await;
        let resumed_at = Instant::now();
        resume(&self.o1);
        let during = self.count_between(stalled_at + TAKE_OVER, resumed_at);
        tokio::time::sleep(Duration::from_secs(5)).await;
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            tokio::time::timeout(Duration::from_secs(90), c).await.expect("the clients stop").unwrap();
        }

        let answers = self.answers.lock().unwrap().clone();
        let rate_before = before as f64 / 10.0;
        let rate_during = during as f64 / (resumed_at - stalled_at - TAKE_OVER).as_secs_f64();
        let late_504 = answers
            .iter()
            .filter(|(sent, _, status)| *status == 504 && *sent >= stalled_at + TAKE_OVER)
            .count();
        // The longest time without an answer from the stall on: how long the take-over took.
        let mut ends: Vec<Instant> =
            answers.iter().map(|a| a.1).filter(|at| *at >= stalled_at && *at < resumed_at).collect();
        ends.sort();
        let gap = std::iter::once(stalled_at)
            .chain(ends)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(STALL);
        let bad: Vec<u16> =
            answers.iter().map(|a| a.2).filter(|s| !matches!(s, 200 | 400..=499 | 503 | 504)).collect();
        println!(
            "sagas/s before the stall {rate_before:.1}, from 15 s into it {rate_during:.1} ({:.2}x); longest \
             time without an answer {gap:?}; {} answers, {} 504 in all, {late_504} sent 15 s or more into it",
            rate_during / rate_before,
            answers.len(),
            answers.iter().filter(|a| a.2 == 504).count(),
        );
        assert!(bad.is_empty(), "answers that are neither done nor refused: {bad:?}");
        assert!(rate_during >= rate_before / 2.0, "{rate_during:.1} sagas/s during, {rate_before:.1} before");
        assert_eq!(late_504, 0, "requests sent 15 s into the stall got a 504");
        every_saga_ends(&self.env, Duration::from_secs(90)).await;
        let report = self.env.audit();
        assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
        drop(self.o1);
        drop(self.procs);
    }

    fn count_between(&self, from: Instant, to: Instant) -> usize {
        self.answers.lock().unwrap().iter().filter(|(_, at, _)| *at >= from && *at < to).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_orchestrators_frozen_for_a_minute_stalls_nothing() {
    let rig = Rig::start(TestEnv::on_postgres().await, &[]).await;
    rig.stall_o1(
        |o1| signal(pid_of(o1), Signal::STOP).unwrap(),
        |o1| signal(pid_of(o1), Signal::CONT).unwrap(),
    )
    .await;
}

/// The database thread stuck while everything else of the process lives (its heartbeats go
/// on): only the watchdog of its consumers can give its deliveries to the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_whose_database_thread_stalls_hands_its_deliveries_over() {
    let env = TestEnv::on_postgres().await;
    let file = env.data_dir().join("o1.stall");
    let rig = Rig::start(env, &[("BATON_STALL_FILE", file.to_str().unwrap())]).await;
    rig.stall_o1(
        |_| std::fs::write(&file, b"stalled by the test").unwrap(),
        |_| std::fs::remove_file(&file).unwrap(),
    )
    .await;
}
