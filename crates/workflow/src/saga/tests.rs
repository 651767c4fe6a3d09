//! Every transition of the saga state machine, driven without I/O.

use super::*;
use crate::definition::{ActionDef, RetryPolicy, WorkflowBuilder};
use Service::*;

const T0: u64 = 1_000_000;

fn input() -> Context {
    Context { name: "acme".into(), owner: "alice".into(), ..Default::default() }
}

fn start(wf: &Workflow) -> (Saga, Vec<Effect>) {
    Saga::start(wf, Uuid::from_u128(1), Uuid::from_u128(2), input(), None, T0)
}

fn sends(effects: &[Effect]) -> Vec<(Service, Action, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { service, action, attempt, .. } => Some((*service, *action, *attempt)),
            _ => None,
        })
        .collect()
}

fn answers(effects: &[Effect]) -> Vec<(u16, Option<Service>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer { status, failure, .. } => Some((*status, failure.as_ref().map(|f| f.service))),
            _ => None,
        })
        .collect()
}

fn events(effects: &[Effect]) -> Vec<HistoryEvent> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::History { event, .. } => Some(*event),
            _ => None,
        })
        .collect()
}

fn done(service: Service, action: Action) -> Reply {
    let data = match service {
        Records => Context { key: Some("acme".into()), ..Default::default() },
        Placement => Context { shard: Some("shard-1".into()), ..Default::default() },
        Entitlements => Context { licence: Some("lic-1".into()), ..Default::default() },
        Routing => Context { route: Some("acme -> shard-1".into()), ..Default::default() },
        Notifier | Search => Context::default(),
    };
    Reply {
        service,
        index: None,
        action,
        attempt: 1,
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data,
    }
}

fn refused(service: Service, status: u16) -> Reply {
    Reply {
        service,
        index: None,
        action: Action::Do,
        attempt: 1,
        outcome: Outcome::Refused,
        status: Some(status),
        reason: Some(format!("{service} says no")),
        data: Context::default(),
    }
}

fn failed(service: Service, action: Action, attempt: u32) -> Reply {
    Reply {
        service,
        index: None,
        action,
        attempt,
        outcome: Outcome::Failed,
        status: None,
        reason: Some("disk on fire".into()),
        data: Context::default(),
    }
}

fn phase(saga: &Saga, s: Service) -> Phase {
    saga.actions.iter().find(|a| a.service == s).unwrap().phase
}

/// Drive the sequential workflow to the point where `upto` has been sent.
fn run_until(wf: &Workflow, upto: Service) -> Saga {
    let (mut saga, _) = start(wf);
    for s in [Records, Placement, Entitlements, Routing] {
        if s == upto {
            break;
        }
        saga.on_reply(wf, done(s, Action::Do), T0 + 1);
    }
    saga
}

#[test]
fn start_sends_the_first_command_and_sets_its_timeout() {
    let wf = Workflow::create_space();
    let (saga, fx) = start(&wf);
    assert_eq!(sends(&fx), vec![(Records, Action::Do, 1)]);
    assert_eq!(events(&fx), vec![HistoryEvent::Started, HistoryEvent::Sent]);
    assert_eq!(saga.status, SagaStatus::Running);
    assert_eq!(saga.wake_at(), Some(T0 + 3_000));
    assert_eq!(phase(&saga, Placement), Phase::Pending);
}

/// When the command each reply event answers was sent, by event (what times the step).
fn sent_of(effects: &[Effect]) -> Vec<(HistoryEvent, Option<u64>)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::History { event, sent_ms, .. } => Some((*event, *sent_ms)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_reply_is_timed_from_its_last_command_and_a_compensation_from_its_own() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 5);
    assert_eq!(sent_of(&fx), vec![(HistoryEvent::Done, Some(T0)), (HistoryEvent::Sent, None)]);
    // Placement fails, is retried later, and its second attempt's reply counts from the retry.
    saga.on_reply(&wf, failed(Placement, Action::Do, 1), T0 + 9);
    let retry_at = saga.wake_at().expect("a retry is scheduled");
    saga.on_tick(&wf, retry_at);
    let mut second = done(Placement, Action::Do);
    second.attempt = 2;
    let fx = saga.on_reply(&wf, second, retry_at + 7);
    assert_eq!(sent_of(&fx)[0], (HistoryEvent::Done, Some(retry_at)));
    // Entitlements refuses: records and placement are undone, each timed from its own undo.
    let fx = saga.on_reply(&wf, refused(Entitlements, 402), retry_at + 20);
    assert_eq!(sent_of(&fx)[0], (HistoryEvent::Refused, Some(retry_at + 7)));
    let mut undone = done(Placement, Action::Undo);
    undone.data = Context::default();
    let fx = saga.on_reply(&wf, undone, retry_at + 30);
    assert_eq!(sent_of(&fx)[0], (HistoryEvent::Compensated, Some(retry_at + 20)));
}

#[test]
fn a_state_awaits_only_the_reply_to_its_last_attempt_in_flight() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    assert!(saga.awaits(&done(Records, Action::Do)));
    assert!(!saga.awaits(&done(Placement, Action::Do)), "not sent yet");
    assert!(!saga.awaits(&done(Records, Action::Undo)), "nothing to undo yet");
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    assert!(!saga.awaits(&done(Records, Action::Do)), "answered already: a duplicate");
    assert!(saga.awaits(&done(Placement, Action::Do)));
    // A failed attempt is retried by the timer: the first attempt's reply is late from then on.
    saga.on_reply(&wf, failed(Placement, Action::Do, 1), T0 + 2);
    assert!(!saga.awaits(&failed(Placement, Action::Do, 1)), "waiting to retry");
    saga.on_tick(&wf, saga.wake_at().expect("a retry is scheduled"));
    assert!(!saga.awaits(&failed(Placement, Action::Do, 1)));
    assert!(saga.awaits(&failed(Placement, Action::Do, 2)));
    // A refusal compensates: each undo is awaited with its own attempt.
    let mut second = done(Placement, Action::Do);
    second.attempt = 2;
    saga.on_reply(&wf, second, T0 + 5_000);
    saga.on_reply(&wf, refused(Entitlements, 402), T0 + 5_001);
    assert!(saga.awaits(&done(Placement, Action::Undo)));
    assert!(!saga.awaits(&done(Records, Action::Undo)), "undone after placement");
    assert!(!saga.awaits(&done(Entitlements, Action::Do)), "refused: over");
    // An index names the action itself, and must be its service's.
    let mut indexed = done(Placement, Action::Undo);
    indexed.index = Some(1);
    assert!(saga.awaits(&indexed));
    indexed.index = Some(0);
    assert!(!saga.awaits(&indexed));
}

