//! The composition root: one place that turns a configuration into a running component.
//!
//! Owns: [`Config`] (everything a component of Baton is started with), which of the
//! [`Component`]s run in which mode (with the list itself, from `baton-protocol`), and [`run`],
//! which builds each component's options from the config and runs it until cancelled. `baton up`,
//! `baton run` and the integration tests' harness all start components through here, so that a
//! new option is wired once.
//!
//! Must not touch: flags and environment variables (the CLI reads them into a [`Config`]),
//! crashes and restarts (whoever drives the components does them, from the outside), or any
//! component's internals.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;
use baton_amqp::AmqpUrl;
use baton_faults::FaultPlan;
use baton_gateway::HttpLimits;
use baton_health::Health;
use baton_services::ServiceConfig;
use baton_workflow::Workflow;
use tokio_util::sync::CancellationToken;

pub use baton_protocol::{Component, Mode};

/// Everything the components of one process are started with; each takes the part it uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The broker, for every component without credentials of its own.
    pub amqp_url: AmqpUrl,
    /// Broker URLs of the components that connect with credentials of their own.
    pub own_amqp_urls: HashMap<Component, AmqpUrl>,
    /// Where each component keeps its state: `<data-dir>/<component>.db`, or a PostgreSQL schema.
    pub store: baton_store::Location,
    /// This instance's name (reply queues, outbox ownership); stable across restarts.
    pub instance: String,
    /// Unacked deliveries each consumer holds.
    pub prefetch: u16,
    /// The five services' business settings.
    pub services: ServiceConfig,
    /// Latency added before every command a service handles.
    pub service_delay: Duration,
    /// The fault plan the components apply to themselves (refusals, delays, duplicates...).
    pub faults: FaultPlan,
    /// The workflows the orchestrator knows.
    pub workflows: Vec<Workflow>,
    /// The workflow the gateway asks for.
    pub workflow: String,
    /// The gateway's address.
    pub http: SocketAddr,
    /// How long a client waits for an outcome before a 504.
    pub deadline: Duration,
    /// Requests the gateway lets wait at once.
    pub max_in_flight: usize,
    /// How long the gateway keeps an `Idempotency-Key`: a retry within it gets the first
    /// request's outcome.
    pub idempotency_ttl: Duration,
    pub limits: HttpLimits,
    /// The checks of every component of this process.
    pub health: Health,
    /// How long each component keeps what it only needs for a while (finished sagas, inbox
    /// rows, tombstones; idempotency keys are kept for `idempotency_ttl`); also the oldest
    /// message it handles.
    pub retain: Duration,
    /// The gateway records metrics and serves them at `GET /metrics` (`--no-metrics` turns it
    /// off, for `baton bench --instrumentation` to measure what they cost).
    pub gateway_metrics: bool,
    /// The kind of every work queue (`--queue-type`): quorum, or classic (no delivery limit).
    pub queue_type: baton_amqp::topology::QueueType,
}

impl Config {
    /// The defaults of `baton up` for `mode`, on `amqp_url` and `store`.
    pub fn new(mode: Mode, amqp_url: impl Into<AmqpUrl>, store: baton_store::Location) -> Config {
        Config {
            mode,
            amqp_url: amqp_url.into(),
            own_amqp_urls: HashMap::new(),
            store,
            instance: baton_store::DEFAULT_OWNER.into(),
            prefetch: 64,
            services: ServiceConfig::default(),
            service_delay: Duration::ZERO,
            faults: FaultPlan::default(),
            workflows: Workflow::bundled(),
            workflow: default_workflow(mode).into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            deadline: default_deadline(mode),
            max_in_flight: 1024,
            idempotency_ttl: baton_gateway::DEFAULT_IDEMPOTENCY_TTL,
            limits: HttpLimits::default(),
            health: Health::default(),
            retain: baton_store::retention::DEFAULT_RETAIN,
            gateway_metrics: true,
            queue_type: Default::default(),
        }
    }

    /// The broker URL `component` connects with.
    pub fn amqp_url_of(&self, component: Component) -> &AmqpUrl {
        self.own_amqp_urls.get(&component).unwrap_or(&self.amqp_url)
    }

    /// How a service runs under this config.
    pub fn service_options(&self, component: Component) -> baton_services::RunOptions {
        baton_services::RunOptions {
            amqp_url: self.amqp_url_of(component).clone(),
            store: self.store.clone(),
            mode: self.mode,
            prefetch: self.prefetch,
            delay: self.service_delay,
            faults: self.faults.clone(),
            instance: self.instance.clone(),
            health: self.health.clone(),
            retain: self.retain,
            queue_type: self.queue_type,
        }
    }

