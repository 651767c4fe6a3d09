//! The component processes of one mode (`baton run <component>`), what they cost the machine
//! (CPU time and peak RSS from `/proc`), and the wait for them to be ready.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use tokio::process::{Child, Command};

/// What one component process cost, read just before it was stopped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ComponentUsage {
    pub component: String,
    pub pid: u32,
    /// User plus system CPU time over the whole mode (start-up, every run, the settling).
    pub cpu_ms: f64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_kb: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time (user + system, ms) of a process: `self` or a pid.
pub(crate) fn cpu_ms(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last `)`.
    // There the state is field 3 of stat(5), so utime (14) and stime (15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 * 1000.0 / clock_ticks())
}

/// Peak RSS (VmHWM, kB) of a process.
fn peak_rss_kb(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The components of one mode, each its own process, with its log in `<dir>/<component>.log`.
pub(crate) struct Fleet {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Fleet {
    /// Start `baton run <component> <args>` for each component.
    pub(crate) fn start(
        bin: &Path,
        args: &[String],
        dir: &Path,
        components: &[&str],
    ) -> anyhow::Result<Fleet> {
        let mut fleet = Fleet { dir: dir.to_owned(), children: Vec::new() };
        for c in components {
            let log =
                std::fs::File::create(dir.join(format!("{c}.log"))).context("creating a component log")?;
            let child = Command::new(bin)
                .arg("run")
                .arg(c)
                .args(args)
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting `{} run {c}`", bin.display()))?;
            fleet.children.push(((*c).to_owned(), child));
        }
        Ok(fleet)
    }

    /// Fail, naming the log to read, if a component has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "component {name} exited ({status}) during the bench; see {}",
                    self.dir.join(format!("{name}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// The last `n` lines of every component's log, for an error message: a test that fails on
    /// CI has only what it printed.
    pub(crate) fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            if !tail.is_empty() {
                out.push_str(&format!("\n--- {name}.log (last {} lines)\n{}", tail.len(), tail.join("\n")));
            }
        }
        out
    }

    /// Total CPU time of the components so far, in ms.
    pub(crate) fn cpu_ms(&self) -> f64 {
        self.children.iter().filter_map(|(_, c)| c.id()).filter_map(|pid| cpu_ms(&pid.to_string())).sum()
    }

    /// CPU time and peak RSS of each component now.
    pub(crate) fn usage(&self) -> Vec<ComponentUsage> {
        self.children
            .iter()
            .filter_map(|(name, c)| {
                let pid = c.id()?;
                Some(ComponentUsage {
                    component: name.clone(),
                    pid,
                    cpu_ms: cpu_ms(&pid.to_string()).unwrap_or(0.0),
                    peak_rss_kb: peak_rss_kb(&pid.to_string()).unwrap_or(0),
                })
            })
            .collect()
    }

    /// SIGTERM every component, then SIGKILL what is still there after 10 s.
    pub(crate) async fn stop(self) {
        for (_, c) in &self.children {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            }
        }
        for (name, mut c) in self.children {
            if tokio::time::timeout(Duration::from_secs(10), c.wait()).await.is_err() {
                tracing::warn!(component = %name, "did not stop within 10 s; killing it");
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}

/// A free TCP port on localhost, for the gateway.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Wait until the gateway answers `/health` and every queue of `queues` has a consumer: then
/// every component is up and taking work.
pub(crate) async fn wait_ready(
    gateway: &str,
    amqp_url: &str,
    queues: &[String],
    fleet: &mut Fleet,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    loop {
        fleet.check_alive()?;
        if let Ok(r) = client.get(format!("{gateway}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway at {gateway} was not healthy within {timeout:?}; see the logs in {}",
                fleet.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let broker = baton_amqp::Broker::connect(amqp_url, "bench probe").await?;
    let mut waiting_for = String::new();
    let ready = loop {
        fleet.check_alive()?;
        match unconsumed(&broker, queues).await {
            Ok(None) => break true,
            Ok(Some(q)) => waiting_for = format!("a consumer on {q}"),
            // A queue not declared yet closes the channel; the next try opens another.
            Err(e) => waiting_for = e,
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    broker.close().await;
    if !ready {
        bail!(
            "waited {timeout:?} for {waiting_for}; see the logs in {}{}",
            fleet.dir.display(),
            fleet.log_tails(20)
        );
    }
    Ok(())
}

/// The first queue of `queues` that has no consumer yet, if any.
async fn unconsumed(broker: &baton_amqp::Broker, queues: &[String]) -> Result<Option<String>, String> {
    let ch = broker.channel().await.map_err(|e| e.to_string())?;
    let mut found = None;
    for q in queues {
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let info = ch
            .queue_declare(q.as_str().into(), opts, FieldTable::default())
            .await
            .map_err(|e| format!("queue {q} ({e})"))?;
        if info.consumer_count() == 0 {
            found = Some(q.clone());
            break;
        }
    }
    let _ = ch.close(200, "probed".into()).await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time() {
        // Burn a little CPU so that at least one tick shows.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_ms("self").is_some_and(|ms| ms > 0.0));
        assert!(peak_rss_kb("self").is_some_and(|kb| kb > 0));
    }
}
