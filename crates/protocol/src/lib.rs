//! The bodies of every message Baton sends, and their names.
//!
//! Owns: the JSON schema (version [`SCHEMA`]) of commands, replies and the orchestrator's
//! `start` request and outcome; the message `type` strings; the shared [`Context`] a space
//! accumulates as it moves through the steps; the [`Outgoing`] message as data (what an outbox
//! row holds), with its [`TraceParent`]. Must not touch: AMQP (see `baton-amqp` for the
//! envelope built from an `Outgoing`), SQLite, or any business rule. Keeping bodies here lets the
//! orchestrator, the services and the gateway agree on the wire without depending on one another.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod outgoing;

pub use outgoing::{Json, Outgoing, TraceParent};

/// Version of every body's schema. A consumer rejects other versions to the dead-letter queue.
pub const SCHEMA: u32 = 1;

/// A message body: it says which [`SCHEMA`] its sender wrote, so that a consumer can refuse
/// one it does not read (every body of this crate has one).
pub trait Body: serde::de::DeserializeOwned {
    fn schema(&self) -> u32;
}

macro_rules! bodies {
    ($($body:ty),*) => {
        $(impl Body for $body {
            fn schema(&self) -> u32 {
                self.schema
            }
        })*
    };
}

bodies!(StepCommand, StepReply, RetrySaga, CancelSaga, StartSaga, SpaceEvent, SagaOutcome);

/// Largest body a consumer accepts; bigger ones are dead-lettered unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The five services of the flow, in the order of the default workflow, and the follow-ups
/// that only react to a finished space in hybrid mode ([`Service::FOLLOW_UPS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Records,
    Placement,
    Entitlements,
    Routing,
    Notifier,
    /// The search index: a follow-up of hybrid mode that indexes each created space.
    Search,
}

impl Service {
    /// The services of the flow, which every mode runs (not the follow-up `search`).
    pub const ALL: [Service; 5] =
        [Service::Records, Service::Placement, Service::Entitlements, Service::Routing, Service::Notifier];

    /// In hybrid mode: the services that react to the orchestrator's `space.created` event
    /// rather than answer a command.
    pub const FOLLOW_UPS: [Service; 2] = [Service::Notifier, Service::Search];

    pub fn name(self) -> &'static str {
        match self {
            Service::Records => "records",
            Service::Placement => "placement",
            Service::Entitlements => "entitlements",
            Service::Routing => "routing",
            Service::Notifier => "notifier",
            Service::Search => "search",
        }
    }

    /// The message type of the step's command (`records.create`, ...).
    pub fn do_type(self) -> &'static str {
        match self {
            Service::Records => "records.create",
            Service::Placement => "placement.assign",
            Service::Entitlements => "entitlements.license",
            Service::Routing => "routing.route",
            Service::Notifier => "notifier.notify",
            Service::Search => "search.index",
        }
    }

    /// The message type of the step's compensation, if it has one.
    pub fn undo_type(self) -> Option<&'static str> {
        match self {
            Service::Records => Some("records.delete"),
            Service::Placement => Some("placement.release"),
            Service::Entitlements => Some("entitlements.revoke"),
            Service::Routing => Some("routing.unroute"),
            Service::Notifier | Service::Search => None,
        }
    }

    /// In events mode: the event the service reacts to.
    pub fn trigger_event(self) -> &'static str {
        match self {
            Service::Records => events::REQUESTED,
            Service::Placement => events::CREATED,
            Service::Entitlements => events::PLACED,
            Service::Routing => events::LICENSED,
            Service::Notifier => events::ROUTED,
            Service::Search => events::CREATED,
        }
    }

    /// In events mode: the event the service emits when its step is done.
    pub fn done_event(self) -> &'static str {
        match self {
            Service::Records => events::CREATED,
            Service::Placement => events::PLACED,
            Service::Entitlements => events::LICENSED,
            Service::Routing => events::ROUTED,
            Service::Notifier => events::READY,
            Service::Search => events::INDEXED,
        }
    }

    pub fn parse(name: &str) -> Option<Service> {
        Service::ALL.into_iter().chain([Service::Search]).find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How the components coordinate: the switch of the design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An orchestrator runs each request as a saga.
    Workflow,
    /// Choreography: each service reacts to the previous one's event.
    Events,
    /// A saga runs the steps that may need undoing, then emits `space.created`, to which the
    /// follow-ups ([`Service::FOLLOW_UPS`]) react on their own.
    Hybrid,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Workflow, Mode::Events, Mode::Hybrid];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Workflow => "workflow",
            Mode::Events => "events",
            Mode::Hybrid => "hybrid",
        }
    }

    /// The services that keep a row for every space created in this mode: the five of the
    /// flow, and the search index in hybrid mode.
    pub fn services(self) -> &'static [Service] {
        const HYBRID: [Service; 6] = [
            Service::Records,
            Service::Placement,
            Service::Entitlements,
            Service::Routing,
            Service::Notifier,
            Service::Search,
        ];
        match self {
            Mode::Workflow | Mode::Events => &Service::ALL,
            Mode::Hybrid => &HYBRID,
        }
    }

    /// Whether an orchestrator runs each request as a saga (workflow and hybrid modes).
    pub fn runs_sagas(self) -> bool {
        matches!(self, Mode::Workflow | Mode::Hybrid)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every process-level part of Baton: the five services, the search index of hybrid mode, the
/// orchestrator and the gateway.
/// Each keeps `<data-dir>/<name>.db`, is `baton run <name>`, and is named so in logs and fault
/// plans; this is the one list of them (which run in which mode is [`Component::runs_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Component {
    Records,
    Placement,
    Entitlements,
    Routing,
    Notifier,
    Search,
    Orchestrator,
    Gateway,
}

