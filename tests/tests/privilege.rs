//! Least privilege on the real broker: each component connects as its own RabbitMQ user with the
//! permissions of `broker/permissions.json` (what `scripts/broker-users.sh` applies), can do its
//! work, and is refused where it does not belong.
//!
//! The users are made per test with unique names on the test's vhost, and deleted on drop (also
//! when the test fails).

use std::time::Duration;

use baton_amqp::topology::{self, COMMANDS, EVENTS, OUTCOMES, REPLIES, command_queue};
use baton_amqp::{Broker, Outgoing, Publisher, TraceParent};
use baton_protocol::{
    Action, Context, Mode, Outcome, SCHEMA, SagaOutcome, Service, StepCommand, StepReply, events,
};
use baton_tests::{Api, SystemConfig, TestEnv, amqp_base, mgmt_base, rows_for, service_options, wait_for};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PERMISSIONS: &str = include_str!("../../broker/permissions.json");
const DEFINITIONS: &str = include_str!("../../broker/definitions.json");
const WAIT: Duration = Duration::from_secs(15);

/// One user per component (`baton-t<random>-<component>`) on the test's vhost, deleted on drop.
struct Users {
    vhost: String,
    users: Vec<(String, String, String)>,
}

impl Users {
    /// Create every user of `broker/permissions.json` with a random password and its permissions.
    async fn create(env: &TestEnv) -> Users {
        let prefix = format!("baton-t{}-", &Uuid::new_v4().simple().to_string()[..10]);
        let perms: Value = serde_json::from_str(PERMISSIONS).expect("broker/permissions.json is JSON");
        let mut users = Users { vhost: env.vhost.clone(), users: Vec::new() };
        let http = client();
        for p in perms["users"].as_array().expect("a users array") {
            let component = p["component"].as_str().expect("a component").to_owned();
            let name = format!("{prefix}{component}");
            let password = Uuid::new_v4().simple().to_string();
            // Recorded before it exists, so that Drop deletes it whatever fails next.
            users.users.push((component, name.clone(), password.clone()));
            let put = |path: String, body: Value, what: String| {
                let http = http.clone();
                async move {
                    let r = http
                        .put(format!("{}/api{path}", mgmt_base()))
                        .basic_auth("guest", Some("guest"))
                        .json(&body)
                        .send()
                        .await
                        .expect("management API");
                    assert!(r.status().is_success(), "{what}: {}", r.status());
                }
            };
            let vhost = &env.vhost;
            put(
                format!("/users/{name}"),
                json!({"password": password, "tags": ""}),
                format!("creating user {name}"),
            )
            .await;
            let body = json!({"configure": p["configure"], "write": p["write"], "read": p["read"]});
            put(format!("/permissions/{vhost}/{name}"), body, format!("permissions of {name}")).await;
            // The routing keys it may publish on a topic exchange (baton.events), one per exchange.
            for t in p["topic"].as_array().into_iter().flatten() {
                let body = json!({"exchange": t["exchange"], "write": t["write"], "read": t["read"]});
                put(
                    format!("/topic-permissions/{vhost}/{name}"),
                    body,
                    format!("topic permissions of {name}"),
                )
                .await;
            }
        }
        users
    }

    /// The broker user of a component.
    fn name(&self, component: &str) -> &str {
        self.users.iter().find(|(c, _, _)| c == component).map(|(_, n, _)| n.as_str()).expect("a user")
    }

    /// The AMQP URL of a component's user on the test's vhost.
    fn url(&self, component: &str) -> String {
        let (_, name, password) = self
            .users
            .iter()
            .find(|(c, _, _)| c == component)
            .unwrap_or_else(|| panic!("no user for {component}"));
        let base = amqp_base();
        let (scheme, rest) = base.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://{name}:{password}@{host}/{}", self.vhost)
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        let names: Vec<String> = self.users.iter().map(|(_, n, _)| n.clone()).collect();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let c = client();
                for name in names {
                    let _ = c
                        .delete(format!("{}/api/users/{name}", mgmt_base()))
                        .basic_auth("guest", Some("guest"))
                        .send()
                        .await;
                }
            });
        })
        .join();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// What an operator does once per vhost before starting components under their own users
/// (`scripts/broker-users.sh` does it): import the topology of `broker/definitions.json`.
async fn import_topology(env: &TestEnv) {
    let body: Value = serde_json::from_str(DEFINITIONS).expect("broker/definitions.json is JSON");
    let r = client()
        .post(format!("{}/api/definitions/{}", mgmt_base(), env.vhost))
        .basic_auth("guest", Some("guest"))
        .json(&body)
        .send()
        .await
        .expect("management API");
    assert!(r.status().is_success(), "importing broker/definitions.json into {}: {}", env.vhost, r.status());
}

