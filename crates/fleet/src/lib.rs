//! The component processes of one run: `baton run <component>` children of the bench or of a
//! comparison, each with its log in the run's dir.
//!
//! Owns: spawning them (several processes of one component too, each with its own
//! `--instance`), a crash (SIGKILL: no cleanup, no flush) and the restart after it, the
//! supervision that starts again a process that exited on its own (and gives up, loudly, on one
//! that keeps exiting), the graceful
//! stop (SIGTERM, then SIGKILL after 10 s), the check that none died on its own, the wait until
//! they are ready (the gateway answers `/health`, every work queue has its consumers), the tails
//! of their logs for an error message, and what each cost from `/proc` (CPU time, RSS now and at
//! its peak), and the one [`FaultDriver`] that crashes them, drops their connections and
//! restarts their broker at a plan's points.
//!
//! Must not touch: component internals, the load, the figures. It runs the components from the
//! outside, as an operator would, and reports what `/proc` says; callers decide what it means.
//!
//! Layout: this file ([`Fleet`], [`Process`], [`FleetError`]), `driver` ([`FaultDriver`]),
//! `ready` (the readiness waits), `usage` ([`ComponentUsage`], `/proc`).

pub mod driver;
mod ready;
mod usage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub use driver::{Fault, FaultDriver, Hooks, Injected, Injection, OnCount, Reach, Window};
pub use usage::{ComponentUsage, cpu_ms, peak_rss_kb, rss_kb};

/// How long a graceful stop waits for each process before it kills it.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Why the fleet could not do what was asked; every variant ends the run, with a sentence that
/// says where to look.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot open the component log {}: {source}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start `{} run {component}`: {source}", bin.display())]
    Spawn {
        bin: PathBuf,
        component: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tell whether component {name} is still running: {source}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("component {name} exited ({status}) before the run ended; see {}{tail}", log.display())]
    Exited { name: String, status: std::process::ExitStatus, log: PathBuf, tail: String },
    #[error(
        "component {name} exited on its own {starts} times in a row ({status}, the last time); \
         the run gave up on it. Its log says why: {}{tail}",
        log.display()
    )]
    GaveUp { name: String, starts: u32, status: std::process::ExitStatus, log: PathBuf, tail: String },
    #[error("waited {timeout:?} for {waiting_for}; see the logs in {}{tails}", dir.display())]
    NotReady { timeout: Duration, waiting_for: String, dir: PathBuf, tails: String },
    #[error("cannot make the HTTP client of the health probe: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the readiness probe could not use the broker: {0}")]
    Broker(#[from] baton_amqp::AmqpError),
}

/// `records`, or `records-i2`.
fn process_name(component: &str, instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("{component}-{i}"),
        None => component.to_owned(),
    }
}

/// One process of the fleet: `baton run <component>`, with `--instance <instance>` when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub component: String,
    pub instance: Option<String>,
    /// Environment variables of its own (libfaketime's, for a clock fault), kept across restarts.
    pub env: Vec<(String, String)>,
}

impl Process {
    /// The only process of `component`, under its default instance.
    pub fn new(component: impl Into<String>) -> Process {
        Process { component: component.into(), instance: None, env: Vec::new() }
    }

    /// One of several processes of `component`, run as `--instance <instance>`.
    pub fn instance(component: impl Into<String>, instance: impl Into<String>) -> Process {
        Process { component: component.into(), instance: Some(instance.into()), env: Vec::new() }
    }

    /// This process with `env` added to its environment.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Process {
        self.env.extend(env);
        self
    }

    /// `records`, or `records-i2` for an instance: its name in the fleet, and its log's
    /// (`<name>.log`).
    pub fn name(&self) -> String {
        process_name(&self.component, self.instance.as_deref())
    }
}

/// A process of the fleet, and its child while it runs (none after a crash, until restarted).
struct Member {
    process: Process,
    child: Option<Child>,
    /// When the running child was started.
    started: Instant,
    /// Times the supervisor started it again after it exited on its own.
    restarts: u32,
    /// Exits in a row, each soon after its start: the supervisor gives up at [`GIVE_UP_AFTER`].
    quick_exits: u32,
    /// A restart the supervisor has planned, after a pause.
    restart_at: Option<Instant>,
    /// The last exit, once the supervisor gave up on it.
    gave_up: Option<std::process::ExitStatus>,
}

