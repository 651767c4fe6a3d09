//! The tools around a running system: `create-space`, `load`, `audit` and `reconcile`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio_util::sync::CancellationToken;

use crate::args::DataDir;
use crate::shutdown;

pub(super) async fn create_space(
    gateway: &str,
    name: &str,
    owner: &str,
    key: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let url = format!("{}/spaces", gateway.trim_end_matches('/'));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
    let mut post = client.post(&url).json(&serde_json::json!({ "name": name, "owner": owner }));
    if let Some(key) = key {
        post = post.header("idempotency-key", key);
    }
    let resp = post.send().await.map_err(|e| {
        anyhow!("no gateway answered at {gateway} ({e}); start one with `baton up` or pass --gateway")
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the gateway's answer is not JSON")?;
    let printed = serde_json::json!({ "status": status.as_u16(), "body": body });
    println!("{}", serde_json::to_string_pretty(&printed)?);
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(super) async fn audit(data: &DataDir, json: bool) -> anyhow::Result<ExitCode> {
    let report = baton_audit::audit(&data.store()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for v in report.inconsistencies.iter().chain(&report.uncertain) {
            println!("{}: {v}", v.kind.class().as_str());
        }
    }
    let n = report.inconsistencies.len();
    eprintln!(
        "audited {} spaces in {}: {} complete, {} in flight, {n} inconsistenc{}, {} uncertain (told 504, all or nothing: the client does not know which)",
        report.spaces,
        data.store(),
        report.complete,
        report.in_flight,
        if n == 1 { "y" } else { "ies" },
        report.uncertain.len(),
    );
    // Only an inconsistency is something to repair; an uncertain space is not.
    Ok(if report.is_consistent() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

pub(super) async fn reconcile(
    data: DataDir,
    amqp_url: String,
    older_than: Duration,
    every: Option<Duration>,
    metrics: Option<std::net::SocketAddr>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let opts = baton_reconcile::Options {
        amqp_url: super::up::component_url("reconcile", &amqp_url)?.into(),
        store: data.store(),
        older_than,
        timeout: Duration::from_secs(60),
    };
    let cancel = CancellationToken::new();
    shutdown::on_signal(cancel.clone());
    // Stopped with the command, whichever way it returns.
    let _metrics = match metrics {
        Some(addr) => {
            let listener = baton_metrics::bind(addr).await.map_err(|e| anyhow!(e))?;
            baton_metrics::install("reconcile");
            let served = baton_metrics::serve(listener, baton_health::Health::default(), cancel.clone());
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(served)))
        }
        None => None,
    };
    let mut failed_in_a_row = 0u32;
    loop {
        // Ctrl-C during a run abandons it: the compensations it sent are idempotent, and the
        // next run finds whatever they did not undo.
        let run = tokio::select! {
            run = baton_reconcile::reconcile(&opts) => run,
            _ = cancel.cancelled() => {
                tracing::warn!("interrupted during a run; the next run picks up what it left");
                return Ok(if every.is_some() { ExitCode::SUCCESS } else { ExitCode::from(130) });
            }
        };
        let summary = match (run, every) {
            (Ok(summary), _) => summary,
            // One run: its failure is the command's.
            (Err(e), None) => return Err(e),
            // A cron job outlives a failed run (the broker briefly away, a database locked): say
            // why, and try again at the next tick.
            (Err(e), Some(every)) => {
                failed_in_a_row += 1;
                tracing::warn!(
                    error = %format!("{e:#}"),
                    failed_in_a_row,
                    retry_in = ?every,
                    "this reconcile run failed; trying again at the next tick"
                );
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
                }
            }
        };
        failed_in_a_row = 0;
        if json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            println!("{summary}");
        }
        let Some(every) = every else {
            return Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        };
        if summary.took_ms > every.as_millis() as u64 {
            tracing::warn!(took_ms = summary.took_ms, every = ?every, "this run took longer than the interval between runs");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub(super) async fn load(
    requests: usize,
    concurrency: usize,
    gateway: String,
    seed: u64,
    refusal_rate: f64,
    json: bool,
    retry_timeouts: Option<u32>,
) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&refusal_rate) {
        bail!("--refusal-rate {refusal_rate}: give a share between 0 and 1");
    }
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let spec = baton_load::Spec {
        gateway: gateway.clone(),
        requests,
        concurrency,
        seed,
        refusal_rate,
        timeout: Duration::from_secs(60),
        stop_after: None,
        retry_timeouts,
    };
    let probe = reqwest::Client::new().get(format!("{}/health", gateway.trim_end_matches('/'))).send().await;
    if probe.is_err() {
        bail!("no gateway answered at {gateway}; start one with `baton up` or pass --gateway");
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = std::sync::Arc::new(baton_load::Progress::new(requests, tty, std::time::Instant::now()));
    let shown = std::sync::Arc::clone(&progress);
    let on_done: std::sync::Arc<dyn Fn(usize) + Send + Sync> = std::sync::Arc::new(move |n| {
        if let Some(text) = shown.after(n, std::time::Instant::now()) {
            eprint!("{text}");
        }
    });
    let outcome = baton_load::run(&spec, std::sync::Arc::new(|_| {}), on_done).await;
    if let Some(end) = progress.finish() {
        eprint!("{end}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(ExitCode::SUCCESS);
    }
    let st = baton_load::Stats::of(&outcome);
    println!("requests      {}", st.requests);
    println!(
        "by status     {}",
        st.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "latency (ms)  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        st.p50_ms, st.p95_ms, st.p99_ms, st.max_ms
    );
    println!("throughput    {:.0} requests/s over {} ms", st.per_second, outcome.elapsed_ms);
    if retry_timeouts.is_some() {
        println!(
            "retries       {} of {} timed-out requests retried ({} retries), {} answered by a retry; retried ones took p50 {:.1} ms, max {:.1} ms",
            st.retried,
            st.first_timeouts,
            st.retries,
            st.fixed_by_retry,
            st.retried_p50_ms,
            st.retried_max_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