async fn connect(url: &str, name: &str) -> Broker {
    tokio::time::timeout(WAIT, Broker::connect(url, name))
        .await
        .expect("connect within 15 s")
        .unwrap_or_else(|e| panic!("{name} connects: {e}"))
}

fn command(to: &str) -> Outgoing {
    probe(COMMANDS, to, &format!("{to}.probe"))
}

/// A message of type `kind` for `exchange` with routing key `key`.
fn probe(exchange: &str, key: &str, kind: &str) -> Outgoing {
    let body = serde_json::json!({"schema": 1, "probe": true});
    Outgoing::new(exchange, key, kind, Uuid::new_v4(), "privilege-test", TraceParent::new_root(), &body)
}

/// An event as the services publish it: routing key = type = the event's name.
fn event(name: &str) -> Outgoing {
    probe(EVENTS, name, name)
}

/// Publish with confirms and `mandatory`; the verdict within 15 s.
async fn publish(broker: &Broker, msg: &Outgoing) -> Result<(), String> {
    let publisher = Publisher::new(broker.clone());
    match tokio::time::timeout(WAIT, publisher.publish_confirmed(msg)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => panic!("no verdict within 15 s for a publish to {} ({})", msg.exchange, msg.routing_key),
    }
}

/// Start consuming `queue`; the error text if the broker refuses.
async fn consume(broker: &Broker, queue: &str) -> Result<lapin::Consumer, String> {
    let ch = broker.channel().await.map_err(|e| e.to_string())?;
    let opts = BasicConsumeOptions::default();
    let tag = format!("privilege-{}", Uuid::new_v4());
    tokio::time::timeout(
        WAIT,
        ch.basic_consume(queue.into(), tag.as_str().into(), opts, FieldTable::default()),
    )
    .await
    .expect("an answer to basic.consume within 15 s")
    .map_err(|e| e.to_string())
}

