//! The saga state machine: a saga's state, and one pure function per input.
//!
//! Inputs are [`Saga::start`], [`Saga::on_reply`], [`Saga::on_tick`] (the clock, as a number),
//! [`Saga::retry_compensation`] and [`Saga::cancel`] (an operator) and [`Saga::rearm`] (a
//! restart). Each returns the
//! [`Effect`]s the runtime must carry out, in order, in the same transaction that stores the new
//! state. Nothing here sleeps, reads a clock or touches a queue.
//!
//! Times are milliseconds on the runtime's saga clock, which never goes back within a process;
//! only [`Saga::rearm`] and [`Deadline::of`] deal with times from another clock.

use baton_protocol::{Action, ClientDeadline, Context, Outcome, Service, StepReply};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::definition::{ActionDef, Workflow};

/// Where a saga stands, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Compensable steps are still running.
    Running,
    /// A step failed; completed steps are being undone in reverse order.
    Compensating,
    /// Every compensable step succeeded and the client was told 200; the non-compensable
    /// steps (the email) are committed and on their way.
    Succeeded,
    /// Everything, the email included, is done.
    Completed,
    /// Every completed step was undone; the client was told why it failed.
    RolledBack,
    /// A compensation kept failing: an operator must look (`baton workflows retry`).
    CompensationFailed,
    /// An operator cancelled it while it ran: every completed step was undone, and the client
    /// was told 409 (the request was cancelled).
    Cancelled,
    /// The definition the saga started on cannot be found (or no longer fits it): it stopped
    /// where it stood, nothing sent, until an operator makes the definition available again and
    /// runs `baton workflows retry`.
    DefinitionMissing,
}

/// A name that is no saga state: bad input from a user, or a foreign write to the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a saga state; the states are {all}", all = SagaStatus::ALL.map(SagaStatus::as_str).join(", "))]
pub struct UnknownState(pub String);

impl SagaStatus {
    /// Every state, in the order a saga meets them.
    pub const ALL: [SagaStatus; 8] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Succeeded,
        SagaStatus::Completed,
        SagaStatus::RolledBack,
        SagaStatus::CompensationFailed,
        SagaStatus::Cancelled,
        SagaStatus::DefinitionMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Succeeded => "succeeded",
            SagaStatus::Completed => "completed",
            SagaStatus::RolledBack => "rolled_back",
            SagaStatus::CompensationFailed => "compensation_failed",
            SagaStatus::Cancelled => "cancelled",
            SagaStatus::DefinitionMissing => "definition_missing",
        }
    }

    /// The state named `name` as [`SagaStatus::as_str`] writes it; the error names them all.
    pub fn parse(name: &str) -> Result<SagaStatus, UnknownState> {
        SagaStatus::ALL.into_iter().find(|s| s.as_str() == name).ok_or_else(|| UnknownState(name.to_owned()))
    }

    /// Still in flight: started and not yet answered and ended (`succeeded` still has its
    /// email to send).
    pub fn is_in_flight(self) -> bool {
        matches!(self, SagaStatus::Running | SagaStatus::Compensating | SagaStatus::Succeeded)
    }

    /// Ended for good, as asked or rolled back: nobody, operator included, has more to do.
    pub fn is_settled(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::RolledBack | SagaStatus::Cancelled)
    }

    /// Stopped until an operator acts (`baton workflows retry`).
    pub fn needs_operator(self) -> bool {
        matches!(self, SagaStatus::CompensationFailed | SagaStatus::DefinitionMissing)
    }

    /// The states for which `pred` holds, as an SQL condition on `column`:
    /// `status IN ('running', 'compensating')`.
    pub fn sql_in(column: &str, pred: fn(SagaStatus) -> bool) -> String {
        let names: Vec<String> =
            SagaStatus::ALL.into_iter().filter(|s| pred(*s)).map(|s| format!("'{}'", s.as_str())).collect();
        format!("{column} IN ({})", names.join(", "))
    }

    /// A terminal saga never changes again (short of an operator's retry).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed
                | SagaStatus::RolledBack
                | SagaStatus::CompensationFailed
                | SagaStatus::Cancelled
                | SagaStatus::DefinitionMissing
        )
    }
}

/// Why a cancel of saga `id` in `status` (`cancelled`: a cancel already stopped it) is refused,
/// or `None` when it is answered with success: a `running` saga, which it stops, and one a
/// cancel already stopped (its steps being undone, or `cancelled`), since a cancel is
/// idempotent: two operators, or one retrying, each learn that the saga is cancelled. One
/// sentence, for the operator's 409 and the saga's timeline.
pub fn why_not_cancellable(id: Uuid, status: SagaStatus, cancelled: bool) -> Option<String> {
    let why = match status {
        SagaStatus::Running | SagaStatus::Cancelled => return None,
        SagaStatus::Compensating if cancelled => return None,
        SagaStatus::Compensating => {
            "it is already rolling back after a failure, and ends rolled_back by itself"
        }
        SagaStatus::Succeeded => {
            "it succeeded (the client was told 200) and its email, which cannot be undone, is on its way"
        }
        SagaStatus::Completed => "it completed: the space exists and its email was sent",
        SagaStatus::RolledBack => "it has already ended rolled_back: nothing of it is left to undo",
        SagaStatus::CompensationFailed => {
            "its rollback stopped in compensation_failed; finish it with `baton workflows retry`"
        }
        SagaStatus::DefinitionMissing => {
            "it stopped because its definition cannot be found; make it available and run `baton workflows retry`"
        }
    };
    Some(format!("saga {id} cannot be cancelled: {why}"))
}

