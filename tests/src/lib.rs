//! The integration-test harness: a real RabbitMQ vhost and a real data dir per test, and the
//! components started in-process (or as real `baton` processes) against them.
//!
//! Owns: [`TestEnv`] (a vhost made through the management API and deleted on drop, a temporary
//! data dir), [`System`] (every component running against it, stopped cleanly on drop), and
//! small readers of the broker and the databases. Every wait here has a timeout.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_faults::FaultPlan;
use baton_protocol::{Component, Mode, Service};
use baton_services::ServiceConfig;
use baton_workflow::Workflow;
use serde_json::Value;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use baton_audit::Report;

pub mod cluster;
pub mod node;

/// The broker the tests use, without a vhost (`BATON_TEST_AMQP_URL`).
pub fn amqp_base() -> String {
    std::env::var("BATON_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

/// The management API (`BATON_TEST_MGMT_URL`), with guest/guest.
pub fn mgmt_base() -> String {
    std::env::var("BATON_TEST_MGMT_URL").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// Quiet logs unless `RUST_LOG` asks for them.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// Poll `check` until it returns `Some`, or fail after `timeout` saying what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The store the tests' components use: SQLite files in the test's data dir, unless
/// `BATON_TEST_STORE=postgres` puts every test's state in a PostgreSQL database of its own
/// (on `BATON_TEST_DATABASE_URL`'s server), to run the same tests on that backend.
pub fn on_postgres() -> bool {
    std::env::var("BATON_TEST_STORE").is_ok_and(|v| v.eq_ignore_ascii_case("postgres"))
}

/// Run `f` to its end from synchronous code, on a thread and a runtime of its own (the
/// harness's readers are called from async tests and from plain ones alike).
pub fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime").block_on(f)
    })
    .join()
    .expect("the reader thread")
}

/// A vhost and a data dir (and, on PostgreSQL, a database) of one test.
pub struct TestEnv {
    pub vhost: String,
    pub data: tempfile::TempDir,
    /// The test's own PostgreSQL database, when the tests run on that backend.
    pg: Option<baton_store::scratch::ScratchDatabase>,
    http: reqwest::Client,
    probe: tokio::sync::OnceCell<baton_amqp::Broker>,
    /// A broker of the test's own (a [`node::Node`]) instead of a vhost on the shared one.
    own_broker: Option<String>,
    /// Where to reach the shared broker instead of [`amqp_base`] (a test's proxy in front of it).
    via: Option<String>,
}

/// A database of the test's own when the tests run on PostgreSQL.
fn scratch_database() -> Option<baton_store::scratch::ScratchDatabase> {
    on_postgres().then(|| {
        baton_store::scratch::ScratchDatabase::create(&baton_store::scratch::test_server(), "baton_test")
            .expect("a database on the tests' PostgreSQL server (scripts/test.sh starts it)")
    })
}

/// Create `vhost` through the management API and give guest every permission on it.
pub async fn make_vhost(http: &reqwest::Client, vhost: &str) {
    let url = format!("{}/api/vhosts/{vhost}", mgmt_base());
    let r = http.put(&url).basic_auth("guest", Some("guest")).send().await.unwrap_or_else(|e| {
        panic!(
            "the RabbitMQ management API at {} is not reachable ({e}); run scripts/test.sh, which starts it",
            mgmt_base()
        )
    });
    assert!(r.status().is_success(), "creating vhost {vhost}: {}", r.status());
    let r = http
        .put(format!("{}/api/permissions/{vhost}/guest", mgmt_base()))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "granting guest on {vhost}: {}", r.status());
}