fn assert_refused(what: &str, r: Result<impl Sized, String>) {
    match r {
        Ok(_) => panic!("{what} was allowed; it must be refused"),
        Err(e) => assert!(e.contains("ACCESS_REFUSED"), "{what} failed, but not with ACCESS_REFUSED: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_user_declares_the_topology_and_consumes_its_own_queue() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;

    // On an empty vhost a service cannot create the other services' queues: a queue with a
    // dead-letter exchange needs read permission on itself when it is created. Hence the
    // operator's import first.
    let records = connect(&users.url("records"), "records").await;
    let err = records
        .declare_topology(&[], Default::default())
        .await
        .expect_err("creating placement's queues is refused")
        .to_string();
    assert!(err.contains("ACCESS_REFUSED"), "{err}");
    import_topology(&env).await;

    let records = connect(&users.url("records"), "records").await;
    records.declare_topology(&[], Default::default()).await.expect("records re-declares the topology");
    let mut inbox =
        consume(&records, &command_queue("records")).await.expect("records consumes records.commands");

    let orchestrator = connect(&users.url("orchestrator"), "orchestrator").await;
    let sent = command("records");
    publish(&orchestrator, &sent).await.expect("the orchestrator sends records a command");

    let delivery = tokio::time::timeout(WAIT, inbox.next())
        .await
        .expect("the command arrives within 15 s")
        .expect("the consumer is open")
        .expect("a delivery");
    let id = delivery.properties.message_id().as_ref().map(|s| s.to_string());
    assert_eq!(id, Some(sent.message_id.to_string()));
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    records.close().await;
    orchestrator.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_user_is_refused_where_it_does_not_belong() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;

    for (i, s) in Service::ALL.iter().enumerate() {
        let other = Service::ALL[(i + 1) % Service::ALL.len()];
        let broker = connect(&users.url(s.name()), s.name()).await;
        broker
            .declare_topology(&[], Default::default())
            .await
            .unwrap_or_else(|e| panic!("{} declares the topology: {e}", s.name()));
        consume(&broker, &command_queue(s.name()))
            .await
            .unwrap_or_else(|e| panic!("{s:?} reads its own queue: {e}"));
        assert_refused(
            &format!("{} consuming {}", s.name(), command_queue(other.name())),
            consume(&broker, &command_queue(other.name())).await,
        );
        assert_refused(
            &format!("{} consuming the orchestrator's replies", s.name()),
            consume(&broker, "orchestrator.replies").await,
        );
        // Sending commands (as the orchestrator does) is refused: no write on baton.commands.
        assert_refused(
            &format!("{} publishing to {COMMANDS}", s.name()),
            publish(&broker, &command(other.name())).await,
        );
        broker.close().await;
    }

    // The gateway may send the orchestrator a start command, but not read a service's queue.
    let gateway = connect(&users.url("gateway"), "gateway").await;
    publish(&gateway, &command("orchestrator")).await.expect("the gateway writes to baton.commands");
    assert_refused("gateway consuming records.commands", consume(&gateway, "records.commands").await);
    gateway.close().await;

    // Outcomes: only the orchestrator may publish on baton.outcomes, so no service can tell the
    // gateway how a saga ended.
    let outcome = || probe(OUTCOMES, "gateway.main", baton_protocol::START_REPLY);
    for s in Service::ALL {
        let broker = connect(&users.url(s.name()), s.name()).await;
        assert_refused(&format!("{} publishing to {OUTCOMES}", s.name()), publish(&broker, &outcome()).await);
        broker.close().await;
    }
    let gateway = connect(&users.url("gateway"), "gateway").await;
    assert_refused("the gateway publishing to its own outcomes", publish(&gateway, &outcome()).await);
    gateway.close().await;
    let orchestrator = connect(&users.url("orchestrator"), "orchestrator").await;
    publish(&orchestrator, &outcome()).await.expect("the orchestrator publishes an outcome");
    orchestrator.close().await;

    // Events: each service publishes its own event keys on baton.events (topic permissions), so
    // only the notifier can announce space.ready, and records may not speak for placement.
    let records = connect(&users.url("records"), "records").await;
    publish(&records, &event(events::CREATED)).await.expect("records publishes space.created");
    publish(&records, &event(events::REJECTED)).await.expect("records publishes space.rejected");
    assert_refused("records publishing space.ready", publish(&records, &event(events::READY)).await);
    assert_refused("records publishing space.placed", publish(&records, &event(events::PLACED)).await);
    assert_refused("records publishing space.requested", publish(&records, &event(events::REQUESTED)).await);
    records.close().await;
    for s in [Service::Placement, Service::Entitlements, Service::Routing] {
        let broker = connect(&users.url(s.name()), s.name()).await;
        publish(&broker, &event(s.done_event()))
            .await
            .unwrap_or_else(|e| panic!("{s} publishes {}: {e}", s.done_event()));
        assert_refused(&format!("{s} publishing space.ready"), publish(&broker, &event(events::READY)).await);
        broker.close().await;
    }
    let gateway = connect(&users.url("gateway"), "gateway").await;
    publish(&gateway, &event(events::REQUESTED)).await.expect("the gateway publishes space.requested");
    assert_refused("the gateway publishing space.ready", publish(&gateway, &event(events::READY)).await);
    gateway.close().await;
    let notifier = connect(&users.url("notifier"), "notifier").await;
    publish(&notifier, &event(events::READY)).await.expect("the notifier publishes space.ready");
    notifier.close().await;

    // baton.replies is direct, and write permission is per exchange, so the broker takes a
    // service's reply with any key: the orchestrator refuses one that is not from the step's
    // service (a_forged_reply_is_refused_by_the_orchestrator_...). Nothing of the gateway's is
    // bound there: a would-be outcome on baton.replies is returned unroutable.
    let records = connect(&users.url("records"), "records").await;
    let mut reply = command("records");
    reply.exchange = REPLIES.into();
    reply.routing_key = "orchestrator".into();
    publish(&records, &reply).await.expect("per-exchange permissions let records publish with any key");
    let forged = probe(REPLIES, "gateway.main", baton_protocol::START_REPLY);
    let err = publish(&records, &forged).await.expect_err("no gateway queue is bound to baton.replies");
    assert!(err.contains("unroutable"), "returned as unroutable: {err}");
    records.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_system_runs_with_one_user_per_component() {
    whole_system(Mode::Workflow).await;
}

/// The events mode under the topic permissions: every service publishes its own events only,
/// and that is all the flow needs, refusals included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_mode_runs_with_one_user_per_component() {
    whole_system(Mode::Events).await;
}

/// Hybrid mode on the imported topology: the orchestrator announces on a follow-up queue it
/// may not declare, and the search index, a user of its own, reads only its own queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hybrid_mode_runs_with_one_user_per_component() {
    whole_system(Mode::Hybrid).await;
}

fn system_of(mode: Mode) -> SystemConfig {
    let workflow = if mode == Mode::Hybrid { "create-space-hybrid" } else { "create-space" };
    SystemConfig {
        mode,
        workflow: workflow.into(),
        deadline: Duration::from_secs(20),
        ..SystemConfig::default()
    }
}

/// Wait until each of `services` holds the space `space_id`.
async fn held_by(env: &TestEnv, services: &[Service], space_id: &str) {
    for &s in services {
        let (at, id) = (env.store(), space_id.to_owned());
        wait_for(&format!("{s} to hold {space_id}"), WAIT, || {
            let (at, id) = (at.clone(), id.clone());
            async move {
                let n = tokio::task::spawn_blocking(move || rows_for(&at, s, &id)).await.ok()?;
                (n == 1).then_some(())
            }
        })
        .await;
    }
}

/// The components of `cfg.mode` but `skip`, each under its own user of `users`, in this process.
struct Running {
    api: Api,
    cancel: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    /// The config the services were started with (to start a skipped one later).
    cfg: SystemConfig,
}

impl Running {
    async fn start(env: &TestEnv, users: &Users, cfg: SystemConfig, skip: &[Service]) -> Running {
        let cancel = CancellationToken::new();
        let services: Vec<Service> =
            cfg.mode.services().iter().copied().filter(|s| !skip.contains(s)).collect();
        let mut running = Running {
            api: Api::new(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            cancel,
            tasks: JoinSet::new(),
            cfg,
        };
        for s in services {
            running.start_service(env, users, s);
        }
        let cfg = &running.cfg;
        if cfg.mode.runs_sagas() {
            let mut orchestrator = baton_tests::node_config(env, cfg).orchestrator_options();
            orchestrator.amqp_url = users.url("orchestrator").into();
            running.tasks.spawn(baton_orchestrator::run(orchestrator, running.cancel.clone()));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let gateway = baton_gateway::Options {
            amqp_url: users.url("gateway").into(),
            http,
            max_in_flight: 100,
            ..baton_tests::node_config(env, cfg).gateway_options()
        };
        running.tasks.spawn(baton_gateway::serve(listener, gateway, running.cancel.clone()));
        running.api = Api::new(http);
        running.api.wait_healthy().await;
        if let Some(Ok(Err(e))) = running.tasks.try_join_next() {
            panic!("a component stopped at start-up: {e:#}");
        }
        running
    }

    fn start_service(&mut self, env: &TestEnv, users: &Users, s: Service) {
        let mut opts = service_options(env, &self.cfg);
        opts.amqp_url = users.url(s.name()).into();
        self.tasks.spawn(baton_services::run(s, self.cfg.services.clone(), opts, self.cancel.clone()));
    }

    /// `POST /spaces` (a future of its own, so that it can wait in a task).
    fn create(&self, name: &str) -> impl std::future::Future<Output = (u16, Value)> + Send + 'static {
        let (api, name) = (self.api.clone(), name.to_owned());
        async move { api.create(&name, "ada").await }
    }

    /// Stop every component; each must have run cleanly.
    async fn stop(mut self) {
        self.cancel.cancel();
        let all = async {
            while let Some(r) = self.tasks.join_next().await {
                r.expect("component task").expect("component ran cleanly");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), all).await.expect("components stop within 20 s");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn whole_system(mode: Mode) {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;

    let running = Running::start(&env, &users, system_of(mode), &[]).await;
    let client = client();
    let (status, body) = running.create("least-privilege").await;
    assert_eq!(status, 200, "{mode}: {body}");
    let space_id = body["id"].as_str().expect("the space's id").to_owned();
    // A refusal at routing: in events mode routing emits space.rejected, which its user may.
    let (status, body) = running.create("admin").await;
    assert_eq!((status, body["step"].as_str()), (409, Some("routing")), "{mode}: {body}");

    // Every component connected as its own user (the management API lists connections after
    // its next statistics round, hence the wait).
    let conns = format!("{}/api/vhosts/{}/connections", mgmt_base(), env.vhost);
    let users_seen: Vec<String> = wait_for("the components' connections in the management API", WAIT, || {
        let (c, url) = (client.clone(), conns.clone());
        async move {
            let list: Value =
                c.get(url).basic_auth("guest", Some("guest")).send().await.ok()?.json().await.ok()?;
            let users: Vec<String> =
                list.as_array()?.iter().filter_map(|c| c["user"].as_str().map(str::to_owned)).collect();
            (users.len() >= baton_protocol::Component::of_mode(mode).count()).then_some(users)
        }
    })
    .await;
    assert!(users_seen.iter().all(|u| u != "guest"), "no component runs as guest: {users_seen:?}");
    for component in baton_protocol::Component::of_mode(mode) {
        assert!(
            users_seen.iter().any(|u| u.ends_with(&format!("-{component}"))),
            "{component} connected: {users_seen:?}"
        );
    }

    // Hybrid mode answers before its follow-ups: the space is complete once both heard of it.
    if mode == Mode::Hybrid {
        held_by(&env, &Service::FOLLOW_UPS, &space_id).await;
    }
    running.stop().await;
    // Workflow mode rolls the refusal back; events mode leaves the steps before routing behind,
    // by design (reconcile's job), so only the space that succeeded is checked there.
    let report = env.audit();
    if mode.runs_sagas() {
        assert!(report.is_consistent(), "the audit is clean: {:?}", report.inconsistencies);
        assert!(report.uncertain.is_empty(), "no 504 expected: {:?}", report.uncertain);
    }
    if mode == Mode::Events {
        for s in Service::ALL {
            assert_eq!(rows_for(&env.store(), s, &space_id), 1, "{s} holds the space that succeeded");
        }
    }
}

/// `broker/definitions.json`, what an operator imports, is the topology the components declare:
/// the five exchanges, every queue of instance `main` and of hybrid mode's follow-ups with its
/// dead-letter queue, and their bindings; the gateway's outcomes come on baton.outcomes, none of
/// its queues on baton.replies.
#[test]
fn the_definitions_are_the_declared_topology() {
    let defs: Value = serde_json::from_str(DEFINITIONS).expect("broker/definitions.json is JSON");
    let names = |key: &str| -> Vec<String> {
        let mut v: Vec<String> =
            defs[key].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_owned()).collect();
        v.sort();
        v
    };
    let mut exchanges: Vec<String> =
        [topology::COMMANDS, REPLIES, OUTCOMES, EVENTS, topology::DLX].map(String::from).to_vec();
    exchanges.sort();
    assert_eq!(names("exchanges"), exchanges);
    // Hybrid mode's follow-up queues too: the orchestrator under its own user may not make them.
    let declared: Vec<_> =
        topology::all_queues("main").into_iter().chain(topology::followup_queues()).collect();
    let mut queues: Vec<String> =
        declared.iter().flat_map(|q| [q.name.clone(), topology::dead_letter_queue(&q.name)]).collect();
    queues.sort();
    assert_eq!(names("queues"), queues);
    let bindings: Vec<(String, String, String)> = defs["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap().to_owned();
            (s("source"), s("destination"), s("routing_key"))
        })
        .collect();
    for q in &declared {
        for key in &q.keys {
            let b = (q.exchange.to_owned(), q.name.clone(), key.clone());
            assert!(bindings.contains(&b), "definitions.json binds {b:?}");
        }
        let dlq = topology::dead_letter_queue(&q.name);
        assert!(bindings.contains(&(topology::DLX.into(), dlq.clone(), dlq)), "{} has its DLQ bound", q.name);
    }
    assert_eq!(bindings.len(), declared.iter().map(|q| q.keys.len() + 1).sum::<usize>(), "nothing more");
    assert!(
        bindings.iter().all(|(src, dst, _)| !(src == REPLIES && dst.starts_with("gateway."))),
        "no gateway queue on baton.replies: {bindings:?}"
    );
}

/// `scripts/broker-users.sh` against the local broker, on this test's vhost: it makes the users
/// with the permissions and topic permissions of `broker/permissions.json`, and a URL it wrote
/// connects, works, and is refused where it does not belong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_users_script_writes_urls_that_work_and_are_limited() {
    let has = |tool: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has("jq") || !has("curl") || !has("bash") {
        eprintln!("skipped: scripts/broker-users.sh needs bash, curl and jq; install them to run this test");
        return;
    }
    let env = TestEnv::new().await;
    let prefix = format!("baton-s{}-", &Uuid::new_v4().simple().to_string()[..10]);
    // The users the script will make, recorded first so that Drop deletes them whatever fails.
    let perms: Value = serde_json::from_str(PERMISSIONS).unwrap();
    let _users = Users {
        vhost: env.vhost.clone(),
        users: perms["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let c = p["component"].as_str().unwrap();
                (c.to_owned(), format!("{prefix}{c}"), String::new())
            })
            .collect(),
    };
    let out = tempfile::tempdir().unwrap();
    let base = amqp_base();
    let host = base.split_once("://").map_or(base.as_str(), |(_, r)| r);
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h).trim_end_matches('/');
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/broker-users.sh");
    let run = tokio::process::Command::new("bash")
        .arg(script)
        .args(["--vhost", &env.vhost, "--prefix", &prefix, "--amqp-host", host, "--out"])
        .arg(out.path())
        .env("BATON_MGMT_URL", mgmt_base())
        .output();
    let run = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the script ends").unwrap();
    assert!(
        run.status.success(),
        "scripts/broker-users.sh failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let file = out.path().join("records.url");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let url = std::fs::read_to_string(&file).unwrap();
    let url = url.trim();
    assert!(url.contains(&format!("{prefix}records:")), "{}", baton_amqp::redact(url));
    let records = connect(url, "records").await;
    records
        .declare_topology(&[], Default::default())
        .await
        .expect("records re-declares the imported topology");
    consume(&records, &command_queue("records")).await.expect("records consumes its queue");
    publish(&records, &event(events::CREATED)).await.expect("records publishes space.created");
    assert_refused("records publishing space.ready", publish(&records, &event(events::READY)).await);
    assert_refused(
        "records publishing an outcome",
        publish(&records, &probe(OUTCOMES, "gateway.main", baton_protocol::START_REPLY)).await,
    );
    assert_refused("records consuming placement.commands", consume(&records, "placement.commands").await);
    records.close().await;
    // The search index, a user of its own: its follow-up queue, and not the notifier's.
    let url = std::fs::read_to_string(out.path().join("search.url")).unwrap();
    let search = connect(url.trim(), "search").await;
    consume(&search, "search.followups").await.expect("search consumes its queue");
    assert_refused("search consuming notifier.followups", consume(&search, "notifier.followups").await);
    assert_refused("search publishing space.created", publish(&search, &event(events::CREATED)).await);
    search.close().await;
}

