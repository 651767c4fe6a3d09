//! Workflow definitions: data loaded from JSON, or built in Rust, validated either way.

use baton_protocol::Service;
use serde::{Deserialize, Serialize};

/// How often and how patiently an action is retried after a timeout or a technical failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Total attempts, the first included. `0` means without limit, which only a
    /// non-compensable action may use: it is past the point of no return and must get through.
    pub attempts: u32,
    pub backoff_ms: u64,
    pub cap_ms: u64,
}

impl RetryPolicy {
    /// Delay before attempt `next` (2, 3, ...): exponential from `backoff_ms`, capped at `cap_ms`.
    pub fn delay_before(&self, next: u32) -> u64 {
        let exp = next.saturating_sub(2).min(32);
        self.backoff_ms.saturating_mul(1u64 << exp).min(self.cap_ms)
    }

    /// Whether another attempt may follow attempt `done`.
    pub fn allows_after(&self, done: u32) -> bool {
        self.attempts == 0 || done < self.attempts
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff_ms: 200, cap_ms: 2_000 }
    }
}

fn default_true() -> bool {
    true
}

/// Compensations are retried longer than steps: a step that keeps failing is given up and
/// undone, but an undo that is given up leaves the saga for an operator.
pub const COMPENSATION_RETRY: RetryPolicy = RetryPolicy { attempts: 10, backoff_ms: 500, cap_ms: 10_000 };

fn default_compensation_retry() -> RetryPolicy {
    COMPENSATION_RETRY
}

/// One action: a command sent to a service, and how to undo it; or (`workflow`) a child saga
/// run as one step, undone as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionDef {
    /// The service the step runs on; for a child workflow, the one its timeline line and its
    /// refusals are named after.
    pub service: Service,
    /// The command; empty for a child workflow, which sends none of its own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    /// The workflow run as a child saga for this step: the parent waits for its outcome, and
    /// undoes it by asking it to compensate every step it did, in reverse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The compensating command; absent when `compensable` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<String>,
    #[serde(default = "default_true")]
    pub compensable: bool,
    pub timeout_ms: u64,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// How its compensation is retried (10 attempts over about a minute by default).
    #[serde(default = "default_compensation_retry")]
    pub compensation_retry: RetryPolicy,
}

/// How a step gets its work done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coordination {
    /// The orchestrator sends each action's command and waits for its reply.
    #[default]
    Command,
    /// The orchestrator publishes the step's `event`, in the transaction that records the
    /// step, and goes on without waiting: the subscribers react on their own.
    Event,
}

impl Coordination {
    fn is_command(&self) -> bool {
        *self == Coordination::Command
    }
}

/// The events a workflow's event step may emit: the ones the follow-ups subscribe to.
pub const EMITTABLE: [&str; 1] = [baton_protocol::events::CREATED];

/// One step: a group of actions that run in parallel, or (`coordination: event`) an event
/// that is published rather than a command that is awaited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Coordination::is_command")]
    pub coordination: Coordination,
    /// The event an event step emits (`space.created`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default)]
    pub actions: Vec<ActionDef>,
}

impl StepDef {
    /// The event this step emits, if it is an event step.
    pub fn emits(&self) -> Option<&str> {
        match self.coordination {
            Coordination::Event => self.event.as_deref(),
            Coordination::Command => None,
        }
    }
}

/// A validated workflow. Construct it with [`Workflow::from_json`] or [`WorkflowBuilder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workflow {
    pub name: String,
    pub steps: Vec<StepDef>,
}

/// Why a workflow file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read workflow file {path}: {cause}")]
    Read { path: String, cause: String },
    #[error("workflow file {path} is not valid: {source}")]
    Invalid {
        path: String,
        #[source]
        source: DefinitionError,
    },
    #[error("the workflows do not fit together: {0}")]
    Children(#[source] DefinitionError),
}

