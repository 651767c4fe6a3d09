//! Outages of a component's own store: a full disk under load is waited out (no step lost to
//! the dead-letter queues, every client answered), and the readiness says which store cannot
//! write; a database thread that stopped fails liveness and readiness.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_amqp::topology;
use baton_protocol::Service;
use baton_tests::{System, SystemConfig, TestEnv, held, wait_for};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A small tmpfs mounted over a test's data dir, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `size` (as `mount -o size=` reads it) on `dir`; `None`, having said why,
    /// where this process may not mount (not root, or in a container without the right).
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_owned())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs on {} ({}); run the test as root",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount ({e}); run the test as root on Linux");
                None
            }
        }
    }

    /// Write a file until the filesystem is full; its path, to remove it.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 256 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        let _ = f.flush();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let done = std::process::Command::new("umount").arg(&self.0).status();
        if !done.is_ok_and(|s| s.success()) {
            // Something still holds a file open there: detach it now, freed once let go.
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// `GET <path>` on the gateway: status and body; 0 when no answer came within 5 s (it must).
async fn get(sys: &System, path: &str) -> (u16, Value) {
    match tokio::time::timeout(Duration::from_secs(5), sys.get(path)).await {
        Ok(r) => r,
        Err(_) => (0, Value::Null),
    }
}

/// Requests from `workers` clients, one after another each, until `stop`: every answer.
fn load(sys: &Arc<System>, workers: usize, stop: &CancellationToken) -> JoinSet<Vec<(u16, Value)>> {
    let mut set = JoinSet::new();
    for w in 0..workers {
        let (sys, stop) = (Arc::clone(sys), stop.clone());
        set.spawn(async move {
            let mut answers = Vec::new();
            let mut i = 0;
            while !stop.is_cancelled() {
                let name = if i % 10 == 9 { "admin".to_owned() } else { format!("w{w}-{i}") };
                let (status, body) = sys.create(&name, &format!("owner-{w}-{}", i / 2)).await;
                answers.push((status, body));
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        });
    }
    set
}

/// Messages in every dead-letter queue of the test's vhost, by queue.
async fn dead_letters(env: &TestEnv) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for q in topology::all_queues("main") {
        let dlq = topology::dead_letter_queue(&q.name);
        if let Some(n) = env.queue_depth(&dlq).await
            && n > 0
        {
            found.push((dlq, n));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_load_is_answered_507_at_once_and_nothing_is_lost() {
    let env = TestEnv::new().await;
    let Some(tmpfs) = Tmpfs::mount(env.data_dir(), "48m") else { return };
    let cfg = SystemConfig { delay: Duration::from_millis(2), ..SystemConfig::default() };
    let sys = Arc::new(System::start(&env, cfg).await);
    let (status, ready) = get(&sys, "/health/ready").await;
    assert_eq!(status, 200, "ready before the outage: {ready}");
    let stop = CancellationToken::new();
    let mut clients = load(&sys, 6, &stop);
    wait_for("some spaces created before the disk fills", Duration::from_secs(30), || async {
        (held(&env.store(), Service::Records) >= 10).then_some(())
    })
    .await;

    let filler = tmpfs.fill();
    // New work is refused at once with a 507 (nothing started), while each store's reserve,
    // given back on the first full write, lets the work in flight finish. The probes before
    // the first 507 may still be taken (the disk is seen full at the next write): their
    // answers count with the clients'.
    let probes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refused =
        wait_for("a new request refused with 507 while the disk is full", Duration::from_secs(30), || {
            let (sys, probes) = (Arc::clone(&sys), Arc::clone(&probes));
            async move {
                let name = format!("probe-{}", probes.lock().unwrap().len());
                let (status, body) = sys.create(&name, &name).await;
                probes.lock().unwrap().push((status, body.clone()));
                (status == 507).then_some(body)
            }
        })
        .await;
    eprintln!("during the outage: {refused}");
    assert!(refused["error"].as_str().is_some_and(|e| e.contains("free some space")), "{refused}");
    // Liveness is about dead loops and threads, not a full disk: the process must not be
    // restarted for it.
    let (live, body) = get(&sys, "/health/live").await;
    assert_eq!(live, 200, "{body}");
    // The outage lasts a while under load, far beyond what five deliveries take.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let depth_during: Vec<_> = dead_letters(&env).await;
    std::fs::remove_file(&filler).unwrap();

    wait_for("/health/ready once the disk has room again", Duration::from_secs(60), || async {
        (get(&sys, "/health/ready").await.0 == 200).then_some(())
    })
    .await;
    // A little more load after the outage, then every client's answers.
    wait_for("new spaces created after the outage", Duration::from_secs(30), || async {
        let n = held(&env.store(), Service::Records);
        tokio::time::sleep(Duration::from_millis(500)).await;
        (held(&env.store(), Service::Records) > n).then_some(())
    })
    .await;
    stop.cancel();
    let mut answers = std::mem::take(&mut *probes.lock().unwrap());
    tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = clients.join_next().await {
            answers.extend(r.unwrap());
        }
    })
    .await
    .expect("every client is answered");
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (status, body) in &answers {
        *by_status.entry(*status).or_default() += 1;
        // A full disk is a 507 at once (nothing started), never a request left to time out.
        assert!([200, 403, 409, 503, 507].contains(status), "not a definite answer: {status} {body}");
    }
    eprintln!("answers: {by_status:?}");
    assert_eq!(depth_during, vec![], "dead-lettered during the outage");
    let created = by_status.get(&200).copied().unwrap_or(0);
    assert!(created > 0, "{by_status:?}");

    baton_tests::every_saga_ends(&env, Duration::from_secs(90)).await;
    baton_tests::every_outbox_drains(&env, Duration::from_secs(30)).await;
    assert_eq!(dead_letters(&env).await, vec![], "nothing is dead-lettered for a passing outage");
    let report = env.audit();
    // Nothing inconsistent; a 504 whose saga ended all or nothing is only uncertain.
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.iter().all(|v| v.told == Some(504)), "{:#?}", report.uncertain);
    let told_504 = by_status.get(&504).copied().unwrap_or(0);
    assert!(report.uncertain.len() <= told_504, "{:#?}", report.uncertain);
    // Every 200 has its complete space (the audit's own check), and nothing else was created
    // but what a 504 told.
    assert!(
        (created..=created + told_504).contains(&report.complete),
        "{} complete, {by_status:?}",
        report.complete
    );
    Arc::into_inner(sys).unwrap().stop().await;
    drop(tmpfs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orchestrators_database_removed_stops_its_thread_and_fails_liveness_and_readiness() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig { deadline: Duration::from_secs(3), ..SystemConfig::default() };
    let sys = Arc::new(System::start(&env, cfg).await);
    let (status, _) = sys.create("before", "alice").await;
    assert_eq!(status, 200);
    let (status, body) = get(&sys, "/health/live").await;
    assert_eq!(status, 200, "{body}");

    // An operator's mistake: the orchestrator's database removed while it runs. What it would
    // write from now on would go to a file nobody opens again.
    std::fs::remove_file(env.data_dir().join("orchestrator.db")).unwrap();
    let next = {
        let sys = Arc::clone(&sys);
        tokio::spawn(async move { sys.create("after", "alice").await })
    };
    let failing = wait_for(
        "/health/ready to say the orchestrator's database thread stopped",
        Duration::from_secs(20),
        || async {
            let (status, body) = get(&sys, "/health/ready").await;
            let error = body["error"].as_str().unwrap_or_default().to_owned();
            (status == 503 && error.contains("orchestrator: database thread alive")).then_some(error)
        },
    )
    .await;
    eprintln!("readiness: {failing}");
    let (status, body) = get(&sys, "/health/live").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("orchestrator: database thread alive"), "{body}");
    // The plain /health, which scripts wait on, is the readiness answer.
    assert_eq!(get(&sys, "/health").await.0, 503);
    // The client gets a definite answer at its deadline, and the start is held, not dead-lettered.
    let (status, body) = next.await.unwrap();
    assert_eq!(status, 504, "{body}");
    assert_eq!(dead_letters(&env).await, vec![]);
    Arc::into_inner(sys).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_run_serves_the_liveness_and_readiness_of_its_component_with_health() {
    let env = TestEnv::new().await;
    let addr = format!("127.0.0.1:{}", baton_tests::free_port());
    let _records = baton_tests::spawn_baton(&env, &["run", "records", "--health", &addr], &[], "records.log");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let get = |path: &'static str| {
        let (client, url) = (client.clone(), format!("http://{addr}{path}"));
        async move {
            let r = client.get(url).send().await.ok()?;
            Some((r.status().as_u16(), r.json::<Value>().await.ok()?))
        }
    };
    let ready = wait_for("records' /health/ready", Duration::from_secs(30), || async {
        get("/health/ready").await.filter(|(s, _)| *s == 200).map(|(_, body)| body)
    })
    .await;
    let checks: Vec<String> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}: {}", c["component"].as_str().unwrap(), c["check"].as_str().unwrap()))
        .collect();
    for want in [
        "records: broker connected",
        "records: store writable",
        "records: database thread alive",
        "records: consuming records.commands",
        "records: relay running",
    ] {
        assert!(checks.iter().any(|c| c == want), "{want} in {checks:?}");
    }
    assert_eq!(get("/health/live").await.map(|(s, _)| s), Some(200));
    assert_eq!(get("/health").await.map(|(s, _)| s), Some(200));
}