/// Look at the first message of `queue` and leave it there (the management API's get with
/// requeue): the command it holds.
async fn peek(env: &TestEnv, queue: &str) -> StepCommand {
    let r = client()
        .post(format!("{}/api/queues/{}/{queue}/get", mgmt_base(), env.vhost))
        .basic_auth("guest", Some("guest"))
        .json(&json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"}))
        .send()
        .await
        .expect("management API");
    let list: Value = r.json().await.expect("a JSON list");
    let payload = list[0]["payload"].as_str().unwrap_or_else(|| panic!("a message in {queue}: {list}"));
    serde_json::from_str(payload).expect("a JSON payload")
}

/// The reply routing would give to `cmd`, claiming to be routing by its `app_id`, whoever
/// publishes it: a route the real routing never made.
fn forged_reply(cmd: &StepCommand, app_id: &str) -> Outgoing {
    let body = StepReply {
        schema: SCHEMA,
        saga_id: cmd.saga_id,
        space_id: cmd.space_id,
        step: Service::Routing,
        action: Action::Do,
        attempt: cmd.attempt,
        index: cmd.index,
        outcome: Outcome::Done,
        status: None,
        reason: None,
        data: Context { route: Some("forged.example".into()), ..Default::default() },
    };
    let kind = baton_protocol::reply_type(Service::Routing.do_type());
    Outgoing::new(REPLIES, topology::ORCHESTRATOR, &kind, cmd.saga_id, app_id, TraceParent::new_root(), &body)
}

/// The one dead-lettered message of `queue`'s DLQ, once there: its reason.
async fn dead_reason_of(env: &TestEnv, queue: &str) -> String {
    let dlq = topology::dead_letter_queue(queue);
    wait_for(&format!("a message in {dlq}"), WAIT, || async {
        (env.queue_depth(&dlq).await == Some(1)).then_some(())
    })
    .await;
    let dead = env.take_messages(&dlq, 1).await;
    dead[0]["properties"]["headers"]["x-baton-dead-reason"].as_str().expect("a reason").to_owned()
}

/// Records' broker user sends the orchestrator routing's reply (with `app_id` routing) for a
/// saga that waits on routing: the broker takes it (records may write baton.replies), the
/// orchestrator dead-letters it, naming both users, and the client is answered only once the
/// real routing replied, with the real route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_reply_is_refused_by_the_orchestrator_and_the_saga_ends_by_the_real_one() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;
    let cfg = SystemConfig { deadline: Duration::from_secs(60), ..SystemConfig::default() };
    let mut running = Running::start(&env, &users, cfg, &[Service::Routing]).await;
    let request = tokio::spawn(running.create("forged-reply"));
    wait_for("the saga to wait on routing", WAIT, || async {
        (env.queue_depth("routing.commands").await == Some(1)).then_some(())
    })
    .await;
    let cmd = peek(&env, "routing.commands").await;

    let records = connect(&users.url("records"), "records").await;
    publish(&records, &forged_reply(&cmd, "routing")).await.expect("the broker takes records' reply");
    records.close().await;
    assert_eq!(
        dead_reason_of(&env, topology::ORCHESTRATOR_REPLIES).await,
        format!(
            "a `routing.route.reply` message came from records (broker user {}), but only routing \
             (broker user {}) may send it",
            users.name("records"),
            users.name("routing")
        )
    );
    assert!(!request.is_finished(), "the client is not answered on a forged reply");

    running.start_service(&env, &users, Service::Routing);
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("an answer within 30 s of routing's start")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let route = body["route"].as_str().expect("a route");
    assert_ne!(route, "forged.example", "the route is the real routing's: {body}");
    running.stop().await;
    let report = env.audit();
    assert!(
        report.inconsistencies.is_empty() && report.uncertain.is_empty(),
        "one route for the space, made by routing: {:?} {:?}",
        report.inconsistencies,
        report.uncertain
    );
}