/// Why a workflow definition was rejected; each message names the offending step.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DefinitionError {
    #[error("workflow definition is not valid JSON of the expected shape: {0}")]
    Parse(String),
    #[error("workflow `{0}` has no steps; add at least one")]
    Empty(String),
    #[error("step `{0}` has no actions; give it at least one")]
    EmptyStep(String),
    #[error(
        "step `{step}` runs the compensable `{service}` after the non-compensable `{after}`: \
         what cannot be undone must come last, so move `{after}` after every compensable action"
    )]
    CompensableAfterFinal { step: String, service: Service, after: Service },
    #[error(
        "step `{step}` mixes non-compensable `{service}` with compensable actions in one parallel \
         group; put it in a step of its own at the end"
    )]
    MixedGroup { step: String, service: Service },
    #[error("step `{step}`: `{service}` appears twice in this parallel group; run it once per step")]
    DuplicateService { step: String, service: Service },
    #[error("step `{step}`: `{service}` has command `{got}`, expected `{expected}`")]
    WrongCommand { step: String, service: Service, got: String, expected: String },
    #[error("step `{step}`: `{service}` is compensable but names no compensation `{expected}`")]
    WrongCompensation { step: String, service: Service, expected: String },
    #[error("step `{step}`: `{service}` {problem}")]
    BadPolicy { step: String, service: Service, problem: &'static str },
    #[error(
        "step `{step}` emits an event, which nobody answers and no compensation can take back, \
         yet the compensable step `{later}` comes after it: if `{later}` failed, what the event \
         set off could not be undone, so move `{step}` after every compensable step"
    )]
    EventBeforeCompensable { step: String, later: String },
    #[error(
        "step `{step}` emits an event and so sends no command: its subscribers react on their \
         own and cannot be compensated; remove its actions, or make it a command step"
    )]
    EventWithActions { step: String },
    #[error(
        "step `{step}` is an event step that emits {got}; it must name one the follow-ups \
         subscribe to: {}", EMITTABLE.join(", ")
    )]
    UnknownEvent { step: String, got: String },
    #[error("step `{step}` names an event but is a command step; add `\"coordination\": \"event\"`")]
    EventOnCommandStep { step: String },
    #[error(
        "step `{step}` runs the child workflow `{workflow}` and so sends no command of its own: \
         remove its `command` and `compensation` (the child is undone as a whole)"
    )]
    ChildWithCommand { step: String, workflow: String },
    #[error("step `{step}` runs the child workflow `{workflow}`, which is not loaded; add its file")]
    UnknownChild { step: String, workflow: String },
    #[error("workflow `{}` runs itself through its children ({}): a child may not run an ancestor", .0[0], .0.join(" -> "))]
    ChildCycle(Vec<String>),
    #[error(
        "step `{step}` runs the child workflow `{child}` as a compensable step, but the child's step \
         `{child_step}` cannot be undone: the parent could not take the child back; make the child \
         wholly compensable, or the parent's step non-compensable and last"
    )]
    NonCompensableChild { step: String, child: String, child_step: String },
}

impl Workflow {
    /// Parse and validate a workflow file.
    pub fn from_json(text: &str) -> Result<Workflow, DefinitionError> {
        #[derive(Deserialize)]
        struct Raw {
            name: String,
            steps: Vec<StepDef>,
        }
        let raw: Raw = serde_json::from_str(text).map_err(|e| DefinitionError::Parse(e.to_string()))?;
        Workflow::validate(raw.name, raw.steps)
    }

    /// The default `create-space` workflow: records, placement, entitlements, routing, notify.
    pub fn create_space() -> Workflow {
        Workflow::from_json(include_str!("../workflows/create-space.json"))
            .expect("the bundled create-space workflow is valid")
    }

    /// `create-space` with placement and entitlements as one parallel group.
    pub fn create_space_parallel() -> Workflow {
        Workflow::from_json(include_str!("../workflows/create-space-parallel.json"))
            .expect("the bundled create-space-parallel workflow is valid")
    }

