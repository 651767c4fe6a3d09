//! Least privilege on the real broker: each component connects as its own RabbitMQ user with the
//! permissions of `broker/permissions.json` (what `scripts/broker-users.sh` applies), can do its
//! work, and is refused where it does not belong.
//!
//! The users are made per test with unique names on the test's vhost, and deleted on drop (also
//! when the test fails).

use std::time::Duration;

use baton_amqp::topology::{COMMANDS, REPLIES, command_queue};
use baton_amqp::{Broker, Outgoing, Publisher, TraceParent};
use baton_protocol::{Mode, Service};
use baton_tests::{
    SystemConfig, TestEnv, amqp_base, mgmt_base, orchestrator_options, service_options, wait_for,
};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use serde_json::Value;
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
            let r = http
                .put(format!("{}/api/users/{name}", mgmt_base()))
                .basic_auth("guest", Some("guest"))
                .json(&serde_json::json!({"password": password, "tags": ""}))
                .send()
                .await
                .expect("management API");
            assert!(r.status().is_success(), "creating user {name}: {}", r.status());
            let body =
                serde_json::json!({"configure": p["configure"], "write": p["write"], "read": p["read"]});
            let r = http
                .put(format!("{}/api/permissions/{}/{name}", mgmt_base(), env.vhost))
                .basic_auth("guest", Some("guest"))
                .json(&body)
                .send()
                .await
                .expect("management API");
            assert!(r.status().is_success(), "permissions of {name}: {}", r.status());
        }
        users
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
    let body = serde_json::json!({"schema": 1, "probe": true});
    Outgoing::new(
        COMMANDS,
        to,
        &format!("{to}.probe"),
        Uuid::new_v4(),
        "privilege-test",
        TraceParent::new_root(),
        &body,
    )
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
    let err =
        records.declare_topology(&[]).await.expect_err("creating placement's queues is refused").to_string();
    assert!(err.contains("ACCESS_REFUSED"), "{err}");
    import_topology(&env).await;

    let records = connect(&users.url("records"), "records").await;
    records.declare_topology(&[]).await.expect("records re-declares the topology");
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
            .declare_topology(&[])
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
            consume(&broker, "orchestrator.main.replies").await,
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

    // The documented limit: write permission is per exchange, not per routing key, so a service
    // may publish on baton.replies with any key, the orchestrator's included.
    let records = connect(&users.url("records"), "records").await;
    let mut reply = command("records");
    reply.exchange = REPLIES.into();
    reply.routing_key = "orchestrator.main".into();
    publish(&records, &reply).await.expect("per-exchange permissions let records reply with any key");
    records.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_system_runs_with_one_user_per_component() {
    let env = TestEnv::new().await;
    let users = Users::create(&env).await;
    import_topology(&env).await;

    let cfg = SystemConfig::default();
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for s in Service::ALL {
        let mut opts = service_options(&env, &cfg);
        opts.amqp_url = users.url(s.name());
        tasks.spawn(baton_services::run(s, cfg.services.clone(), opts, cancel.clone()));
    }
    let mut orchestrator = orchestrator_options(&env, &cfg.workflows);
    orchestrator.amqp_url = users.url("orchestrator");
    tasks.spawn(baton_orchestrator::run(orchestrator, cancel.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let gateway = baton_gateway::Options {
        amqp_url: users.url("gateway"),
        data_dir: env.data_dir().to_owned(),
        http,
        mode: Mode::Workflow,
        instance: "main".into(),
        workflow: cfg.workflow.clone(),
        deadline: cfg.deadline,
        max_in_flight: 100,
    };
    tasks.spawn(baton_gateway::serve(listener, gateway, cancel.clone()));

    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let health = format!("http://{http}/health");
    wait_for("the gateway's /health", Duration::from_secs(20), || {
        let (c, url) = (client.clone(), health.clone());
        async move { c.get(url).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await;
    if let Some(Ok(Err(e))) = tasks.try_join_next() {
        panic!("a component stopped at start-up: {e:#}");
    }

    let r = client
        .post(format!("http://{http}/spaces"))
        .json(&serde_json::json!({"name": "least-privilege", "owner": "ada"}))
        .send()
        .await
        .expect("POST /spaces");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{body}");

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
            (users.len() >= 7).then_some(users)
        }
    })
    .await;
    assert!(users_seen.iter().all(|u| u != "guest"), "no component runs as guest: {users_seen:?}");
    for component in
        ["records", "placement", "entitlements", "routing", "notifier", "orchestrator", "gateway"]
    {
        assert!(
            users_seen.iter().any(|u| u.ends_with(&format!("-{component}"))),
            "{component} connected: {users_seen:?}"
        );
    }

    cancel.cancel();
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.expect("component task").expect("component ran cleanly");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), all).await.expect("components stop within 20 s");
    assert!(env.audit().violations.is_empty(), "the audit is clean");
}
