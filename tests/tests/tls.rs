//! `amqps://` against a RabbitMQ node of the test's own with a TLS listener and a certificate of
//! a CA made in the test (with `openssl`): trusted through `?cacertfile=`, a component declares
//! the topology and publishes with confirms; without it, the connection is refused with an
//! error that says what to do.
//!
//! The node is started from the installed server (`rabbitmq-server`, as a child process of the
//! test) with its own node name, ports, cookie, data, logs, config and plugins file, so it never
//! touches the shared broker the other tests use; Drop stops it (SIGTERM, then SIGKILL of its
//! process group after 30 s) and removes its directory.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_amqp::topology::{COMMANDS, command_queue};
use baton_amqp::{AmqpError, Broker, Outgoing, Publisher, TraceParent, tls};
use uuid::Uuid;

/// The server script without Debian's wrapper (which switches to the `rabbitmq` user and its
/// home, hence its cookie and directories); any other install: `rabbitmq-server` on the PATH.
fn server_script() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.exists() { debian.to_owned() } else { PathBuf::from("rabbitmq-server") }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run(dir: &Path, cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, and a server certificate it signed for `localhost` and 127.0.0.1.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca =
        vec!["req", "-x509", "-days", "2", "-subj", "/CN=Baton test CA", "-keyout", "ca.key", "-out"];
    ca.extend([
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    ca.extend(ec);
    run(dir, "openssl", &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr"];
    csr.extend(ec);
    run(dir, "openssl", &csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(
        dir,
        "openssl",
        &["x509", "-req", "-days", "2", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key"]
            .into_iter()
            .chain(["-CAcreateserial", "-extfile", "server.ext", "-out", "server.pem"])
            .collect::<Vec<_>>(),
    );
}

/// A RabbitMQ node of this test, with only a TLS listener.
struct TlsNode {
    dir: tempfile::TempDir,
    child: Child,
    name: String,
    port: u16,
}

impl TlsNode {
    fn start() -> TlsNode {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        make_certificates(d);
        let port = free_port();
        let dist_port = free_port();
        let name = format!("baton-tls-{}@localhost", &Uuid::new_v4().simple().to_string()[..10]);
        let p = |f: &str| d.join(f).display().to_string();
        let conf = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             max_message_size = 1048576\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key"),
        );
        std::fs::write(d.join("rabbitmq.conf"), conf).unwrap();
        std::fs::write(d.join("enabled_plugins"), "[].\n").unwrap();
        // An env file of our own, so that /etc/rabbitmq/rabbitmq-env.conf (NODENAME...) is not read.
        std::fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::create_dir_all(d.join("home")).unwrap();
        let child = Command::new(server_script())
            .current_dir(d)
            // Its own home: Erlang makes a fresh cookie there, nothing is shared with the
            // node the other tests use.
            .env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", p("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", p("mnesia"))
            .env("RABBITMQ_LOG_BASE", p("log"))
            .env("RABBITMQ_PID_FILE", p("node.pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can kill whatever is left of it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", server_script().display()));
        let mut node = TlsNode { dir, child, name, port };
        node.wait_for_listener(Duration::from_secs(60));
        node
    }

    fn wait_for_listener(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "RabbitMQ node {} exited ({status}) before listening; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "RabbitMQ node {} not listening on {} after {timeout:?}; its log:\n{}",
                    self.name,
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("== {}\n", e.path().display()));
                out.extend(tail.into_iter().rev().map(|l| format!("{l}\n")));
            }
        }
        out
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    fn url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.port)
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        // rabbitmq-server traps SIGTERM and stops the node cleanly.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the group (the VM, if the script died first; erl_child_setup).
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}

async fn connect(url: &str) -> Result<Broker, AmqpError> {
    tokio::time::timeout(Duration::from_secs(20), Broker::connect(url, "tls-test"))
        .await
        .expect("an answer within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_works_with_the_ca_and_is_refused_without_it() {
    baton_tests::init_logs();
    let node = tokio::task::spawn_blocking(TlsNode::start).await.unwrap();

    // Trusted through the URL: declare the topology and publish one message with confirms.
    let url = format!("{}?{}={}", node.url("localhost"), tls::CA_FILE_PARAM, node.ca());
    let broker = connect(&url).await.unwrap_or_else(|e| panic!("amqps with the CA: {e}"));
    broker.declare_topology(&[]).await.expect("topology over TLS");
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