impl TestEnv {
    /// Create a fresh vhost (`baton-test-<random>`) with guest's permissions, and a data dir.
    pub async fn new() -> TestEnv {
        init_logs();
        let vhost = format!("baton-test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        make_vhost(&http, &vhost).await;
        TestEnv {
            vhost,
            data: tempfile::tempdir().unwrap(),
            pg: scratch_database(),
            http,
            probe: tokio::sync::OnceCell::new(),
            own_broker: None,
            via: None,
        }
    }

    /// [`TestEnv::new`], its state in a PostgreSQL database of its own whatever
    /// `BATON_TEST_STORE` says: for the tests of what only a shared store allows (several
    /// orchestrators on several machines).
    pub async fn on_postgres() -> TestEnv {
        let mut env = TestEnv::new().await;
        if env.pg.is_none() {
            env.pg = Some(
                baton_store::scratch::ScratchDatabase::create(
                    &baton_store::scratch::test_server(),
                    "baton_test",
                )
                .expect("a database on the tests' PostgreSQL server (scripts/test.sh starts it)"),
            );
        }
        env
    }

    /// A data dir for a test that runs against a broker of its own (`url`, e.g. a
    /// [`node::Node`]'s): no vhost is made on the shared broker.
    pub fn on_broker(url: &str) -> TestEnv {
        init_logs();
        TestEnv {
            vhost: "/".into(),
            data: tempfile::tempdir().unwrap(),
            pg: scratch_database(),
            http: reqwest::Client::new(),
            probe: tokio::sync::OnceCell::new(),
            own_broker: Some(url.into()),
            via: None,
        }
    }

    pub fn amqp_url(&self) -> String {
        match &self.own_broker {
            Some(url) => url.clone(),
            None => format!("{}/{}", self.via.clone().unwrap_or_else(amqp_base), self.vhost),
        }
    }

    /// Reach this test's vhost through `base` (`amqp://guest:guest@127.0.0.1:<port>`, a proxy of
    /// the test's in front of the shared broker) rather than straight: set before connecting.
    pub fn connect_via(&mut self, base: &str) {
        self.via = Some(base.into());
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Where this test's components keep their state.
    pub fn store(&self) -> baton_store::Location {
        match &self.pg {
            Some(db) => db.location().clone(),
            None => baton_store::Location::Dir(self.data_dir().to_owned()),
        }
    }

    /// The flags that point a `baton` process at this test's store.
    pub fn store_args(&self) -> Vec<String> {
        let mut args = vec!["--data-dir".to_owned(), self.data_dir().display().to_string()];
        if let Some(db) = &self.pg {
            args.extend(["--database-url".to_owned(), db.url().to_owned()]);
        }
        args
    }

    /// The audit of this test's stores.
    pub fn audit(&self) -> Report {
        let at = self.store();
        block_on(async move { baton_audit::audit(&at).await }).expect("audit runs")
    }

    /// Messages ready in a queue of this vhost, read at once through a passive declare (the
    /// management API's figures lag by seconds); `None` if the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Option<u64> {
        self.probe_queue(queue).await.map(|q| u64::from(q.message_count()))
    }

    /// Consumers on a queue of this vhost, read as [`TestEnv::queue_depth`] is.
    pub async fn queue_consumers(&self, queue: &str) -> Option<u32> {
        self.probe_queue(queue).await.map(|q| q.consumer_count())
    }

    async fn probe_queue(&self, queue: &str) -> Option<lapin::Queue> {
        let broker = self.probe.get_or_init(|| self.broker()).await;
        let ch = broker.channel().await.ok()?;
        let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let q = ch.queue_declare(queue.into(), opts, lapin::types::FieldTable::default()).await.ok()?;
        let _ = ch.close(200, "probed".into()).await;
        Some(q)
    }

    /// Take up to `count` messages from a queue (they are removed), with headers and payload.
    pub async fn take_messages(&self, queue: &str, count: u32) -> Vec<Value> {
        let url = format!("{}/api/queues/{}/{}/get", mgmt_base(), self.vhost, queue);
        let r = self
            .http
            .post(url)
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"count": count, "ackmode": "ack_requeue_false", "encoding": "auto"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "get from {queue}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Apply a policy of this vhost to the queues whose names match `pattern`.
    pub async fn set_policy(&self, name: &str, pattern: &str, definition: Value) {
        let url = format!("{}/api/policies/{}/{name}", mgmt_base(), self.vhost);
        let body = serde_json::json!({"pattern": pattern, "definition": definition, "apply-to": "queues", "priority": 10});
        let r = self.http.put(url).basic_auth("guest", Some("guest")).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "policy {name}: {}", r.status());
    }

    /// Connect to this vhost as a test client.
    pub async fn broker(&self) -> baton_amqp::Broker {
        baton_amqp::Broker::connect(&self.amqp_url(), "test").await.expect("test connection")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.own_broker.is_some() {
            return;
        }
        // Delete the vhost (and with it every queue of the test), from a thread of its own
        // since Drop cannot await.
        let url = format!("{}/api/vhosts/{}", mgmt_base(), self.vhost);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let c = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
                let _ = c.delete(url).basic_auth("guest", Some("guest")).send().await;
            });
        })
        .join();
    }
}