/// Where one action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not sent yet (or never, if the saga failed before its step).
    Pending,
    /// Command sent; waiting for the reply until `due_ms`.
    Running,
    /// Timed out or failed technically; the next attempt goes out at `due_ms`.
    RetryWait,
    Done,
    /// A business rule refused it: nothing happened, nothing to undo.
    Refused,
    /// Must be undone once every later step is undone. Includes actions whose outcome is
    /// unknown (timed out): the compensation is idempotent, and the service's tombstone turns
    /// a late command into a no-op.
    ToCompensate,
    Compensating,
    CompensationRetryWait,
    Compensated,
    CompensationFailed,
}

/// The state of one action of the saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionState {
    pub step: usize,
    pub service: Service,
    pub phase: Phase,
    /// Attempts of the command made so far.
    pub attempt: u32,
    /// Attempts of the compensation made so far.
    pub undo_attempt: u32,
    /// When the current wait ends (timeout or retry), in ms since the epoch.
    pub due_ms: Option<u64>,
    /// When its last command or compensation was sent: the step's reply is timed from it.
    /// `None` in the state of a saga a build without it stored (that reply goes untimed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<u64>,
}

/// The client's deadline as the saga holds it: `at_ms` on the saga clock, and the budget it was
/// given, which bounds it again after a restart (a wall clock set back must not extend it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    pub at_ms: u64,
    pub budget_ms: u64,
}

impl Deadline {
    /// The deadline of a start received at `now` (saga clock) and `wall_now` (this host's wall
    /// clock, unix ms): the earlier of the budget counted from receipt and the client's instant
    /// held against the wall clock (which also counts the time the start waited in a queue).
    pub fn of(client: ClientDeadline, now: u64, wall_now: u64) -> Deadline {
        let budget = client.budget_ms.min(client.at_ms.saturating_sub(wall_now));
        Deadline { at_ms: now.saturating_add(budget), budget_ms: client.budget_ms }
    }
}

/// Why a saga failed: the step, the status the client gets, one sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub service: Service,
    pub status: u16,
    pub reason: String,
}

/// A service's reply, as the state machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub service: Service,
    /// The action's index in the saga, when the reply carries it (it always does from Baton's
    /// services); without it the reply is matched by service.
    pub index: Option<usize>,
    pub action: Action,
    pub attempt: u32,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub data: Context,
}

impl From<StepReply> for Reply {
    fn from(r: StepReply) -> Reply {
        Reply {
            service: r.step,
            index: r.index.map(|i| i as usize),
            action: r.action,
            attempt: r.attempt,
            outcome: r.outcome,
            status: r.status,
            reason: r.reason,
            data: r.data,
        }
    }
}

/// What happened, for the saga's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryEvent {
    Started,
    Sent,
    Done,
    Refused,
    Failed,
    TimedOut,
    RetryScheduled,
    LateReplyIgnored,
    Compensated,
    CompensationFailed,
    Succeeded,
    Completed,
    RolledBack,
    OperatorRetry,
    /// The client's deadline passed before the saga passed its last compensable step.
    DeadlinePassed,
    /// The loaded workflow no longer has this saga's steps: nothing is done.
    DefinitionChanged,
    /// An operator cancelled the saga: no step starts any more, the done ones are undone.
    CancelRequested,
    /// A cancel came for a saga that cannot be cancelled (it has ended, or is past its last
    /// compensable step); the detail says why, and nothing changed.
    CancelRefused,
    /// Every step of a cancelled saga is undone.
    Cancelled,
    /// The saga's own definition cannot be found: it stops until an operator's retry.
    DefinitionMissing,
    /// An operator's retry found the definition again: the saga goes on where it stopped.
    Resumed,
    /// An event step published its event (the detail names it); nobody is waited for.
    Emitted,
    /// A child saga's parent asked it to undo every step it did.
    UndoRequested,
}

impl HistoryEvent {
    /// Whether it records a service's reply to a command or a compensation: the event its
    /// step is timed to.
    pub fn is_reply(self) -> bool {
        matches!(
            self,
            HistoryEvent::Done | HistoryEvent::Refused | HistoryEvent::Failed | HistoryEvent::Compensated
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HistoryEvent::Started => "started",
            HistoryEvent::Sent => "sent",
            HistoryEvent::Done => "done",
            HistoryEvent::Refused => "refused",
            HistoryEvent::Failed => "failed",
            HistoryEvent::TimedOut => "timed_out",
            HistoryEvent::RetryScheduled => "retry_scheduled",
            HistoryEvent::LateReplyIgnored => "late_reply_ignored",
            HistoryEvent::Compensated => "compensated",
            HistoryEvent::CompensationFailed => "compensation_failed",
            HistoryEvent::Succeeded => "succeeded",
            HistoryEvent::Completed => "completed",
            HistoryEvent::RolledBack => "rolled_back",
            HistoryEvent::OperatorRetry => "operator_retry",
            HistoryEvent::DeadlinePassed => "deadline_passed",
            HistoryEvent::DefinitionChanged => "definition_changed",
            HistoryEvent::CancelRequested => "cancel_requested",
            HistoryEvent::CancelRefused => "cancel_refused",
            HistoryEvent::Cancelled => "cancelled",
            HistoryEvent::DefinitionMissing => "definition_missing",
            HistoryEvent::Resumed => "resumed",
            HistoryEvent::Emitted => "emitted",
            HistoryEvent::UndoRequested => "undo_requested",
        }
    }
}

