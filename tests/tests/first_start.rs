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
        ("BATON_MGMT_PASSWORD", "s3cret-mgmt", &["compare", "-h"][..]),
        ("BATON_MGMT_PASSWORD", "s3cret-mgmt", &["chaos", "--help"]),
        ("BATON_MGMT_PASSWORD", "s3cret-mgmt", &["up", "--help"]),
        ("AMQP_URL", "amqp://u:s3cret-amqp@127.0.0.1:5672/v", &["up", "--help"]),
        ("AMQP_URL", "amqp://u:s3cret-amqp@127.0.0.1:5672/v", &["run", "records", "--help"]),
        ("AMQP_URL", "amqp://u:s3cret-amqp@127.0.0.1:5672/v", &["run", "gateway", "--help"]),
    ] {
        let out = tokio::process::Command::new(baton_bin()).env(var, value).args(args).output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("help is quick").unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && help.contains(var), "{args:?}: {help}");
        assert!(!help.contains("s3cret"), "{args:?} printed {var}'s value: {help}");
    }
}

/// `baton up` against a port where no broker listens, with the given log settings: what it
/// printed before it gave up.
async fn up_against_nothing(rust_log: &str, flag: Option<&str>) -> String {
    let nothing = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(baton_bin());
    cmd.env("RUST_LOG", rust_log);
    if let Some(f) = flag {
        cmd.args(["--log", f]);
    }
    cmd.args(["up", "--http", "127.0.0.1:0", "--amqp-url"])
        .arg(format!("amqp://guest:guest@{nothing}/%2f"))
        .arg("--data-dir")
        .arg(data.path())
        .kill_on_drop(true);
    let out =
        tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("it gives up").unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn the_log_flag_beats_rust_log_and_a_bad_filter_is_a_usage_error() {
    // RUST_LOG alone is obeyed (so the next check can fail) ...
    let env_only = up_against_nothing("debug", None).await;
    assert!(env_only.contains(" DEBUG "), "{env_only}");
    // ... and the flag beats it.
    let flag = up_against_nothing("debug", Some("error")).await;
    assert!(!flag.contains(" DEBUG ") && !flag.contains(" INFO "), "{flag}");
    assert!(flag.contains("could not reach RabbitMQ"), "{flag}");
    let out =
        tokio::process::Command::new(baton_bin()).args(["--log", "info,[", "audit"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a log filter"));
}

#[tokio::test]
async fn a_saga_state_that_does_not_exist_is_a_usage_error_not_an_empty_list() {
    let data = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(baton_bin())
        .args(["workflows", "list", "--state", "rolledback", "--data-dir"])
        .arg(data.path())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("quick").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("rolledback") && err.contains("rolled_back"),
        "names the typo and the real states: {err}"
    );
}

#[tokio::test]
async fn completions_are_generated_for_the_shells() {
    for shell in ["bash", "zsh", "fish"] {
        let out = tokio::process::Command::new(baton_bin()).args(["completions", shell]).output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("quick").unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        // Every subcommand is offered.
        for sub in ["up", "compare", "workflows", "dlq", "audit"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
}

#[tokio::test]
async fn a_command_that_cannot_run_exits_2_and_one_that_finds_problems_exits_1() {
    // Could not run: the data dir holds no databases to audit.
    let empty = tempfile::tempdir().unwrap();
    let nothing = empty.path().join("nothing-here");
    let out = tokio::process::Command::new(baton_bin()).args(["audit", "--data-dir"]).arg(&nothing).output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("quick").unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let help = tokio::process::Command::new(baton_bin()).arg("--help").output().await.unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout)
            .contains("Exit codes: 0 ok; 1 the command ran and found problems")
    );
}

#[tokio::test]
async fn completions_into_a_pipe_closed_early_do_not_panic() {
    let mut child = tokio::process::Command::new(baton_bin())
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the script is written (the child is still starting), as
    // `| head -1` would once it has its line: the write fails with a broken pipe.
    drop(child.stdout.take());
    let out =
        tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await.expect("ends").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

#[tokio::test]
async fn run_refuses_a_flag_its_component_does_not_use() {
    for args in
        [&["run", "records", "--http", "127.0.0.1:9"][..], &["run", "orchestrator", "--workflow", "x"]]
    {
        let out = tokio::process::Command::new(baton_bin()).args(args).output();
        let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("refused at once").unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} is a usage error: {err}");
        assert!(err.contains("unexpected argument"), "{args:?}: {err}");
    }
}