/// What to start, and how.
#[derive(Clone)]
pub struct SystemConfig {
    pub services: ServiceConfig,
    pub workflow: String,
    pub workflows: Vec<Workflow>,
    pub with_orchestrator: bool,
    pub with_services: bool,
    pub deadline: Duration,
    pub delay: Duration,
    pub mode: Mode,
    pub faults: FaultPlan,
    /// Services not to start (to start them later, or never).
    pub skip: Vec<Service>,
    /// Start the in-process gateway (off when a test runs it as a process of its own).
    pub with_gateway: bool,
    pub max_in_flight: usize,
    /// How long the gateway keeps an `Idempotency-Key`.
    pub idempotency_ttl: Duration,
    /// The checks of every component started, answered by the gateway's `/health/ready`.
    pub health: baton_health::Health,
    /// Every component's retention.
    pub retain: Duration,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            services: ServiceConfig::default(),
            workflow: "create-space".into(),
            workflows: Workflow::bundled(),
            with_orchestrator: true,
            with_services: true,
            deadline: Duration::from_secs(30),
            delay: Duration::ZERO,
            mode: Mode::Workflow,
            faults: FaultPlan::default(),
            skip: Vec::new(),
            with_gateway: true,
            max_in_flight: 1_000,
            idempotency_ttl: baton_gateway::DEFAULT_IDEMPOTENCY_TTL,
            health: baton_health::Health::default(),
            retain: baton_store::retention::DEFAULT_RETAIN,
        }
    }
}

/// A client of one gateway's HTTP API, cheap to clone into a task of its own: the requests the
/// tests make (create a space, read a workflow, cancel one), each with a 60 s timeout.
#[derive(Clone)]
pub struct Api {
    pub http: SocketAddr,
    client: reqwest::Client,
}

impl Api {
    pub fn new(http: SocketAddr) -> Api {
        Api { http, client: reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap() }
    }

    /// `POST /spaces`: the status and the JSON body.
    pub async fn create(&self, name: &str, owner: &str) -> (u16, Value) {
        let (status, body, _) = self.create_keyed(name, owner, None).await;
        (status, body)
    }