/// A decision the runtime must carry out, in the transaction that stores the new state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Send a command (or its compensation) to a service.
    Send { index: usize, service: Service, action: Action, attempt: u32, context: Context },
    /// Start the child saga of action `index` (`Action::Do`; a later attempt asks how it ended),
    /// or ask it to undo every step it did, in reverse (`Action::Undo`). Its outcome comes back
    /// as this action's reply.
    Child { index: usize, workflow: String, action: Action, attempt: u32, context: Context },
    /// A child saga undid, on its parent's request, every step it had done: the parent's
    /// compensation of it is done.
    Undone,
    /// Publish `event` with the space's context (an event step): nobody answers it.
    Emit { event: String, context: Context },
    /// Answer the client: 200 with the context, or the failure's status after the rollback.
    Answer { status: u16, context: Context, failure: Option<Failure> },
    /// Append to the saga's timeline.
    History {
        service: Option<Service>,
        action: Option<Action>,
        attempt: u32,
        event: HistoryEvent,
        detail: Option<String>,
        /// For a service's reply ([`HistoryEvent::is_reply`]): when the command or compensation
        /// it answers was sent, which times the step.
        sent_ms: Option<u64>,
    },
}

/// One saga: a run of a workflow for one space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    pub id: Uuid,
    pub space_id: Uuid,
    pub workflow: String,
    pub status: SagaStatus,
    /// The step running forward.
    pub step: usize,
    pub actions: Vec<ActionState>,
    pub context: Context,
    pub failure: Option<Failure>,
    /// Whether the client's answer was already emitted (it is emitted once).
    pub answered: bool,
    /// Past it, no new compensable step starts: the saga rolls back and answers 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Deadline>,
    /// An operator cancelled it: its rollback ends `cancelled` rather than `rolled_back`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancelled: bool,
    /// While [`SagaStatus::DefinitionMissing`]: the status it stopped in, to go on from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<SagaStatus>,
    /// A child saga whose parent asked it to undo everything ([`Saga::undo_as_child`]): its
    /// rollback ends with [`Effect::Undone`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo_requested: bool,
}

/// Collects effects during one transition.
struct Out(Vec<Effect>);

impl Out {
    fn history(
        &mut self,
        a: Option<&ActionState>,
        action: Option<Action>,
        event: HistoryEvent,
        detail: Option<String>,
    ) {
        let attempt = match (a, action) {
            (Some(a), Some(Action::Undo)) => a.undo_attempt,
            (Some(a), _) => a.attempt,
            _ => 0,
        };
        let sent_ms = a.filter(|_| event.is_reply()).and_then(|a| a.sent_ms);
        self.0.push(Effect::History {
            service: a.map(|a| a.service),
            action,
            attempt,
            event,
            detail,
            sent_ms,
        });
    }
}

impl Saga {
    /// Start a saga: its first step's commands go out (unless `deadline` has passed already).
    pub fn start(
        wf: &Workflow,
        id: Uuid,
        space_id: Uuid,
        input: Context,
        deadline: Option<Deadline>,
        now: u64,
    ) -> (Saga, Vec<Effect>) {
        let actions = wf
            .actions()
            .map(|(step, a)| ActionState {
                step,
                service: a.service,
                phase: Phase::Pending,
                attempt: 0,
                undo_attempt: 0,
                due_ms: None,
                sent_ms: None,
            })
            .collect();
        let mut saga = Saga {
            id,
            space_id,
            workflow: wf.name.clone(),
            status: SagaStatus::Running,
            step: 0,
            actions,
            context: input,
            failure: None,
            answered: false,
            deadline,
            cancelled: false,
            parked: None,
            undo_requested: false,
        };
        let mut out = Out(Vec::new());
        out.history(None, None, HistoryEvent::Started, Some(format!("workflow {}", wf.name)));
        saga.enter_step(wf, 0, now, &mut out);
        (saga, out.0)
    }

    /// The earliest time at which [`Saga::on_tick`] has something to do.
    pub fn wake_at(&self) -> Option<u64> {
        if self.status == SagaStatus::DefinitionMissing {
            // Its waits are kept for the resume, but nothing fires without the definition.
            return None;
        }
        let deadline = self.deadline.filter(|_| self.status == SagaStatus::Running).map(|d| d.at_ms);
        self.actions.iter().filter_map(|a| a.due_ms).chain(deadline).min()
    }

    /// Whether `wf` still has this saga's actions, each at its index with its service and step.
    /// A saga stored under another definition is left alone rather than driven by the wrong one.
    pub fn fits(&self, wf: &Workflow) -> bool {
        self.actions.len() == wf.actions().count()
            && self
                .actions
                .iter()
                .zip(wf.actions())
                .all(|(a, (step, d))| a.step == step && a.service == d.service)
    }

    /// After a restart, the saga's times come from the clock of another process, which may have
    /// jumped either way since. Every wait is kept within its own bound from `now` (a timeout,
    /// or the retry delay due next): none waits longer than that, and one already past is
    /// counted again from `now` rather than fired with every other at once. The client's
    /// deadline is kept, but never further than its budget from `now`.
    pub fn rearm(&mut self, wf: &Workflow, now: u64) {
        if !self.fits(wf) {
            return;
        }
        for idx in 0..self.actions.len() {
            let Some(def) = wf.action(idx) else { return };
            let a = &mut self.actions[idx];
            let Some(due) = a.due_ms else { continue };
            let bound = match a.phase {
                Phase::Running | Phase::Compensating => def.timeout_ms,
                Phase::RetryWait => def.retry.delay_before(a.attempt + 1),
                Phase::CompensationRetryWait => def.compensation_retry.delay_before(a.undo_attempt + 1),
                _ => 0,
            };
            let latest = now.saturating_add(bound);
            a.due_ms = Some(if due < now { latest } else { due.min(latest) });
        }
        if let Some(d) = &mut self.deadline {
            d.at_ms = d.at_ms.min(now.saturating_add(d.budget_ms));
        }
    }