/// Records' user forges the orchestrator's announcement. The broker refuses it on the
/// announcement's key (a topic permission), but a user that may configure its own queue can
/// still get a message there by dead-lettering: it redeclares its `records.events` (unused in
/// hybrid mode) to dead-letter onto baton.events with key `hybrid.space.created`, and the
/// broker keeps records' `user_id` on the way. Both follow-ups dead-letter that `space.created`,
/// naming both users, and do nothing for it; the real saga's announcement was followed up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_announcement_is_refused_by_the_follow_ups() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;
    let running = Running::start(&env, &users, system_of(Mode::Hybrid), &[]).await;
    let (status, body) = running.create("announced").await;
    assert_eq!(status, 200, "{body}");
    let real = body["id"].as_str().expect("the space's id").to_owned();
    held_by(&env, &Service::FOLLOW_UPS, &real).await;

    let records = connect(&users.url("records"), "records").await;
    let key = topology::announce_key(events::CREATED);
    let forged_space = Uuid::new_v4();
    let announcement = |exchange: &str, key: &str| {
        let body = baton_protocol::SpaceEvent {
            schema: SCHEMA,
            space_id: forged_space,
            context: Context { name: "forged".into(), owner: "mallory".into(), ..Default::default() },
            step: None,
            status: None,
            reason: None,
        };
        Outgoing::new(
            exchange,
            key,
            events::CREATED,
            forged_space,
            "orchestrator",
            TraceParent::new_root(),
            &body,
        )
        .mode("hybrid")
    };
    assert_refused(
        "records publishing on hybrid.space.created",
        publish(&records, &announcement(EVENTS, &key)).await,
    );
    // The detour: records.events, records' own, made to dead-letter every message at once onto
    // the announcement's key, and reached through baton.dlx, where records may publish.
    let ch = records.channel().await.unwrap();
    ch.queue_delete("records.events".into(), QueueDeleteOptions::default()).await.expect("its own queue");
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), lapin::types::AMQPValue::LongString(EVENTS.into()));
    args.insert("x-dead-letter-routing-key".into(), lapin::types::AMQPValue::LongString(key.as_str().into()));
    args.insert("x-message-ttl".into(), lapin::types::AMQPValue::LongInt(0));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("records.events".into(), durable, args).await.expect("records redeclares its own queue");
    ch.queue_bind(
        "records.events".into(),
        topology::DLX.into(),
        "records.events".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("records binds its own queue to baton.dlx");
    publish(&records, &announcement(topology::DLX, "records.events"))
        .await
        .expect("records may write baton.dlx");
    records.close().await;

    let reason = format!(
        "a `space.created` message came from records (broker user {}), but only orchestrator \
         (broker user {}) may send it",
        users.name("records"),
        users.name("orchestrator")
    );
    for follow_up in Service::FOLLOW_UPS {
        let queue = topology::followup_queue(follow_up.name()).name;
        assert_eq!(dead_reason_of(&env, &queue).await, reason, "{follow_up}");
        assert_eq!(rows_for(&env.store(), follow_up, &forged_space.to_string()), 0, "{follow_up}");
        assert_eq!(rows_for(&env.store(), follow_up, &real), 1, "{follow_up}");
    }
    running.stop().await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:?}", report.inconsistencies);
    assert_eq!((report.spaces, report.complete), (1, 1), "{report:?}");
}