#[test]
fn happy_path_answers_200_when_notify_is_committed_and_completes_on_its_reply() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    assert_eq!(sends(&fx), vec![(Placement, Action::Do, 1)]);
    let fx = saga.on_reply(&wf, done(Placement, Action::Do), T0 + 2);
    assert_eq!(sends(&fx), vec![(Entitlements, Action::Do, 1)]);
    let fx = saga.on_reply(&wf, done(Entitlements, Action::Do), T0 + 3);
    assert_eq!(sends(&fx), vec![(Routing, Action::Do, 1)]);
    assert!(answers(&fx).is_empty());
    let fx = saga.on_reply(&wf, done(Routing, Action::Do), T0 + 4);
    // The answer and the notify command leave in the same transition: one transaction.
    assert_eq!(answers(&fx), vec![(200, None)]);
    assert_eq!(sends(&fx), vec![(Notifier, Action::Do, 1)]);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    let Some(Effect::Answer { context, .. }) = fx.iter().find(|e| matches!(e, Effect::Answer { .. })) else {
        unreachable!()
    };
    assert_eq!(context.shard.as_deref(), Some("shard-1"));
    assert_eq!(context.licence.as_deref(), Some("lic-1"));
    let fx = saga.on_reply(&wf, done(Notifier, Action::Do), T0 + 5);
    assert_eq!(saga.status, SagaStatus::Completed);
    assert!(answers(&fx).is_empty(), "the client is answered once");
    assert_eq!(saga.wake_at(), None);
}

#[test]
fn refusal_compensates_completed_steps_in_reverse_order_then_answers() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Entitlements);
    let fx = saga.on_reply(&wf, refused(Entitlements, 403), T0 + 10);
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    assert!(answers(&fx).is_empty(), "no answer before the rollback finished");
    assert_eq!(phase(&saga, Entitlements), Phase::Refused);
    let fx = saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 11);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 12);
    assert_eq!(answers(&fx), vec![(403, Some(Entitlements))]);
    assert_eq!(saga.status, SagaStatus::RolledBack);
    assert_eq!(phase(&saga, Routing), Phase::Pending);
    assert_eq!(phase(&saga, Notifier), Phase::Pending, "no email for a failed space");
}

#[test]
fn refusal_at_the_first_step_rolls_back_with_nothing_to_undo() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, refused(Records, 409), T0 + 1);
    assert!(sends(&fx).is_empty());
    assert_eq!(answers(&fx), vec![(409, Some(Records))]);
    assert_eq!(saga.status, SagaStatus::RolledBack);
}

#[test]
fn parallel_group_starts_together_and_waits_for_all_members() {
    let wf = Workflow::create_space_parallel();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    assert_eq!(sends(&fx), vec![(Placement, Action::Do, 1), (Entitlements, Action::Do, 1)]);
    let fx = saga.on_reply(&wf, done(Entitlements, Action::Do), T0 + 2);
    assert!(sends(&fx).is_empty(), "routing waits for placement");
    let fx = saga.on_reply(&wf, done(Placement, Action::Do), T0 + 3);
    assert_eq!(sends(&fx), vec![(Routing, Action::Do, 1)]);
    assert_eq!(saga.context.licence.as_deref(), Some("lic-1"));
    assert_eq!(saga.context.shard.as_deref(), Some("shard-1"));
}

#[test]
fn failure_inside_a_parallel_group_compensates_the_member_still_running() {
    let wf = Workflow::create_space_parallel();
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    // Entitlements refuses while placement has not answered yet.
    let fx = saga.on_reply(&wf, refused(Entitlements, 403), T0 + 2);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    // Placement's late success changes nothing: it is being undone.
    let fx = saga.on_reply(&wf, done(Placement, Action::Do), T0 + 3);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    assert!(sends(&fx).is_empty());
    let fx = saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 4);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 5);
    assert_eq!(answers(&fx), vec![(403, Some(Entitlements))]);
}

#[test]
fn failure_after_a_parallel_group_undoes_all_its_members_at_once() {
    let wf = Workflow::create_space_parallel();
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    saga.on_reply(&wf, done(Placement, Action::Do), T0 + 2);
    saga.on_reply(&wf, done(Entitlements, Action::Do), T0 + 3);
    let fx = saga.on_reply(&wf, refused(Routing, 409), T0 + 4);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1), (Entitlements, Action::Undo, 1)]);
    let fx = saga.on_reply(&wf, done(Entitlements, Action::Undo), T0 + 5);
    assert!(sends(&fx).is_empty(), "records waits for the whole group");
    let fx = saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 6);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
}

#[test]
fn timeout_schedules_a_retry_with_backoff_and_resends() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_tick(&wf, T0 + 2_999);
    assert!(fx.is_empty(), "nothing is due before the timeout");
    let fx = saga.on_tick(&wf, T0 + 3_000);
    assert_eq!(events(&fx), vec![HistoryEvent::TimedOut, HistoryEvent::RetryScheduled]);
    assert_eq!(phase(&saga, Records), Phase::RetryWait);
    assert_eq!(saga.wake_at(), Some(T0 + 3_200));
    let fx = saga.on_tick(&wf, T0 + 3_200);
    assert_eq!(sends(&fx), vec![(Records, Action::Do, 2)]);
    // A success from the first attempt, arriving late, is still a success.
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 3_300);
    assert_eq!(sends(&fx), vec![(Placement, Action::Do, 1)]);
}