    /// The saga's definition cannot be found (`why`): stop where it stands, send nothing, keep
    /// its waits for the resume, and say so. Never answers the client: what would become of its
    /// space is not known (the client's own deadline answers it 504). Asked again while already
    /// stopped (an operator's retry that still finds nothing), it only says so again.
    pub fn definition_missing(&mut self, why: String) -> Vec<Effect> {
        if self.status != SagaStatus::DefinitionMissing {
            self.parked = Some(self.status);
            self.status = SagaStatus::DefinitionMissing;
        }
        vec![Effect::History {
            service: None,
            action: None,
            attempt: 0,
            event: HistoryEvent::DefinitionMissing,
            sent_ms: None,
            detail: Some(format!(
                "{why}; the saga waits: make its definition available (start an orchestrator with the \
                 workflow file it started on) and run `baton workflows retry {}`",
                self.id
            )),
        }]
    }

    /// `wf` does not have this saga's actions (a stored definition that does not match the
    /// saga, which a content hash should rule out): stop rather than be driven by it.
    fn misfit(&mut self, wf: &Workflow) -> Vec<Effect> {
        self.definition_missing(format!(
            "workflow `{}` as found has {} actions where this saga has {}",
            wf.name,
            wf.actions().count(),
            self.actions.len()
        ))
    }

    fn past_deadline(&self, now: u64) -> bool {
        self.deadline.is_some_and(|d| now >= d.at_ms)
    }

    /// The client's deadline passed while compensable steps remain: start nothing more, undo
    /// what was done, and answer 503 naming the step it stopped before. A definite answer:
    /// the gateway gives the saga a deadline a margin before its own, so that the client hears
    /// "nothing was done" rather than a 504 that leaves it guessing.
    fn deadline_passed(&mut self, wf: &Workflow, idx: usize, started: bool, now: u64, out: &mut Out) {
        let a = &self.actions[idx];
        let late = self.deadline.map_or(0, |d| now.saturating_sub(d.at_ms));
        let reason = if started {
            format!(
                "the saga's deadline passed ({late} ms ago) while {} was not done (attempt {}); every step was undone",
                a.service, a.attempt
            )
        } else {
            format!(
                "the saga's deadline passed ({late} ms ago) before {} started; every earlier step was undone",
                a.service
            )
        };
        out.history(Some(a), None, HistoryEvent::DeadlinePassed, Some(reason.clone()));
        let failure = Failure { service: a.service, status: 503, reason };
        self.begin_compensation(wf, failure, now, out);
    }

    /// Whether `reply` answers what this state has in flight: the command (or compensation) of
    /// its action, with the attempt last sent. A state that awaits a reply has not moved since
    /// that attempt went out, as far as its holder knows; a reply it does not await comes late,
    /// twice, or after someone else moved the saga on.
    pub fn awaits(&self, reply: &Reply) -> bool {
        if !self.status.is_in_flight() {
            return false;
        }
        let found = match reply.index {
            Some(i) => self.actions.get(i).filter(|a| a.service == reply.service),
            None => self.actions.iter().find(|a| a.service == reply.service),
        };
        found.is_some_and(|a| match reply.action {
            Action::Do => a.phase == Phase::Running && a.attempt == reply.attempt,
            Action::Undo => a.phase == Phase::Compensating && a.undo_attempt == reply.attempt,
        })
    }

    /// A service replied.
    pub fn on_reply(&mut self, wf: &Workflow, reply: Reply, now: u64) -> Vec<Effect> {
        if self.status == SagaStatus::DefinitionMissing {
            // Dropped, not acted on: after the resume, the step's timeout sends it again and
            // the service answers the same (its rules are idempotent per space).
            return vec![Effect::History {
                service: Some(reply.service),
                action: Some(reply.action),
                attempt: reply.attempt,
                event: HistoryEvent::LateReplyIgnored,
                sent_ms: None,
                detail: Some("the saga waits for its definition and an operator's retry".into()),
            }];
        }
        if !self.fits(wf) {
            return self.misfit(wf);
        }
        let mut out = Out(Vec::new());
        let found = match reply.index {
            Some(i) => self.actions.get(i).filter(|a| a.service == reply.service).map(|_| i),
            None => self.actions.iter().position(|a| a.service == reply.service),
        };
        let Some(idx) = found else {
            out.0.push(Effect::History {
                service: Some(reply.service),
                action: Some(reply.action),
                attempt: reply.attempt,
                event: HistoryEvent::LateReplyIgnored,
                sent_ms: None,
                detail: Some("this workflow has no such step".into()),
            });
            return out.0;
        };
        let phase = self.actions[idx].phase;
        let Some(def) = wf.action(idx).cloned() else { return out.0 };
        match (reply.action, phase) {
            (Action::Do, Phase::Running | Phase::RetryWait) => {
                self.on_do_reply(wf, idx, def.compensable, reply, now, &mut out);
            }
            (Action::Undo, Phase::Compensating | Phase::CompensationRetryWait) => {
                self.on_undo_reply(wf, idx, reply, now, &mut out);
            }
            (action, phase) => {
                out.0.push(Effect::History {
                    service: Some(reply.service),
                    action: Some(action),
                    attempt: reply.attempt,
                    event: HistoryEvent::LateReplyIgnored,
                    sent_ms: None,
                    detail: Some(
                        format!("{:?} reply while the step is {phase:?}", reply.outcome).to_lowercase(),
                    ),
                });
            }
        }
        out.0
    }