impl Component {
    /// In the order `baton up` starts them: the services, then who sends them work.
    pub const ALL: [Component; 8] = [
        Component::Records,
        Component::Placement,
        Component::Entitlements,
        Component::Routing,
        Component::Notifier,
        Component::Search,
        Component::Orchestrator,
        Component::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Orchestrator => "orchestrator",
            Component::Gateway => "gateway",
            c => c.service().map_or("", Service::name),
        }
    }

    pub fn parse(name: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The service this component is, if it is one.
    pub fn service(self) -> Option<Service> {
        match self {
            Component::Records => Some(Service::Records),
            Component::Placement => Some(Service::Placement),
            Component::Entitlements => Some(Service::Entitlements),
            Component::Routing => Some(Service::Routing),
            Component::Notifier => Some(Service::Notifier),
            Component::Search => Some(Service::Search),
            Component::Orchestrator | Component::Gateway => None,
        }
    }

    /// Whether it has a part in `mode`: the orchestrator has none in events mode, the search
    /// index a part in hybrid mode only.
    pub fn runs_in(self, mode: Mode) -> bool {
        match self {
            Component::Orchestrator => mode.runs_sagas(),
            Component::Search => mode == Mode::Hybrid,
            _ => true,
        }
    }

    /// The components of a system running in `mode`, in start order.
    pub fn of_mode(mode: Mode) -> impl Iterator<Item = Component> {
        Component::ALL.into_iter().filter(move |c| c.runs_in(mode))
    }
}

impl From<Service> for Component {
    fn from(s: Service) -> Component {
        match s {
            Service::Records => Component::Records,
            Service::Placement => Component::Placement,
            Service::Entitlements => Component::Entitlements,
            Service::Routing => Component::Routing,
            Service::Notifier => Component::Notifier,
            Service::Search => Component::Search,
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a command does a step or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Do,
    Undo,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Do => "do",
            Action::Undo => "undo",
        }
    }
}

/// What a space has accumulated so far: the request, then each step's output.
///
/// Steps read what they need (routing reads `key` and `shard`) and add their own output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub name: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl Context {
    /// Fold a step's output into the context; fields the output leaves empty are kept.
    pub fn merge(&mut self, out: &Context) {
        let keep = |mine: &mut Option<String>, theirs: &Option<String>| {
            if theirs.is_some() {
                mine.clone_from(theirs);
            }
        };
        keep(&mut self.key, &out.key);
        keep(&mut self.shard, &out.shard);
        keep(&mut self.licence, &out.licence);
        keep(&mut self.route, &out.route);
    }
}

/// A command from the orchestrator to a service: do or undo one step of one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCommand {
    pub schema: u32,
    pub saga_id: Uuid,
    pub space_id: Uuid,
    pub step: Service,
    pub action: Action,
    pub attempt: u32,
    /// Which action of the saga this is (its position in the workflow, flattened), echoed in
    /// the reply: a workflow may run the same service in several steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub context: Context,
}

/// How a step ended, as a service reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The step (or its compensation) took effect; `data` holds its output.
    Done,
    /// A business rule refused the step; `status` and `reason` say which.
    Refused,
    /// A technical error; the orchestrator may retry.
    Failed,
}