#[test]
fn timeout_after_all_retries_compensates_the_step_itself_and_ignores_its_late_reply() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Placement);
    let mut now = T0 + 1;
    let mut fx = Vec::new();
    for _ in 0..10 {
        now = saga.wake_at().unwrap();
        fx = saga.on_tick(&wf, now);
        if saga.status != SagaStatus::Running {
            break;
        }
    }
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert_eq!(saga.actions.iter().find(|a| a.service == Placement).unwrap().attempt, 3);
    // The timed-out step may have happened: it is undone first, then records.
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    let fx = saga.on_reply(&wf, done(Placement, Action::Do), now + 1);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    saga.on_reply(&wf, done(Placement, Action::Undo), now + 2);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), now + 3);
    assert_eq!(answers(&fx), vec![(503, Some(Placement))]);
    let Some(Effect::Answer { failure: Some(f), .. }) =
        fx.iter().find(|e| matches!(e, Effect::Answer { .. }))
    else {
        unreachable!()
    };
    assert!(f.reason.contains("did not answer"), "{}", f.reason);
}

#[test]
fn technical_failure_is_retried_and_a_stale_failure_is_ignored() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, failed(Records, Action::Do, 1), T0 + 1);
    assert_eq!(events(&fx), vec![HistoryEvent::Failed, HistoryEvent::RetryScheduled]);
    let fx = saga.on_tick(&wf, saga.wake_at().unwrap());
    assert_eq!(sends(&fx), vec![(Records, Action::Do, 2)]);
    let fx = saga.on_reply(&wf, failed(Records, Action::Do, 1), T0 + 400);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    assert_eq!(phase(&saga, Records), Phase::Running);
}

#[test]
fn failing_compensation_is_retried_then_ends_visible_and_an_operator_can_finish_it() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Entitlements);
    saga.on_reply(&wf, refused(Entitlements, 403), T0 + 10);
    let mut all = Vec::new();
    let attempts = baton_workflow_attempts();
    for attempt in 1..=attempts {
        let fx = saga.on_reply(&wf, failed(Placement, Action::Undo, attempt), T0 + 20);
        all.extend(fx.clone());
        if attempt < attempts {
            assert_eq!(phase(&saga, Placement), Phase::CompensationRetryWait);
            let fx = saga.on_tick(&wf, saga.wake_at().unwrap());
            assert_eq!(sends(&fx), vec![(Placement, Action::Undo, attempt + 1)]);
        }
    }
    assert_eq!(saga.status, SagaStatus::CompensationFailed);
    assert_eq!(phase(&saga, Records), Phase::ToCompensate, "records is not undone before placement");
    assert_eq!(answers(&all), vec![(500, Some(Entitlements))]);
    assert!(saga.status.is_terminal());
    assert_eq!(saga.wake_at(), None);

    let fx = saga.retry_compensation(&wf, T0 + 100);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 101);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 102);
    assert_eq!(saga.status, SagaStatus::RolledBack);
    assert!(answers(&fx).is_empty(), "the client was answered already");
}

#[test]
fn compensation_timeout_is_retried_like_a_failure() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Placement);
    saga.on_reply(&wf, refused(Placement, 503), T0 + 5);
    let due = saga.wake_at().unwrap();
    let fx = saga.on_tick(&wf, due);
    assert_eq!(events(&fx), vec![HistoryEvent::TimedOut, HistoryEvent::RetryScheduled]);
    let fx = saga.on_tick(&wf, saga.wake_at().unwrap());
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 2)]);
}

#[test]
fn duplicate_replies_change_nothing() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    let before = saga.clone();
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 2);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    assert!(sends(&fx).is_empty());
    assert_eq!(saga, before);
}

#[test]
fn a_reply_for_a_step_the_workflow_lacks_is_ignored() {
    let wf = WorkflowBuilder::new("short").step("rec", [Records]).build().unwrap();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, done(Routing, Action::Do), T0 + 1);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    // A workflow with no final step completes and answers on its last reply.
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 2);
    assert_eq!(answers(&fx), vec![(200, None)]);
    assert_eq!(saga.status, SagaStatus::Completed);
}

#[test]
fn the_non_compensable_step_retries_without_limit_and_never_rolls_back() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Notifier);
    saga.on_reply(&wf, done(Routing, Action::Do), T0 + 1);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    for _ in 0..50 {
        let now = saga.wake_at().unwrap();
        saga.on_tick(&wf, now);
    }
    let n = saga.actions.iter().find(|a| a.service == Notifier).unwrap();
    assert!(n.attempt >= 25, "still trying, attempt {}", n.attempt);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    // Even a refusal is retried: the email cannot be undone, so it must get through.
    let fx = saga.on_reply(&wf, Reply { attempt: n.attempt, ..refused(Notifier, 500) }, T0);
    assert!(events(&fx).contains(&HistoryEvent::RetryScheduled));
    let delays_capped = saga.wake_at().unwrap() - T0 <= 30_000;
    assert!(delays_capped);
}

#[test]
fn late_compensation_reply_after_rollback_is_ignored() {
    let wf = WorkflowBuilder::new("w")
        .step_with(
            "rec",
            vec![ActionDef {
                retry: RetryPolicy { attempts: 1, backoff_ms: 0, cap_ms: 0 },
                ..WorkflowBuilder::default_action(Records)
            }],
        )
        .step("place", [Placement])
        .build()
        .unwrap();
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    saga.on_reply(&wf, refused(Placement, 503), T0 + 2);
    saga.on_reply(&wf, done(Records, Action::Undo), T0 + 3);
    assert_eq!(saga.status, SagaStatus::RolledBack);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 4);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    assert_eq!(saga.status, SagaStatus::RolledBack);
}

#[test]
fn saga_state_round_trips_through_json() {
    let wf = Workflow::create_space_parallel();
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    let text = serde_json::to_string(&saga).unwrap();
    let back: Saga = serde_json::from_str(&text).unwrap();
    assert_eq!(back, saga);
}

fn baton_workflow_attempts() -> u32 {
    crate::definition::COMPENSATION_RETRY.attempts
}

