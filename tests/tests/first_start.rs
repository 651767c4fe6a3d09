//! What a new user meets when starting Baton beside a running one.

use std::time::Duration;

use baton_tests::baton_bin;

#[tokio::test]
async fn up_on_a_taken_port_says_so_before_starting_anything() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // A broker address where nothing listens: had any service started first, the error would be
    // about the broker instead.
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(baton_bin())
        .args(["up", "--mode", "events", "--http", &addr.to_string(), "--amqp-url"])
        .arg(format!("amqp://guest:guest@{nothing}/%2f"))
        .arg("--data-dir")
        .arg(data.path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run).await.expect("it ends at once").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("{addr} is already in use")) && err.contains("--http"), "{err}");
    assert!(!err.contains("RabbitMQ"), "nothing tried the broker first: {err}");
}

#[tokio::test]
async fn help_never_prints_a_secret_from_the_environment() {
    for (var, value, args) in [
        ("BATON_MGMT_PASSWORD", "s3cret-mgmt", ["compare", "-h"]),
        ("BATON_MGMT_PASSWORD", "s3cret-mgmt", ["chaos", "--help"]),
        ("AMQP_URL", "amqp://u:s3cret-amqp@127.0.0.1:5672/v", ["up", "--help"]),
        ("AMQP_URL", "amqp://u:s3cret-amqp@127.0.0.1:5672/v", ["run", "--help"]),
    ] {
        let out = tokio::process::Command::new(baton_bin()).env(var, value).args(args).output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("help is quick").unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && help.contains(var), "{args:?}: {help}");
        assert!(!help.contains("s3cret"), "{args:?} printed {var}'s value: {help}");
    }
}