/// A service's answer to a [`StepCommand`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReply {
    pub schema: u32,
    pub saga_id: Uuid,
    pub space_id: Uuid,
    pub step: Service,
    pub action: Action,
    pub attempt: u32,
    /// The command's `index`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub outcome: Outcome,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub data: Context,
}

/// A step's answer, as a reply carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub data: Context,
}

impl StepCommand {
    /// The reply to this command: the same saga, step, action, attempt and index, and `answer`.
    pub fn reply(&self, answer: Answer) -> StepReply {
        StepReply {
            schema: SCHEMA,
            saga_id: self.saga_id,
            space_id: self.space_id,
            step: self.step,
            action: self.action,
            attempt: self.attempt,
            index: self.index,
            outcome: answer.outcome,
            status: answer.status,
            reason: answer.reason,
            data: answer.data,
        }
    }
}

/// Message type of a reply to a command of type `command_type`.
pub fn reply_type(command_type: &str) -> String {
    format!("{command_type}.reply")
}

/// Type of the gateway's request to start a saga.
pub const START: &str = "orchestrator.start";
/// Type of the orchestrator's answer to [`START`].
pub const START_REPLY: &str = "orchestrator.start.reply";

/// Type of an operator's request to finish a rollback that stopped in `compensation_failed`.
/// It goes to the orchestrator instance that owns the saga (its own queue).
pub const RETRY: &str = "orchestrator.retry";

/// Body of [`RETRY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrySaga {
    pub schema: u32,
    pub saga_id: Uuid,
}

/// Type of an operator's request to cancel a running saga (`POST /workflows/{id}/cancel`,
/// `baton workflows cancel`). It goes to `orchestrator.commands`, which every orchestrator
/// instance consumes, so it is handled whichever instance is alive.
pub const CANCEL: &str = "orchestrator.cancel";

/// Body of [`CANCEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelSaga {
    pub schema: u32,
    pub saga_id: Uuid,
    /// Who asked, and how (`POST /workflows/{id}/cancel`, `baton workflows cancel`): it goes
    /// into the saga's timeline and the client's 409.
    pub by: String,
}

/// The gateway asks the orchestrator to run a workflow for one space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSaga {
    pub schema: u32,
    pub saga_id: Uuid,
    pub space_id: Uuid,
    pub workflow: String,
    pub input: Context,
    /// When the client stops waiting and is told 504. Past it the saga starts no new forward
    /// step. Absent from starts that have no client waiting (bench, operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<ClientDeadline>,
}

/// A client's deadline, said twice so that a receiver can hold it against either clock: `at_ms`
/// is the gateway's wall clock (unix ms), right when clocks agree and the start waited in a
/// queue; `budget_ms` is what was left of it when the gateway sent the start, right when the
/// receiver's wall clock jumped. The receiver keeps the earlier of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientDeadline {
    pub at_ms: u64,
    pub budget_ms: u64,
}

/// The events of the `events` mode (routing keys on `baton.events` and message types).
pub mod events {
    pub const REQUESTED: &str = "space.requested";
    pub const CREATED: &str = "space.created";
    pub const PLACED: &str = "space.placed";
    pub const LICENSED: &str = "space.licensed";
    pub const ROUTED: &str = "space.routed";
    pub const READY: &str = "space.ready";
    pub const REJECTED: &str = "space.rejected";
    /// Never emitted: the search index, a follow-up, has nobody to tell (its done event exists
    /// so that every service has one).
    pub const INDEXED: &str = "space.indexed";
    pub const ALL: [&str; 7] = [REQUESTED, CREATED, PLACED, LICENSED, ROUTED, READY, REJECTED];

    /// The components that may emit `event` (by name) in `mode`: the gateway
    /// `space.requested`, each service its done event, any service `space.rejected`; in hybrid
    /// mode only the orchestrator emits, `space.created`, once a saga's compensable steps are
    /// done. The same rule as the topic permissions of `broker/permissions.json`; receivers
    /// check it by sender (`baton_amqp::Identity`).
    pub fn emitters(event: &str, mode: crate::Mode) -> Vec<&'static str> {
        use crate::Service;
        match (event, mode) {
            (CREATED, crate::Mode::Hybrid) => vec!["orchestrator"],
            (_, crate::Mode::Hybrid) => Vec::new(),
            (REQUESTED, _) => vec!["gateway"],
            (REJECTED, _) => Service::ALL.iter().map(|s| s.name()).collect(),
            (e, _) => Service::ALL.iter().filter(|s| s.done_event() == e).map(|s| s.name()).collect(),
        }
    }
}

