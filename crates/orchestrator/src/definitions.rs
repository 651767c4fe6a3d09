//! The saga clock, and the check that every saga in flight runs the definition it started on.

use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use baton_store::params;
use baton_store::{Db, StoreError, now_ms};
use baton_workflow::{Saga, Workflow};

use crate::query::IN_FLIGHT;

/// The clock of every saga transition: the wall clock read once at start-up, advanced by the
/// monotonic clock. A wall clock set back or forward while the process runs moves no timer;
/// the times persisted from another process are brought back within bounds by
/// [`Saga::rearm`] at start-up.
#[derive(Debug, Clone, Copy)]
pub struct SagaClock {
    wall_at_start: u64,
    start: Instant,
}

impl SagaClock {
    pub fn start() -> SagaClock {
        SagaClock { wall_at_start: now_ms().max(0) as u64, start: Instant::now() }
    }

    /// Milliseconds, comparable with the wall clock of this process's start.
    pub fn now(&self) -> u64 {
        self.wall_at_start + self.start.elapsed().as_millis() as u64
    }
}

/// Sagas in flight whose workflow is no longer loaded as they were started on.
#[derive(Debug)]
pub struct Changed {
    pub workflow: String,
    pub in_flight: usize,
    /// A few of their ids.
    pub examples: Vec<String>,
    /// What differs.
    pub why: String,
}

/// The orchestrator refuses to start: definitions changed under sagas in flight.
#[derive(Debug, thiserror::Error)]
pub struct DefinitionsChanged(pub Vec<Changed>);

impl fmt::Display for DefinitionsChanged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            let more = if c.in_flight > c.examples.len() { ", ..." } else { "" };
            write!(
                f,
                "workflow `{}` changed under {} saga(s) in flight ({}{more}): {}",
                c.workflow,
                c.in_flight,
                c.examples.join(", "),
                c.why
            )?;
        }
        write!(
            f,
            ". Refusing to start, since they would run on a definition they were not started on. Start this \
             orchestrator with the definition they started on (the previous --workflow-file) until \
             `baton workflows list --state running` (and --state compensating, --state succeeded) shows \
             none of them, then restart it with the new one"
        )
    }
}

/// How many saga ids an error names.
const EXAMPLES: usize = 5;

/// Refuse (with [`DefinitionsChanged`]) when a saga in flight was started on a definition other
/// than the loaded one of its workflow, or on a workflow not loaded; otherwise record the loaded
/// definitions and return the id of each, to store with the sagas it starts.
pub async fn check_and_record(
    db: &Db,
    workflows: &HashMap<String, Workflow>,
) -> anyhow::Result<HashMap<String, i64>> {
    let loaded = workflows.clone();
    let verdict = db
        .transaction(move |tx| {
            // (workflow, definition body or none for sagas older than the table, saga ids)
            let mut groups: HashMap<(String, Option<String>), Vec<String>> = HashMap::new();
            let rows: Vec<(String, Option<String>, String)> = tx.query_map(
                &format!(
                    "SELECT s.workflow, d.body, s.saga_id FROM sagas s LEFT JOIN definitions d ON d.id = s.definition
                     WHERE s.{IN_FLIGHT} ORDER BY s.created_at"
                ),
                (),
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            for (wf, body, id) in rows {
                groups.entry((wf, body)).or_default().push(id);
            }
            let mut changed = Vec::new();
            for ((name, body), ids) in groups {
                let why = match (loaded.get(&name), body) {
                    (None, _) => Some(format!("no workflow `{name}` is loaded now")),
                    (Some(wf), Some(body)) => match Workflow::from_json(&body) {
                        Ok(old) if old == *wf => None,
                        Ok(old) => Some(difference(&old, wf)),
                        Err(e) => Some(format!("the stored definition is unreadable ({e})")),
                    },
                    // Started before definitions were recorded: each saga's own steps decide.
                    (Some(wf), None) => {
                        let mut misfit = None;
                        for id in &ids {
                            let state: String =
                                tx.query_row("SELECT state FROM sagas WHERE saga_id = ?1", [id], |r| r.get(0))?;
                            let saga: Saga = serde_json::from_str(&state).map_err(|e| StoreError::Corrupt {
                                table: "sagas",
                                cause: e.to_string(),
                            })?;
                            if !saga.fits(wf) {
                                misfit = Some(format!(
                                    "they have {} actions, the loaded definition {}",
                                    saga.actions.len(),
                                    wf.actions().count()
                                ));
                                break;
                            }
                        }
                        misfit
                    }
                };
                if let Some(why) = why {
                    changed.push(Changed {
                        workflow: name,
                        in_flight: ids.len(),
                        examples: ids.into_iter().take(EXAMPLES).collect(),
                        why,
                    });
                }
            }
            if !changed.is_empty() {
                changed.sort_by(|a, b| a.workflow.cmp(&b.workflow));
                return Ok(Err(DefinitionsChanged(changed)));
            }
            let mut ids = HashMap::new();
            for (name, wf) in &loaded {
                let body = serde_json::to_string(wf).expect("a workflow serialises");
                tx.execute(
                    "INSERT INTO definitions (workflow, body) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    params![name, body],
                )?;
                let id: i64 = tx.query_row(
                    "SELECT id FROM definitions WHERE workflow = ?1 AND body = ?2",
                    params![name, body],
                    |r| r.get(0),
                )?;
                ids.insert(name.clone(), id);
            }
            Ok(Ok(ids))
        })
        .await?;
    Ok(verdict?)
}

/// One phrase on how two definitions of a workflow differ.
fn difference(old: &Workflow, new: &Workflow) -> String {
    let names = |w: &Workflow| w.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ");
    let (a, b) = (names(old), names(new));
    if a == b {
        format!("its steps ({a}) are the same but their actions or policies differ")
    } else {
        format!("they were started on steps [{a}], the loaded definition has [{b}]")
    }
}
