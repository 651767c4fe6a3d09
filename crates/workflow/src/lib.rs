//! Workflow definitions and the saga state machine: the pure core of the orchestrator.
//!
//! Owns: what a workflow is ([`definition`]), the rules that make one valid, and how a saga moves
//! from one state to the next ([`saga`]). Must not touch: AMQP, SQLite, the clock or any other
//! I/O. Every input (a reply, the current time) comes in as an argument and every decision (send
//! a command, answer the client, write history) goes out as an [`saga::Effect`], so each transition
//! is a plain function that unit tests can drive exhaustively.

pub mod definition;
pub mod saga;

pub use definition::{
    ActionDef, DefinitionError, FileError, RetryPolicy, StepDef, Workflow, WorkflowBuilder,
};
pub use saga::{
    Deadline, Effect, Failure, HistoryEvent, Phase, Reply, Saga, SagaStatus, UnknownState, answer_as_reply,
    undone_reply, why_not_cancellable,
};