    /// The reply to a step's action `idx` while it runs or waits to retry: done (the next step
    /// when its whole group is), refused (compensate, when the step may refuse), or failed
    /// (retry, unless a later attempt superseded it).
    fn on_do_reply(
        &mut self,
        wf: &Workflow,
        idx: usize,
        compensable: bool,
        reply: Reply,
        now: u64,
        out: &mut Out,
    ) {
        match reply.outcome {
            Outcome::Done => {
                let a = &mut self.actions[idx];
                a.phase = Phase::Done;
                a.due_ms = None;
                self.context.merge(&reply.data);
                out.history(Some(&self.actions[idx]), Some(Action::Do), HistoryEvent::Done, None);
                let step = self.actions[idx].step;
                if self.actions.iter().filter(|a| a.step == step).all(|a| a.phase == Phase::Done) {
                    self.enter_step(wf, step + 1, now, out);
                }
            }
            Outcome::Refused if compensable => {
                let a = &mut self.actions[idx];
                a.phase = Phase::Refused;
                a.due_ms = None;
                let reason = reply.reason.unwrap_or_else(|| format!("{} refused", reply.service));
                out.history(
                    Some(&self.actions[idx]),
                    Some(Action::Do),
                    HistoryEvent::Refused,
                    Some(reason.clone()),
                );
                let failure = Failure { service: reply.service, status: reply.status.unwrap_or(409), reason };
                self.begin_compensation(wf, failure, now, out);
            }
            // A technical failure, or a refusal from a step that cannot refuse: retry.
            Outcome::Refused | Outcome::Failed => {
                if reply.attempt != self.actions[idx].attempt {
                    out.history(
                        Some(&self.actions[idx]),
                        Some(Action::Do),
                        HistoryEvent::LateReplyIgnored,
                        Some(format!("failure of attempt {} superseded", reply.attempt)),
                    );
                    return;
                }
                let reason = reply.reason.unwrap_or_else(|| format!("{} failed", reply.service));
                out.history(
                    Some(&self.actions[idx]),
                    Some(Action::Do),
                    HistoryEvent::Failed,
                    Some(reason.clone()),
                );
                self.retry_or_fail(wf, idx, reason, now, out);
            }
        }
    }

    /// The reply to the undo of action `idx` while it compensates or waits to retry: done (the
    /// rollback goes on), or failed (retry, or give up and wait for an operator).
    fn on_undo_reply(&mut self, wf: &Workflow, idx: usize, reply: Reply, now: u64, out: &mut Out) {
        match reply.outcome {
            Outcome::Done => {
                let a = &mut self.actions[idx];
                a.phase = Phase::Compensated;
                a.due_ms = None;
                out.history(Some(&self.actions[idx]), Some(Action::Undo), HistoryEvent::Compensated, None);
                self.advance_compensation(wf, now, out);
            }
            Outcome::Refused | Outcome::Failed => {
                if reply.attempt != self.actions[idx].undo_attempt {
                    out.history(
                        Some(&self.actions[idx]),
                        Some(Action::Undo),
                        HistoryEvent::LateReplyIgnored,
                        Some(format!("failure of attempt {} superseded", reply.attempt)),
                    );
                    return;
                }
                let reason = reply.reason.unwrap_or_else(|| format!("{} could not undo", reply.service));
                out.history(
                    Some(&self.actions[idx]),
                    Some(Action::Undo),
                    HistoryEvent::Failed,
                    Some(reason.clone()),
                );
                self.retry_undo_or_give_up(wf, idx, reason, now, out);
            }
        }
    }

    /// Time passed: fire every timeout and retry that is due at `now`.
    pub fn on_tick(&mut self, wf: &Workflow, now: u64) -> Vec<Effect> {
        if self.status == SagaStatus::DefinitionMissing {
            return Vec::new();
        }
        if !self.fits(wf) {
            return self.misfit(wf);
        }
        let mut out = Out(Vec::new());
        if self.status == SagaStatus::Running && self.past_deadline(now) {
            let current = (0..self.actions.len())
                .filter(|&i| self.actions[i].step == self.step)
                .find(|&i| self.actions[i].phase != Phase::Done);
            if let Some(idx) = current {
                self.deadline_passed(wf, idx, true, now, &mut out);
                return out.0;
            }
        }
        for idx in 0..self.actions.len() {
            let a = &self.actions[idx];
            if a.due_ms.is_none_or(|due| due > now) {
                continue;
            }
            let Some(timeout) = wf.action(idx).map(|d| d.timeout_ms) else { continue };
            match a.phase {
                Phase::Running => {
                    let reason = format!("{} did not answer within {timeout} ms", a.service);
                    out.history(Some(a), Some(Action::Do), HistoryEvent::TimedOut, Some(reason.clone()));
                    self.retry_or_fail(wf, idx, reason, now, &mut out);
                }
                Phase::RetryWait => {
                    let next = a.attempt + 1;
                    self.send_do(wf, idx, next, now, &mut out);
                }
                Phase::Compensating => {
                    let reason =
                        format!("{} did not confirm its compensation within {timeout} ms", a.service);
                    out.history(Some(a), Some(Action::Undo), HistoryEvent::TimedOut, Some(reason.clone()));
                    self.retry_undo_or_give_up(wf, idx, reason, now, &mut out);
                }
                Phase::CompensationRetryWait => {
                    let next = a.undo_attempt + 1;
                    self.send_undo(wf, idx, next, now, &mut out);
                }
                _ => self.actions[idx].due_ms = None,
            }
        }
        out.0
    }