#[test]
fn a_service_in_two_steps_is_told_apart_by_index_and_undone_twice_in_reverse_order() {
    let wf = WorkflowBuilder::new("twice")
        .step("create", [Records])
        .step("place", [Placement])
        .step("check", [Records])
        .step("check-place", [Placement])
        .build()
        .unwrap();
    let (mut saga, effects) = start(&wf);
    let first = |e: &[Effect]| match e.iter().find(|e| matches!(e, Effect::Send { .. })) {
        Some(Effect::Send { index, service, action, .. }) => (*index, *service, *action),
        _ => panic!("a command goes out: {e:?}"),
    };
    assert_eq!(first(&effects), (0, Records, Action::Do));
    let at = |idx: usize, mut r: Reply| {
        r.index = Some(idx);
        r
    };
    let e = saga.on_reply(&wf, at(0, done(Records, Action::Do)), T0 + 2);
    assert_eq!(first(&e), (1, Placement, Action::Do));
    let e = saga.on_reply(&wf, at(1, done(Placement, Action::Do)), T0 + 3);
    assert_eq!(first(&e), (2, Records, Action::Do));
    // A duplicate of the first records reply must not complete the check of step 3.
    let e = saga.on_reply(&wf, at(0, done(Records, Action::Do)), T0 + 4);
    assert_eq!(events(&e), vec![HistoryEvent::LateReplyIgnored]);
    assert_eq!(saga.actions[2].phase, Phase::Running);
    let e = saga.on_reply(&wf, at(2, done(Records, Action::Do)), T0 + 5);
    assert_eq!(first(&e), (3, Placement, Action::Do));
    // The second placement refuses: both checks, then both originals, undone latest first.
    let mut no = refused(Placement, 503);
    no.index = Some(3);
    let e = saga.on_reply(&wf, no, T0 + 6);
    assert_eq!(first(&e), (2, Records, Action::Undo));
    let e = saga.on_reply(&wf, at(2, done(Records, Action::Undo)), T0 + 7);
    assert_eq!(first(&e), (1, Placement, Action::Undo));
    let e = saga.on_reply(&wf, at(1, done(Placement, Action::Undo)), T0 + 8);
    assert_eq!(first(&e), (0, Records, Action::Undo));
    let e = saga.on_reply(&wf, at(0, done(Records, Action::Undo)), T0 + 9);
    assert_eq!(saga.status, SagaStatus::RolledBack);
    assert!(e.iter().any(|e| matches!(e, Effect::Answer { status: 503, .. })));
}

// The client's deadline.

/// A deadline `ms` after T0, as the runtime derives it from a start received at T0.
fn with_deadline(wf: &Workflow, ms: u64) -> (Saga, Vec<Effect>) {
    let d = Deadline { at_ms: T0 + ms, budget_ms: ms };
    Saga::start(wf, Uuid::from_u128(1), Uuid::from_u128(2), input(), Some(d), T0)
}

fn answer_reason(effects: &[Effect]) -> String {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer { failure: Some(f), .. } => Some(f.reason.clone()),
            _ => None,
        })
        .expect("an answer with a failure")
}

#[test]
fn the_deadline_is_the_earlier_of_the_budget_from_receipt_and_the_clients_instant() {
    let client = ClientDeadline { at_ms: 5_000_000, budget_ms: 10_000 };
    // Clocks agree and the start waited 4 s in a queue: 6 s are left.
    assert_eq!(Deadline::of(client, T0, 4_994_000), Deadline { at_ms: T0 + 6_000, budget_ms: 10_000 });
    // This host's wall clock is an hour behind: the budget bounds it.
    assert_eq!(Deadline::of(client, T0, 5_000_000 - 3_600_000).at_ms, T0 + 10_000);
    // Already past by the wall clock: due at once.
    assert_eq!(Deadline::of(client, T0, 5_010_000).at_ms, T0);
}

#[test]
fn a_running_saga_wakes_at_its_deadline_and_a_finished_one_does_not() {
    let wf = Workflow::create_space();
    let (saga, _) = with_deadline(&wf, 1_000);
    assert_eq!(saga.wake_at(), Some(T0 + 1_000), "before the records timeout at T0 + 3000");
    let mut saga = run_until(&wf, Notifier);
    saga.deadline = Some(Deadline { at_ms: T0 + 10, budget_ms: 10 });
    saga.on_reply(&wf, done(Routing, Action::Do), T0 + 1);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    let notify_timeout = wf.action(4).unwrap().timeout_ms;
    assert_eq!(saga.wake_at(), Some(T0 + 1 + notify_timeout), "only the notify timeout is left");
}

#[test]
fn a_deadline_passing_while_a_step_runs_undoes_every_step_and_answers_503_naming_it() {
    let wf = Workflow::create_space();
    let (mut saga, _) = with_deadline(&wf, 1_000);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    saga.on_reply(&wf, done(Placement, Action::Do), T0 + 2);
    assert!(saga.on_tick(&wf, T0 + 999).is_empty(), "nothing before the deadline");
    let fx = saga.on_tick(&wf, T0 + 1_000);
    assert_eq!(events(&fx)[0], HistoryEvent::DeadlinePassed);
    assert_eq!(saga.status, SagaStatus::Compensating);
    // Entitlements was running: its outcome is unknown, so it is undone first.
    assert_eq!(sends(&fx), vec![(Entitlements, Action::Undo, 1)]);
    saga.on_reply(&wf, done(Entitlements, Action::Undo), T0 + 1_001);
    saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 1_002);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 1_003);
    assert_eq!(answers(&fx), vec![(503, Some(Entitlements))]);
    let reason = answer_reason(&fx);
    assert!(reason.contains("deadline") && reason.contains("entitlements"), "{reason}");
    assert_eq!(saga.status, SagaStatus::RolledBack);
}

#[test]
fn no_step_starts_after_the_deadline_even_on_a_late_success() {
    let wf = Workflow::create_space();
    let (mut saga, _) = with_deadline(&wf, 1_000);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    // Placement's success arrives after the deadline, before the timer fired.
    let fx = saga.on_reply(&wf, done(Placement, Action::Do), T0 + 1_500);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)], "entitlements is never sent");
    saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 1_501);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 1_502);
    assert_eq!(answers(&fx), vec![(503, Some(Entitlements))]);
    assert!(answer_reason(&fx).contains("before entitlements started"), "{}", answer_reason(&fx));
    assert_eq!(phase(&saga, Entitlements), Phase::Pending);
}

#[test]
fn no_retry_is_sent_after_the_deadline() {
    let wf = Workflow::create_space();
    let (mut saga, _) = with_deadline(&wf, 3_100);
    saga.on_tick(&wf, T0 + 3_000);
    assert_eq!(phase(&saga, Records), Phase::RetryWait);
    // The retry was due at T0 + 3200; the deadline comes first.
    assert_eq!(saga.wake_at(), Some(T0 + 3_100));
    let fx = saga.on_tick(&wf, T0 + 3_100);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)], "the unanswered create is undone, not retried");
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 3_101);
    assert_eq!(answers(&fx), vec![(503, Some(Records))]);
}

