//! A RabbitMQ node of a test's own, for tests that stop the broker, raise its alarms or need a
//! TLS listener: started from the installed server with its own node name, ports, cookie, data,
//! logs, config and plugins file, so it never touches the shared broker the other tests use.
//! Drop stops it (SIGTERM, then SIGKILL of its process group after 30 s) and removes its dir.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::free_port;

/// The server script without Debian's wrapper (which switches to the `rabbitmq` user and its
/// home, hence its cookie and directories); any other install: `rabbitmq-server` on the PATH.
fn server_script() -> PathBuf {
    let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    if debian.exists() { debian.to_owned() } else { PathBuf::from("rabbitmq-server") }
}

fn run(dir: &Path, cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, and a server certificate it signed for `localhost` and 127.0.0.1.
pub fn make_certificates(dir: &Path) {
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

/// A RabbitMQ node of one test.
pub struct Node {
    dir: tempfile::TempDir,
    child: Child,
    pub name: String,
    pub port: u16,
    pub tls: bool,
    /// The management API's port, when the node runs it.
    pub mgmt_port: Option<u16>,
}

impl Node {
    /// A node with a plain AMQP listener on a free port.
    pub fn start() -> Node {
        Node::launch(false, false)
    }

    /// A node with a plain AMQP listener and the management API (UI and HTTP API).
    pub fn start_with_management() -> Node {
        Node::launch(false, true)
    }

    /// A node with only a TLS listener, its certificate signed by a CA made here ([`Node::ca`]).
    pub fn start_tls() -> Node {
        Node::launch(true, false)
    }

    fn launch(tls: bool, management: bool) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let dist_port = free_port();
        let name = format!("baton-tls-{}@localhost", &Uuid::new_v4().simple().to_string()[..10]);
        let p = |f: &str| d.join(f).display().to_string();
        let conf = if tls {
            make_certificates(d);
            format!(
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
            )
        } else {
            format!(
                "listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\nmax_message_size = 1048576\n"
            )
        };
        let mgmt_port = management.then(free_port);
        let conf = match mgmt_port {
            Some(p) => format!("{conf}management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {p}\n"),
            None => conf,
        };
        std::fs::write(d.join("rabbitmq.conf"), conf).unwrap();
        let plugins = if management { "[rabbitmq_management].\n" } else { "[].\n" };
        std::fs::write(d.join("enabled_plugins"), plugins).unwrap();
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
        let mut node = Node { dir, child, name, port, tls, mgmt_port };
        node.wait_for_listener(Duration::from_secs(60));
        if let Some(p) = mgmt_port {
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the management API of {} did not listen on {p}",
                    node.name
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        node
    }

    /// Wait until the node accepts connections on its port.
    pub fn wait_for_listener(&mut self, timeout: Duration) {
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

    pub fn log(&self) -> String {
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

    /// The PEM of the CA that signed the TLS listener's certificate.
    pub fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    /// The node's default vhost as guest, through `host`.
    pub fn url(&self, host: &str) -> String {
        let scheme = if self.tls { "amqps" } else { "amqp" };
        format!("{scheme}://guest:guest@{host}:{}/%2f", self.port)
    }

    /// The command that runs `rabbitmqctl` against this node (its own home, hence cookie).
    pub fn ctl_command(&self) -> Vec<String> {
        let d = self.dir.path();
        vec![
            "env".into(),
            format!("HOME={}", d.join("home").display()),
            format!("RABBITMQ_CONF_ENV_FILE={}", d.join("rabbitmq-env.conf").display()),
            server_script().with_file_name("rabbitmqctl").display().to_string(),
            "-n".into(),
            self.name.clone(),
        ]
    }

    /// Run `rabbitmqctl <args>` against this node; panics with its output if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let d = self.dir.path();
        let ctl = server_script().with_file_name("rabbitmqctl");
        let out = Command::new(ctl)
            .current_dir(d)
            .env("HOME", d.join("home"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // rabbitmq-server traps SIGTERM and stops the node cleanly.
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let _ = crate::signal(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Whatever is left of the group (the VM, if the script died first; erl_child_setup).
        let _ = crate::signal(-pid, rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }
}