    /// How the orchestrator runs under this config.
    pub fn orchestrator_options(&self) -> baton_orchestrator::Options {
        baton_orchestrator::Options {
            amqp_url: self.amqp_url_of(Component::Orchestrator).clone(),
            store: self.store.clone(),
            instance: self.instance.clone(),
            prefetch: self.prefetch,
            workflows: self.workflows.clone(),
            announces: self.mode == Mode::Hybrid,
            health: self.health.clone(),
            retain: self.retain,
            queue_type: self.queue_type,
        }
    }

    /// How the gateway runs under this config.
    pub fn gateway_options(&self) -> baton_gateway::Options {
        baton_gateway::Options {
            amqp_url: self.amqp_url_of(Component::Gateway).clone(),
            store: self.store.clone(),
            http: self.http,
            mode: self.mode,
            instance: self.instance.clone(),
            workflow: self.workflow.clone(),
            deadline: self.deadline,
            max_in_flight: self.max_in_flight,
            idempotency_ttl: self.idempotency_ttl,
            limits: self.limits,
            health: self.health.clone(),
            sagas: baton_orchestrator::Sagas::at(&self.store),
            retain: self.retain,
            metrics: self.gateway_metrics,
            queue_type: self.queue_type,
        }
    }
}

/// The workflow the gateway asks for by default: in hybrid mode the one whose last step emits
/// `space.created` to the follow-ups.
pub fn default_workflow(mode: Mode) -> &'static str {
    match mode {
        Mode::Workflow | Mode::Events => "create-space",
        Mode::Hybrid => "create-space-hybrid",
    }
}

/// How long a client waits for an outcome by default: a saga may retry a step for a while;
/// a flow of events has nobody to wait on.
pub fn default_deadline(mode: Mode) -> Duration {
    match mode {
        Mode::Workflow | Mode::Hybrid => Duration::from_secs(30),
        Mode::Events => Duration::from_secs(5),
    }
}

/// Run `component` under `config` until `cancel`; returns once it has stopped.
pub async fn run(component: Component, config: &Config, cancel: CancellationToken) -> anyhow::Result<()> {
    if !component.runs_in(config.mode) {
        let runs: Vec<&str> =
            Mode::ALL.into_iter().filter(|m| component.runs_in(*m)).map(Mode::as_str).collect();
        bail!(
            "the {component} has no part in {} mode; run it with --mode {}",
            config.mode,
            runs.join(" or --mode ")
        );
    }
    match component.service() {
        Some(service) => {
            let opts = config.service_options(component);
            baton_services::run(service, config.services.clone(), opts, cancel).await
        }
        None if component == Component::Orchestrator => {
            baton_orchestrator::run(config.orchestrator_options(), cancel).await
        }
        None => baton_gateway::run(config.gateway_options(), cancel).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_with_credentials_of_its_own_uses_them() {
        let mut cfg =
            Config::new(Mode::Workflow, "amqp://shared", baton_store::Location::Dir("/tmp/x".into()));
        cfg.own_amqp_urls.insert(Component::Routing, "amqp://routing".into());
        assert_eq!(cfg.service_options(Component::Routing).amqp_url.expose(), "amqp://routing");
        assert_eq!(cfg.service_options(Component::Records).amqp_url.expose(), "amqp://shared");
        assert_eq!(cfg.gateway_options().amqp_url.expose(), "amqp://shared");
    }

    #[tokio::test]
    async fn the_orchestrator_is_refused_in_events_mode() {
        let cfg = Config::new(Mode::Events, "amqp://shared", baton_store::Location::Dir("/tmp/x".into()));
        let err = run(Component::Orchestrator, &cfg, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("events mode"), "{err}");
        let cfg = Config::new(Mode::Workflow, "amqp://shared", baton_store::Location::Dir("/tmp/x".into()));
        let err = run(Component::Search, &cfg, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("run it with --mode hybrid"), "{err}");
    }

    #[test]
    fn hybrid_mode_runs_the_workflow_that_announces_the_space() {
        let cfg = Config::new(Mode::Hybrid, "amqp://shared", baton_store::Location::Dir("/tmp/x".into()));
        let wf = cfg.workflows.iter().find(|w| w.name == cfg.workflow).expect("a bundled workflow");
        assert!(wf.emits_events());
        assert_eq!(cfg.deadline, Duration::from_secs(30));
    }
}
