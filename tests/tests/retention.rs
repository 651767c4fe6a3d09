//! Retention: with a tiny `--retain`, 20,000 sagas leave the databases no bigger than a few
//! thousand do. Finished sagas and their history, inbox rows and tombstones are purged in the
//! background while the load runs, and nothing that was still needed is lost: every request
//! gets its answer (a fifth are refused by a rule and rolled back), nothing is dead-lettered,
//! and the audit is clean.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_tests::{System, SystemConfig, TestEnv, every_saga_ends, publishers, wait_for};

/// What the retention keeps bounded, and what the files weigh, at one point of the run.
#[derive(Debug, Clone, Copy, Default)]
struct Measure {
    sagas: i64,
    history: i64,
    inbox: i64,
    tombstones: i64,
    /// Every component's database file, in bytes (the WAL apart: its size is the checkpoints'
    /// lag, not what the database holds).
    bytes: u64,
    /// The orchestrator's alone.
    orchestrator_bytes: u64,
    /// Every WAL, in bytes.
    wal_bytes: u64,
}

fn measure(env: &TestEnv) -> Measure {
    let dir = env.data_dir();
    let store = env.store();
    let (kept, counts) = baton_tests::block_on(async move {
        let kept = baton_orchestrator::Sagas::at(&store).retained().await.expect("the orchestrator's store");
        (kept, baton_store::StoreCounts::total(&store).await.expect("the stores"))
    });
    let size = |file: String| std::fs::metadata(dir.join(file)).map_or(0, |m| m.len());
    let names = || baton_protocol::Component::ALL.iter().map(|c| c.name());
    let all = names().map(|c| size(format!("{c}.db"))).sum();
    let wal = names().map(|c| size(format!("{c}.db-wal"))).sum();
    Measure {
        sagas: kept.sagas,
        history: kept.history,
        inbox: counts.handled,
        tombstones: counts.tombstones,
        bytes: all,
        orchestrator_bytes: size("orchestrator.db".into()),
        wal_bytes: wal,
    }
}

/// How many sagas: `BATON_RETENTION_SAGAS`, 20,000 by default.
fn total() -> usize {
    std::env::var("BATON_RETENTION_SAGAS").ok().and_then(|n| n.parse().ok()).unwrap_or(20_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sagas_with_a_tiny_retention_leave_the_databases_bounded() {
    let env = TestEnv::new().await;
    let retain = Duration::from_secs(2);
    let cfg = SystemConfig { retain, deadline: Duration::from_secs(30), ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    let total = total();
    let rounds = 8;
    let started = Instant::now();
    // Each round's measure, and its rate (sagas/s).
    let mut measures = Vec::new();
    for round in 0..rounds {
        let spec = baton_load::Spec {
            gateway: format!("http://{}", sys.http),
            requests: total / rounds,
            concurrency: 64,
            seed: round as u64 + 1,
            // A fifth refused by a rule (reserved route, taken name, full plan): their
            // compensations leave tombstones for the purge too.
            refusal_rate: 0.2,
            timeout: Duration::from_secs(60),
            stop_after: None,
            retry_timeouts: None,
        };
        let out = baton_load::run(&spec, Arc::new(|_| {}), Arc::new(|_| {})).await;
        // Succeeded, or refused by the rule it was drawn to meet; never a timeout or a 5xx.
        let failed: Vec<_> =
            out.samples.iter().filter(|s| !matches!(s.status, 200 | 403 | 409)).take(5).collect();
        assert!(failed.is_empty(), "round {round}: every request gets its answer: {failed:?}");
        let m = measure(&env);
        let rate = (total / rounds) as f64 / (out.elapsed_ms.max(1) as f64 / 1000.0);
        eprintln!(
            "after {:>6} sagas ({:>5.1} s, {:>4.0}/s this round): sagas {:>6}, history {:>7}, inbox {:>6}, \
             tombstones {:>5}, orchestrator.db {:>6} KiB, all databases {:>6} KiB, WALs {:>6} KiB",
            (round + 1) * total / rounds,
            started.elapsed().as_secs_f64(),
            rate,
            m.sagas,
            m.history,
            m.inbox,
            m.tombstones,
            m.orchestrator_bytes / 1024,
            m.bytes / 1024,
            m.wal_bytes / 1024
        );
        measures.push((m, rate));
    }
    every_saga_ends(&env, Duration::from_secs(30)).await;
    // Once the load stops, the purge catches up with all of it.
    wait_for("the purge to empty the sagas, the inboxes and the tombstones", retain * 10, || async {
        let m = measure(&env);
        (m.sagas == 0 && m.history == 0 && m.inbox == 0 && m.tombstones == 0).then_some(())
    })
    .await;
    let end = measure(&env);
    eprintln!("after the load: {end:?}");

    // What the retention manages stays at what a few seconds of load hold (the retention, a
    // purge round apart, the sagas in flight), whatever the total: at most 10 s of each round's
    // rate, where nothing purged would hold every saga so far (about 12 inbox rows each).
    for (m, rate) in &measures[1..] {
        let ten_seconds = rate * 10.0;
        assert!((m.sagas as f64) < ten_seconds, "{m:?} at {rate:.0}/s");
        assert!((m.inbox as f64) < ten_seconds * 12.0, "{m:?} at {rate:.0}/s");
    }
    let (steady, last) = (measures[1].0, measures[rounds - 1].0);
    // The orchestrator's database, nearly all retention-managed, stops growing once the purge
    // runs (freed pages are reused); the services' keep their business rows (a space is not
    // purged), so the whole grows by those alone.
    assert!(
        last.orchestrator_bytes <= steady.orchestrator_bytes * 3 / 2,
        "orchestrator.db grew from {} to {} bytes",
        steady.orchestrator_bytes,
        last.orchestrator_bytes
    );
    // Nothing still needed was purged, and no message was too old for the bound.
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    let queues = publishers()
        .map(|c| format!("{c}.commands.dlq"))
        .chain(["orchestrator.replies.dlq".into(), "gateway.main.outcomes.dlq".into()]);
    for queue in queues {
        let depth = env.queue_depth(&queue).await.unwrap_or(0);
        assert_eq!(depth, 0, "{queue} holds {depth} dead letters");
    }
    sys.stop().await;
}