    /// `create-space` for hybrid mode: the four compensable steps run as a saga, then the
    /// orchestrator emits `space.created`, to which the email and the search index react.
    pub fn create_space_hybrid() -> Workflow {
        Workflow::from_json(include_str!("../workflows/create-space-hybrid.json"))
            .expect("the bundled create-space-hybrid workflow is valid")
    }

    /// `create-space` with placement and entitlements run as one child saga,
    /// `reserve-capacity`, between the record and the route.
    pub fn create_space_nested() -> Workflow {
        Workflow::from_json(include_str!("../workflows/create-space-nested.json"))
            .expect("the bundled create-space-nested workflow is valid")
    }

    /// The child of `create-space-nested`: a shard, then a licence.
    pub fn reserve_capacity() -> Workflow {
        Workflow::from_json(include_str!("../workflows/reserve-capacity.json"))
            .expect("the bundled reserve-capacity workflow is valid")
    }

    /// The bundled workflows, by name.
    pub fn bundled() -> Vec<Workflow> {
        vec![
            Workflow::create_space(),
            Workflow::create_space_parallel(),
            Workflow::create_space_hybrid(),
            Workflow::create_space_nested(),
            Workflow::reserve_capacity(),
        ]
    }

    /// The child workflows this one's steps run, with the step running each.
    pub fn children(&self) -> impl Iterator<Item = (&StepDef, &ActionDef, &str)> {
        self.steps
            .iter()
            .flat_map(|s| s.actions.iter().filter_map(move |a| Some((s, a, a.workflow.as_deref()?))))
    }

    /// Checks a set of workflows together, as they are loaded: every child a step names is in
    /// it, no workflow runs itself through its children, and a child run by a compensable step
    /// can be undone as a whole (every step of it compensable, no event).
    pub fn check_children(all: &[Workflow]) -> Result<(), DefinitionError> {
        let by_name = |n: &str| all.iter().find(|w| w.name == n);
        for wf in all {
            for (step, action, child) in wf.children() {
                let Some(c) = by_name(child) else {
                    return Err(DefinitionError::UnknownChild {
                        step: step.name.clone(),
                        workflow: child.into(),
                    });
                };
                if action.compensable {
                    let final_step = c
                        .steps
                        .iter()
                        .find(|s| s.emits().is_some() || s.actions.iter().any(|a| !a.compensable));
                    if let Some(bad) = final_step {
                        return Err(DefinitionError::NonCompensableChild {
                            step: step.name.clone(),
                            child: child.into(),
                            child_step: bad.name.clone(),
                        });
                    }
                }
            }
            let mut path = vec![wf.name.clone()];
            Self::no_cycle(all, wf, &mut path)?;
        }
        Ok(())
    }

    /// Depth-first through the children of `wf`, `path` the workflows above it.
    fn no_cycle(all: &[Workflow], wf: &Workflow, path: &mut Vec<String>) -> Result<(), DefinitionError> {
        for (_, _, child) in wf.children() {
            if path.iter().any(|p| p == child) {
                path.push(child.to_owned());
                let from = path.iter().position(|p| p == child).unwrap_or(0);
                return Err(DefinitionError::ChildCycle(path[from..].to_vec()));
            }
            if let Some(c) = all.iter().find(|w| w.name == child) {
                path.push(child.to_owned());
                Self::no_cycle(all, c, path)?;
                path.pop();
            }
        }
        Ok(())
    }

    /// Whether a step of it emits an event (it is meant for hybrid mode).
    pub fn emits_events(&self) -> bool {
        self.steps.iter().any(|s| s.emits().is_some())
    }

    /// What the components run: the bundled workflows, each replaced by the one of the same name
    /// in `files` (read and validated in order), joined by the others.
    pub fn bundled_and(files: &[std::path::PathBuf]) -> Result<Vec<Workflow>, FileError> {
        let mut all = Workflow::bundled();
        for file in files {
            let path = file.display().to_string();
            let text = std::fs::read_to_string(file)
                .map_err(|e| FileError::Read { path: path.clone(), cause: e.to_string() })?;
            let wf = Workflow::from_json(&text).map_err(|source| FileError::Invalid { path, source })?;
            all.retain(|w| w.name != wf.name);
            all.push(wf);
        }
        Workflow::check_children(&all).map_err(FileError::Children)?;
        Ok(all)
    }