    /// An operator asks to finish a rollback that stopped in `compensation_failed`, or to go on
    /// with a saga stopped in `definition_missing` now that `wf`, its definition, is found.
    pub fn retry_compensation(&mut self, wf: &Workflow, now: u64) -> Vec<Effect> {
        if !self.fits(wf) {
            return self.misfit(wf);
        }
        let mut out = Out(Vec::new());
        if self.status == SagaStatus::DefinitionMissing {
            self.status = self.parked.take().unwrap_or(SagaStatus::Running);
            self.rearm(wf, now);
            out.history(
                None,
                None,
                HistoryEvent::Resumed,
                Some(format!("definition found again; going on as {}", self.status.as_str())),
            );
            return out.0;
        }
        if self.status != SagaStatus::CompensationFailed {
            return out.0;
        }
        self.status = SagaStatus::Compensating;
        out.history(None, None, HistoryEvent::OperatorRetry, None);
        for a in &mut self.actions {
            if a.phase == Phase::CompensationFailed {
                a.phase = Phase::ToCompensate;
                a.undo_attempt = 0;
            }
        }
        self.advance_compensation(wf, now, &mut out);
        out.0
    }

    /// An operator cancels the saga (`reason` says who and how). A running saga starts no
    /// further step: every step done, and every one in flight (its late reply is ignored and
    /// its late command finds the tombstone), is undone in reverse order, and the saga ends
    /// `cancelled`, answering 409. A saga a cancel already stopped is left as it is, without a
    /// refusal: the cancel is done, or being done. Any other saga is left as it is, with a
    /// `cancel_refused` line that says why ([`Saga::why_not_cancellable`]).
    pub fn cancel(&mut self, wf: &Workflow, reason: &str, now: u64) -> Vec<Effect> {
        if !self.fits(wf) {
            return self.misfit(wf);
        }
        let mut out = Out(Vec::new());
        if let Some(why) = self.why_not_cancellable() {
            out.history(None, None, HistoryEvent::CancelRefused, Some(why));
            return out.0;
        }
        if self.cancelled {
            return out.0;
        }
        // The step it stops at: the first of the current group not done yet.
        let current = (0..self.actions.len())
            .filter(|&i| self.actions[i].step == self.step)
            .find(|&i| self.actions[i].phase != Phase::Done)
            .or_else(|| self.actions.iter().position(|a| a.step == self.step))
            .unwrap_or(0);
        let Some(service) = self.actions.get(current).map(|a| a.service) else { return out.0 };
        out.history(
            Some(&self.actions[current]),
            None,
            HistoryEvent::CancelRequested,
            Some(reason.to_owned()),
        );
        self.cancelled = true;
        let failure = Failure {
            service,
            status: 409,
            reason: format!(
                "the request was cancelled by an operator ({reason}) before {service} finished; every step it had done was undone"
            ),
        };
        self.begin_compensation(wf, failure, now, &mut out);
        out.0
    }

    /// This saga is a child, and its parent asks it to undo every step it did, in reverse (the
    /// parent rolls back, was cancelled, or gave up waiting). A running child stops as a cancel
    /// stops it; a finished one compensates its done steps; one already rolled back has nothing
    /// to undo. Its rollback ends with [`Effect::Undone`], never with an answer: its parent is
    /// who waits. Asked again (the parent's retry), it goes on with what it is doing.
    pub fn undo_as_child(&mut self, wf: &Workflow, now: u64) -> Vec<Effect> {
        if !self.fits(wf) {
            return self.misfit(wf);
        }
        let mut out = Out(Vec::new());
        let first = !self.undo_requested;
        self.undo_requested = true;
        if first && self.status != SagaStatus::Running {
            out.history(None, None, HistoryEvent::UndoRequested, Some("by its parent saga".into()));
        }
        match self.status {
            SagaStatus::Running => {
                self.answered = true;
                out.0.extend(self.cancel(wf, "its parent saga is rolling back", now));
            }
            SagaStatus::Succeeded | SagaStatus::Completed => {
                self.status = SagaStatus::Compensating;
                for (idx, a) in self.actions.iter_mut().enumerate() {
                    if a.phase == Phase::Done && wf.action(idx).is_some_and(|d| d.compensable) {
                        a.phase = Phase::ToCompensate;
                    }
                }
                self.advance_compensation(wf, now, &mut out);
            }
            SagaStatus::RolledBack | SagaStatus::Cancelled => out.0.push(Effect::Undone),
            SagaStatus::CompensationFailed => out.0.extend(self.retry_compensation(wf, now)),
            SagaStatus::Compensating | SagaStatus::DefinitionMissing => {}
        }
        out.0
    }

    /// How this child saga ended, as its parent's reply to action `index` (on `service`), or
    /// `None` while it has not (or its parent already asked it to undo everything): asked by
    /// a parent's later attempt, which must hear what the first one did.
    pub fn outcome_as_child(&self, service: Service, index: usize) -> Option<Reply> {
        if self.undo_requested {
            return None;
        }
        let status = match self.status {
            SagaStatus::Succeeded | SagaStatus::Completed => 200,
            SagaStatus::RolledBack | SagaStatus::Cancelled | SagaStatus::CompensationFailed => {
                self.failure.as_ref().map_or(500, |f| f.status)
            }
            SagaStatus::Running | SagaStatus::Compensating | SagaStatus::DefinitionMissing => return None,
        };
        let status = if self.status == SagaStatus::CompensationFailed { 500 } else { status };
        Some(answer_as_reply(service, index, status, self.context.clone(), self.failure.clone()))
    }