#[test]
fn a_saga_past_its_last_compensable_step_completes_despite_its_deadline() {
    let wf = Workflow::create_space();
    let (mut saga, _) = with_deadline(&wf, 1_000);
    for s in [Records, Placement, Entitlements] {
        saga.on_reply(&wf, done(s, Action::Do), T0 + 1);
    }
    let fx = saga.on_reply(&wf, done(Routing, Action::Do), T0 + 5_000);
    assert_eq!(answers(&fx), vec![(200, None)]);
    assert_eq!(sends(&fx), vec![(Notifier, Action::Do, 1)]);
    saga.on_reply(&wf, done(Notifier, Action::Do), T0 + 5_001);
    assert_eq!(saga.status, SagaStatus::Completed);
}

#[test]
fn a_start_past_its_deadline_sends_nothing_and_answers_503_at_once() {
    let wf = Workflow::create_space();
    let (saga, fx) = with_deadline(&wf, 0);
    assert!(sends(&fx).is_empty());
    assert_eq!(answers(&fx), vec![(503, Some(Records))]);
    assert_eq!(saga.status, SagaStatus::RolledBack);
}

// Restarts and clock jumps.

/// A clock jump (T0 is only 1000 s after the epoch of these tests).
const JUMP: u64 = 900_000;

#[test]
fn rearm_after_a_restart_keeps_every_wait_within_its_bound_and_fires_none_at_once() {
    let wf = Workflow::create_space();
    let (mut saga, _) = with_deadline(&wf, 20_000);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    // Placement waits until T0 + 3001. The next process's clock is 15 minutes behind.
    let behind = T0 - JUMP;
    saga.rearm(&wf, behind);
    assert_eq!(saga.wake_at(), Some(behind + 3_000), "a clock set back does not stall the timeout");
    assert_eq!(saga.deadline.unwrap().at_ms, behind + 20_000, "nor extend the client's deadline");
    // The next process's clock is 15 minutes ahead: nothing is due at once, the wait starts over.
    let (mut saga, _) = start(&wf);
    saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    let ahead = T0 + JUMP;
    saga.rearm(&wf, ahead);
    assert!(saga.on_tick(&wf, ahead).iter().all(|e| !matches!(e, Effect::Send { .. })));
    assert_eq!(phase(&saga, Placement), Phase::Running);
    assert_eq!(saga.actions[1].due_ms, Some(ahead + 3_000));
}

#[test]
fn rearm_bounds_a_retry_wait_by_its_retry_delay() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    saga.on_tick(&wf, T0 + 3_000);
    assert_eq!(saga.wake_at(), Some(T0 + 3_200));
    saga.rearm(&wf, T0 - JUMP);
    assert_eq!(saga.wake_at(), Some(T0 - JUMP + 200));
}

#[test]
fn a_saga_given_a_workflow_without_its_steps_stops_as_definition_missing_and_nothing_panics() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Routing);
    let shorter = WorkflowBuilder::new("create-space").step("rec", [Records]).build().unwrap();
    assert!(!saga.fits(&shorter));
    let fx = saga.on_reply(&shorter, Reply { index: Some(3), ..done(Routing, Action::Do) }, T0 + 2);
    assert_eq!(events(&fx), vec![HistoryEvent::DefinitionMissing]);
    assert_eq!(saga.status, SagaStatus::DefinitionMissing);
    assert!(saga.status.is_terminal());
    assert!(answers(&fx).is_empty(), "the client is not told an outcome nobody knows");
    assert!(saga.on_tick(&shorter, T0 + 10_000).is_empty());
    assert_eq!(saga.wake_at(), None, "it does not wake again to do nothing");
    assert!(saga.retry_compensation(&shorter, T0).iter().all(|e| !matches!(e, Effect::Send { .. })));
    assert_eq!(saga.status, SagaStatus::DefinitionMissing);
}

#[test]
fn a_saga_stopped_for_its_definition_goes_on_where_it_stood_once_retried_with_it() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Routing);
    let fx = saga.definition_missing("no definition with hash abc".into());
    assert_eq!(events(&fx), vec![HistoryEvent::DefinitionMissing]);
    assert_eq!(saga.parked, Some(SagaStatus::Running));
    // A reply meanwhile is dropped, not acted on.
    let fx = saga.on_reply(&wf, Reply { index: Some(3), ..done(Routing, Action::Do) }, T0 + 2);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    assert_eq!(phase(&saga, Routing), Phase::Running);
    // Retried twice without it: it says so again and stays.
    let again = saga.definition_missing("still none".into());
    assert_eq!(events(&again), vec![HistoryEvent::DefinitionMissing]);
    assert_eq!(saga.parked, Some(SagaStatus::Running));
    // With it: running again, routing's wait counted from now, then its timeout resends it.
    let later = T0 + 60_000;
    let fx = saga.retry_compensation(&wf, later);
    assert_eq!(events(&fx), vec![HistoryEvent::Resumed]);
    assert_eq!(saga.status, SagaStatus::Running);
    assert_eq!(saga.parked, None);
    let due = saga.wake_at().expect("routing's wait is armed again");
    assert!(due > later && due <= later + 3_000, "{due}");
    let fx = saga.on_tick(&wf, due);
    assert_eq!(events(&fx), vec![HistoryEvent::TimedOut, HistoryEvent::RetryScheduled]);
    let fx = saga.on_tick(&wf, saga.wake_at().unwrap());
    assert_eq!(sends(&fx), vec![(Routing, Action::Do, 2)]);
    saga.on_reply(&wf, Reply { index: Some(3), attempt: 2, ..done(Routing, Action::Do) }, due + 1_000);
    assert_eq!(saga.status, SagaStatus::Succeeded);
}

