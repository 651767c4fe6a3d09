//! The console in a real browser: Debian's chromium, headless, driven through chromedriver
//! (fantoccini). A workflow-mode system with a saga that succeeded and one that was compensated,
//! and an events-mode system with a space its chain left orphaned, then undone by `baton
//! reconcile`; each page must render the right steps and states. Screenshots of every page go to
//! `$BATON_ARTIFACTS` (default `target/console-screenshots/`). scripts/test.sh installs chromium
//! and chromium-driver; without them the test says so loudly and passes without a browser.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

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
/// Each link of a space's chain as `service:state`.
const CHAIN: &str = "return [...document.querySelectorAll('#chain .link')].map(l => l.dataset.service + ':' + l.dataset.state).join(' ')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_saga_that_succeeded_one_compensated_and_an_orphaned_chain() {
    let (chromium, driver_path) = match browser() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("\n!!!!! SKIPPED the console's browser test: {why} !!!!!\n");
            return;
        }
    };
    let driver = Driver::start(&driver_path).await;
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(&chromium, profile.path()).await;

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
    // Search by owner: the request of alice.
    open(&c, sys.http, "#/sagas?q=alice").await;
    until(&c, "the search by owner", "return [...document.querySelectorAll('table.requests tbody tr')].map(r => r.dataset.space).join(' ')", |s| {
        s == ok["id"].as_str().unwrap()
    })
    .await;

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
    screenshot(&c, "4-health").await;
    open(&c, sys.http, "#/compare").await;
    until(&c, "the comparison page", "return document.querySelector('iframe') ? 'ok' : ''", |s| s == "ok")
        .await;
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

/// The child sagas of the nested workflow, as the saga page shows them: nested in the parent
/// with their own flow, each linking back to its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_nests_a_child_saga_in_its_parent() {
    let (chromium, driver_path) = match browser() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("\n!!!!! SKIPPED the console's browser test: {why} !!!!!\n");
            return;
        }
    };
    let driver = Driver::start(&driver_path).await;
    let profile = tempfile::tempdir().unwrap();
    let c = driver.browser(&chromium, profile.path()).await;
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
