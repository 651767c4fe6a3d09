//! `baton workflows`: the sagas of the orchestrator's store, read-only, and the retry of one.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};

use crate::args::{Broker, DataDir, WorkflowsCommand};

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
        WorkflowsCommand::Retry { .. } => unreachable!("retry is async, dispatched before"),
        WorkflowsCommand::Show { id, data, json } => {
            let Some(view) = sagas(&data).await?.describe(id).await? else {
                bail!("no workflow {id} in {}", data.store());
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("workflow {} ({}) for space {}: {}", view.id, view.workflow, view.space_id, view.status);
            if let Some(f) = &view.failure {
                println!("failed at {} ({}): {}", f.service, f.status, f.reason);
            }
            for s in &view.steps {
                println!(
                    "  step {} [{}]: {} after {} attempt(s), {} compensation attempt(s)",
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
                    "  +{:>6} ms  {:<12} {:<4} #{} {}{}",
                    h.at_ms - t0,
                    h.step.as_deref().unwrap_or("saga"),
                    h.action.as_deref().unwrap_or(""),
                    h.attempt,
                    h.event,
                    h.detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn retry(id: uuid::Uuid, data: DataDir, broker: Broker) -> anyhow::Result<ExitCode> {
    let sagas = sagas(&data).await?;
    let status = || async {
        let view = sagas.describe(id).await?;
        anyhow::Ok(view.ok_or_else(|| anyhow!("no workflow {id} in {}", data.store()))?.status)
    };
    let before = status().await?;
    if before != "compensation_failed" {
        bail!("workflow {id} is {before}, not compensation_failed: there is no rollback to finish");
    }
    baton_orchestrator::request_retry(&broker.amqp_url, id).await?;
    eprintln!("asked the orchestrators to finish the rollback of {id}; waiting (up to 60 s)");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = status().await?;
        // Once retried, the saga leaves compensation_failed for compensating, and then ends.
        if now == "rolled_back" {
            println!("{id}: rolled_back");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() > deadline {
            println!("{id}: {now}");
            eprintln!("the rollback did not finish within 60 s; `baton workflows show {id}` tells why");
            return Ok(ExitCode::from(1));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
