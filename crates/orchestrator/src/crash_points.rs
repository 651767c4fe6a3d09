//! Where a saga's transition stands at a dangerous instant, for the crash tests: `None` at
//! once without the feature `crash-points` (see `baton-crash`).

use baton_protocol::{Action, Service};
use baton_workflow::{Effect, Saga};

/// The crash point a transition stands at, if any (for the crash tests).
pub(crate) fn dangerous_instant(
    saga: &Saga,
    step: Service,
    index: Option<usize>,
    action: Action,
) -> Option<&'static str> {
    use baton_workflow::{Phase, SagaStatus};
    if !baton_crash::ENABLED {
        return None;
    }
    let me = match index {
        Some(i) => saga.actions.get(i),
        None => saga.actions.iter().find(|a| a.service == step),
    };
    let me = me?;
    match action {
        Action::Undo if me.phase == Phase::Compensated && saga.status == SagaStatus::Compensating => {
            Some(baton_crash::BETWEEN_COMPENSATIONS)
        }
        Action::Do
            if me.phase == Phase::Done
                && saga.actions.iter().any(|a| a.step == me.step && a.phase == Phase::Running) =>
        {
            Some(baton_crash::MID_PARALLEL_GROUP)
        }
        _ => None,
    }
}

/// [`baton_crash::AFTER_ANNOUNCE_COMMIT`] when a transition announces (an event step): the
/// saga's commit holds the announcement, which only the outbox relay will publish.
pub(crate) fn announcing(effects: &[Effect]) -> Option<&'static str> {
    (baton_crash::ENABLED && effects.iter().any(|e| matches!(e, Effect::Emit { .. })))
        .then_some(baton_crash::AFTER_ANNOUNCE_COMMIT)
}