/// The supervisor gives up on a process that exited this many times in a row, each time within
/// [`STABLE_AFTER`] of its start: it is not coming back by itself (a corrupt database, a port
/// taken), and the run must say so rather than wait for work that will never be done.
const GIVE_UP_AFTER: u32 = 5;

/// A process that ran this long before it exited is started again with a fresh count.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How often the supervisor looks.
const SUPERVISE_EVERY: Duration = Duration::from_millis(200);

/// The pause before the `n`th restart in a row: 0.5 s, doubling, at most 5 s.
fn restart_pause(n: u32) -> Duration {
    Duration::from_millis(500).saturating_mul(1 << n.saturating_sub(1).min(4)).min(Duration::from_secs(5))
}

/// The component processes of one run, each `baton run <component> <args>` with its stderr in
/// `<dir>/<name>.log` (appended to across restarts). Every method takes `&self`, so a fault task
/// can crash and restart members while the run checks them.
pub struct Fleet {
    bin: PathBuf,
    args: Vec<String>,
    /// Flags only some components take (`baton run <component>` refuses the others'), with
    /// the components that take them.
    only_for: Vec<(Vec<String>, Vec<String>)>,
    /// The processes write to this process's stderr rather than to their logs.
    stderr_inherited: bool,
    dir: PathBuf,
    members: Mutex<Vec<Member>>,
    /// A supervisor runs: an exit is its to handle, and only giving up is an error.
    supervised: AtomicBool,
    /// Told when the supervisor gives up on a process.
    gave_up: tokio::sync::watch::Sender<bool>,
}