#[test]
fn cancel_undoes_the_step_in_flight_and_the_done_ones_in_reverse_order_and_answers_409() {
    let wf = Workflow::create_space();
    // Records, placement and entitlements done; routing's command is out.
    let mut saga = run_until(&wf, Routing);
    let fx = saga.cancel(&wf, "POST /workflows/{id}/cancel", T0 + 10);
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert!(saga.cancelled);
    assert_eq!(events(&fx)[0], HistoryEvent::CancelRequested);
    // Routing may have routed by now: it is undone first, like a step that timed out.
    assert_eq!(sends(&fx), vec![(Routing, Action::Undo, 1)]);
    assert!(answers(&fx).is_empty(), "no answer before the rollback finished");
    // Its late reply changes nothing: it is being undone.
    let fx = saga.on_reply(&wf, done(Routing, Action::Do), T0 + 11);
    assert_eq!(events(&fx), vec![HistoryEvent::LateReplyIgnored]);
    let mut undone = Vec::new();
    let mut last = Vec::new();
    for s in [Routing, Entitlements, Placement, Records] {
        last = saga.on_reply(&wf, done(s, Action::Undo), T0 + 12);
        undone.extend(sends(&last));
    }
    assert_eq!(
        undone,
        vec![(Entitlements, Action::Undo, 1), (Placement, Action::Undo, 1), (Records, Action::Undo, 1)]
    );
    assert_eq!(saga.status, SagaStatus::Cancelled);
    assert!(saga.status.is_terminal());
    assert_eq!(answers(&last), vec![(409, Some(Routing))]);
    assert!(events(&last).contains(&HistoryEvent::Cancelled));
    let reason = &saga.failure.as_ref().unwrap().reason;
    assert!(reason.contains("cancelled") && reason.contains("POST"), "{reason}");
    assert_eq!(phase(&saga, Notifier), Phase::Pending, "no email for a cancelled space");
    assert_eq!(saga.wake_at(), None);
}

#[test]
fn cancel_at_the_first_step_undoes_the_command_in_flight() {
    let wf = Workflow::create_space();
    let (mut saga, _) = start(&wf);
    let fx = saga.cancel(&wf, "by test", T0 + 1);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
    let fx = saga.on_reply(&wf, done(Records, Action::Undo), T0 + 2);
    assert_eq!(answers(&fx), vec![(409, Some(Records))]);
    assert_eq!(saga.status, SagaStatus::Cancelled);
}

#[test]
fn a_saga_that_cannot_be_cancelled_is_left_as_it_is_and_says_why() {
    let wf = Workflow::create_space();
    // Past its last compensable step: the email is committed.
    let mut saga = run_until(&wf, Notifier);
    saga.on_reply(&wf, done(Routing, Action::Do), T0 + 2);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    let before = saga.clone();
    let fx = saga.cancel(&wf, "by test", T0 + 3);
    assert_eq!(events(&fx), vec![HistoryEvent::CancelRefused]);
    assert!(sends(&fx).is_empty() && answers(&fx).is_empty());
    assert_eq!(saga, before);
    assert!(saga.why_not_cancellable().unwrap().contains("succeeded"));
    // Rolled back after a refusal, then asked again.
    let mut saga = run_until(&wf, Placement);
    saga.on_reply(&wf, refused(Placement, 503), T0 + 2);
    assert_eq!(saga.status, SagaStatus::Compensating);
    assert!(saga.why_not_cancellable().unwrap().contains("rolling back"));
    saga.on_reply(&wf, done(Records, Action::Undo), T0 + 3);
    assert_eq!(saga.status, SagaStatus::RolledBack);
    let fx = saga.cancel(&wf, "by test", T0 + 4);
    assert_eq!(events(&fx), vec![HistoryEvent::CancelRefused]);
    assert!(saga.why_not_cancellable().unwrap().contains("rolled_back"));
}

#[test]
fn a_second_cancel_while_the_first_is_undoing_changes_nothing_and_is_not_refused() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Entitlements);
    saga.cancel(&wf, "first", T0 + 2);
    assert_eq!(saga.status, SagaStatus::Compensating);
    let before = saga.clone();
    let fx = saga.cancel(&wf, "second", T0 + 3);
    assert!(fx.is_empty(), "no refusal, no second rollback: {fx:?}");
    assert_eq!(saga, before);
    assert_eq!(saga.why_not_cancellable(), None, "both callers are told it is being cancelled");
}

#[test]
fn a_cancel_of_a_cancelled_saga_changes_nothing_and_is_not_refused() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Placement);
    saga.cancel(&wf, "first", T0 + 2);
    saga.on_reply(&wf, done(Placement, Action::Undo), T0 + 3);
    saga.on_reply(&wf, done(Records, Action::Undo), T0 + 4);
    assert_eq!(saga.status, SagaStatus::Cancelled);
    let before = saga.clone();
    let fx = saga.cancel(&wf, "again", T0 + 5);
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(saga, before);
    assert_eq!(saga.why_not_cancellable(), None);
}

#[test]
fn only_a_saga_that_ended_otherwise_or_rolls_back_on_its_own_refuses_a_cancel() {
    use SagaStatus::*;
    let id = Uuid::nil();
    let refused = |status, cancelled| why_not_cancellable(id, status, cancelled).is_some();
    assert!(!refused(Running, false));
    assert!(!refused(Compensating, true));
    assert!(!refused(Cancelled, true));
    for status in [Compensating, Succeeded, Completed, RolledBack, CompensationFailed, DefinitionMissing] {
        assert!(refused(status, false), "{status:?}");
    }
}

#[test]
fn a_cancelled_saga_whose_rollback_failed_ends_cancelled_after_the_operators_retry() {
    let wf = Workflow::create_space();
    let mut saga = run_until(&wf, Placement);
    saga.cancel(&wf, "by test", T0 + 2);
    // Placement's undo is sent first (it was in flight); it keeps failing.
    let mut now = T0 + 3;
    for attempt in 1..=crate::definition::COMPENSATION_RETRY.attempts {
        saga.on_reply(&wf, failed(Placement, Action::Undo, attempt), now);
        now += 60_000;
        saga.on_tick(&wf, now);
    }
    assert_eq!(saga.status, SagaStatus::CompensationFailed);
    saga.retry_compensation(&wf, now);
    saga.on_reply(&wf, done(Placement, Action::Undo), now + 1);
    saga.on_reply(&wf, done(Records, Action::Undo), now + 2);
    assert_eq!(saga.status, SagaStatus::Cancelled);
}

