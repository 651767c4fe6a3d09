//! A CI-sized `baton bench` against the real broker: it runs, and its figures are sane. No time
//! is asserted: the machine decides those.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_bench::{Latency, Options, Report, Throughput, run, table};
use baton_compare::mgmt::Mgmt;

/// The `baton` binary next to this test executable (`target/<profile>/baton`).
fn baton_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("baton");
    assert!(
        bin.exists(),
        "{} is missing: this test runs the components as `baton run` processes; build it first with \
         `cargo build -p baton-cli` (same profile and target dir as the test)",
        bin.display()
    );
    bin
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn sane_latency(what: &str, l: &Latency, n: usize) {
    assert_eq!(l.samples, n, "{what}: samples");
    assert_eq!(l.errors, 0, "{what}: every request succeeds");
    assert!(l.p50_ms > 0.0 && l.mean_ms > 0.0, "{what}: {l:?}");
    assert!(l.p99_ms >= l.p50_ms && l.max_ms >= l.p99_ms, "{what}: {l:?}");
}

fn sane_throughput(what: &str, t: &Throughput) {
    assert!(t.completed > 0 && t.per_second > 0.0 && t.seconds > 0.0, "{what}: {t:?}");
    assert_eq!(t.errors, 0, "{what}: every request succeeds: {t:?}");
    assert!(t.p50_ms > 0.0 && t.p99_ms >= t.p50_ms, "{what}: {t:?}");
    assert!(t.cpu_ms_per_op.is_finite() && t.cpu_ms_per_op >= 0.0, "{what}: {t:?}");
}

fn sane(r: &Report) {
    sane_latency("floor, one at a time", &r.floor.sequential, 20);
    sane_throughput("floor, loaded", &r.floor.loaded);
    assert!(r.floor.messages_per_second > 0.0);
    assert_eq!(r.modes.len(), 2);
    for m in &r.modes {
        let mode = m.mode.as_str();
        sane_latency(&format!("{mode}, HTTP"), &m.http_sequential, 20);
        assert_eq!(m.http_loaded.len(), 1);
        for t in &m.http_loaded {
            sane_throughput(&format!("{mode}, HTTP loaded"), t);
        }
        assert_eq!(m.direct_sequential.is_some(), mode == "workflow", "{mode}: orchestrator runs");
        if let Some(l) = &m.direct_sequential {
            sane_latency("orchestrator", l, 20);
        }
        if let Some(t) = &m.direct_loaded {
            sane_throughput("orchestrator, loaded", t);
        }
        // Every saga succeeded, so each one's messages are all there (12 / 6 when none is
        // still under way; a little more than nominal can only come from a redelivery).
        let nominal = if mode == "workflow" { 12.0 } else { 6.0 };
        assert!(
            m.messages_per_saga >= nominal - 1.0 && m.messages_per_saga <= nominal + 1.0,
            "{mode}: {} messages per saga",
            m.messages_per_saga
        );
        assert!(m.sagas > 0);
        let names: Vec<&str> = m.components.iter().map(|c| c.component.as_str()).collect();
        assert_eq!(names.len(), if mode == "workflow" { 7 } else { 6 }, "{mode}: {names:?}");
        for c in &m.components {
            assert!(c.cpu_ms > 0.0 && c.peak_rss_kb > 0, "{mode}: {c:?}");
        }
        let ratios = [m.ratios.http_latency]
            .into_iter()
            .chain(m.ratios.direct_latency)
            .chain(m.ratios.http_messages.iter().map(|r| r.of_floor))
            .chain(m.ratios.direct_messages.as_ref().map(|r| r.of_floor));
        for ratio in ratios {
            assert!(ratio.is_finite() && ratio > 0.0, "{mode}: ratios {:?}", m.ratios);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_bench_reports_sane_figures() {
    let bin = baton_bin();
    let out = tempfile::tempdir().expect("a temporary dir");
    let mgmt = Mgmt::new(&env("BATON_TEST_MGMT_URL", "http://127.0.0.1:15672"), "guest", "guest");
    let mut opts = Options::new(
        bin,
        env("BATON_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672"),
        mgmt,
        out.path().to_owned(),
    );
    opts.sequential = 20;
    opts.warmup = 5;
    opts.windows = vec![8];
    opts.in_flight = 8;
    opts.duration = Duration::from_secs(2);
    opts.floor_duration = Duration::from_secs(2);
    let report = run(&opts).await.expect("the bench runs");
    let text = table(&report);
    println!("{text}");
    sane(&report);
    assert!(text.contains("floor") && text.contains("workflow") && text.contains("events"));
    let json = serde_json::to_value(&report).expect("the report serialises");
    assert!(json["modes"][0]["ratios"]["http_latency"].is_number());
}