/// The supervision task of a fleet; it stops when this is dropped.
pub struct Supervisor(tokio::task::JoinHandle<()>);

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Fleet {
    /// A fleet with no process yet: each is `<bin> run <component> <args>`, logging in `dir`.
    pub fn new(bin: &Path, args: Vec<String>, dir: &Path) -> Fleet {
        Fleet {
            bin: bin.to_owned(),
            args,
            only_for: Vec::new(),
            stderr_inherited: false,
            dir: dir.to_owned(),
            members: Mutex::new(Vec::new()),
            supervised: AtomicBool::new(false),
            gave_up: tokio::sync::watch::Sender::new(false),
        }
    }

    /// A fleet running each of `processes`, started in that order.
    pub fn start(
        bin: &Path,
        args: Vec<String>,
        dir: &Path,
        processes: &[Process],
    ) -> Result<Fleet, FleetError> {
        let fleet = Fleet::new(bin, args, dir);
        for p in processes {
            fleet.spawn(p)?;
        }
        Ok(fleet)
    }

    /// This fleet with `args` added to the command line of the processes of `components` only
    /// (e.g. `--http` for the gateway): `baton run <component>` takes only the flags it uses.
    pub fn with_args_for(mut self, components: &[&str], args: Vec<String>) -> Fleet {
        self.only_for.push((components.iter().map(|c| (*c).to_owned()).collect(), args));
        self
    }

    /// This fleet with its processes writing to this process's stderr (`baton up`, whose user
    /// reads one stream) rather than to a log each.
    pub fn with_stderr_inherited(mut self) -> Fleet {
        self.stderr_inherited = true;
        self
    }

    /// The dir of the logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log of the process `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().expect("the fleet's lock")
    }

    /// Start `process`; one already running under its name is replaced (and killed).
    pub fn spawn(&self, process: &Process) -> Result<(), FleetError> {
        let child = self.launch(process)?;
        let name = process.name();
        let mut members = self.members();
        match members.iter_mut().find(|m| m.process.name() == name) {
            Some(m) => {
                m.child = Some(child);
                m.started = Instant::now();
                m.restart_at = None;
            }
            None => members.push(Member {
                process: process.clone(),
                child: Some(child),
                started: Instant::now(),
                restarts: 0,
                quick_exits: 0,
                restart_at: None,
                gave_up: None,
            }),
        }
        Ok(())
    }

    /// `baton run <component> <args>`, its stderr appended to its log.
    fn launch(&self, process: &Process) -> Result<Child, FleetError> {
        let log = if self.stderr_inherited {
            Stdio::inherit()
        } else {
            let path = self.log_path(&process.name());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| FleetError::Log { path, source })?;
            Stdio::from(file)
        };
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg(&process.component).args(&self.args);
        for (components, args) in &self.only_for {
            if components.contains(&process.component) {
                cmd.args(args);
            }
        }
        if let Some(i) = &process.instance {
            cmd.arg("--instance").arg(i);
        }
        cmd.envs(process.env.iter().map(|(k, v)| (k, v)));
        cmd.stdout(Stdio::null()).stderr(log).kill_on_drop(true).spawn().map_err(|source| FleetError::Spawn {
            bin: self.bin.clone(),
            component: process.component.clone(),
            source,
        })
    }

    /// Watch the fleet until the returned [`Supervisor`] is dropped: a process that exits on its
    /// own (not through [`crash`](Fleet::crash) or [`stop`](Fleet::stop)) is started again after
    /// a short pause, and said so at WARN; one that keeps exiting soon after each start is given
    /// up on, which [`failed`](Fleet::failed) reports at once. [`restarted`](Fleet::restarted)
    /// counts the restarts, for the run's table.
    pub fn supervise(self: &Arc<Self>) -> Supervisor {
        self.supervised.store(true, Ordering::SeqCst);
        let fleet = Arc::clone(self);
        Supervisor(tokio::spawn(async move {
            loop {
                tokio::time::sleep(SUPERVISE_EVERY).await;
                fleet.supervise_once();
            }
        }))
    }

    fn supervise_once(&self) {
        let mut members = self.members();
        for m in members.iter_mut().filter(|m| m.gave_up.is_none()) {
            let name = m.process.name();
            if let Some(child) = &mut m.child {
                let Ok(Some(status)) = child.try_wait() else { continue };
                m.child = None;
                m.quick_exits = if m.started.elapsed() < STABLE_AFTER { m.quick_exits + 1 } else { 1 };
                let log = self.log_path(&name);
                if m.quick_exits >= GIVE_UP_AFTER {
                    tracing::error!(component = %name, %status, log = %log.display(), "exited again soon after its start; giving up on it");
                    m.gave_up = Some(status);
                    self.gave_up.send_replace(true);
                } else {
                    let pause = restart_pause(m.quick_exits);
                    tracing::warn!(
                        component = %name, %status, retry_in = ?pause, log = %log.display(),
                        "a component exited on its own; starting it again{}", tail(&log, &name, 3)
                    );
                    m.restart_at = Some(Instant::now() + pause);
                }
            } else if m.restart_at.is_some_and(|at| Instant::now() >= at) {
                m.restart_at = None;
                match self.launch(&m.process) {
                    Ok(child) => {
                        m.child = Some(child);
                        m.started = Instant::now();
                        m.restarts += 1;
                    }
                    Err(e) => {
                        tracing::warn!(component = %name, error = %e, "starting it again failed; trying later");
                        m.quick_exits += 1;
                        m.restart_at = Some(Instant::now() + restart_pause(m.quick_exits));
                    }
                }
            }
        }
    }

    /// Resolves once the supervisor has given up on a process, with the error that says which
    /// and where its log is; never resolves otherwise.
    pub async fn failed(&self) -> FleetError {
        let mut rx = self.gave_up.subscribe();
        let _ = rx.wait_for(|gave_up| *gave_up).await;
        match self.given_up() {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// The process the supervisor gave up on, if any, as an error.
    fn given_up(&self) -> Option<FleetError> {
        let members = self.members();
        let m = members.iter().find(|m| m.gave_up.is_some())?;
        let name = m.process.name();
        let log = self.log_path(&name);
        Some(FleetError::GaveUp {
            tail: tail(&log, &name, ready::TAIL),
            starts: m.quick_exits,
            status: m.gave_up?,
            log,
            name,
        })
    }

    /// How many times the supervisor started each process again after it exited on its own,
    /// by process name (only those it did).
    pub fn restarted(&self) -> BTreeMap<String, u32> {
        self.members().iter().filter(|m| m.restarts > 0).map(|m| (m.process.name(), m.restarts)).collect()
    }

    /// Start again the process `name` after a [`crash`](Fleet::crash). Returns whether the
    /// fleet knows that name.
    pub fn restart(&self, name: &str) -> Result<bool, FleetError> {
        let process = self.members().iter().find(|m| m.process.name() == name).map(|m| m.process.clone());
        match process {
            Some(p) => self.spawn(&p).map(|()| true),
            None => Ok(false),
        }
    }

    /// SIGKILL the process `name`, as a crash: no cleanup, no flush, no goodbye. Returns whether
    /// it was running. [`check_alive`](Fleet::check_alive) does not count it as dead.
    pub async fn crash(&self, name: &str) -> bool {
        let child = self.members().iter_mut().find(|m| m.process.name() == name).and_then(|m| {
            m.restart_at = None;
            m.child.take()
        });
        match child {
            Some(mut c) => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                true
            }
            None => false,
        }
    }

    /// SIGKILL every running process, as [`crash`](Fleet::crash) does one: for a run whose
    /// state is thrown away, where a graceful stop would only wait on work nobody needs.
    pub async fn crash_all(&self) {
        let names: Vec<String> =
            self.members().iter().filter(|m| m.child.is_some()).map(|m| m.process.name()).collect();
        for name in names {
            self.crash(&name).await;
        }
    }

    /// The pid of the process `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.members().iter().find(|m| m.process.name() == name)?.child.as_ref()?.id()
    }

    /// Fail, naming the log to read, if a running process has exited on its own (under a
    /// supervisor: if it gave up on one).
    pub fn check_alive(&self) -> Result<(), FleetError> {
        if self.supervised.load(Ordering::SeqCst) {
            return self.given_up().map_or(Ok(()), Err);
        }
        for m in self.members().iter_mut() {
            let Some(child) = &mut m.child else { continue };
            let name = m.process.name();
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    let log = self.log_path(&name);
                    let tail = tail(&log, &name, ready::TAIL);
                    return Err(FleetError::Exited { log, name, status, tail });
                }
                Err(source) => return Err(FleetError::Wait { name, source }),
            }
        }
        Ok(())
    }

    /// The last `n` lines of every process's log, for an error message: a test that fails on
    /// CI has only what it printed.
    pub fn log_tails(&self, n: usize) -> String {
        let names: Vec<String> = self.members().iter().map(|m| m.process.name()).collect();
        names.iter().map(|name| tail(&self.log_path(name), name, n)).collect()
    }

    /// Total CPU time of the running processes so far, in ms.
    pub fn cpu_ms(&self) -> f64 {
        self.members()
            .iter()
            .filter_map(|m| m.child.as_ref()?.id())
            .filter_map(|pid| cpu_ms(&pid.to_string()))
            .sum()
    }

    /// CPU time and peak RSS of each running process now, in the order they were first started.
    pub fn usage(&self) -> Vec<ComponentUsage> {
        self.members()
            .iter()
            .filter_map(|m| {
                let pid = m.child.as_ref()?.id()?;
                Some(ComponentUsage {
                    component: m.process.component.clone(),
                    instance: m.process.instance.clone(),
                    pid,
                    cpu_ms: cpu_ms(&pid.to_string()).unwrap_or(0.0),
                    peak_rss_kb: peak_rss_kb(&pid.to_string()).unwrap_or(0),
                })
            })
            .collect()
    }

    /// SIGTERM every running process, then SIGKILL what is still there after 10 s.
    pub async fn stop(&self) {
        let children: Vec<(String, Child)> = self
            .members()
            .iter_mut()
            .filter_map(|m| {
                m.restart_at = None;
                Some((m.process.name(), m.child.take()?))
            })
            .collect();
        for (_, c) in &children {
            let pid = c.id().and_then(|pid| rustix::process::Pid::from_raw(i32::try_from(pid).ok()?));
            if let Some(pid) = pid {
                // It may have exited meanwhile: the wait below says so.
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for (name, mut c) in children {
            if tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err() {
                tracing::warn!(component = %name, "did not stop within 10 s; killing it");
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}

/// The last `n` lines of the log of `name` at `path`, under a heading; empty when there are none.
fn tail(path: &Path, name: &str, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- {name}.log (last {} lines)\n{}", tail.len(), tail.join("\n"))
    }
}

/// A free TCP port on localhost for a child process to listen on (a gateway, a `/metrics`).
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`, 32768 and up by default),
/// where the port the kernel picks for `:0` lies: between this check and the child's bind, the
/// many outgoing connections of a run (to the broker, to PostgreSQL) would take such a port, and
/// the child would fail with "address in use". Never the same port twice in one process.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 20_000;
    let high = ephemeral_start().clamp(LOW + 1_000, 65_535);
    let span = high - LOW;
    // A start of its own per process, so that two runs on one machine seldom meet.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id() % span, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port below the ephemeral range"))
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a free port")).collect();
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(ports.iter().all(|p| (20_000..ephemeral_start()).contains(&u32::from(*p))), "{ports:?}");
    }

    /// A stand-in for `baton`: logs its arguments to stderr, then sleeps until killed.
    fn fake_bin(dir: &Path) -> PathBuf {
        let bin = dir.join("fake-baton");
        std::fs::write(&bin, "#!/bin/sh\necho \"args: $*\" >&2\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn names_carry_the_instance() {
        assert_eq!(Process::new("records").name(), "records");
        assert_eq!(Process::instance("records", "i2").name(), "records-i2");
    }

    #[tokio::test]
    async fn spawns_crashes_restarts_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_bin(dir.path());
        let procs =
            [Process::instance("records", "i1"), Process::instance("records", "i2"), Process::new("gateway")];
        let fleet = Fleet::new(&bin, vec!["--mode".into(), "workflow".into()], dir.path())
            .with_args_for(&["gateway"], vec!["--http".into(), "127.0.0.1:1".into()]);
        for p in &procs {
            fleet.spawn(p).unwrap();
        }
        // The script writes its line at once; wait for it, with a bound.
        let args_of = async |name: &str| {
            let log = fleet.log_path(name);
            for _ in 0..100 {
                if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("args")) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::fs::read_to_string(&log).unwrap().trim().to_owned()
        };
        assert_eq!(args_of("records-i2").await, "args: run records --mode workflow --instance i2");
        assert_eq!(args_of("gateway").await, "args: run gateway --mode workflow --http 127.0.0.1:1");
        fleet.check_alive().unwrap();
        let usage = fleet.usage();
        let names: Vec<String> = usage.iter().map(ComponentUsage::name).collect();
        assert_eq!(names, ["records-i1", "records-i2", "gateway"]);

        assert!(fleet.crash("records-i1").await);
        assert!(!fleet.crash("records-i1").await, "a crashed process is not running");
        fleet.check_alive().expect("a crash is not a death on its own");
        assert_eq!(fleet.usage().len(), 2);
        assert!(fleet.pid("records-i1").is_none() && fleet.pid("records-i2").is_some());
        assert!(fleet.restart("records-i1").unwrap());
        assert!(!fleet.restart("nobody").unwrap());
        assert_eq!(fleet.usage().len(), 3);
        assert!(fleet.log_tails(5).contains("--- records-i1.log"));

        fleet.stop().await;
        assert!(fleet.usage().is_empty());
    }

    #[tokio::test]
    async fn crash_all_kills_every_process() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_bin(dir.path());
        let procs = [Process::new("records"), Process::new("orchestrator")];
        let fleet = Fleet::start(&bin, Vec::new(), dir.path(), &procs).unwrap();
        let pid = fleet.pid("orchestrator").expect("running");
        assert!(rss_kb(&pid.to_string()).is_some());
        fleet.crash_all().await;
        assert!(fleet.usage().is_empty() && fleet.pid("orchestrator").is_none());
        fleet.check_alive().expect("killed on purpose, not dead on its own");
    }

    #[tokio::test]
    async fn a_process_that_exits_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Fleet::start(Path::new("/bin/false"), Vec::new(), dir.path(), &[Process::new("routing")])
            .unwrap();
        let mut err = None;
        for _ in 0..200 {
            if let Err(e) = fleet.check_alive() {
                err = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = err.expect("the exit is seen").to_string();
        assert!(err.contains("component routing exited") && err.contains("routing.log"), "{err}");
    }
}
