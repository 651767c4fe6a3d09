//! `baton workflows`: the sagas of the orchestrator's store, read-only, and the retry or the
//! cancel of one.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};

use baton_workflow::HistoryEvent;

use crate::args::{Broker, CliMode, DataDir, WorkflowsCommand};

/// The sagas of the orchestrator of `data`; an error that says where to point when it has none.
async fn sagas(data: &DataDir) -> anyhow::Result<baton_orchestrator::Sagas> {
    let sagas = baton_orchestrator::Sagas::at(&data.store());
    if !sagas.exists().await {
        bail!(
            "the orchestrator has no store at {}; point --data-dir (BATON_DATA_DIR) or --database-url \
             (BATON_DATABASE_URL) at the one the orchestrator uses",
            sagas.location()
        );
    }
    Ok(sagas)
}

/// A step's phase as `workflows show` prints it: a step still `pending` in a saga that goes no
/// further forward (it is undoing, or has ended without it) never ran, and will not.
fn shown_phase<'a>(saga_status: &str, phase: &'a str) -> &'a str {
    let goes_forward = matches!(saga_status, "running" | "succeeded");
    if phase == "pending" && !goes_forward { "not run" } else { phase }
}

pub(super) async fn workflows(cmd: WorkflowsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowsCommand::List { data, state, limit, json } => {
            // The flag's parser already took only a state's name.
            let state = state
                .as_deref()
                .map(baton_workflow::SagaStatus::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let rows = sagas(&data).await?.list(state, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<36}  {:<22}  {:<20}  {:>6}  {:<36}",
                    "WORKFLOW ID", "WORKFLOW", "STATUS", "ANSWER", "SPACE ID"
                );
                for r in &rows {
                    let answer = r.answer_status.map_or_else(|| "-".into(), |s| s.to_string());
                    println!(
                        "{:<36}  {:<22}  {:<20}  {:>6}  {}",
                        r.id, r.workflow, r.status, answer, r.space_id
                    );
                }
                eprintln!("{} saga{}", rows.len(), if rows.len() == 1 { "" } else { "s" });
            }
            Ok(ExitCode::SUCCESS)
        }
        WorkflowsCommand::Retry { .. } | WorkflowsCommand::Cancel { .. } => {
            unreachable!("retry and cancel are async, dispatched before")
        }
        WorkflowsCommand::Versions { data, json } => versions(&data, json).await,
        WorkflowsCommand::Show { id, data, json } => {
            let Some(view) = sagas(&data).await?.describe(id).await? else {
                bail!("no workflow {id} in {}", data.store());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(ExitCode::SUCCESS);
            }
            print_saga(&view, "");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A saga as `workflows show` prints it, each line after `indent`; its child sagas follow, each
/// indented under the line that says which step of it ran them.
fn print_saga(view: &baton_orchestrator::query::WorkflowView, indent: &str) {
    let head = match view.parent_step {
        Some(step) => format!("child saga of step {}: ", step + 1),
        None => String::new(),
    };
    println!(
        "{indent}{head}workflow {} ({}) for space {}: {}",
        view.id, view.workflow, view.space_id, view.status
    );
    // The version, as `baton workflows versions` shows it.
    let hash = view.definition_hash.as_deref().map_or("(none recorded)", |h| h.get(..12).unwrap_or(h));
    println!("{indent}definition {hash}");
    println!("{indent}trace {}", view.trace_id);
    if let Some(f) = &view.failure {
        println!("{indent}failed at {} ({}): {}", f.service, f.status, f.reason);
    }
    for s in &view.steps {
        println!(
            "{indent}  step {} [{}]: {} after {} attempt(s), {} compensation attempt(s)",
            s.group + 1,
            s.step,
            shown_phase(&view.status, &s.phase),
            s.attempts,
            s.compensation_attempts
        );
    }
    let t0 = view.created_at_ms;
    for h in &view.history {
        println!(
            "{indent}  +{:>6} ms  {:<12} {:<4} #{} {}{}",
            h.at_ms - t0,
            h.step.as_deref().unwrap_or("saga"),
            h.action.as_deref().unwrap_or(""),
            h.attempt,
            h.event,
            h.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
        );
    }
    let deeper = format!("{indent}    ");
    for child in &view.children {
        print_saga(child, &deeper);
    }
}

pub(super) async fn retry(id: uuid::Uuid, data: DataDir, broker: Broker) -> anyhow::Result<ExitCode> {
    // The status, and how many times the saga said its definition is missing.
    let sagas = sagas(&data).await?;
    let state = || async {
        let view = sagas.describe(id).await?;
        let view = view.ok_or_else(|| anyhow!("no workflow {id} in {}", data.store()))?;
        let missing = view.history.iter().filter(|h| h.event == "definition_missing").count();
        anyhow::Ok((view.status, missing))
    };
    let (before, missing_before) = state().await?;
    let waiting_for_definition = before == "definition_missing";
    if before != "compensation_failed" && !waiting_for_definition {
        bail!(
            "workflow {id} is {before}, neither compensation_failed nor definition_missing: there is nothing to retry"
        );
    }
    baton_orchestrator::request_retry(&broker.amqp_url, id).await?;
    let what = if waiting_for_definition { "go on with" } else { "finish the rollback of" };
    eprintln!("asked the orchestrators to {what} {id}; waiting (up to 60 s)");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (now, missing) = state().await?;
        if waiting_for_definition {
            if now != "definition_missing" {
                println!("{id}: {now} (resumed on its definition)");
                return Ok(ExitCode::SUCCESS);
            }
            if missing > missing_before {
                println!("{id}: definition_missing");
                eprintln!(
                    "its definition is still missing: start an orchestrator with the workflow file it started on \
                     (`baton workflows versions` lists the stored ones), then retry; `baton workflows show {id}` says which"
                );
                return Ok(ExitCode::from(1));
            }
        } else if now == "rolled_back" {
            // Once retried, the saga leaves compensation_failed for compensating, and then ends.
            println!("{id}: rolled_back");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() > deadline {
            println!("{id}: {now}");
            eprintln!("the retry did not finish within 60 s; `baton workflows show {id}` tells why");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `baton workflows cancel`: ask the orchestrator (through `orchestrator.commands`, whichever
/// instance is alive) to cancel a running saga, then wait for it to end `cancelled`. A saga a
/// cancel already stopped is waited for the same way, without asking again: a cancel is
/// idempotent.
pub(super) async fn cancel(
    id: uuid::Uuid,
    mode: CliMode,
    data: DataDir,
    broker: Broker,
) -> anyhow::Result<ExitCode> {
    if matches!(mode, CliMode::Events) {
        bail!(
            "the events mode has no saga to cancel: each service reacts to the previous one's event and nobody \
             undoes a flow once it started (`baton reconcile` cleans up afterwards); cancelling needs the workflow or hybrid mode"
        );
    }
    let sagas = sagas(&data).await?;
    let read = || async {
        let view = sagas.describe(id).await?;
        view.ok_or_else(|| anyhow!("no workflow {id} in {}", data.store()))
    };
    let before = read().await?;
    if let Some(why) = before.why_not_cancellable() {
        eprintln!("{why}");
        println!("{id}: {}", before.status);
        return Ok(ExitCode::from(1));
    }
    let refused = before.count(HistoryEvent::CancelRefused);
    if before.count(HistoryEvent::CancelRequested) == 0 {
        baton_orchestrator::request_cancel(&broker.amqp_url, id, "baton workflows cancel").await?;
        eprintln!("asked the orchestrator to cancel {id}; waiting (up to 60 s) while its steps are undone");
    } else if before.status != "cancelled" {
        eprintln!("{id} is already being cancelled; waiting (up to 60 s) while its steps are undone");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = read().await?;
        if now.count(HistoryEvent::CancelRefused) > refused {
            eprintln!("{}", now.last_detail(HistoryEvent::CancelRefused).unwrap_or("it cannot be cancelled"));
            println!("{id}: {}", now.status);
            return Ok(ExitCode::from(1));
        }
        if now.status == "cancelled" {
            println!("{id}: cancelled");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() > deadline {
            println!("{id}: {}", now.status);
            eprintln!("the cancel did not finish within 60 s; `baton workflows show {id}` tells why");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `baton workflows versions`: every stored definition and its sagas.
async fn versions(data: &DataDir, json: bool) -> anyhow::Result<ExitCode> {
    let rows = sagas(data).await?.versions().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<22}  {:<12}  {:<24}  {:>8}  {:>8}  {:>6}",
        "WORKFLOW", "HASH", "FIRST SEEN (UTC)", "RUNNING", "DONE", "STUCK"
    );
    for v in &rows {
        let hash = if v.hash.is_empty() { "(none)" } else { v.hash.get(..12).unwrap_or(&v.hash) };
        let seen = v
            .first_seen_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .map(|ms| {
                let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
                humantime::format_rfc3339_seconds(at).to_string()
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<22}  {:<12}  {:<24}  {:>8}  {:>8}  {:>6}",
            v.workflow, hash, seen, v.running, v.done, v.stuck
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::shown_phase;

    #[test]
    fn a_step_that_never_ran_is_shown_as_not_run_once_the_saga_goes_no_further() {
        assert_eq!(shown_phase("rolled_back", "pending"), "not run");
        assert_eq!(shown_phase("compensating", "pending"), "not run");
        assert_eq!(shown_phase("compensation_failed", "pending"), "not run");
        assert_eq!(shown_phase("completed", "pending"), "not run");
        // Still to come: the saga is on its way, or the email waits in the outbox.
        assert_eq!(shown_phase("running", "pending"), "pending");
        assert_eq!(shown_phase("succeeded", "pending"), "pending");
        assert_eq!(shown_phase("rolled_back", "compensated"), "compensated");
    }
}