    /// A child saga's outcome for action `idx`: a reply of the attempt in progress (the child
    /// answers whichever attempt asked), under the action's own service, then as
    /// [`Saga::on_reply`].
    pub fn on_child_reply(&mut self, wf: &Workflow, mut reply: Reply, now: u64) -> Vec<Effect> {
        if let Some(a) = reply.index.and_then(|i| self.actions.get(i)) {
            reply.service = a.service;
            reply.attempt = match reply.action {
                Action::Do => a.attempt,
                Action::Undo => a.undo_attempt,
            };
        }
        self.on_reply(wf, reply, now)
    }

    /// Why a cancel of this saga is refused, or `None` when it succeeds (it is `running`, or a
    /// cancel already stopped it).
    pub fn why_not_cancellable(&self) -> Option<String> {
        why_not_cancellable(self.id, self.status, self.cancelled)
    }

    fn enter_step(&mut self, wf: &Workflow, step: usize, now: u64, out: &mut Out) {
        self.step = step;
        let Some(def) = wf.steps.get(step) else {
            if self.status == SagaStatus::Running {
                self.answer_success(out);
            }
            self.status = SagaStatus::Completed;
            out.history(None, None, HistoryEvent::Completed, None);
            return;
        };
        if let Some(event) = def.emits() {
            // Past the point of no return too, and nothing to wait for: answer, publish, go on.
            if self.status == SagaStatus::Running {
                self.answer_success(out);
                self.status = SagaStatus::Succeeded;
                out.history(None, None, HistoryEvent::Succeeded, None);
            }
            out.0.push(Effect::Emit { event: event.to_owned(), context: self.context.clone() });
            out.history(None, None, HistoryEvent::Emitted, Some(event.to_owned()));
            return self.enter_step(wf, step + 1, now, out);
        }
        let compensable = def.actions.iter().any(|a| a.compensable);
        if self.status == SagaStatus::Running
            && compensable
            && self.past_deadline(now)
            && let Some(idx) = (0..self.actions.len()).find(|&i| self.actions[i].step == step)
        {
            self.deadline_passed(wf, idx, false, now, out);
            return;
        }
        if self.status == SagaStatus::Running && !compensable {
            // Past the point of no return: what follows is committed with this answer.
            self.answer_success(out);
            self.status = SagaStatus::Succeeded;
            out.history(None, None, HistoryEvent::Succeeded, None);
        }
        let members: Vec<usize> = (0..self.actions.len()).filter(|&i| self.actions[i].step == step).collect();
        for idx in members {
            self.send_do(wf, idx, 1, now, out);
        }
    }

    fn answer_success(&mut self, out: &mut Out) {
        if !self.answered {
            self.answered = true;
            out.0.push(Effect::Answer { status: 200, context: self.context.clone(), failure: None });
        }
    }

    fn send_do(&mut self, wf: &Workflow, idx: usize, attempt: u32, now: u64, out: &mut Out) {
        let Some(def) = wf.action(idx) else { return };
        let a = &mut self.actions[idx];
        a.phase = Phase::Running;
        a.attempt = attempt;
        a.due_ms = Some(now + def.timeout_ms);
        a.sent_ms = Some(now);
        out.0.push(command(def, idx, a.service, Action::Do, attempt, &self.context));
        let detail = def.workflow.as_ref().map(|w| format!("child workflow {w}"));
        out.history(Some(&self.actions[idx]), Some(Action::Do), HistoryEvent::Sent, detail);
    }

    fn send_undo(&mut self, wf: &Workflow, idx: usize, attempt: u32, now: u64, out: &mut Out) {
        let Some(def) = wf.action(idx) else { return };
        let a = &mut self.actions[idx];
        a.phase = Phase::Compensating;
        a.undo_attempt = attempt;
        a.due_ms = Some(now + def.timeout_ms);
        a.sent_ms = Some(now);
        out.0.push(command(def, idx, a.service, Action::Undo, attempt, &self.context));
        let detail = def.workflow.as_ref().map(|w| format!("undo child workflow {w} as a whole"));
        out.history(Some(&self.actions[idx]), Some(Action::Undo), HistoryEvent::Sent, detail);
    }

    fn retry_or_fail(&mut self, wf: &Workflow, idx: usize, reason: String, now: u64, out: &mut Out) {
        let Some(def) = wf.action(idx) else { return };
        let a = &mut self.actions[idx];
        if def.retry.allows_after(a.attempt) {
            let delay = def.retry.delay_before(a.attempt + 1);
            a.phase = Phase::RetryWait;
            a.due_ms = Some(now + delay);
            out.history(
                Some(&self.actions[idx]),
                Some(Action::Do),
                HistoryEvent::RetryScheduled,
                Some(format!("in {delay} ms")),
            );
        } else {
            // The command may have taken effect after all: undo it with the others.
            a.phase = Phase::ToCompensate;
            a.due_ms = None;
            let failure = Failure {
                service: a.service,
                status: 503,
                reason: format!("{reason} (gave up after {} attempts)", a.attempt),
            };
            self.begin_compensation(wf, failure, now, out);
        }
    }