/// A publisher cannot claim another broker user: records' connection sending a message whose
/// `user_id` is routing's closes the channel with PRECONDITION_FAILED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_user_id_is_refused_by_the_broker() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;
    let records = connect(&users.url("records"), "records").await;
    let ch = records.channel().await.expect("a channel");
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let cmd = StepCommand {
        schema: SCHEMA,
        saga_id: Uuid::new_v4(),
        space_id: Uuid::new_v4(),
        step: Service::Routing,
        action: Action::Do,
        attempt: 1,
        index: Some(3),
        context: Context::default(),
    };
    let msg = forged_reply(&cmd, "routing");
    let props = BasicProperties::default()
        .with_message_id(msg.message_id.to_string().into())
        .with_type(msg.kind.as_str().into())
        .with_app_id("routing".into())
        .with_user_id(users.name("routing").into());
    let sent = async {
        let confirm = ch
            .basic_publish(
                REPLIES.into(),
                topology::ORCHESTRATOR.into(),
                BasicPublishOptions::default(),
                msg.body.as_bytes(),
                props,
            )
            .await?;
        confirm.await
    };
    let err = tokio::time::timeout(WAIT, sent)
        .await
        .expect("a verdict within 15 s")
        .expect_err("a user_id of another user is refused");
    let err = err.to_string();
    assert!(err.contains("PRECONDITION_FAILED") && err.contains("user_id"), "{err}");
    assert_eq!(env.queue_depth(topology::ORCHESTRATOR_REPLIES).await, Some(0), "nothing reached it");
    records.close().await;
}