    /// The definition as stored and hashed: its JSON with every default spelled out, so that
    /// two files that mean the same workflow give the same body.
    pub fn body(&self) -> String {
        serde_json::to_string(self).expect("a workflow serialises")
    }

    /// The content hash that pins a saga to this exact definition: SHA-256 of [`Workflow::body`],
    /// in hex. Any change of a step, an action or a policy gives another hash.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.body().as_bytes());
        hex::encode(digest)
    }

    /// Action `idx` of the flattened list of [`Workflow::actions`].
    pub fn action(&self, idx: usize) -> Option<&ActionDef> {
        self.actions().nth(idx).map(|(_, a)| a)
    }

    /// Index of every action, flattened in step order: `(step, action)`.
    pub fn actions(&self) -> impl Iterator<Item = (usize, &ActionDef)> {
        self.steps.iter().enumerate().flat_map(|(i, s)| s.actions.iter().map(move |a| (i, a)))
    }

    fn validate(name: String, steps: Vec<StepDef>) -> Result<Workflow, DefinitionError> {
        if steps.is_empty() {
            return Err(DefinitionError::Empty(name));
        }
        let mut final_seen: Option<Service> = None;
        let mut event_seen: Option<&str> = None;
        for step in &steps {
            match step.coordination {
                Coordination::Event => {
                    if !step.actions.is_empty() {
                        return Err(DefinitionError::EventWithActions { step: step.name.clone() });
                    }
                    let got = step.event.as_deref().unwrap_or_default();
                    if !EMITTABLE.contains(&got) {
                        let got = if got.is_empty() { "no event".into() } else { format!("`{got}`") };
                        return Err(DefinitionError::UnknownEvent { step: step.name.clone(), got });
                    }
                    event_seen = Some(&step.name);
                    continue;
                }
                Coordination::Command if step.event.is_some() => {
                    return Err(DefinitionError::EventOnCommandStep { step: step.name.clone() });
                }
                Coordination::Command => {}
            }
            if let Some(event_step) = event_seen
                && step.actions.iter().any(|a| a.compensable)
            {
                return Err(DefinitionError::EventBeforeCompensable {
                    step: event_step.to_owned(),
                    later: step.name.clone(),
                });
            }
            if step.actions.is_empty() {
                return Err(DefinitionError::EmptyStep(step.name.clone()));
            }
            let group_has_compensable = step.actions.iter().any(|a| a.compensable);
            // A service may come back in a later step (its rules are idempotent per space, so
            // it checks again what it did), but not twice in one parallel group.
            let mut seen = Vec::new();
            for a in &step.actions {
                let err_step = || step.name.clone();
                if seen.contains(&a.service) {
                    return Err(DefinitionError::DuplicateService { step: err_step(), service: a.service });
                }
                seen.push(a.service);
                if let Some(child) = &a.workflow {
                    if !a.command.is_empty() || a.compensation.is_some() {
                        return Err(DefinitionError::ChildWithCommand {
                            step: err_step(),
                            workflow: child.clone(),
                        });
                    }
                } else if a.command != a.service.do_type() {
                    return Err(DefinitionError::WrongCommand {
                        step: err_step(),
                        service: a.service,
                        got: a.command.clone(),
                        expected: a.service.do_type().into(),
                    });
                }
                if a.compensable {
                    let expected = a.service.undo_type();
                    if a.workflow.is_none() && (expected.is_none() || a.compensation.as_deref() != expected) {
                        return Err(DefinitionError::WrongCompensation {
                            step: err_step(),
                            service: a.service,
                            expected: expected.unwrap_or("(none: this service cannot undo)").into(),
                        });
                    }
                    if let Some(after) = final_seen {
                        return Err(DefinitionError::CompensableAfterFinal {
                            step: err_step(),
                            service: a.service,
                            after,
                        });
                    }
                    if a.retry.attempts == 0 {
                        return Err(DefinitionError::BadPolicy {
                            step: err_step(),
                            service: a.service,
                            problem: "is compensable and so needs a finite number of attempts (1 or more)",
                        });
                    }
                } else if group_has_compensable {
                    return Err(DefinitionError::MixedGroup { step: err_step(), service: a.service });
                }
                if a.timeout_ms == 0 {
                    return Err(DefinitionError::BadPolicy {
                        step: err_step(),
                        service: a.service,
                        problem: "needs a timeout_ms above 0",
                    });
                }
                if a.retry.backoff_ms > a.retry.cap_ms {
                    return Err(DefinitionError::BadPolicy {
                        step: err_step(),
                        service: a.service,
                        problem: "has a backoff_ms above its cap_ms",
                    });
                }
            }
            if let Some(a) = step.actions.iter().find(|a| !a.compensable) {
                final_seen = Some(a.service);
            }
        }
        Ok(Workflow { name, steps })
    }
}