    fn retry_undo_or_give_up(&mut self, wf: &Workflow, idx: usize, reason: String, now: u64, out: &mut Out) {
        let Some(policy) = wf.action(idx).map(|d| d.compensation_retry) else { return };
        let a = &mut self.actions[idx];
        if policy.allows_after(a.undo_attempt) {
            let delay = policy.delay_before(a.undo_attempt + 1);
            a.phase = Phase::CompensationRetryWait;
            a.due_ms = Some(now + delay);
            out.history(
                Some(&self.actions[idx]),
                Some(Action::Undo),
                HistoryEvent::RetryScheduled,
                Some(format!("in {delay} ms")),
            );
        } else {
            a.phase = Phase::CompensationFailed;
            a.due_ms = None;
            self.status = SagaStatus::CompensationFailed;
            let detail = format!("{reason} (gave up after {} attempts)", self.actions[idx].undo_attempt);
            out.history(
                Some(&self.actions[idx]),
                Some(Action::Undo),
                HistoryEvent::CompensationFailed,
                Some(detail.clone()),
            );
            if !self.answered {
                self.answered = true;
                let cause = self.failure.clone();
                let step = cause.as_ref().map_or(self.actions[idx].service, |f| f.service);
                let why = cause.map_or_else(String::new, |f| format!("{}; ", f.reason));
                out.0.push(Effect::Answer {
                    status: 500,
                    context: self.context.clone(),
                    failure: Some(Failure {
                        service: step,
                        status: 500,
                        reason: format!(
                            "{why}the rollback could not finish: {detail}; an operator must run `baton workflows retry {}`",
                            self.id
                        ),
                    }),
                });
            }
        }
    }

    fn begin_compensation(&mut self, wf: &Workflow, failure: Failure, now: u64, out: &mut Out) {
        if self.status != SagaStatus::Running {
            // Already compensating (a second member of a parallel group failed): the caller
            // has set this action's phase; it is picked up with the rest.
            return;
        }
        self.status = SagaStatus::Compensating;
        self.failure = Some(failure);
        for a in &mut self.actions {
            if matches!(a.phase, Phase::Done | Phase::Running | Phase::RetryWait) {
                // In-flight members of the group are undone too: their late reply is ignored,
                // and a late command finds the tombstone.
                a.phase = Phase::ToCompensate;
                a.due_ms = None;
            }
        }
        self.advance_compensation(wf, now, out);
    }

    /// Undo the latest step that still has something to undo, all of its members at once.
    fn advance_compensation(&mut self, wf: &Workflow, now: u64, out: &mut Out) {
        if self.status != SagaStatus::Compensating {
            return;
        }
        let busy = self.actions.iter().any(|a| {
            matches!(a.phase, Phase::Compensating | Phase::CompensationRetryWait | Phase::CompensationFailed)
        });
        if busy {
            return;
        }
        let latest = self.actions.iter().filter(|a| a.phase == Phase::ToCompensate).map(|a| a.step).max();
        match latest {
            Some(step) => {
                let members: Vec<usize> = (0..self.actions.len())
                    .filter(|&i| self.actions[i].step == step && self.actions[i].phase == Phase::ToCompensate)
                    .collect();
                for idx in members {
                    self.send_undo(wf, idx, 1, now, out);
                }
            }
            None => {
                if self.cancelled {
                    self.status = SagaStatus::Cancelled;
                    out.history(None, None, HistoryEvent::Cancelled, None);
                } else {
                    self.status = SagaStatus::RolledBack;
                    out.history(None, None, HistoryEvent::RolledBack, None);
                }
                if self.undo_requested {
                    out.0.push(Effect::Undone);
                }
                if !self.answered {
                    self.answered = true;
                    let failure = self.failure.clone();
                    out.0.push(Effect::Answer {
                        status: failure.as_ref().map_or(500, |f| f.status),
                        context: self.context.clone(),
                        failure,
                    });
                }
            }
        }
    }
}

/// A child saga's answer (`status`, its context and failure) as its parent's reply to action
/// `index` on `service`: 200 is done, with the child's context; a rollback is a refusal with
/// the child's status and reason, nothing of the child being left; a rollback that stopped
/// (500) is a failure, which the parent retries, then undoes.
pub fn answer_as_reply(
    service: Service,
    index: usize,
    status: u16,
    context: Context,
    failure: Option<Failure>,
) -> Reply {
    let outcome = match status {
        200 => Outcome::Done,
        500 => Outcome::Failed,
        _ => Outcome::Refused,
    };
    Reply {
        service,
        index: Some(index),
        action: Action::Do,
        attempt: 0,
        outcome,
        status: (status != 200).then_some(status),
        reason: failure.map(|f| format!("child saga: {}", f.reason)),
        data: if status == 200 { context } else { Context::default() },
    }
}

/// The reply a child saga gives its parent once it undid everything it did.
pub fn undone_reply(service: Service, index: usize) -> Reply {
    Reply {
        service,
        index: Some(index),
        action: Action::Undo,
        attempt: 0,
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data: Context::default(),
    }
}

/// The effect that sends action `idx` (`def`) or its compensation: a service's command, or a
/// child saga's start or undo.
fn command(
    def: &ActionDef,
    idx: usize,
    service: Service,
    action: Action,
    attempt: u32,
    context: &Context,
) -> Effect {
    let context = context.clone();
    match &def.workflow {
        Some(workflow) => Effect::Child { index: idx, workflow: workflow.clone(), action, attempt, context },
        None => Effect::Send { index: idx, service, action, attempt, context },
    }
}

#[cfg(test)]
mod tests;