/// The binding detour is closed: records' user may not bind the orchestrator's command queue
/// to baton.events (where it may publish, so it could start a saga of its own), nor any other
/// component's queue anywhere, nor declare or delete one, nor bind its own event queue to an
/// event it does not react to. Each is refused with ACCESS_REFUSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_start_by_binding_is_refused_by_the_broker() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;
    let records = connect(&users.url("records"), "records").await;
    let bind = |queue: &'static str, exchange: &'static str, key: &'static str| {
        let records = records.clone();
        async move {
            let ch = records.channel().await.map_err(|e| e.to_string())?;
            let opts = QueueBindOptions::default();
            let bound = ch.queue_bind(queue.into(), exchange.into(), key.into(), opts, FieldTable::default());
            tokio::time::timeout(WAIT, bound).await.expect("an answer within 15 s").map_err(|e| e.to_string())
        }
    };
    assert_refused(
        "records binding orchestrator.commands to baton.events",
        bind("orchestrator.commands", EVENTS, events::CREATED).await,
    );
    assert_refused(
        "records binding placement.commands to baton.commands",
        bind("placement.commands", COMMANDS, "records").await,
    );
    assert_refused(
        "records binding its event queue to space.ready",
        bind("records.events", EVENTS, events::READY).await,
    );
    bind("records.events", EVENTS, events::REQUESTED)
        .await
        .expect("records binds its own queue to its trigger");
    let ch = records.channel().await.unwrap();
    let deleted = ch.queue_delete("orchestrator.commands".into(), QueueDeleteOptions::default()).await;
    assert_refused("records deleting orchestrator.commands", deleted.map_err(|e| e.to_string()));
    let ch = records.channel().await.unwrap();
    let declared = ch
        .queue_declare("orchestrator.commands".into(), QueueDeclareOptions::default(), FieldTable::default())
        .await;
    assert_refused("records declaring orchestrator.commands", declared.map_err(|e| e.to_string()));
    let ch = records.channel().await.unwrap();
    let deleted = ch.exchange_delete(EVENTS.into(), ExchangeDeleteOptions::default()).await;
    assert_refused("records deleting baton.events", deleted.map_err(|e| e.to_string()));
    // And so the one route it had: a space.created it may publish reaches no command queue.
    let mut start = event(events::CREATED);
    start.kind = baton_protocol::START.into();
    publish(&records, &start).await.expect("records may publish space.created");
    assert_eq!(env.queue_depth("orchestrator.commands").await, Some(0), "no start reached the orchestrator");
    records.close().await;
}