/// Builds a workflow in Rust; [`WorkflowBuilder::build`] applies the same validation as a file.
///
/// ```
/// use baton_workflow::WorkflowBuilder;
/// use baton_protocol::Service::*;
/// let wf = WorkflowBuilder::new("create-space")
///     .step("create-record", [Records])
///     .step("assign-shard", [Placement])
///     .step("license", [Entitlements])
///     .step("publish-route", [Routing])
///     .step("notify", [Notifier])
///     .build()
///     .unwrap();
/// assert_eq!(wf.steps.len(), 5);
/// ```
#[derive(Debug, Clone)]
pub struct WorkflowBuilder {
    name: String,
    steps: Vec<StepDef>,
}

impl WorkflowBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowBuilder { name: name.into(), steps: Vec::new() }
    }

    /// A step whose services run in parallel, each with the service's own command and
    /// compensation, the default timeout and retry policy (unbounded retries for a service that
    /// cannot undo, like the notifier).
    pub fn step(self, name: impl Into<String>, services: impl IntoIterator<Item = Service>) -> Self {
        let actions = services.into_iter().map(Self::default_action).collect();
        self.step_with(name, actions)
    }

    /// A step with fully specified actions.
    pub fn step_with(mut self, name: impl Into<String>, actions: Vec<ActionDef>) -> Self {
        self.steps.push(StepDef {
            name: name.into(),
            coordination: Coordination::Command,
            event: None,
            actions,
        });
        self
    }

    /// A step that emits `event` and goes on without waiting for anyone.
    pub fn emit(mut self, name: impl Into<String>, event: &str) -> Self {
        self.steps.push(StepDef {
            name: name.into(),
            coordination: Coordination::Event,
            event: Some(event.into()),
            actions: Vec::new(),
        });
        self
    }

    /// A step that runs workflow `child` as a child saga, named after `service`, undone as a
    /// whole; it waits `timeout_ms` for the child's outcome (allow for all of the child's steps).
    pub fn child(self, name: impl Into<String>, service: Service, child: &str, timeout_ms: u64) -> Self {
        let action = ActionDef {
            service,
            command: String::new(),
            workflow: Some(child.into()),
            compensation: None,
            compensable: true,
            timeout_ms,
            retry: RetryPolicy { attempts: 2, backoff_ms: 500, cap_ms: 2_000 },
            compensation_retry: COMPENSATION_RETRY,
        };
        self.step_with(name, vec![action])
    }

    /// The action a service gets by default.
    pub fn default_action(service: Service) -> ActionDef {
        let compensation = service.undo_type().map(String::from);
        let compensable = compensation.is_some();
        ActionDef {
            service,
            command: service.do_type().into(),
            workflow: None,
            compensation,
            compensable,
            timeout_ms: if compensable { 3_000 } else { 5_000 },
            retry: if compensable {
                RetryPolicy::default()
            } else {
                RetryPolicy { attempts: 0, backoff_ms: 500, cap_ms: 30_000 }
            },
            compensation_retry: COMPENSATION_RETRY,
        }
    }

    pub fn build(self) -> Result<Workflow, DefinitionError> {
        Workflow::validate(self.name, self.steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Service::*;

    #[test]
    fn the_bench_workflows_of_4_and_16_steps_are_valid() {
        // `baton bench --workflow-file` runs them to show how a saga's cost grows with its steps.
        for (text, steps) in [
            (include_str!("../workflows/bench/bench-4-steps.json"), 4),
            (include_str!("../workflows/bench/bench-16-steps.json"), 16),
        ] {
            let wf = Workflow::from_json(text).unwrap();
            assert_eq!(wf.steps.len(), steps, "{}", wf.name);
            assert_eq!(wf.actions().count(), steps, "{}: one action per step", wf.name);
        }
    }

    #[test]
    fn bundled_workflows_are_valid_and_match_the_builder() {
        let built = WorkflowBuilder::new("create-space")
            .step("create-record", [Records])
            .step("assign-shard", [Placement])
            .step("license", [Entitlements])
            .step("publish-route", [Routing])
            .step("notify", [Notifier])
            .build()
            .unwrap();
        assert_eq!(built, Workflow::create_space());
        let parallel = WorkflowBuilder::new("create-space-parallel")
            .step("create-record", [Records])
            .step("assign-shard-and-license", [Placement, Entitlements])
            .step("publish-route", [Routing])
            .step("notify", [Notifier])
            .build()
            .unwrap();
        assert_eq!(parallel, Workflow::create_space_parallel());
        assert_eq!(parallel.steps[1].actions.len(), 2);
    }

    #[test]
    fn non_compensable_before_compensable_is_rejected_naming_the_step() {
        let err = WorkflowBuilder::new("bad")
            .step("create-record", [Records])
            .step("notify", [Notifier])
            .step("publish-route", [Routing])
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            DefinitionError::CompensableAfterFinal {
                step: "publish-route".into(),
                service: Routing,
                after: Notifier
            }
        );
        assert!(err.to_string().contains("step `publish-route`"), "{err}");
    }

    #[test]
    fn non_compensable_in_a_compensable_group_is_rejected() {
        let err = WorkflowBuilder::new("bad").step("both", [Records, Notifier]).build().unwrap_err();
        assert!(matches!(err, DefinitionError::MixedGroup { ref step, service: Notifier } if step == "both"));
    }

    #[test]
    fn other_mistakes_are_named() {
        assert!(matches!(WorkflowBuilder::new("e").build(), Err(DefinitionError::Empty(_))));
        assert!(matches!(
            WorkflowBuilder::new("e").step("s", []).build(),
            Err(DefinitionError::EmptyStep(s)) if s == "s"
        ));
        assert!(matches!(
            WorkflowBuilder::new("d").step("a", [Records]).step("b", [Placement, Records, Placement]).build(),
            Err(DefinitionError::DuplicateService { step, service: Placement }) if step == "b"
        ));
        // The same service in two steps is a check of what it did: allowed.
        let again = WorkflowBuilder::new("d").step("a", [Records]).step("b", [Records]).build().unwrap();
        assert_eq!(again.action(1).map(|a| a.service), Some(Records));
        let mut a = WorkflowBuilder::default_action(Records);
        a.command = "records.destroy".into();
        assert!(matches!(
            WorkflowBuilder::new("c").step_with("s", vec![a]).build(),
            Err(DefinitionError::WrongCommand { .. })
        ));
        let mut a = WorkflowBuilder::default_action(Records);
        a.retry.attempts = 0;
        assert!(matches!(
            WorkflowBuilder::new("c").step_with("s", vec![a]).build(),
            Err(DefinitionError::BadPolicy { .. })
        ));
        let mut a = WorkflowBuilder::default_action(Records);
        a.timeout_ms = 0;
        assert!(matches!(
            WorkflowBuilder::new("c").step_with("s", vec![a]).build(),
            Err(DefinitionError::BadPolicy { .. })
        ));
    }

    #[test]
    fn from_json_reports_parse_errors_and_validation_errors() {
        assert!(matches!(Workflow::from_json("{"), Err(DefinitionError::Parse(_))));
        let text = r#"{"name":"x","steps":[
            {"name":"mail","actions":[{"service":"notifier","command":"notifier.notify","compensable":false,"timeout_ms":10}]},
            {"name":"rec","actions":[{"service":"records","command":"records.create","compensation":"records.delete","timeout_ms":10}]}]}"#;
        let err = Workflow::from_json(text).unwrap_err();
        assert!(err.to_string().contains("step `rec`"), "{err}");
    }

    #[test]
    fn the_hybrid_workflow_announces_the_space_after_its_compensable_steps() {
        let built = WorkflowBuilder::new("create-space-hybrid")
            .step("create-record", [Records])
            .step("assign-shard", [Placement])
            .step("license", [Entitlements])
            .step("publish-route", [Routing])
            .emit("announce", "space.created")
            .build()
            .unwrap();
        assert_eq!(built, Workflow::create_space_hybrid());
        assert!(built.emits_events() && !Workflow::create_space().emits_events());
        assert_eq!(built.actions().count(), 4, "an event step sends no command");
        // A command step that cannot be undone may still follow the event.
        let wf = WorkflowBuilder::new("x")
            .step("rec", [Records])
            .emit("e", "space.created")
            .step("mail", [Notifier]);
        assert!(wf.build().is_ok());
    }

    #[test]
    fn an_event_before_a_compensable_step_is_refused_saying_why() {
        let err = WorkflowBuilder::new("bad")
            .step("create-record", [Records])
            .emit("announce", "space.created")
            .step("publish-route", [Routing])
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            DefinitionError::EventBeforeCompensable {
                step: "announce".into(),
                later: "publish-route".into()
            }
        );
        let text = err.to_string();
        assert!(text.contains("nobody answers") && text.contains("could not be undone"), "{text}");
        // Among compensable steps, even at the very start.
        let first =
            WorkflowBuilder::new("bad").emit("announce", "space.created").step("rec", [Records]).build();
        assert!(matches!(first, Err(DefinitionError::EventBeforeCompensable { .. })));
    }

    #[test]
    fn an_event_step_has_no_actions_and_names_an_event_the_follow_ups_know() {
        let text = r#"{"name":"x","steps":[{"name":"announce","coordination":"event","event":"space.created",
            "actions":[{"service":"records","command":"records.create","compensation":"records.delete","timeout_ms":10}]}]}"#;
        assert_eq!(
            Workflow::from_json(text).unwrap_err(),
            DefinitionError::EventWithActions { step: "announce".into() }
        );
        let err = WorkflowBuilder::new("x").emit("announce", "space.exploded").build().unwrap_err();
        assert!(
            err.to_string().contains("`space.exploded`") && err.to_string().contains("space.created"),
            "{err}"
        );
        let text = r#"{"name":"x","steps":[{"name":"announce","coordination":"event"}]}"#;
        assert!(Workflow::from_json(text).unwrap_err().to_string().contains("emits no event"));
        let text = r#"{"name":"x","steps":[{"name":"rec","event":"space.created","actions":[
            {"service":"records","command":"records.create","compensation":"records.delete","timeout_ms":10}]}]}"#;
        assert!(matches!(Workflow::from_json(text), Err(DefinitionError::EventOnCommandStep { .. })));
    }

    #[test]
    fn the_hash_follows_the_content_not_the_spelling() {
        let wf = Workflow::create_space();
        assert_eq!(wf.hash().len(), 64);
        // The body read back (defaults spelled out) is the same definition.
        assert_eq!(Workflow::from_json(&wf.body()).unwrap().hash(), wf.hash());
        let mut slower = wf.clone();
        slower.steps[0].actions[0].timeout_ms += 1;
        assert_ne!(slower.hash(), wf.hash(), "a policy change is another version");
        assert_ne!(Workflow::create_space_parallel().hash(), wf.hash());
    }

    #[test]
    fn the_nested_workflow_runs_placement_and_entitlements_as_one_child() {
        let built = WorkflowBuilder::new("create-space-nested")
            .step("create-record", [Records])
            .child("reserve-capacity", Entitlements, "reserve-capacity", 20_000)
            .step("publish-route", [Routing])
            .step("notify", [Notifier])
            .build()
            .unwrap();
        assert_eq!(built, Workflow::create_space_nested());
        let child = WorkflowBuilder::new("reserve-capacity")
            .step("assign-shard", [Placement])
            .step("license", [Entitlements])
            .build()
            .unwrap();
        assert_eq!(child, Workflow::reserve_capacity());
        assert!(Workflow::check_children(&Workflow::bundled()).is_ok());
        // Workflows from before children keep their body, and so their hash.
        assert!(!Workflow::create_space().body().contains("workflow\":"));
    }

    #[test]
    fn a_child_that_is_missing_or_runs_an_ancestor_is_refused() {
        let parent = WorkflowBuilder::new("a").step("rec", [Records]).child("c", Placement, "b", 10_000);
        let parent = parent.build().unwrap();
        assert_eq!(
            Workflow::check_children(std::slice::from_ref(&parent)),
            Err(DefinitionError::UnknownChild { step: "c".into(), workflow: "b".into() })
        );
        let b = WorkflowBuilder::new("b").child("again", Placement, "c", 10_000).build().unwrap();
        let c = WorkflowBuilder::new("c").child("back", Routing, "a", 10_000).build().unwrap();
        let err = Workflow::check_children(&[parent.clone(), b, c]).unwrap_err();
        assert_eq!(err, DefinitionError::ChildCycle(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
        assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");
        let itself = WorkflowBuilder::new("x").child("me", Records, "x", 10_000).build().unwrap();
        assert!(matches!(Workflow::check_children(&[itself]), Err(DefinitionError::ChildCycle(_))));
    }

    #[test]
    fn a_compensable_child_must_be_undoable_as_a_whole() {
        let parent = WorkflowBuilder::new("p").child("c", Records, "child", 10_000).build().unwrap();
        let mailing =
            WorkflowBuilder::new("child").step("rec", [Records]).step("mail", [Notifier]).build().unwrap();
        assert_eq!(
            Workflow::check_children(&[parent.clone(), mailing]),
            Err(DefinitionError::NonCompensableChild {
                step: "c".into(),
                child: "child".into(),
                child_step: "mail".into()
            })
        );
        let announcing =
            WorkflowBuilder::new("child").step("rec", [Records]).emit("e", "space.created").build().unwrap();
        assert!(matches!(
            Workflow::check_children(&[parent.clone(), announcing.clone()]),
            Err(DefinitionError::NonCompensableChild { .. })
        ));
        // The parent's last, non-compensable step may run such a child: nothing comes after it.
        let mut last = parent.clone();
        last.steps[0].actions[0].compensable = false;
        last.steps[0].actions[0].retry.attempts = 0;
        assert!(Workflow::check_children(&[last, announcing]).is_ok());
        // A child step names no command of its own.
        let text = r#"{"name":"p","steps":[{"name":"c","actions":[{"service":"records","workflow":"child",
            "command":"records.create","timeout_ms":10}]}]}"#;
        assert!(matches!(Workflow::from_json(text), Err(DefinitionError::ChildWithCommand { .. })));
        let files = [std::path::PathBuf::from("/nonexistent/child.json")];
        assert!(matches!(Workflow::bundled_and(&files), Err(FileError::Read { .. })));
    }

    #[test]
    fn backoff_grows_exponentially_to_the_cap() {
        let p = RetryPolicy { attempts: 5, backoff_ms: 100, cap_ms: 350 };
        assert_eq!(p.delay_before(2), 100);
        assert_eq!(p.delay_before(3), 200);
        assert_eq!(p.delay_before(4), 350);
        assert!(p.allows_after(4));
        assert!(!p.allows_after(5));
        assert!(RetryPolicy { attempts: 0, ..p }.allows_after(1_000));
    }
}