/// An event of the `events` mode: where a space got to, with everything it has so far. A
/// `space.rejected` names the step that refused, its status and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpaceEvent {
    pub schema: u32,
    pub space_id: Uuid,
    pub context: Context,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Service>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A space as the client sees it after success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    pub id: Uuid,
    pub key: String,
    pub name: String,
    pub owner: String,
    pub shard: String,
    pub licence: String,
    pub route: String,
    /// The saga that created it (workflow mode; events mode has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<Uuid>,
}

/// Why a request did not succeed: which step, what status, one sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub error: String,
    pub step: Option<Service>,
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<Uuid>,
}

/// The orchestrator's answer to the gateway: 200 with the space, or the error after rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaOutcome {
    pub schema: u32,
    pub saga_id: Uuid,
    pub space_id: Uuid,
    pub status: u16,
    #[serde(default)]
    pub space: Option<Space>,
    #[serde(default)]
    pub error: Option<StepError>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_event_has_its_emitters() {
        use super::{Mode, Service, events};
        let ev = Mode::Events;
        assert_eq!(events::emitters(events::REQUESTED, ev), ["gateway"]);
        assert_eq!(events::emitters(events::READY, ev), ["notifier"]);
        assert_eq!(events::emitters(events::PLACED, ev), ["placement"]);
        assert_eq!(events::emitters(events::REJECTED, ev).len(), 5);
        for s in Service::ALL {
            assert_eq!(events::emitters(s.done_event(), ev), [s.name()]);
        }
        assert!(events::emitters("space.exploded", ev).is_empty());
        // In hybrid mode the orchestrator announces a created space, and nobody else emits.
        assert_eq!(events::emitters(events::CREATED, Mode::Hybrid), ["orchestrator"]);
        assert!(events::emitters(events::READY, Mode::Hybrid).is_empty());
    }

    use super::*;

    #[test]
    fn service_names_round_trip() {
        for s in Service::ALL {
            assert_eq!(Service::parse(s.name()), Some(s));
            assert!(s.do_type().starts_with(s.name()));
        }
        assert_eq!(Service::parse("nope"), None);
        assert_eq!(Service::Notifier.undo_type(), None);
    }

    #[test]
    fn component_names_round_trip_and_the_orchestrator_runs_only_where_sagas_do() {
        for c in Component::ALL {
            assert_eq!(Component::parse(c.name()), Some(c));
        }
        for s in Service::ALL {
            assert_eq!(Component::from(s).service(), Some(s));
            assert_eq!(Component::from(s).name(), s.name());
        }
        for s in Service::FOLLOW_UPS {
            assert_eq!(Service::parse(s.name()), Some(s));
        }
        assert_eq!(Component::of_mode(Mode::Workflow).count(), 7);
        assert!(!Component::of_mode(Mode::Events).any(|c| c == Component::Orchestrator));
        assert_eq!(Component::of_mode(Mode::Hybrid).count(), 8);
        assert!(!Component::of_mode(Mode::Workflow).any(|c| c == Component::Search));
    }

    #[test]
    fn events_chain_from_requested_to_ready() {
        let mut event = events::REQUESTED;
        for s in Service::ALL {
            assert_eq!(s.trigger_event(), event);
            event = s.done_event();
        }
        assert_eq!(event, events::READY);
    }

    #[test]
    fn merge_keeps_fields_the_output_leaves_empty() {
        let mut ctx =
            Context { name: "a".into(), owner: "o".into(), key: Some("a".into()), ..Default::default() };
        ctx.merge(&Context { shard: Some("shard-2".into()), ..Default::default() });
        assert_eq!(ctx.key.as_deref(), Some("a"));
        assert_eq!(ctx.shard.as_deref(), Some("shard-2"));
    }

    #[test]
    fn reply_with_missing_optional_fields_parses() {
        let id = Uuid::new_v4();
        let json = format!(
            r#"{{"schema":1,"saga_id":"{id}","space_id":"{id}","step":"records","action":"do","attempt":1,"outcome":"done"}}"#
        );
        let r: StepReply = serde_json::from_str(&json).unwrap();
        assert_eq!(r.outcome, Outcome::Done);
        assert_eq!(r.status, None);
    }
}
