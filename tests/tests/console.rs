//! The console in a real browser: Debian's chromium, headless, driven through chromedriver
//! (fantoccini). A workflow-mode system with a saga that succeeded and one that was compensated,
//! and an events-mode system with a space its chain left orphaned, then undone by `baton
//! reconcile`; each page must render the right steps and states. Screenshots of every page go to
//! `$BATON_ARTIFACTS` (default `target/console-screenshots/`). scripts/test.sh installs chromium
//! and chromium-driver; without them the test says so loudly and passes without a browser.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use baton_protocol::Mode;
use baton_services::ServiceConfig;
use baton_tests::{System, SystemConfig, TestEnv, free_port, wait_for};
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

/// Where chromium and its driver are, or why the test cannot run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let find = |names: &[&str]| {
        names.iter().map(PathBuf::from).find(|p| p.exists()).or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .flat_map(|d| names.iter().map(move |n| d.join(n)))
                .find(|p| p.exists())
        })
    };
    let chromium = find(&["/usr/bin/chromium", "chromium", "chromium-browser"]);
    let driver = find(&["/usr/bin/chromedriver", "chromedriver"]);
    match (chromium, driver) {
        (Some(c), Some(d)) => Ok((c, d)),
        _ => Err("chromium or chromedriver is missing (Debian: apt-get install chromium chromium-driver; \
                  scripts/test.sh installs them)"
            .into()),
    }
}

/// A headless Chromium under a chromedriver and a profile of its own, held for the test.
struct Session {
    c: Client,
    profile: tempfile::TempDir,
    driver: Driver,
}

/// A browser [`Session`], or `None` where Chromium is not installed: the test then says it is
/// skipped, loudly, and passes (`scripts/test.sh` installs it, so CI always runs it).
async fn session() -> Option<Session> {
    let (chromium, driver_path) = match browser() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("\n!!!!! SKIPPED the console's browser test: {why} !!!!!\n");
            return None;
        }
    };
    let driver = Driver::start(&driver_path).await;
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(&chromium, profile.path()).await;
    Some(Session { c, profile, driver })
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: tokio::process::Child,
    port: u16,
}