    /// `POST /spaces` with `key` as its `Idempotency-Key`: the status, the JSON body, and
    /// whether the gateway says it replayed.
    pub async fn create_keyed(&self, name: &str, owner: &str, key: Option<&str>) -> (u16, Value, bool) {
        let mut post = self
            .client
            .post(format!("http://{}/spaces", self.http))
            .json(&serde_json::json!({"name": name, "owner": owner}));
        if let Some(key) = key {
            post = post.header("Idempotency-Key", key);
        }
        let r = post.send().await.expect("POST /spaces");
        let replayed = r.headers().get("idempotent-replayed").is_some();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null), replayed)
    }

    /// Wait (bounded) until the gateway's `/health` answers.
    pub async fn wait_healthy(&self) {
        let url = format!("http://{}/health", self.http);
        wait_for("the gateway's /health", Duration::from_secs(20), || {
            let c = self.client.clone();
            let url = url.clone();
            async move { c.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
    }

    /// `GET <path>`: the status and the JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("http://{}{path}", self.http)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /workflows/{id}`: the status and the saga as JSON.
    pub async fn workflow(&self, id: &str) -> (u16, Value) {
        self.get(&format!("/workflows/{id}")).await
    }

    /// `POST <path>`, without a body: the status and the JSON body.
    pub async fn post(&self, path: &str) -> (u16, Value) {
        let r = self.client.post(format!("http://{}{path}", self.http)).send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /workflows/{id}/cancel`: the status and the JSON body.
    pub async fn cancel(&self, id: &str) -> (u16, Value) {
        self.post(&format!("/workflows/{id}/cancel")).await
    }
}

/// Every component of the workflow mode running in this process against a [`TestEnv`].
pub struct System {
    pub http: SocketAddr,
    cancel: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    client: reqwest::Client,
}

impl System {
    /// Start the five services, the orchestrator (unless disabled) and a gateway on a free
    /// port; return once `/health` answers.
    pub async fn start(env: &TestEnv, cfg: SystemConfig) -> System {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let config = node_config(env, &cfg);
        let started = Component::of_mode(cfg.mode).filter(|c| match c.service() {
            Some(s) => cfg.with_services && !cfg.skip.contains(&s),
            None if *c == Component::Orchestrator => cfg.with_orchestrator,
            // Started below, on a port bound first.
            None => false,
        });
        for c in started {
            let (config, cancel) = (config.clone(), cancel.clone());
            tasks.spawn(async move { baton_node::run(c, &config, cancel).await });
        }
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        if !cfg.with_gateway {
            let http = SocketAddr::from(([127, 0, 0, 1], 0));
            return System { http, cancel, tasks, client };
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let opts = baton_node::Config { http, ..config }.gateway_options();
        tasks.spawn(baton_gateway::serve(listener, opts, cancel.clone()));
        let sys = System { http, cancel, tasks, client };
        sys.wait_healthy().await;
        sys
    }

    /// Use a gateway that runs elsewhere (a process of the test's).
    pub async fn use_gateway(&mut self, http: SocketAddr) {
        self.http = http;
        self.wait_healthy().await;
    }

    async fn wait_healthy(&self) {
        self.api().wait_healthy().await
    }

    /// A client of the system's gateway, to clone into a task of its own.
    pub fn api(&self) -> Api {
        Api { http: self.http, client: self.client.clone() }
    }

    /// `POST /spaces`: the status and the JSON body.
    pub async fn create(&self, name: &str, owner: &str) -> (u16, Value) {
        self.api().create(name, owner).await
    }

    /// `POST /spaces`, where the gateway may die: the status, or 0 when no answer came.
    pub async fn try_create(&self, name: &str, owner: &str) -> u16 {
        let sent = self
            .client
            .post(format!("http://{}/spaces", self.http))
            .json(&serde_json::json!({"name": name, "owner": owner}))
            .send()
            .await;
        sent.map_or(0, |r| r.status().as_u16())
    }

    /// `GET <path>`: the status and the JSON body.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.api().get(path).await
    }

    /// Stop every component and wait for them (bounded).
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let all = async {
            while let Some(r) = self.tasks.join_next().await {
                r.expect("component task").expect("component ran cleanly");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all).await.expect("components stop within 20 s");
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// How the harness configures the components it runs against `env`: as `baton up` would, with
/// a smaller prefetch.
pub fn node_config(env: &TestEnv, cfg: &SystemConfig) -> baton_node::Config {
    let mut config = baton_node::Config::new(cfg.mode, env.amqp_url(), env.store());
    config.prefetch = 32;
    config.services = cfg.services.clone();
    config.service_delay = cfg.delay;
    config.faults = cfg.faults.clone();
    config.workflows = cfg.workflows.clone();
    config.workflow = cfg.workflow.clone();
    config.deadline = cfg.deadline;
    config.max_in_flight = cfg.max_in_flight;
    config.idempotency_ttl = cfg.idempotency_ttl;
    config.health = cfg.health.clone();
    config.retain = cfg.retain;
    config
}

/// How the harness runs a service against `env`.
pub fn service_options(env: &TestEnv, cfg: &SystemConfig) -> baton_services::RunOptions {
    // The component only picks the broker URL, which is the same for every service here.
    node_config(env, cfg).service_options(Component::Records)
}

/// One service started on its own (stop it by cancelling the token).
pub fn spawn_service(
    env: &TestEnv,
    service: Service,
    cfg: &SystemConfig,
) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let cancel = CancellationToken::new();
    let (config, token) = (node_config(env, cfg), cancel.clone());
    let task = tokio::spawn(async move { baton_node::run(service.into(), &config, token).await });
    (cancel, task)
}

pub fn orchestrator_options(env: &TestEnv, workflows: &[Workflow]) -> baton_orchestrator::Options {
    let cfg = SystemConfig { workflows: workflows.to_vec(), ..SystemConfig::default() };
    baton_orchestrator::Options {
        health: baton_health::Health::default(),
        ..node_config(env, &cfg).orchestrator_options()
    }
}

/// Rows a service holds for a space, through the services' read model.
pub fn rows_for(at: &baton_store::Location, service: Service, space_id: &str) -> i64 {
    let (at, space_id) = (at.clone(), space_id.to_owned());
    block_on(async move { baton_services::read::Holdings::at(&at, service).for_space(&space_id).await })
        .expect("the service's store reads") as i64
}

/// Rows a service holds, for every space, through the services' read model.
pub fn held(at: &baton_store::Location, service: Service) -> usize {
    let at = at.clone();
    block_on(async move { baton_services::read::Holdings::at(&at, service).all().await })
        .expect("the service's store reads")
        .len()
}

/// Every saga of the orchestrator's store, oldest first, through its read model; none while
/// the orchestrator has not made its store (or its tables) yet.
pub fn sagas(at: &baton_store::Location) -> Vec<baton_orchestrator::query::WorkflowView> {
    let at = at.clone();
    block_on(async move { baton_orchestrator::Sagas::at(&at).all().await }).unwrap_or_default()
}

/// How many sagas are in each of `statuses`, through the orchestrator's read model; `None`
/// while the orchestrator has not made its store (or its tables) yet.
pub fn sagas_in(at: &baton_store::Location, statuses: &[baton_workflow::SagaStatus]) -> Option<i64> {
    let at = at.clone();
    let counts = block_on(async move {
        let sagas = baton_orchestrator::Sagas::at(&at);
        if !sagas.exists().await {
            return None;
        }
        sagas.counts_by_status().await.ok()
    })?;
    Some(counts.iter().filter(|(s, _)| statuses.contains(s)).map(|(_, n)| n).sum())
}

/// How many sagas the orchestrator's store keeps (0 while it has no store).
pub fn saga_count(at: &baton_store::Location) -> i64 {
    let at = at.clone();
    block_on(async move { baton_orchestrator::Sagas::at(&at).retained().await })
        .expect("the orchestrator's store reads")
        .sagas
}

/// How many requests the gateway took, through its read model (0 while it has no store).
pub fn requests(at: &baton_store::Location) -> i64 {
    let at = at.clone();
    block_on(async move { baton_gateway::read::Requests::at(&at).count().await })
        .expect("the gateway's store reads")
}

/// What the gateway's idempotency keys hold, through its read model.
pub fn idempotency_keys(at: &baton_store::Location) -> baton_gateway::read::Keys {
    let at = at.clone();
    block_on(async move { baton_gateway::read::Requests::at(&at).keys().await })
        .expect("the gateway's store reads")
}

/// What a component's own tables (inbox, outbox, tombstones) hold; zeros while it has no store.
pub fn store_counts(at: &baton_store::Location, component: Component) -> baton_store::StoreCounts {
    let at = at.clone();
    block_on(async move { baton_store::StoreCounts::of(&at, component).await })
        .expect("the component's store reads")
        .unwrap_or_default()
}

/// A saga's timeline from the orchestrator's store (time relative to its start, step, action,
/// attempt, event, detail), one line each: what a failed assertion should show.
pub fn saga_story(at: &baton_store::Location, saga_id: &str) -> String {
    let Ok(id) = uuid::Uuid::parse_str(saga_id) else { return format!("(`{saga_id}` is no saga id)") };
    let at = at.clone();
    match block_on(async move { baton_orchestrator::Sagas::at(&at).describe(id).await }) {
        Ok(Some(view)) => {
            let start = view.history.first().map_or(0, |h| h.at_ms);
            let line = |h: &baton_orchestrator::query::HistoryRow| {
                format!(
                    "{:>6} ms {} {} #{} {} {}",
                    h.at_ms - start,
                    h.step.as_deref().unwrap_or("-"),
                    h.action.as_deref().unwrap_or("-"),
                    h.attempt,
                    h.event,
                    h.detail.as_deref().unwrap_or("")
                )
            };
            view.history.iter().map(line).collect::<Vec<_>>().join("\n")
        }
        Ok(None) => "(no such saga in the orchestrator's store)".to_owned(),
        Err(e) => format!("(history unreadable: {e})"),
    }
}

/// Wait (bounded) until no saga of `env` is still open: every one completed, rolled back or
/// cancelled.
pub async fn every_saga_ends(env: &TestEnv, timeout: Duration) {
    wait_for("every saga to end", timeout, || async {
        let counts = baton_orchestrator::Sagas::at(&env.store()).counts_by_status().await.ok()?;
        counts.iter().all(|(s, n)| s.is_settled() || *n == 0).then_some(())
    })
    .await
}

/// The components of workflow mode that publish through an outbox (every one but the gateway,
/// which publishes a request's start itself), by name, which is also their database's.
pub fn publishers() -> impl Iterator<Item = &'static str> {
    baton_protocol::Component::ALL
        .into_iter()
        .filter(|c| *c != baton_protocol::Component::Gateway && c.runs_in(Mode::Workflow))
        .map(|c| c.name())
}

/// Wait (bounded, `timeout` for each) until the outbox of every component that has one is
/// empty: everything committed was published.
pub async fn every_outbox_drains(env: &TestEnv, timeout: Duration) {
    for db in publishers() {
        wait_for(&format!("{db}'s outbox to drain"), timeout, || async {
            let component = baton_protocol::Component::parse(db).expect("a component");
            let c = baton_store::StoreCounts::of(&env.store(), component).await.ok()??;
            (c.outbox == 0).then_some(())
        })
        .await;
    }
}

/// A `records.create` command for a new saga and space, answered to `reply_to`, as the
/// orchestrator would send it.
pub fn records_create(name: &str, reply_to: &str) -> (baton_protocol::StepCommand, baton_amqp::Outgoing) {
    use baton_protocol::{Action, Context, SCHEMA, StepCommand};
    let cmd = StepCommand {
        schema: SCHEMA,
        saga_id: uuid::Uuid::new_v4(),
        space_id: uuid::Uuid::new_v4(),
        step: Service::Records,
        action: Action::Do,
        attempt: 1,
        index: None,
        context: Context { name: name.into(), owner: "alice".into(), ..Default::default() },
    };
    let msg = baton_amqp::Outgoing::new(
        baton_amqp::topology::COMMANDS,
        "records",
        "records.create",
        cmd.saga_id,
        "test",
        baton_amqp::TraceParent::new_root(),
        &cmd,
    )
    .reply_to(reply_to);
    (cmd, msg)
}

/// A free TCP port on 127.0.0.1 for a child process, below the ephemeral range so that no
/// outgoing connection takes it before the child binds it ([`baton_fleet::free_port`]).
pub fn free_port() -> u16 {
    baton_fleet::free_port().expect("a free port on 127.0.0.1")
}

/// Start `baton <args>` against `env` as a real process (killed when dropped), its stderr in
/// `<data-dir>/<log>`.
pub fn spawn_baton(env: &TestEnv, args: &[&str], envs: &[(&str, &str)], log: &str) -> tokio::process::Child {
    let log = std::fs::File::create(env.data_dir().join(log)).unwrap();
    tokio::process::Command::new(baton_bin())
        .args(args)
        .args(["--amqp-url", &env.amqp_url(), "--log", "warn"])
        .args(env.store_args())
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start a baton process")
}

/// Send `sig` to the process `pid` (`Signal::TERM`, `Signal::INT`...); a negative `pid` is a
/// process group.
pub fn signal(pid: i32, sig: rustix::process::Signal) -> std::io::Result<()> {
    use rustix::process::{Pid, kill_process, kill_process_group};
    let target = Pid::from_raw(pid.abs()).ok_or_else(|| std::io::Error::other(format!("no pid {pid}")))?;
    if pid < 0 { kill_process_group(target, sig) } else { kill_process(target, sig) }?;
    Ok(())
}

/// The pid of a running child, for [`signal`].
pub fn pid_of(child: &tokio::process::Child) -> i32 {
    child.id().and_then(|pid| i32::try_from(pid).ok()).expect("the process is running")
}

/// The `baton` binary built next to the tests (`cargo build` puts it in target/<profile>).
pub fn baton_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = dir.join("baton");
    assert!(bin.exists(), "{} is missing; build it first with `cargo build -p baton-cli`", bin.display());
    bin
}

/// The events of a saga's history, as `(step, action, event)`.
pub fn timeline(view: &Value) -> Vec<(String, String, String)> {
    view["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| {
            (
                h["step"].as_str().unwrap_or("saga").to_owned(),
                h["action"].as_str().unwrap_or("").to_owned(),
                h["event"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}