#[test]
fn saga_states_parse_from_their_names_and_cancelled_is_one() {
    assert_eq!(SagaStatus::parse("cancelled"), Ok(SagaStatus::Cancelled));
    assert!(SagaStatus::parse("canceled").unwrap_err().to_string().contains("cancelled"));
}

fn emits(effects: &[Effect]) -> Vec<(&str, &Context)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Emit { event, context } => Some((event.as_str(), context)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_event_step_answers_200_emits_once_and_completes_without_waiting() {
    let wf = Workflow::create_space_hybrid();
    let mut saga = run_until(&wf, Routing);
    let fx = saga.on_reply(&wf, done(Routing, Action::Do), T0 + 2);
    assert_eq!(answers(&fx), vec![(200, None)], "the client hears as soon as the last awaited step is done");
    let emitted = emits(&fx);
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].0, "space.created");
    assert_eq!(emitted[0].1.route.as_deref(), Some("acme -> shard-1"), "the event carries the whole space");
    assert!(sends(&fx).is_empty(), "nobody is sent a command, nor waited for");
    assert_eq!(
        events(&fx),
        vec![HistoryEvent::Done, HistoryEvent::Succeeded, HistoryEvent::Emitted, HistoryEvent::Completed]
    );
    // The answer is emitted before the event, in the same transition (one transaction).
    let answer_at = fx.iter().position(|e| matches!(e, Effect::Answer { .. }));
    let emit_at = fx.iter().position(|e| matches!(e, Effect::Emit { .. }));
    assert!(answer_at < emit_at);
    assert_eq!(saga.status, SagaStatus::Completed);
    assert_eq!(saga.wake_at(), None, "nothing is left to time out");
    assert!(saga.on_tick(&wf, T0 + 60_000).is_empty());
}

#[test]
fn a_refusal_before_the_event_step_compensates_and_emits_nothing() {
    let wf = Workflow::create_space_hybrid();
    let mut saga = run_until(&wf, Routing);
    let mut fx = saga.on_reply(&wf, refused(Routing, 409), T0 + 2);
    for s in [Entitlements, Placement, Records] {
        fx.extend(saga.on_reply(&wf, done(s, Action::Undo), T0 + 3));
    }
    assert!(emits(&fx).is_empty());
    assert_eq!(answers(&fx), vec![(409, Some(Routing))]);
    assert_eq!(saga.status, SagaStatus::RolledBack);
}

#[test]
fn a_command_step_after_the_event_is_sent_after_it_and_awaited() {
    let wf = WorkflowBuilder::new("x")
        .step("rec", [Records])
        .emit("announce", "space.created")
        .step("mail", [Notifier])
        .build()
        .unwrap();
    let (mut saga, _) = start(&wf);
    let fx = saga.on_reply(&wf, done(Records, Action::Do), T0 + 1);
    assert_eq!(answers(&fx).len(), 1);
    assert_eq!(emits(&fx).len(), 1);
    assert_eq!(sends(&fx), vec![(Notifier, Action::Do, 1)]);
    assert_eq!(saga.status, SagaStatus::Succeeded);
    let fx = saga.on_reply(&wf, done(Notifier, Action::Do), T0 + 2);
    assert!(emits(&fx).is_empty(), "the event is not emitted again");
    assert_eq!(saga.status, SagaStatus::Completed);
}

// Child workflows: a step that runs another workflow as a saga of its own.

/// The parent: a record, the child `capacity` (shard and licence), a route.
fn nested() -> (Workflow, Workflow) {
    let parent = WorkflowBuilder::new("p")
        .step("rec", [Records])
        .child("capacity", Entitlements, "c", 20_000)
        .step("route", [Routing])
        .build()
        .unwrap();
    let child =
        WorkflowBuilder::new("c").step("place", [Placement]).step("lic", [Entitlements]).build().unwrap();
    (parent, child)
}

fn children(effects: &[Effect]) -> Vec<(usize, String, Action, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Child { index, workflow, action, attempt, .. } => {
                Some((*index, workflow.clone(), *action, *attempt))
            }
            _ => None,
        })
        .collect()
}

/// A child that did all its steps.
fn finished_child(child: &Workflow) -> Saga {
    let (mut c, _) = Saga::start(child, Uuid::from_u128(9), Uuid::from_u128(2), input(), None, T0);
    c.on_reply(child, done(Placement, Action::Do), T0 + 1);
    let fx = c.on_reply(child, done(Entitlements, Action::Do), T0 + 2);
    assert_eq!(answers(&fx), vec![(200, None)], "a child answers like any saga");
    assert_eq!(c.status, SagaStatus::Completed);
    c
}

#[test]
fn a_child_step_starts_the_child_saga_and_waits_for_its_outcome_as_its_reply() {
    let (parent, child) = nested();
    let (mut p, _) = start(&parent);
    let fx = p.on_reply(&parent, done(Records, Action::Do), T0 + 1);
    assert_eq!(children(&fx), vec![(1, "c".into(), Action::Do, 1)]);
    assert!(sends(&fx).is_empty(), "no command of its own");
    let sent = fx.iter().find_map(|e| match e {
        Effect::History { event: HistoryEvent::Sent, detail, .. } => detail.clone(),
        _ => None,
    });
    assert_eq!(sent.as_deref(), Some("child workflow c"), "the timeline names the child");
    assert_eq!(p.actions[1].due_ms, Some(T0 + 1 + 20_000), "the child's outcome has its step's timeout");
    let c = finished_child(&child);
    let reply = c.outcome_as_child(Records, 1).expect("a finished child has an outcome");
    let fx = p.on_child_reply(&parent, reply, T0 + 3);
    assert_eq!(p.actions[1].phase, Phase::Done);
    assert_eq!(p.context.licence.as_deref(), Some("lic-1"), "the child's output is the step's");
    assert_eq!(sends(&fx), vec![(Routing, Action::Do, 1)]);
}

