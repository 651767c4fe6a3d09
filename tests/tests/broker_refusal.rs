//! A broker that refuses Baton (its vhost deleted under a running system, or missing at start)
//! gets a few connection attempts a minute, never a flood; the system comes back by itself once
//! the vhost is back; and neither a refusal nor a dead stderr keeps a process from stopping.
//!
//! Connection attempts are counted by a TCP proxy of the test's own between the components and
//! the shared broker: it sees this test's connections only, exactly, whatever other tests do to
//! the broker at the same time. Its count of sockets open at once stands for the broker's socket
//! count (`sockets_used` of `GET /api/nodes` counts every test's connections, so it cannot be
//! held to a bound here, and a private node would not show more: each of its sockets is one of
//! these).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_tests::{System, SystemConfig, TestEnv, amqp_base, baton_bin, free_port, mgmt_base, wait_for};
use rustix::process::Signal;
use tokio::net::{TcpListener, TcpStream};

/// Components of a workflow-mode system, one connection each.
const COMPONENTS: usize = 7;

/// Connection attempts one component may make in the minute after its vhost vanished: one at
/// once, then the refusal schedule (5 s doubling to 20 s, with jitter) allows four more at most.
const ATTEMPTS_PER_MINUTE: usize = 5;

/// A TCP proxy in front of the shared broker that counts the connections made through it.
struct Proxy {
    port: u16,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start() -> Proxy {
        let base = amqp_base();
        let upstream = base.rsplit('@').next().expect("host:port in the AMQP URL").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, open, peak) = (Arc::default(), Arc::<AtomicUsize>::default(), Arc::default());
        let counters = (Arc::clone(&accepted), Arc::clone(&open), Arc::clone(&peak));
        let task = tokio::spawn(async move {
            let (accepted, open, peak): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) = counters;
            while let Ok((mut client, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let (open, upstream) = (Arc::clone(&open), upstream.clone());
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy { port, accepted, open, peak, task }
    }

    /// The shared broker's URL without a vhost, through this proxy.
    fn base(&self) -> String {
        let base = amqp_base();
        let creds = base.rsplit_once('@').map_or("amqp://", |(c, _)| c);
        format!("{creds}@127.0.0.1:{}", self.port)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The most sockets open at once since the last call; starts over from those open now.
    fn take_peak(&self) -> usize {
        self.peak.swap(self.open(), Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mgmt() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

async fn delete_vhost(vhost: &str) {
    let r = mgmt()
        .delete(format!("{}/api/vhosts/{vhost}", mgmt_base()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "deleting vhost {vhost}: {}", r.status());
}

/// Make the vhost again and give guest its permissions back, as an operator would.
async fn restore_vhost(vhost: &str) {
    baton_tests::make_vhost(&mgmt(), vhost).await;
}

/// `GET /health` of a gateway: the status, and the body (the reason when not 200).
async fn health(http: &str) -> Option<(u16, String)> {
    let r = reqwest::Client::new()
        .get(format!("http://{http}/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.unwrap_or_default()))
}

/// How long a system may take to serve again once its vhost is back: the longest wait of the
/// refusal schedule (20 s plus as much jitter), a consumer's restart backoff (5 s plus jitter)
/// and the re-declaration of the topology, with room for a loaded machine.
const COMES_BACK_WITHIN: Duration = Duration::from_secs(75);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_vhost_gets_a_few_attempts_a_minute_and_the_system_comes_back_by_itself() {
    let proxy = Proxy::start().await;
    let mut env = TestEnv::new().await;
    env.connect_via(&proxy.base());
    let cfg = SystemConfig { deadline: Duration::from_secs(10), ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    let http = sys.http.to_string();
    let (status, body) = sys.create("before", "alice").await;
    assert_eq!(status, 200, "{body}");
    let connected = wait_for("one connection per component", Duration::from_secs(10), || async {
        (proxy.open() == COMPONENTS).then_some(proxy.open())
    })
    .await;

    let before = proxy.accepted();
    proxy.take_peak();
    delete_vhost(&env.vhost).await;
    let gone = Instant::now();
    // A fixed observation window, not a wait for readiness: the flood this guards against
    // showed up as a rate, over a minute. Meanwhile, what /health says of it.
    let (mut most_open, mut why) = (0, None);
    while gone.elapsed() < Duration::from_secs(60) {
        most_open = most_open.max(proxy.open());
        if why.is_none() {
            why = health(&http).await.filter(|(s, _)| *s == 503).map(|(_, body)| body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = proxy.accepted() - before;
    let peak = proxy.take_peak();
    eprintln!(
        "vhost gone for 60 s: {attempts} connection attempts by {COMPONENTS} components, at most {peak} sockets open at once (before: {connected}), {} open at the end",
        proxy.open()
    );
    assert!(attempts >= COMPONENTS, "every component tried again at least once: {attempts}");
    assert!(
        attempts <= COMPONENTS * ATTEMPTS_PER_MINUTE,
        "at most {ATTEMPTS_PER_MINUTE} attempts a minute per component, got {attempts} in all"
    );
    assert!(peak <= connected && most_open <= connected, "the socket count stays flat: peak {peak}");
    let why = why.expect("/health reported the broker with a 503");
    assert!(why.contains("refused") && why.contains(&env.vhost), "the reason names the vhost: {why}");

    restore_vhost(&env.vhost).await;
    let back = Instant::now();
    let mut tries = 0;
    wait_for("a create-space to succeed again", COMES_BACK_WITHIN, || {
        tries += 1;
        let (sys, name) = (&sys, format!("after-{tries}"));
        async move { (sys.create(&name, &name).await.0 == 200).then_some(()) }
    })
    .await;
    eprintln!("the system served again {:?} after the vhost was restored ({tries} tries)", back.elapsed());
    assert!(back.elapsed() <= COMES_BACK_WITHIN + Duration::from_secs(10), "{:?}", back.elapsed());
    sys.stop().await;
}

/// `baton up --log <log>` against `url`, its gateway on a free port; stderr as given.
fn start_up(env: &TestEnv, url: &str, log: &str, stderr: Stdio) -> (tokio::process::Child, String) {
    let http = format!("127.0.0.1:{}", free_port());
    let child = tokio::process::Command::new(baton_bin())
        .args(["up", "--mode", "workflow", "--http", &http, "--amqp-url", url, "--log", log])
        .arg("--data-dir")
        .arg(env.data_dir())
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start baton up");
    (child, http)
}

async fn healthy(http: &str) {
    wait_for("the gateway of baton up", Duration::from_secs(30), || async {
        health(http).await.filter(|(s, _)| *s == 200).map(|_| ())
    })
    .await;
}

fn signal(child: &tokio::process::Child, sig: Signal) {
    let pid = baton_tests::pid_of(child);
    baton_tests::signal(pid, sig).unwrap_or_else(|e| panic!("signal {sig:?} to {pid}: {e}"));
}

/// The grace period of `baton up` (10 s), and a little for the process to end.
const STOPS_WITHIN: Duration = Duration::from_secs(13);

async fn exits(child: &mut tokio::process::Child, within: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("baton up did not stop within {within:?}"))
        .unwrap();
    eprintln!("baton up stopped in {:?}: {status}", started.elapsed());
    status
}

fn log_file(env: &TestEnv, name: &str) -> (std::path::PathBuf, Stdio) {
    let path = env.data_dir().join(name);
    let file = std::fs::File::create(&path).unwrap();
    (path, Stdio::from(file))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_while_the_vhost_is_gone_ends_within_the_grace_period() {
    let env = TestEnv::new().await;
    let (path, stderr) = log_file(&env, "up.log");
    let (mut up, http) = start_up(&env, &env.amqp_url(), "info", stderr);
    healthy(&http).await;
    delete_vhost(&env.vhost).await;
    wait_for("/health to report the broker", Duration::from_secs(20), || async {
        health(&http).await.filter(|(s, _)| *s == 503).map(|_| ())
    })
    .await;
    signal(&up, Signal::TERM);
    let status = exits(&mut up, STOPS_WITHIN).await;
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(status.success(), "baton up stopped cleanly: {status}\n{log}");
    // Each component says once that it is refused, with what to do; nothing from lapin.
    let said = log.lines().filter(|l| l.contains("RabbitMQ refuses this component")).count();
    assert!((1..=COMPONENTS).contains(&said), "the refusal is said once per component at most:\n{log}");
    assert!(!log.contains("Exponential backoff") && !log.contains("Connection closed"), "{log}");
}

/// Stop `baton up --log debug` whose stderr's reader is gone, with `sig`: it must end cleanly.
async fn stops_with_a_dead_stderr(sig: Signal) {
    let env = TestEnv::new().await;
    let (mut up, http) = start_up(&env, &env.amqp_url(), "debug", Stdio::piped());
    healthy(&http).await;
    // The reader goes away: every log write from now on fails with EPIPE.
    drop(up.stderr.take());
    // Something to log, on its way through every component.
    let r = reqwest::Client::new()
        .post(format!("http://{http}/spaces"))
        .json(&serde_json::json!({"name": "piped", "owner": "alice"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the gateway answers with its log gone");
    assert_eq!(r.status().as_u16(), 200);
    signal(&up, sig);
    let status = exits(&mut up, STOPS_WITHIN).await;
    assert_eq!(status.code(), Some(0), "a clean exit, not a panic (101) nor a signal: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_baton_up_whose_stderr_reader_is_gone() {
    stops_with_a_dead_stderr(Signal::INT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_baton_up_whose_stderr_reader_is_gone() {
    stops_with_a_dead_stderr(Signal::TERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_start_logs_no_error_no_warning_and_no_escape_codes() {
    let env = TestEnv::new().await;
    let (path, stderr) = log_file(&env, "up.log");
    let (mut up, http) = start_up(&env, &env.amqp_url(), "info", stderr);
    healthy(&http).await;
    let r = reqwest::Client::new()
        .post(format!("http://{http}/spaces"))
        .json(&serde_json::json!({"name": "quiet", "owner": "alice"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    signal(&up, Signal::TERM);
    let status = exits(&mut up, STOPS_WITHIN).await;
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("starting; Ctrl-C stops"), "the log was written: {log}");
    assert!(!log.contains('\x1b'), "no ANSI escape codes in a log file:\n{log:?}");
    let loud: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).collect();
    assert!(loud.is_empty(), "a normal start and stop logs no ERROR or WARN:\n{}", loud.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_against_a_missing_vhost_says_so_once_and_clearly() {
    let env = TestEnv::new().await;
    let vhost = format!("{}-missing", env.vhost);
    let url = format!("{}/{vhost}", amqp_base());
    let (path, stderr) = log_file(&env, "up.log");
    let (mut up, _) = start_up(&env, &url, "info", stderr);
    let status = exits(&mut up, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&path).unwrap();
    assert_eq!(status.code(), Some(2), "could not run: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{log}");
    let line = errors[0];
    assert!(line.contains(&vhost) && line.contains("refused"), "it names the vhost: {line}");
    assert!(line.contains("set_permissions") || line.contains("add_vhost"), "it says what to do: {line}");
    assert!(!line.contains("guest:guest"), "the password is redacted: {line}");
    assert!(!log.contains('\x1b'), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_with_a_wrong_password_says_so_once_and_clearly() {
    let env = TestEnv::new().await;
    let base = amqp_base();
    let (creds, host) = base.rsplit_once('@').expect("credentials in the AMQP URL");
    let user = creds.rsplit_once("//").and_then(|(_, c)| c.split(':').next()).unwrap_or("guest");
    let url = format!("amqp://{user}:not-the-password@{host}/{}", env.vhost);
    let (path, stderr) = log_file(&env, "up.log");
    let (mut up, _) = start_up(&env, &url, "info", stderr);
    let status = exits(&mut up, Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&path).unwrap();
    assert_eq!(status.code(), Some(2), "could not run: {log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{log}");
    assert!(errors[0].contains("ACCESS_REFUSED") && errors[0].contains("password"), "{}", errors[0]);
    assert!(!log.contains("not-the-password"), "the password is redacted: {log}");
}