/// With one shared broker user (the demo's guest), the sender is known by its `app_id`: a
/// reply that says it comes from records is refused as routing's, and an outcome that does not
/// come from the orchestrator is refused by the gateway; the saga still ends by routing's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_user_a_reply_from_another_component_is_refused_by_name() {
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        skip: vec![Service::Routing],
        deadline: Duration::from_secs(60),
        ..Default::default()
    };
    let sys = baton_tests::System::start(&env, cfg).await;
    let api = sys.api();
    let request = tokio::spawn(async move { api.create("by-name", "ada").await });
    wait_for("the saga to wait on routing", WAIT, || async {
        (env.queue_depth("routing.commands").await == Some(1)).then_some(())
    })
    .await;
    let cmd = peek(&env, "routing.commands").await;
    let guest = env.broker().await;
    publish(&guest, &forged_reply(&cmd, "records")).await.expect("guest may publish anything");
    assert_eq!(
        dead_reason_of(&env, topology::ORCHESTRATOR_REPLIES).await,
        "a `routing.route.reply` message came from records (by its app_id), but only routing \
         (by app_id: the components share broker user guest) may send it"
    );
    let outcome = SagaOutcome {
        schema: SCHEMA,
        saga_id: cmd.saga_id,
        space_id: cmd.space_id,
        status: 200,
        space: None,
        error: None,
    };
    let forged = Outgoing::new(
        OUTCOMES,
        "gateway.main",
        baton_protocol::START_REPLY,
        cmd.saga_id,
        "records",
        TraceParent::new_root(),
        &outcome,
    );
    publish(&guest, &forged).await.expect("guest may publish an outcome");
    let reason = dead_reason_of(&env, "gateway.main.outcomes").await;
    assert!(reason.contains("came from records (by its app_id), but only orchestrator"), "{reason}");
    assert!(!request.is_finished(), "the client is not answered on a forged reply or outcome");
    guest.close().await;

    let routing = baton_tests::spawn_service(&env, Service::Routing, &SystemConfig::default());
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), request)
        .await
        .expect("an answer within 30 s of routing's start")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["route"].as_str(), Some("forged.example"), "{body}");
    routing.0.cancel();
    routing.1.await.unwrap().expect("routing ran cleanly");
    sys.stop().await;
}