#[test]
fn a_child_that_refused_rolled_itself_back_and_the_parent_undoes_only_its_own_earlier_steps() {
    let (parent, child) = nested();
    let (mut p, _) = start(&parent);
    p.on_reply(&parent, done(Records, Action::Do), T0 + 1);
    let (mut c, _) = Saga::start(&child, Uuid::from_u128(9), Uuid::from_u128(2), input(), None, T0);
    c.on_reply(&child, done(Placement, Action::Do), T0 + 2);
    let fx = c.on_reply(&child, refused(Entitlements, 403), T0 + 3);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)], "the child undoes itself");
    let fx = c.on_reply(&child, done(Placement, Action::Undo), T0 + 4);
    assert_eq!(c.status, SagaStatus::RolledBack);
    let [.., Effect::Answer { status, context, failure }] = &fx[..] else { panic!("{fx:?}") };
    let reply = answer_as_reply(Entitlements, 1, *status, context.clone(), failure.clone());
    let fx = p.on_child_reply(&parent, reply, T0 + 5);
    assert_eq!(p.actions[1].phase, Phase::Refused, "nothing of the child is left to undo");
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
    assert!(children(&fx).is_empty());
    let fx = p.on_reply(&parent, done(Records, Action::Undo), T0 + 6);
    assert_eq!(answers(&fx), vec![(403, Some(Entitlements))], "the child's status reaches the client");
}

#[test]
fn a_parent_refusing_after_its_child_succeeded_undoes_the_child_as_a_whole_in_reverse() {
    let (parent, child) = nested();
    let (mut p, _) = start(&parent);
    p.on_reply(&parent, done(Records, Action::Do), T0 + 1);
    let mut c = finished_child(&child);
    p.on_child_reply(&parent, c.outcome_as_child(Records, 1).unwrap(), T0 + 3);
    let fx = p.on_reply(&parent, Reply { index: Some(2), ..refused(Routing, 409) }, T0 + 4);
    assert_eq!(children(&fx), vec![(1, "c".into(), Action::Undo, 1)], "the child first: it came last");
    assert!(sends(&fx).is_empty(), "the record waits for the child");
    // The child, asked, undoes its steps latest first and then says so, answering nobody.
    let fx = c.undo_as_child(&child, T0 + 5);
    assert_eq!(sends(&fx), vec![(Entitlements, Action::Undo, 1)]);
    assert!(events(&fx).contains(&HistoryEvent::UndoRequested));
    let fx = c.on_reply(&child, done(Entitlements, Action::Undo), T0 + 6);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    let fx = c.on_reply(&child, done(Placement, Action::Undo), T0 + 7);
    assert!(fx.contains(&Effect::Undone) && answers(&fx).is_empty(), "{fx:?}");
    assert_eq!(c.status, SagaStatus::RolledBack);
    assert_eq!(c.outcome_as_child(Records, 1), None, "undone at its parent's request: no outcome");
    let fx = p.on_child_reply(&parent, undone_reply(Records, 1), T0 + 8);
    assert_eq!(p.actions[1].phase, Phase::Compensated);
    assert_eq!(sends(&fx), vec![(Records, Action::Undo, 1)]);
    let fx = p.on_reply(&parent, done(Records, Action::Undo), T0 + 9);
    assert_eq!(answers(&fx), vec![(409, Some(Routing))]);
}

#[test]
fn a_cancel_of_the_parent_reaches_its_running_child_which_ends_cancelled() {
    let (parent, child) = nested();
    let (mut p, _) = start(&parent);
    p.on_reply(&parent, done(Records, Action::Do), T0 + 1);
    let (mut c, _) = Saga::start(&child, Uuid::from_u128(9), Uuid::from_u128(2), input(), None, T0 + 1);
    c.on_reply(&child, done(Placement, Action::Do), T0 + 2);
    let fx = p.cancel(&parent, "ops", T0 + 3);
    assert_eq!(children(&fx), vec![(1, "c".into(), Action::Undo, 1)]);
    let fx = c.undo_as_child(&child, T0 + 4);
    assert!(c.cancelled && events(&fx).contains(&HistoryEvent::CancelRequested));
    // Its licence was in flight: undone first (a late one finds the tombstone), then its shard.
    assert_eq!(sends(&fx), vec![(Entitlements, Action::Undo, 1)]);
    let fx = c.on_reply(&child, done(Entitlements, Action::Undo), T0 + 5);
    assert_eq!(sends(&fx), vec![(Placement, Action::Undo, 1)]);
    let fx = c.on_reply(&child, done(Placement, Action::Undo), T0 + 5);
    assert!(fx.contains(&Effect::Undone) && answers(&fx).is_empty(), "{fx:?}");
    assert_eq!(c.status, SagaStatus::Cancelled);
    p.on_child_reply(&parent, undone_reply(Records, 1), T0 + 6);
    let fx = p.on_reply(&parent, done(Records, Action::Undo), T0 + 7);
    assert_eq!(p.status, SagaStatus::Cancelled);
    assert_eq!(answers(&fx).first().map(|a| a.0), Some(409));
}

#[test]
fn a_later_attempt_or_a_second_undo_of_a_child_changes_nothing_twice() {
    let (parent, child) = nested();
    let (mut p, _) = start(&parent);
    p.on_reply(&parent, done(Records, Action::Do), T0 + 1);
    // No outcome within the step's timeout: a second attempt asks the child again.
    let fx = p.on_tick(&parent, T0 + 1 + 20_000);
    assert!(events(&fx).contains(&HistoryEvent::TimedOut));
    let fx = p.on_tick(&parent, T0 + 1 + 30_000);
    assert_eq!(children(&fx), vec![(1, "c".into(), Action::Do, 2)]);
    // The outcome answers the attempt in progress, whichever started the child.
    let c = finished_child(&child);
    let mut reply = c.outcome_as_child(Records, 1).unwrap();
    reply.attempt = 1;
    p.on_child_reply(&parent, reply, T0 + 30_001);
    assert_eq!(p.actions[1].phase, Phase::Done);
    // A child already rolled back has nothing to undo: it says so at once, every time.
    let (mut gone, _) = Saga::start(&child, Uuid::from_u128(9), Uuid::from_u128(2), input(), None, T0);
    gone.on_reply(&child, refused(Placement, 503), T0 + 1);
    assert_eq!(gone.status, SagaStatus::RolledBack);
    assert_eq!(gone.undo_as_child(&child, T0 + 2).last(), Some(&Effect::Undone));
    assert_eq!(gone.undo_as_child(&child, T0 + 3), vec![Effect::Undone]);
}
