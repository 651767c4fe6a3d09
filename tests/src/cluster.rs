//! A three-node RabbitMQ cluster of one test, run by `scripts/cluster.sh` (the script users run,
//! so the test proves it too) with its own directory, node names and ports: it never touches
//! the shared broker, nor a cluster a user or another test runs. Drop stops it (SIGTERM, then
//! SIGKILL after 30 s) and removes its directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The nodes of the cluster.
pub const NODES: usize = 3;

/// How long one run of the script may take (starting three nodes and joining two of them takes
/// about 80 s on two busy cores).
const SCRIPT_PATIENCE: Duration = Duration::from_secs(240);

/// A cluster of one test: node `n` (1 to 3) is `<prefix><n>@localhost`.
pub struct Cluster {
    dir: tempfile::TempDir,
    prefix: String,
    /// AMQP, management and distribution ports of node 1; node `n` adds `n - 1`.
    amqp: u16,
    mgmt: u16,
    dist: u16,
    http: reqwest::Client,
    /// Nodes frozen by [`Cluster::freeze`]: their management API is not asked (it would not
    /// answer), and Drop lets them go on before stopping them.
    frozen: std::sync::Mutex<Vec<usize>>,
}

/// `scripts/cluster.sh`, found from this crate's directory.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// `count` consecutive ports free on 127.0.0.1, below the kernel's ephemeral range (where
/// [`crate::free_port`] and the other tests' listeners land), from a random start.
fn free_run(count: u16, taken: &[u16]) -> u16 {
    for _ in 0..200 {
        let seed = uuid::Uuid::new_v4().as_u128();
        let base = 20_000 + (seed % 12_000) as u16;
        let run = base..base + count;
        let free = run.clone().all(|p| {
            !taken.iter().any(|t| (*t..*t + count).contains(&p))
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no {count} consecutive free ports found between 20000 and 32000");
}

impl Cluster {
    /// Start the three nodes and join them (`scripts/cluster.sh start`).
    pub async fn start() -> Cluster {
        let amqp = free_run(NODES as u16, &[]);
        let mgmt = free_run(NODES as u16, &[amqp]);
        let dist = free_run(NODES as u16, &[amqp, mgmt]);
        let prefix = format!("baton-t{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            prefix,
            amqp,
            mgmt,
            dist,
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap(),
            frozen: std::sync::Mutex::new(Vec::new()),
        };
        let urls = cluster.script(&["start"]).await;
        assert_eq!(urls.trim(), cluster.urls(), "the script prints the AMQP_URL to use");
        cluster
    }

    /// Run `scripts/cluster.sh <args>` for this cluster, bounded; its stdout.
    pub async fn script(&self, args: &[&str]) -> String {
        let run = tokio::process::Command::new(script())
            .args(args)
            .env("BATON_CLUSTER_DIR", self.dir.path())
            .env("BATON_CLUSTER_NAME", &self.prefix)
            .env("BATON_CLUSTER_PORT", self.amqp.to_string())
            .env("BATON_CLUSTER_MGMT_PORT", self.mgmt.to_string())
            .env("BATON_CLUSTER_DIST_PORT", self.dist.to_string())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(SCRIPT_PATIENCE, run)
            .await
            .unwrap_or_else(|_| {
                panic!("scripts/cluster.sh {args:?} did not finish within {SCRIPT_PATIENCE:?}")
            })
            .expect("scripts/cluster.sh runs");
        assert!(
            out.status.success(),
            "scripts/cluster.sh {args:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The comma-separated URL list of the three nodes' default vhost, as guest.
    pub fn urls(&self) -> String {
        (1..=NODES)
            .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp + n as u16 - 1))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The Erlang name of node `n`.
    pub fn node(&self, n: usize) -> String {
        format!("{}{n}@localhost", self.prefix)
    }

    /// The number of the node named `name`.
    pub fn number(&self, name: &str) -> Option<usize> {
        (1..=NODES).find(|n| self.node(*n) == name)
    }

    /// SIGKILL node `n`, as a crash.
    pub async fn kill(&self, n: usize) {
        self.script(&["kill", &n.to_string()]).await;
    }

    /// Stop node `n` cleanly.
    pub async fn stop_node(&self, n: usize) {
        self.script(&["stop", &n.to_string()]).await;
    }

    /// SIGSTOP node `n`: its VM stops answering with its sockets open, as a stalled machine.
    pub async fn freeze(&self, n: usize) {
        self.script(&["freeze", &n.to_string()]).await;
        self.frozen.lock().unwrap().push(n);
    }

    /// SIGCONT node `n`.
    pub async fn thaw(&self, n: usize) {
        self.script(&["thaw", &n.to_string()]).await;
        self.frozen.lock().unwrap().retain(|f| *f != n);
    }

    /// Start the nodes that are down (the script's `start` is idempotent).
    pub async fn start_missing(&self) {
        self.script(&["start"]).await;
    }

    /// `GET /api<path>` from the first node not frozen whose management API answers.
    pub async fn mgmt_get(&self, path: &str) -> Option<Value> {
        let frozen = self.frozen.lock().unwrap().clone();
        for n in (1..=NODES).filter(|n| !frozen.contains(n)) {
            let url = format!("http://127.0.0.1:{}/api{path}", self.mgmt + n as u16 - 1);
            let Ok(r) = self.http.get(url).basic_auth("guest", Some("guest")).send().await else {
                continue;
            };
            if r.status().is_success()
                && let Ok(v) = r.json().await
            {
                return Some(v);
            }
        }
        None
    }

    /// The node (its number) that leads quorum queue `queue` of the default vhost.
    pub async fn leader(&self, queue: &str) -> Option<usize> {
        let q = self.mgmt_get(&format!("/queues/%2f/{queue}")).await?;
        self.number(q["leader"].as_str()?)
    }

    /// One line per queue of the default vhost (dead-letter queues only when they hold
    /// messages): its ready and unacked messages, consumers and leader. Printed when a test
    /// stops making progress, to show where the messages wait.
    pub async fn queue_snapshot(&self) -> String {
        let Some(qs) = self
            .mgmt_get("/queues/%2f?columns=name,messages_ready,messages_unacknowledged,consumers,leader")
            .await
        else {
            return "(no management API answers)".into();
        };
        let lines = qs.as_array().into_iter().flatten().filter_map(|q| {
            let n = |k: &str| q[k].as_u64().unwrap_or(0);
            let name = q["name"].as_str()?;
            let busy = n("messages_ready") + n("messages_unacknowledged") > 0;
            (busy || !name.ends_with(".dlq")).then(|| {
                format!(
                    "{name}: ready {} unacked {} consumers {} leader {}",
                    n("messages_ready"),
                    n("messages_unacknowledged"),
                    n("consumers"),
                    q["leader"].as_str().unwrap_or("?")
                )
            })
        });
        let all: Vec<String> = lines.collect();
        all.join("\n")
    }

    /// Quorum queues of the default vhost that do not have a member online on every node, with
    /// their members online; empty once the whole cluster serves every queue.
    pub async fn under_replicated(&self) -> Option<Vec<(String, Vec<String>)>> {
        let qs = self.mgmt_get("/queues/%2f?columns=name,type,members,online").await?;
        let short = qs.as_array()?.iter().filter(|q| q["type"] == "quorum").filter_map(|q| {
            let online: Vec<String> =
                q["online"].as_array()?.iter().filter_map(|m| m.as_str().map(str::to_owned)).collect();
            let full = q["members"].as_array()?.len() == NODES && online.len() == NODES;
            (!full).then(|| (q["name"].as_str().unwrap_or("?").to_owned(), online))
        });
        Some(short.collect())
    }

    /// Wait (bounded) until every quorum queue has a member online on each node.
    pub async fn wait_replicated(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let short = self.under_replicated().await;
            if short.as_ref().is_some_and(Vec::is_empty) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "after {timeout:?}, quorum queues still lack members online: {short:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn pids(&self) -> Vec<String> {
        (1..=NODES)
            .filter_map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("{}{n}/node.pid", self.prefix))).ok()
            })
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // rabbitmq-server stops a node cleanly on SIGTERM; all three at once, then whatever is
        // left is killed.
        let pids = self.pids();
        for p in &pids {
            let _ = std::process::Command::new("kill").args(["-CONT", p]).status();
        }
        let alive = |p: &String| {
            std::process::Command::new("kill")
                .args(["-0", p])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        for p in &pids {
            let _ = std::process::Command::new("kill").args(["-TERM", p]).status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while pids.iter().any(alive) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for p in pids.iter().filter(|p| alive(p)) {
            let _ = std::process::Command::new("kill").args(["-KILL", p]).status();
        }
    }
}