impl Driver {
    async fn start(path: &PathBuf) -> Driver {
        let port = free_port();
        let child = tokio::process::Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let status = format!("http://127.0.0.1:{port}/status");
        wait_for("chromedriver's /status", Duration::from_secs(20), || {
            let (http, status) = (http.clone(), status.clone());
            async move { http.get(status).send().await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
        Driver { child, port }
    }

    /// A headless chromium with a profile of its own, through this driver.
    async fn browser(&self, chromium: &PathBuf, profile: &std::path::Path) -> Client {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", "--window-size=1400,1100",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let Value::Object(caps) = caps else { unreachable!("a JSON object") };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session through chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn artefacts() -> PathBuf {
    let dir = std::env::var_os("BATON_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots"));
    std::fs::create_dir_all(&dir).expect("the screenshot directory");
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(artefacts().join(format!("{name}.png")), png).expect("the screenshot is written");
}

/// Open `page` (a `#/...` route) of the console at `http`.
async fn open(c: &Client, http: std::net::SocketAddr, page: &str) {
    c.goto(&format!("http://{http}/{page}")).await.expect("the page loads");
}

/// Poll a script's answer (a string) until `ok` holds, or fail showing the last one.
async fn until(c: &Client, what: &str, script: &str, ok: impl Fn(&str) -> bool) -> String {
    let last = std::sync::Mutex::new(String::new());
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let v = c.execute(script, vec![]).await.expect("the script runs");
            let s = v.as_str().unwrap_or_default().to_owned();
            if ok(&s) {
                return s;
            }
            *last.lock().unwrap() = s;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    got.unwrap_or_else(|_| panic!("timed out waiting for {what}; the page showed: {}", last.lock().unwrap()))
}

/// Each step of the flow diagram as `step:phase`, in order.
const FLOW: &str = "return [...document.querySelectorAll('#flow g.step')].map(g => g.dataset.step + ':' + g.dataset.phase).join(' ')";
/// The events of the sequence diagram, in order.
const SEQUENCE: &str = "return [...document.querySelectorAll('#sequence g.msg')].map(g => g.dataset.from + '>' + g.dataset.to + ':' + g.dataset.event).join(' ')";
/// The timeline's entries as `step:event`.
const TIMELINE: &str = "return [...document.querySelectorAll('#timeline g.entry')].map(g => g.dataset.step + ':' + g.dataset.event).join(' ')";
/// The saga list's rows, by id, in order.
const ROWS: &str =
    "return [...document.querySelectorAll('table.sagas tbody tr')].map(r => r.dataset.id).join(' ')";
/// The health page's instances as `component/instance:ready`.
const INSTANCES: &str = "return [...document.querySelectorAll('table.instances tbody tr')].map(r => r.dataset.component + '/' + r.dataset.instance + ':' + r.dataset.ready).join(' ')";
/// The health page's queues as `name:ready:unacked:consumers`.
const QUEUES: &str = "return [...document.querySelectorAll('table.queues tbody tr')].map(r => [r.dataset.queue, r.dataset.ready, r.dataset.unacked, r.dataset.consumers].join(':')).join(' ')";
/// Each link of a space's chain as `service:state`.
const CHAIN: &str = "return [...document.querySelectorAll('#chain .link')].map(l => l.dataset.service + ':' + l.dataset.state).join(' ')";

/// The list's search, each through `GET /workflows`: by owner, by space name, by space id, and
/// a time range, over alice's saga that succeeded and the refused `admin` one.
async fn search(
    c: &Client,
    http: std::net::SocketAddr,
    ok_saga: &str,
    refused_saga: &str,
    refused_space: &str,
) {
    // Search, each through GET /workflows: by owner, by space name, by space id.
    for (q, saga) in [("alice", ok_saga), ("admin", refused_saga), (refused_space, refused_saga)] {
        open(c, http, &format!("#/sagas?q={q}")).await;
        until(c, &format!("the search for {q}"), ROWS, |s| s == saga).await;
    }
    // A time range: started before the first saga is nothing.
    let first_at = reqwest::get(format!("http://{}/workflows/{ok_saga}", http))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["created_at_ms"]
        .as_i64()
        .expect("a start time");
    open(c, http, &format!("#/sagas?until={first_at}")).await;
    until(c, "an empty time range", "return document.querySelector('#sagas p.muted') ? 'none' : ''", |s| {
        s == "none"
    })
    .await;
    open(c, http, &format!("#/sagas?since={first_at}&until={}", first_at + 1)).await;
    until(c, "a time range of the first saga", ROWS, |s| s == ok_saga).await;
    screenshot(c, "1b-sagas-time-range").await;
}

/// The health page's view of the broker: every instance takes work, every queue its depths.
async fn broker_health(c: &Client) {
    // Every instance, as the broker sees it: each takes work. (The broker reports a new
    // connection's state with its next sample of statistics, every few seconds.)
    let instances = until(c, "every instance taking work in the broker's view", INSTANCES, |s| {
        s.split(' ').count() == 7 && s.split(' ').all(|i| i.ends_with(":true"))
    })
    .await;
    for component in
        ["records", "placement", "entitlements", "routing", "notifier", "orchestrator", "gateway"]
    {
        assert!(instances.contains(&format!("{component}/main:true")), "{component}: {instances}");
    }
    // Each work queue with its depths; the services consume theirs.
    // (The broker samples the figures every few seconds; the page shows the next sample.)
    let queues = until(c, "each work queue with one consumer and nothing waiting", QUEUES, |s| {
        s.contains("records.commands:0:0:1") && s.contains("orchestrator.replies:0:0:1")
    })
    .await;
    assert!(queues.contains("records.commands.dlq:0:0:0"), "{queues}");
}

/// A second gateway on `env`'s store serves the console too, and sees the same sagas as the
/// `first`.
async fn second_gateway_serves(c: &Client, env: &TestEnv, first: std::net::SocketAddr, sagas: &[&str]) {
    // A second gateway on the same store serves the console too, and sees the same sagas.
    let (second, stop_second) = second_gateway(env).await;
    let page = |http: std::net::SocketAddr| async move {
        reqwest::get(format!("http://{http}/workflows")).await.unwrap().json::<Value>().await.unwrap()
    };
    assert_eq!(page(second).await, page(first).await, "both gateways read one store");
    open(c, second, "").await;
    let listed = until(c, "the list on the second gateway", ROWS, |s| s.split(' ').count() == 3).await;
    for saga in sagas {
        assert!(listed.contains(saga), "{saga}: {listed}");
    }
    let here = c.execute("return document.getElementById('mode').textContent", vec![]).await.unwrap();
    assert!(here.as_str().unwrap().contains("gateway g2"), "{here}");
    screenshot(c, "4b-second-gateway").await;
    stop_second.cancel();
}

/// A second gateway (instance `g2`) on `env`'s broker and store, in this process, serving on a
/// free port until its token is cancelled.
async fn second_gateway(env: &TestEnv) -> (std::net::SocketAddr, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let mut config = baton_tests::node_config(env, &SystemConfig::default());
    config.http = http;
    config.instance = "g2".into();
    config.health = baton_health::Health::default();
    let opts = config.gateway_options();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(baton_gateway::serve(listener, opts, stop.clone()));
    baton_tests::Api::new(http).wait_healthy().await;
    (http, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_saga_that_succeeded_one_compensated_and_an_orphaned_chain() {
    let Some(Session { c, profile: _profile, driver: _driver }) = session().await else { return };

    // The workflow mode: one saga completes, one is refused at routing (a reserved name) and
    // its three done steps are compensated.
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let (s, ok) = sys.create("console-ok", "alice").await;
    assert_eq!(s, 200, "{ok}");
    let (s, refused) = sys.create("admin", "dave").await;
    assert_eq!(s, 409, "{refused}");
    let ok_saga = ok["workflow_id"].as_str().expect("a workflow id").to_owned();
    let refused_saga = refused["workflow_id"].as_str().expect("a workflow id").to_owned();

    open(&c, sys.http, "").await;
    let listed = until(&c, "the saga list", "return [...document.querySelectorAll('table.sagas tbody tr')].map(r => r.dataset.id + ':' + r.dataset.state).join(' ')", |s| {
        s.contains(&format!("{ok_saga}:completed")) && s.contains(&format!("{refused_saga}:rolled_back"))
    })
    .await;
    assert_eq!(listed.split(' ').count(), 2, "{listed}");
    // Live: a saga started while the list is open shows without a reload.
    let (s, live) = sys.create("console-live", "carol").await;
    assert_eq!(s, 200, "{live}");
    let live_saga = live["workflow_id"].as_str().expect("a workflow id").to_owned();
    until(&c, "the new saga in the open list", ROWS, |s| s.split(' ').next() == Some(live_saga.as_str()))
        .await;
    screenshot(&c, "1-sagas").await;

    // Filter by state: only the rolled back one.
    open(&c, sys.http, "#/sagas?state=rolled_back").await;
    until(
        &c,
        "the filtered list",
        "return [...document.querySelectorAll('table.sagas tbody tr')].map(r => r.dataset.id).join(' ')",
        |s| s == refused_saga,
    )
    .await;
    let refused_space = refused["space_id"].as_str().expect("a refusal names its space");
    search(&c, sys.http, &ok_saga, &refused_saga, refused_space).await;

    open(&c, sys.http, &format!("#/saga/{ok_saga}")).await;
    let flow = until(&c, "the flow of the saga that succeeded", FLOW, |s| s.split(' ').count() == 5).await;
    assert_eq!(
        flow, "records:done placement:done entitlements:done routing:done notifier:done",
        "every step done"
    );
    let sequence = until(&c, "its sequence", SEQUENCE, |s| s.contains("completed")).await;
    for step in ["records", "placement", "entitlements", "routing", "notifier"] {
        assert!(
            sequence.contains(&format!("orchestrator>{step}:sent")),
            "{step} was sent its command: {sequence}"
        );
        assert!(sequence.contains(&format!("{step}>orchestrator:done")), "{step} replied done: {sequence}");
    }
    assert!(sequence.contains("orchestrator>gateway:succeeded"), "{sequence}");
    let timeline = c.execute(TIMELINE, vec![]).await.unwrap();
    assert!(timeline.as_str().unwrap().contains("notifier:done"), "{timeline}");
    assert!(
        c.execute("return !!document.getElementById('retry') || !!document.getElementById('cancel')", vec![])
            .await
            .unwrap()
            == json!(false),
        "no operator action on a completed saga"
    );
    screenshot(&c, "2-saga-completed").await;

    open(&c, sys.http, &format!("#/saga/{refused_saga}")).await;
    let flow = until(&c, "the flow of the compensated saga", FLOW, |s| s.contains("routing:refused")).await;
    assert_eq!(
        flow,
        "records:compensated placement:compensated entitlements:compensated routing:refused notifier:pending",
        "three steps undone, the refusing one holds nothing, the last never ran"
    );
    let sequence = until(&c, "its sequence", SEQUENCE, |s| s.contains("rolled_back")).await;
    for step in ["records", "placement", "entitlements"] {
        assert!(sequence.contains(&format!("{step}>orchestrator:compensated")), "{step} undone: {sequence}");
    }
    assert!(sequence.contains("routing>orchestrator:refused"), "{sequence}");
    assert!(!sequence.contains("orchestrator>notifier"), "the notifier is never asked: {sequence}");
    screenshot(&c, "3-saga-rolled-back").await;

    // A rolled back saga cannot be retried: the API says why, as the CLI would.
    let r = reqwest::Client::new()
        .post(format!("http://{}/workflows/{refused_saga}/retry", sys.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nothing to retry"), "{body}");

    open(&c, sys.http, "#/health").await;
    until(&c, "the health page", "return [...document.querySelectorAll('table.health tbody tr')].map(r => r.dataset.component).join(' ')", |s| {
        s.contains("orchestrator") && s.contains("gateway")
    })
    .await;
    broker_health(&c).await;
    screenshot(&c, "4-health").await;
    open(&c, sys.http, "#/compare").await;
    until(&c, "the comparison page", "return document.querySelector('iframe') ? 'ok' : ''", |s| s == "ok")
        .await;

    let sagas = [ok_saga.as_str(), refused_saga.as_str(), live_saga.as_str()];
    second_gateway_serves(&c, &env, sys.http, &sagas).await;
    sys.stop().await;
    drop(env);

    // The events mode: bob's second space is refused at entitlements; records and placement
    // keep theirs (the chain cannot undo), until baton reconcile does.
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        mode: Mode::Events,
        deadline: Duration::from_secs(10),
        services: ServiceConfig { plans: vec![("free".into(), 1)], ..ServiceConfig::default() },
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg).await;
    let (s, first) = sys.create("mine", "bob").await;
    assert_eq!(s, 200, "{first}");
    let (s, orphan) = sys.create("mine-too", "bob").await;
    assert_eq!(s, 403, "{orphan}");
    let orphan_id = orphan["space_id"].as_str().expect("the space id").to_owned();

    open(&c, sys.http, "").await;
    until(&c, "the events mode's page", "return document.getElementById('main').dataset.page + ' ' + document.querySelectorAll('table.requests tbody tr').length", |s| {
        s == "spaces 2"
    })
    .await;
    screenshot(&c, "5-event-chains").await;

    open(&c, sys.http, &format!("#/space/{}", first["id"].as_str().unwrap())).await;
    let chain = until(&c, "the complete chain", CHAIN, |s| s.split(' ').count() == 5).await;
    assert_eq!(chain, "records:ok placement:ok entitlements:ok routing:ok notifier:ok");

    open(&c, sys.http, &format!("#/space/{orphan_id}")).await;
    let chain = until(&c, "the orphaned chain", CHAIN, |s| s.contains("entitlements:stopped")).await;
    assert_eq!(chain, "records:ok placement:ok entitlements:stopped routing:absent notifier:absent");
    let stopped =
        c.execute("return document.getElementById('stopped-at').dataset.service", vec![]).await.unwrap();
    assert_eq!(stopped, json!("entitlements"));
    screenshot(&c, "6-space-orphaned").await;

    let fixed = baton_reconcile::reconcile(&baton_reconcile::Options {
        amqp_url: env.amqp_url().into(),
        store: env.store(),
        older_than: Duration::ZERO,
        timeout: Duration::from_secs(20),
    })
    .await
    .expect("reconcile runs");
    assert_eq!(fixed.found, 1, "{fixed}");
    // The page polls: it shows what reconcile undid without a reload.
    let chain = until(&c, "the chain after reconcile", CHAIN, |s| s.contains("records:undone")).await;
    assert_eq!(chain, "records:undone placement:undone entitlements:stopped routing:absent notifier:absent");
    let undone =
        c.execute("return document.getElementById('undone').dataset.services", vec![]).await.unwrap();
    assert_eq!(undone, json!("records placement"));
    screenshot(&c, "7-space-reconciled").await;

    c.close().await.expect("the browser closes");
    sys.stop().await;
}

/// A saga waiting on a step whose service is down: its page names the step, its attempts,
/// and, once the step timed out, its last failure; the list shows it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_step_a_saga_waits_on() {
    let Some(Session { c, profile: _profile, driver: _driver }) = session().await else { return };
    let env = TestEnv::new().await;
    let cfg = SystemConfig { skip: vec![baton_protocol::Service::Routing], ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    let api = sys.api();
    let waiting = tokio::spawn(async move { api.create("waits", "erin").await });
    let saga = wait_for("the running saga", Duration::from_secs(20), || async {
        let (_, page) = sys.get("/workflows?state=running&q=erin").await;
        page["workflows"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    open(&c, sys.http, &format!("#/saga/{saga}")).await;
    let shown = until(
        &c,
        "the step it waits on",
        "const w = document.querySelector('#waiting [data-step]'); return w ? w.dataset.step + ' ' + w.textContent : ''",
        |s| s.starts_with("routing ") && s.contains("last failure"),
    )
    .await;
    assert!(shown.contains("attempt(s)"), "{shown}");
    screenshot(&c, "9-saga-waiting").await;
    c.close().await.expect("the browser closes");
    waiting.abort();
    sys.stop().await;
}

/// Sagas in the store of the test of scale.
const MANY: usize = 100_000;

/// What a page of `GET /workflows` must hold, or what it holds instead.
type Check = Box<dyn Fn(&Value) -> Result<(), String>>;

/// 100,000 sagas in the orchestrator's store (written through its fixture, in one transaction):
/// `GET /workflows` with each filter and search, a page deep in the list, the console's
/// overview and its list page in the browser each answer in well under a second, and right.
/// The figures are printed as a table (`--no-capture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_stays_fast_with_100000_sagas() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig { with_services: false, ..SystemConfig::default() }).await;
    let store = env.store();
    wait_for("the orchestrator's store", Duration::from_secs(20), || {
        let store = store.clone();
        async move { baton_orchestrator::Sagas::at(&store).exists().await.then_some(()) }
    })
    .await;
    let mut figures: Vec<(String, u128)> = Vec::new();
    let first_at = baton_store::now_ms() - MANY as i64 * 10;
    let started = Instant::now();
    fill_many(&store, first_at).await;
    figures.push((format!("fill {MANY} sagas (one transaction)"), started.elapsed().as_millis()));

    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let get = |path: String| {
        let (http, url) = (http.clone(), format!("http://{}{path}", sys.http));
        async move {
            let started = Instant::now();
            let r = http.get(url).send().await.expect("the gateway answers");
            let status = r.status();
            let body: Value = r.json().await.expect("a JSON answer");
            assert!(status.is_success(), "{path}: {status} {body}");
            (body, started.elapsed().as_millis())
        }
    };
    // Warm the gateway's reader of the orchestrator's store.
    get("/workflows?limit=1".into()).await;

    for (what, path, check) in &list_checks(first_at) {
        let (body, ms) = get(path.clone()).await;
        check(&body).unwrap_or_else(|e| panic!("{what} ({path}): {e}"));
        figures.push((format!("GET {path}"), ms));
    }
    let (_, ms) = get("/console/api/overview".into()).await;
    figures.push(("GET /console/api/overview (what every page waits for)".into(), ms));
    let (summary, ms) = get("/console/api/summary".into()).await;
    let counted: i64 = summary["counts"].as_object().unwrap().values().map(|n| n.as_i64().unwrap()).sum();
    assert_eq!(counted, MANY as i64, "{summary}");
    figures.push(("GET /console/api/summary (counts by state, versions; after the rows)".into(), ms));

    figures.extend(list_in_browser(sys.http).await);
    let store_kind = if baton_tests::on_postgres() { "PostgreSQL" } else { "SQLite" };
    eprintln!("\n| {MANY} sagas on {store_kind} | ms |\n|---|---:|");
    for (what, ms) in &figures {
        eprintln!("| {what} | {ms} |");
    }
    // Every answer a page waits for in well under a second; the counts, which no page waits
    // for (they read every saga), in a few.
    for (what, ms) in &figures[1..] {
        let limit = if what.contains("summary") { 3000 } else { 1000 };
        assert!(*ms < limit, "{what} took {ms} ms with {MANY} sagas");
    }
    sys.stop().await;
}

/// The saga `i` of [`fill_many`].
fn saga(i: usize) -> uuid::Uuid {
    uuid::Uuid::from_u128(0xba70_u128 << 64 | i as u128)
}

/// [`MANY`] sagas, 10 ms apart from `first_at`: the 8 states, 2 workflows and 3 versions in
/// turn, a name each, 1,000 owners.
async fn fill_many(store: &baton_store::Location, first_at: i64) {
    use baton_orchestrator::testing::{Filled, fill};
    let statuses = baton_workflow::SagaStatus::ALL;
    fill(store, MANY, move |i| Filled {
        id: saga(i),
        space_id: uuid::Uuid::from_u128(0x5ace_u128 << 64 | i as u128),
        workflow: ["create-space", "create-space-parallel"][i % 2].into(),
        status: statuses[i % statuses.len()],
        name: format!("scale-{i}"),
        owner: format!("owner-{}", i % 1000),
        version: ["v-a", "v-b", "v-c"][i % 3].into(),
        created_at_ms: first_at + i as i64 * 10,
    })
    .await
    .expect("the fixture fills the store");
}

/// Each filter and search of `GET /workflows` over [`fill_many`]'s sagas, and what its page
/// must hold.
fn list_checks(first_at: i64) -> Vec<(&'static str, String, Check)> {
    let middle = first_at + (MANY as i64 / 2) * 10;
    let cursor = format!("{}.{}", middle, saga(MANY / 2).simple());
    let failed = baton_workflow::SagaStatus::CompensationFailed.as_str();
    vec![
        (
            "newest page",
            "/workflows".into(),
            Box::new(move |b| expect_ids(b, &[saga(MANY - 1), saga(MANY - 2)])),
        ),
        (
            "a page at the middle (cursor)",
            format!("/workflows?cursor={cursor}"),
            Box::new(move |b| expect_ids(b, &[saga(MANY / 2 - 1), saga(MANY / 2 - 2)])),
        ),
        ("state", format!("/workflows?state={failed}"), Box::new(move |b| every(b, "status", failed))),
        (
            "workflow",
            "/workflows?workflow=create-space-parallel".into(),
            Box::new(|b| every(b, "workflow", "create-space-parallel")),
        ),
        (
            "version",
            "/workflows?version=v-b".into(),
            Box::new(move |b| expect_ids(b, &[saga(MANY - 3), saga(MANY - 6)])),
        ),
        ("owner", "/workflows?owner=owner-7".into(), Box::new(|b| every(b, "owner", "owner-7"))),
        ("name", "/workflows?name=scale-77777".into(), Box::new(move |b| exactly(b, &[saga(77_777)]))),
        (
            "search: a saga id",
            format!("/workflows?q={}", saga(4242)),
            Box::new(move |b| exactly(b, &[saga(4242)])),
        ),
        ("search: an owner", "/workflows?q=owner-999".into(), Box::new(|b| every(b, "owner", "owner-999"))),
        (
            "time range (since, until)",
            format!("/workflows?since={}&until={}", middle, middle + 30),
            Box::new(move |b| exactly(b, &[saga(MANY / 2 + 2), saga(MANY / 2 + 1), saga(MANY / 2)])),
        ),
        (
            "state + workflow + until",
            format!("/workflows?state={failed}&workflow=create-space-parallel&until={middle}"),
            Box::new(move |b| every(b, "status", failed).and(every(b, "workflow", "create-space-parallel"))),
        ),
        // The worst case: no saga of the state has the workflow (8 states, 2 workflows, in
        // turn), so the walk of the state's index reads all its 12,500 sagas.
        (
            "state + workflow, none matching",
            format!("/workflows?state={failed}&workflow=create-space"),
            Box::new(|b| exactly(b, &[])),
        ),
    ]
}

/// The console's list page in chromium, plain and filtered: how long each took to show its
/// rows; nothing without a browser.
async fn list_in_browser(http: std::net::SocketAddr) -> Vec<(String, u128)> {
    let failed = baton_workflow::SagaStatus::CompensationFailed.as_str();
    let Some(Session { c, profile: _profile, driver: _driver }) = session().await else { return Vec::new() };
    let mut figures = Vec::new();
    for (what, page) in [
        ("the console's list", "#/sagas".to_owned()),
        ("the console's list, filtered", format!("#/sagas?state={failed}&q=owner-5")),
    ] {
        // From a page that reads nothing (the browser and its script warm), to the list.
        open(&c, http, "#/compare").await;
        until(&c, "the comparison page", "return document.querySelector('iframe') ? 'ok' : ''", |s| {
            s == "ok"
        })
        .await;
        let started = Instant::now();
        open(&c, http, &page).await;
        until(&c, what, "return document.querySelectorAll('table.sagas tbody tr').length + ''", |s| s != "0")
            .await;
        figures.push((format!("{what} in chromium, to rows shown ({page})"), started.elapsed().as_millis()));
    }
    screenshot(&c, "8-sagas-100000").await;
    c.close().await.expect("the browser closes");
    figures
}

/// The page starts with these sagas.
fn expect_ids(body: &Value, first: &[uuid::Uuid]) -> Result<(), String> {
    let got: Vec<&str> =
        body["workflows"].as_array().unwrap().iter().map(|w| w["id"].as_str().unwrap()).collect();
    let want: Vec<String> = first.iter().map(|id| id.to_string()).collect();
    (got.len() >= want.len() && got[..want.len()] == want.iter().map(String::as_str).collect::<Vec<_>>())
        .then_some(())
        .ok_or_else(|| format!("the page starts {:?}, not {want:?}", &got[..got.len().min(3)]))
}

/// The page holds exactly these sagas, in this order.
fn exactly(body: &Value, ids: &[uuid::Uuid]) -> Result<(), String> {
    let n = body["workflows"].as_array().unwrap().len();
    if n != ids.len() {
        return Err(format!("{n} sagas, not {}", ids.len()));
    }
    expect_ids(body, ids)
}

/// Every saga of a full page (50, with a next one) has `field` = `value`.
fn every(body: &Value, field: &str, value: &str) -> Result<(), String> {
    let rows = body["workflows"].as_array().unwrap();
    if rows.len() != 50 || body["next_cursor"].is_null() {
        return Err(format!("{} sagas, next {}: not a full page", rows.len(), body["next_cursor"]));
    }
    match rows.iter().find(|w| w[field] != value) {
        Some(w) => Err(format!("a saga with {field} {}", w[field])),
        None => Ok(()),
    }
}

/// The child sagas of the nested workflow, as the saga page shows them: nested in the parent
/// with their own flow, each linking back to its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_nests_a_child_saga_in_its_parent() {
    let Some(Session { c, profile: _profile, driver: _driver }) = session().await else { return };
    let env = TestEnv::new().await;
    let cfg = SystemConfig { workflow: "create-space-nested".into(), ..SystemConfig::default() };
    let sys = System::start(&env, cfg).await;
    // Routing refuses a reserved key after the child reserved capacity: the child is undone.
    let (s, refused) = sys.create("admin", "gus").await;
    assert_eq!(s, 409, "{refused}");
    let saga = refused["workflow_id"].as_str().expect("a workflow id").to_owned();
    open(&c, sys.http, &format!("#/saga/{saga}")).await;
    let flow = until(&c, "the parent's flow", FLOW, |s| s.contains("routing:refused")).await;
    assert_eq!(flow, "records:compensated entitlements:compensated routing:refused notifier:pending");
    const CHILDREN: &str = "return [...document.querySelectorAll('#nested .child-saga')].map(s => s.dataset.state + ' ' + [...s.querySelectorAll('g.step')].map(g => g.dataset.step + ':' + g.dataset.phase).join(' ')).join(' | ')";
    let nested = until(&c, "the child nested in it", CHILDREN, |s| s.starts_with("rolled_back")).await;
    assert_eq!(nested, "rolled_back placement:compensated entitlements:compensated");
    screenshot(&c, "8-saga-with-child").await;
    let child = until(
        &c,
        "the child's link",
        "return document.querySelector('#nested .child-saga')?.dataset.child || ''",
        |s| !s.is_empty(),
    )
    .await;
    open(&c, sys.http, &format!("#/saga/{child}")).await;
    let parent = until(
        &c,
        "the child's page, linking back",
        "return document.querySelector('#parent-saga a')?.textContent || ''",
        |s| !s.is_empty(),
    )
    .await;
    assert_eq!(parent, saga);
    c.close().await.expect("the browser closes");
    sys.stop().await;
}

/// Hybrid mode has its page: the saga list (the steps that must complete run as a saga), and
/// each space's chain, where the follow-ups that react to the saga's event show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_hybrid_saga_and_its_follow_ups() {
    let Some(Session { c, profile: _profile, driver: _driver }) = session().await else { return };
    let env = TestEnv::new().await;
    let cfg = SystemConfig {
        mode: baton_protocol::Mode::Hybrid,
        workflow: "create-space-hybrid".into(),
        ..SystemConfig::default()
    };
    let sys = System::start(&env, cfg).await;
    let (s, space) = sys.create("hybrid-one", "hana").await;
    assert_eq!(s, 200, "{space}");
    let saga = space["workflow_id"].as_str().expect("a workflow id").to_owned();

    open(&c, sys.http, "").await;
    let home = until(&c, "hybrid mode's page", "return document.getElementById('main').dataset.page + ' ' + [...document.querySelectorAll('#nav a')].map(a => a.textContent).join(',')", |s| {
        s.starts_with("sagas ")
    })
    .await;
    assert_eq!(home, "sagas Sagas,Spaces,Health,Comparison");
    let rows = until(&c, "the saga listed", ROWS, |s| !s.is_empty()).await;
    assert_eq!(rows, saga);

    open(&c, sys.http, &format!("#/saga/{saga}")).await;
    let flow = until(&c, "the saga's flow", FLOW, |s| s.contains("routing:done")).await;
    assert_eq!(flow, "records:done placement:done entitlements:done routing:done");
    // The event step is announced, not awaited: a line of the timeline, no step of the flow.
    let timeline = until(&c, "the announcement", TIMELINE, |s| s.contains(":emitted")).await;
    assert!(!timeline.contains("notifier:"), "nothing awaits the email in hybrid mode: {timeline}");
    screenshot(&c, "a-hybrid-saga").await;

    open(&c, sys.http, &format!("#/space/{}", space["id"].as_str().expect("a space id"))).await;
    let chain = until(&c, "the follow-ups on the chain", CHAIN, |s| s.contains("notifier:ok")).await;
    assert!(chain.starts_with("records:ok placement:ok entitlements:ok routing:ok"), "{chain}");
    screenshot(&c, "b-hybrid-space").await;
    c.close().await.expect("the browser closes");
    sys.stop().await;
}
