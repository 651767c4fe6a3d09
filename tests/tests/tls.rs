//! `amqps://` against a RabbitMQ node of the test's own with a TLS listener and a certificate of
//! a CA made in the test (with `openssl`): trusted through `?cacertfile=`, a component declares
//! the topology and publishes with confirms; without it, the connection is refused with an
//! error that says what to do.
//!
//! The node is started from the installed server (`rabbitmq-server`, as a child process of the
//! test) with its own node name, ports, cookie, data, logs, config and plugins file, so it never
//! touches the shared broker the other tests use; Drop stops it (SIGTERM, then SIGKILL of its
//! process group after 30 s) and removes its directory.

use std::time::Duration;

use baton_amqp::topology::{COMMANDS, command_queue};
use baton_amqp::{AmqpError, Broker, Outgoing, Publisher, TraceParent, tls};
use baton_tests::node::Node;
use uuid::Uuid;

async fn connect(url: &str) -> Result<Broker, AmqpError> {
    tokio::time::timeout(Duration::from_secs(20), Broker::connect(url, "tls-test"))
        .await
        .expect("an answer within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_works_with_the_ca_and_is_refused_without_it() {
    baton_tests::init_logs();
    let node = tokio::task::spawn_blocking(Node::start_tls).await.unwrap();

    // Trusted through the URL: declare the topology and publish one message with confirms.
    let url = format!("{}?{}={}", node.url("localhost"), tls::CA_FILE_PARAM, node.ca());
    let broker = connect(&url).await.unwrap_or_else(|e| panic!("amqps with the CA: {e}"));
    broker.declare_topology(&[], Default::default()).await.expect("topology over TLS");
    let body = serde_json::json!({"schema": 1, "probe": "tls"});
    let msg = Outgoing::new(
        COMMANDS,
        "records",
        "records.probe",
        Uuid::new_v4(),
        "tls-test",
        TraceParent::new_root(),
        &body,
    );
    tokio::time::timeout(Duration::from_secs(15), Publisher::new(broker.clone()).publish_confirmed(&msg))
        .await
        .expect("a confirm within 15 s")
        .expect("the broker confirms over TLS");
    let ch = broker.channel().await.unwrap();
    let q = ch
        .queue_declare(
            command_queue("records").as_str().into(),
            lapin::options::QueueDeclareOptions { passive: true, ..Default::default() },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 1, "the message is in records.commands");
    broker.close().await;

    // The same node by IP address: the certificate lists 127.0.0.1 too.
    let by_ip = format!("{}?{}={}", node.url("127.0.0.1"), tls::CA_FILE_PARAM, node.ca());
    connect(&by_ip).await.unwrap_or_else(|e| panic!("amqps by IP with the CA: {e}")).close().await;

    // Without the CA the certificate is not trusted, and the error says what to do.
    if std::env::var_os(tls::CA_FILE_ENV).is_some() {
        eprintln!("{} is set in this environment; skipping the untrusted case", tls::CA_FILE_ENV);
        return;
    }
    let err = match connect(&node.url("localhost")).await {
        Ok(_) => panic!("amqps without the CA must be refused"),
        Err(e) => e.to_string(),
    };
    eprintln!("refused as expected: {err}");
    assert!(err.contains("certificate"), "{err}");
    assert!(err.contains(tls::CA_FILE_ENV), "the error names {}: {err}", tls::CA_FILE_ENV);
    assert!(!err.contains("guest:guest"), "the password is redacted: {err}");
}
