//! The gateway against hostile or careless clients, with a real broker and real databases:
//! input it must refuse (and how), one owner however it is spelled, answers that carry the ids a
//! client needs next, and clients that are slow, idle or too many.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_gateway::HttpLimits;
use baton_protocol::Service;
use baton_tests::{System, SystemConfig, TestEnv, baton_bin, requests, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, DropGuard};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

/// `POST /spaces` with the given headers and body, as sent: status and JSON body.
async fn post(sys: &System, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut req = client().post(format!("http://{}/spaces", sys.http)).body(body.to_owned());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("POST /spaces");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

/// A refusal: its status, the same in the body, and one sentence holding `needle`.
fn refused(case: &str, (status, body): (u16, Value), want: u16, needle: &str) {
    assert_eq!(status, want, "{case}: {body}");
    assert_eq!(body["status"], want, "{case}: {body}");
    let msg = body["error"].as_str().unwrap_or_else(|| panic!("{case}: no sentence in {body}"));
    assert!(msg.contains(needle), "{case}: `{needle}` not in {msg:?}");
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_that_should_be_refused_is_refused_with_its_status_and_a_sentence() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let good = r#"{"name":"acme","owner":"alice"}"#;
    refused("text/plain", post(&sys, &[("content-type", "text/plain")], good).await, 415, "not JSON");
    refused("no content-type", post(&sys, &[], good).await, 415, "no content-type");
    refused(
        "latin1",
        post(&sys, &[("content-type", "application/json; charset=latin1")], good).await,
        415,
        "UTF-8",
    );
    refused("a false gzip", post(&sys, &[JSON, ("content-encoding", "gzip")], good).await, 415, "`gzip`");
    refused(
        "a name given twice",
        post(&sys, &[JSON], r#"{"name":"a","name":"b","owner":"alice"}"#).await,
        400,
        "`name` is given twice",
    );
    refused("name -", post(&sys, &[JSON], r#"{"name":"-","owner":"alice"}"#).await, 422, "start and end");
    refused("name a-", post(&sys, &[JSON], r#"{"name":"a-","owner":"alice"}"#).await, 422, "start and end");
    refused(
        "a zero-width space",
        post(&sys, &[JSON], r#"{"name":"zw","owner":"\u200bcarol"}"#).await,
        422,
        "U+200B at character 1",
    );
    refused(
        "a bell",
        post(&sys, &[JSON], r#"{"name":"bell","owner":"car\u0007ol"}"#).await,
        422,
        "U+0007 at character 4",
    );
    refused(
        "an unknown field",
        post(&sys, &[JSON], r#"{"name":"a","owner":"o","plan":"x"}"#).await,
        422,
        "`plan`",
    );
    // `application/json; charset=utf-8` is JSON.
    let (status, body) = post(&sys, &[("content-type", "application/json; charset=utf-8")], good).await;
    assert_eq!(status, 200, "{body}");
    // Nothing refused reached the system: one request, the good one.
    assert_eq!(requests(&env.store()), 1);
    // A method a path does not take: 405 with a sentence, not an empty body.
    let r = client().get(format!("http://{}/spaces", sys.http)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.headers().get("allow").is_some_and(|a| a == "POST"), "{:?}", r.headers());
    refused("GET /spaces", (405, r.json().await.expect("a JSON body")), 405, "POST /spaces");
    sys.stop().await;
}

/// Send `request` as raw bytes on a connection of its own; the status and JSON body of the
/// answer (the gateway closes the connection after each of these).
async fn raw(sys: &System, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(sys.http).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10)).await.unwrap_or_else(|| {
        panic!("no answer within 10 s to {:?}", String::from_utf8_lossy(&request[..request.len().min(60)]))
    });
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {answer:?}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
}

/// The answers hyper gives before a request reaches the router (a head over its limits, a
/// target too long, a line it cannot parse) and axum's for a path that is not UTF-8 were empty
/// or plain text; every error is JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_given_before_the_router_are_json_with_a_sentence_too() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    let mut many = String::from("GET /health HTTP/1.1\r\nhost: baton\r\n");
    for i in 0..101 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    refused("101 headers", raw(&sys, many.as_bytes()).await, 431, "100 header fields");
    // hyper checks its limit only on a head still incomplete in its buffer, so 300 KiB that
    // arrive in pieces can pass it (hyper issue 4081): the router checks again.
    let big = format!("GET /health HTTP/1.1\r\nhost: baton\r\ncookie: {}\r\n\r\n", "c".repeat(300 * 1024));
    refused("a 300 KiB header", raw(&sys, big.as_bytes()).await, 431, "256 KiB");
    let long = format!("GET /spaces/{} HTTP/1.1\r\nhost: baton\r\n\r\n", "a".repeat(70_000));
    refused("a 70,000-byte path", raw(&sys, long.as_bytes()).await, 414, "65534 bytes");
    refused(
        "a header without a colon",
        raw(&sys, b"GET /health HTTP/1.1\r\nhost: baton\r\nno colon here\r\n\r\n").await,
        400,
        "malformed",
    );
    for path in ["spaces", "workflows", "workflows/%FF%FE/cancel"] {
        let path = if path.contains('%') { path.to_owned() } else { format!("{path}/%FF%FE") };
        let method = if path.ends_with("cancel") { "POST" } else { "GET" };
        let req = format!("{method} /{path} HTTP/1.1\r\nhost: baton\r\nconnection: close\r\n\r\n");
        refused(&path, raw(&sys, req.as_bytes()).await, 400, "not UTF-8");
    }
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_however_spelled_is_one_owner_for_the_quota() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    // The free plan allows three spaces per owner.
    for (name, owner) in [("c1", "carol"), ("c2", "Carol"), ("c3", "CAROL")] {
        let (status, body) = sys.create(name, owner).await;
        assert_eq!(status, 200, "{owner}: {body}");
        assert_eq!(body["owner"], "carol", "the normalised owner is what the answer holds");
    }
    for (i, owner) in ["Carol", "CAROL", "carol ", " carol", "ｃａｒｏｌ"].into_iter().enumerate() {
        let (status, body) = sys.create(&format!("c{}", i + 4), owner).await;
        assert_eq!(status, 403, "{owner:?} is carol, who has three spaces: {body}");
    }
    let nfc = "andr\u{e9}";
    let nfd = "andre\u{301}";
    for (name, owner) in [("a1", nfc), ("a2", nfd), ("a3", "ANDR\u{c9}")] {
        let (status, body) = sys.create(name, owner).await;
        assert_eq!(status, 200, "{owner}: {body}");
        assert_eq!(body["owner"], nfc);
    }
    for (name, owner) in [("a4", nfd), ("a5", nfc)] {
        let (status, body) = sys.create(name, owner).await;
        assert_eq!(status, 403, "{owner:?} is andré, who has three spaces: {body}");
    }
    // Each service holds the one spelling.
    let owners = baton_services::read::Holdings::owners(&env.store()).await.unwrap();
    assert_eq!(owners.len(), 2, "records holds two owners: {owners:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_names_the_space_and_the_workflow_to_look_up() {
    let env = TestEnv::new().await;
    let sys = System::start(&env, SystemConfig::default()).await;
    // 409: `admin` is a reserved route, refused at the last step before the email.
    let (status, body) = sys.create("admin", "bob").await;
    assert_eq!(status, 409, "{body}");
    let (space_id, workflow_id) = ids(&body);
    let (status, space) = sys.get(&format!("/spaces/{space_id}")).await;
    assert_eq!((status, space["told_status"].as_i64()), (200, Some(409)), "{space}");
    let (status, view) = sys.get(&format!("/workflows/{workflow_id}")).await;
    assert_eq!((status, view["status"].as_str()), (200, Some("rolled_back")), "{view}");
    // The step that never ran says so.
    let out = std::process::Command::new(baton_bin())
        .args(["workflows", "show", workflow_id.as_str()])
        .args(env.store_args())
        .output()
        .expect("baton workflows show");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let notify = text.lines().find(|l| l.contains("[notifier]")).unwrap_or_else(|| panic!("{text}"));
    assert!(notify.contains("not run"), "{text}");
    assert!(!text.contains("pending"), "{text}");
    // 403: the owner's plan is full.
    for name in ["b1", "b2", "b3"] {
        assert_eq!(sys.create(name, "bob").await.0, 200);
    }
    let (status, body) = sys.create("b4", "bob").await;
    assert_eq!(status, 403, "{body}");
    let (_, workflow_id) = ids(&body);
    assert_eq!(sys.get(&format!("/workflows/{workflow_id}")).await.0, 200);
    sys.stop().await;
}

/// The `space_id` and `workflow_id` of an answer, both present.
fn ids(body: &Value) -> (String, String) {
    let id = |k: &str| body[k].as_str().unwrap_or_else(|| panic!("no {k} in {body}")).to_owned();
    (id("space_id"), id("workflow_id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_504_names_the_space_and_the_workflow_that_goes_on() {
    let env = TestEnv::new().await;
    // Routing is not running: the saga waits at its step past the client's deadline.
    let cfg =
        SystemConfig { skip: vec![Service::Routing], deadline: Duration::from_secs(2), ..Default::default() };
    let sys = System::start(&env, cfg).await;
    let (status, body) = sys.create("late", "dora").await;
    assert_eq!(status, 504, "{body}");
    let (space_id, workflow_id) = ids(&body);
    assert!(body["error"].as_str().unwrap().contains(&format!("GET /spaces/{space_id}")), "{body}");
    let (status, view) = sys.get(&format!("/workflows/{workflow_id}")).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["space_id"], space_id.as_str());
    let (status, space) = sys.get(&format!("/spaces/{space_id}")).await;
    assert_eq!((status, space["told_status"].as_i64()), (200, Some(504)), "{space}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_broker_keeps_refusing_is_sent_again_until_the_deadline_then_answered_503() {
    let env = TestEnv::new().await;
    // No orchestrator: the first start stays in orchestrator.commands, which then refuses
    // (nacks) every further publish, as a queue without a leader does (a quorum queue takes
    // publishes until it is over its limit).
    let cfg =
        SystemConfig { with_orchestrator: false, deadline: Duration::from_secs(3), ..Default::default() };
    let sys = System::start(&env, cfg).await;
    env.set_policy(
        "full",
        "^orchestrator\\.commands$",
        serde_json::json!({"max-length": 0, "overflow": "reject-publish"}),
    )
    .await;
    let (status, body) = sys.create("first", "dora").await;
    assert_eq!(status, 504, "taken, and no orchestrator answers: {body}");
    let started = std::time::Instant::now();
    let (status, body) = sys.create("second", "dora").await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nack"), "{body}");
    // Sent again while the deadline allowed, not refused at the first nack.
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(env.queue_depth("orchestrator.commands").await, Some(1), "the refused start never went in");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_of_a_saga_carries_the_clients_deadline() {
    let env = TestEnv::new().await;
    // No orchestrator: the start stays in its queue to be read.
    let cfg =
        SystemConfig { with_orchestrator: false, deadline: Duration::from_secs(2), ..Default::default() };
    let sys = System::start(&env, cfg).await;
    let before = now_ms();
    let (status, body) = sys.create("timed", "erin").await;
    let after = now_ms();
    assert_eq!(status, 504, "{body}");
    let (_, workflow_id) = ids(&body);
    let msgs = env.take_messages("orchestrator.commands", 1).await;
    let start: Value = serde_json::from_str(msgs[0]["payload"].as_str().expect("a text payload")).unwrap();
    assert_eq!(start["saga_id"], workflow_id.as_str(), "{start}");
    let deadline = &start["deadline"];
    let budget = deadline["budget_ms"].as_u64().unwrap_or_else(|| panic!("no deadline in {start}"));
    let at = deadline["at_ms"].as_u64().unwrap();
    assert!(budget > 1_000 && budget <= 2_000, "{deadline}");
    // The instant the saga must give up: a sixth of the budget (333 ms) before the 504 was due,
    // 2 s after the request came, so that a saga that gives up can still tell the client.
    assert!(
        at >= before + 2_000 - 333 - 50 && at <= after - 333 + 50,
        "{deadline}, request between {before} and {after}"
    );
    sys.stop().await;
}

fn now_ms() -> u64 {
    u64::try_from(baton_store::now_ms()).unwrap()
}

/// A gateway of the test's own, with these limits, over a system without one.
struct Gateway {
    sys: System,
    http: SocketAddr,
    _stop: DropGuard,
}

async fn gateway(env: &TestEnv, limits: HttpLimits) -> Gateway {
    let cfg = SystemConfig { with_gateway: false, ..Default::default() };
    let mut sys = System::start(env, cfg.clone()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let opts =
        baton_gateway::Options { http, limits, ..baton_tests::node_config(env, &cfg).gateway_options() };
    let cancel = CancellationToken::new();
    tokio::spawn(baton_gateway::serve(listener, opts, cancel.clone()));
    sys.use_gateway(http).await;
    Gateway { sys, http, _stop: cancel.drop_guard() }
}

/// Read what the gateway sends until it closes the connection, or `None` after `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut got)).await {
        Ok(_) => Some(String::from_utf8_lossy(&got).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_closed_within_the_header_timeout() {
    let env = TestEnv::new().await;
    let limits = HttpLimits { header_timeout: Duration::from_secs(1), ..HttpLimits::default() };
    let gw = gateway(&env, limits).await;
    // Half a request, then nothing.
    let mut slow = TcpStream::connect(gw.http).await.unwrap();
    slow.write_all(b"POST /spaces HTTP/1.1\r\nhost: baton\r\ncontent-type: appl").await.unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(gw.http).await.unwrap();
    // One answered request, then idle on a kept-alive connection.
    let mut idle = TcpStream::connect(gw.http).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: baton\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let t0 = Instant::now();
    for (what, stream) in
        [("half headers", &mut slow), ("no bytes", &mut silent), ("kept alive, idle", &mut idle)]
    {
        read_until_closed(stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: the connection is still open 5 s after a 1 s header timeout"));
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "closed after {:?}", t0.elapsed());
    gw.sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408_within_the_body_timeout() {
    let env = TestEnv::new().await;
    let limits = HttpLimits { body_timeout: Duration::from_secs(1), ..HttpLimits::default() };
    let gw = gateway(&env, limits).await;
    let head = "POST /spaces HTTP/1.1\r\nhost: baton\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n";
    // A body shorter than its content-length.
    let mut short = TcpStream::connect(gw.http).await.unwrap();
    short.write_all(format!("{head}{{\"name\":\"a\"").as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let answer = read_until_closed(&mut short, Duration::from_secs(5)).await.expect("an answer within 5 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""status":408"#), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(3), "answered after {:?}", t0.elapsed());
    // A body sent a byte at a time, each within the timeout, all of it not: the timeout is for
    // the whole body.
    let mut drip = TcpStream::connect(gw.http).await.unwrap();
    drip.write_all(head.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let mut answer = String::new();
    for b in br#"{"name":"drip","owner":"fred","x":"xxx"}"# {
        if drip.write_all(&[*b]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(300), drip.read(&mut buf)).await {
            answer = String::from_utf8_lossy(&buf[..n]).into_owned();
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?} after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(3), "answered after {:?}", t0.elapsed());
    gw.sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_connections_leave_valid_requests_answered_and_more_are_refused_at_once() {
    const IDLE: usize = 5_000;
    const LIMIT: usize = IDLE + 50;
    // Both ends of every connection are in this process.
    let nofile = rlimit::increase_nofile_limit(4 * LIMIT as u64).expect("read the open-file limit");
    assert!(
        nofile >= 2 * LIMIT as u64 + 512,
        "this test opens {IDLE} connections to a gateway in the same process and needs {} open files; \
         the limit is {nofile}: raise it (ulimit -n)",
        2 * LIMIT + 512
    );
    let env = TestEnv::new().await;
    let limits = HttpLimits {
        header_timeout: Duration::from_secs(120),
        max_connections: LIMIT,
        ..HttpLimits::default()
    };
    let gw = gateway(&env, limits).await;
    let mut idle = Vec::with_capacity(IDLE);
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        // A few hundred at a time: the listen backlog is not the subject.
        while opening.len() >= 256 {
            idle.push(opening.join_next().await.unwrap().unwrap());
        }
        opening.spawn(stalled(gw.http));
    }
    while let Some(s) = opening.join_next().await {
        idle.push(s.unwrap());
    }
    let t0 = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), gw.sys.create("busy", "gina"))
        .await
        .expect("a valid request is answered while 5,000 connections idle");
    assert_eq!(status, 200, "{body}");
    let answered_in = t0.elapsed();
    assert!(answered_in < Duration::from_secs(5), "answered in {answered_in:?}");
    // The limit is near: of 100 more, those past it get a 503 at once and are closed.
    let mut more = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let http = gw.http;
        more.spawn(async move {
            let mut s = TcpStream::connect(http).await.expect("connect");
            let t = Instant::now();
            let answer = read_until_closed(&mut s, Duration::from_secs(3)).await;
            (answer, t.elapsed(), s)
        });
    }
    let (mut refused, mut held, mut slowest) = (0, Vec::new(), Duration::ZERO);
    while let Some(r) = more.join_next().await {
        let (answer, took, stream) = r.unwrap();
        match answer {
            Some(a) => {
                assert!(a.starts_with("HTTP/1.1 503"), "{a}");
                assert!(a.contains("retry shortly"), "{a}");
                refused += 1;
                slowest = slowest.max(took);
            }
            None => held.push(stream),
        }
    }
    // 50 places were left, less the harness client's kept-alive connection.
    assert!((45..=50).contains(&held.len()), "{} of 100 more were held, {refused} refused", held.len());
    assert!(slowest < Duration::from_secs(1), "the slowest refusal took {slowest:?}");
    eprintln!(
        "{IDLE} idle connections: a valid request answered in {answered_in:?}; {refused} past the limit \
         refused, the slowest in {slowest:?}"
    );
    drop(idle);
    drop(held);
    gw.sys.stop().await;
}

/// A connection the gateway has surely accepted (it answered a first request on it), left
/// with the head of a second request that never ends.
async fn stalled(http: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(http).await.expect("connect");
    s.write_all(b"GET /accepted HTTP/1.1\r\nhost: baton\r\n\r\n").await.unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("an answer to the first request");
    assert_eq!(&head, b"HTTP/1.1 404");
    s.write_all(b"POST /spaces HTTP/1.1\r\nhost: ba").await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_the_limit_gets_a_json_503_at_once() {
    let env = TestEnv::new().await;
    // Two places, both held by this test (headers never sent, within a long header timeout).
    // The harness's client may still keep a connection of its own: then the second of these is
    // already refused, and either way the request below is past the limit.
    let limits =
        HttpLimits { max_connections: 2, header_timeout: Duration::from_secs(60), ..HttpLimits::default() };
    let gw = gateway(&env, limits).await;
    let _held = [TcpStream::connect(gw.http).await.unwrap(), TcpStream::connect(gw.http).await.unwrap()];
    // Read only: the refusal is written at accept, and a request sent meanwhile could be reset
    // by the close before its answer is read.
    let (status, body) = wait_for("a refusal", Duration::from_secs(10), || async {
        let t = Instant::now();
        let mut stream = TcpStream::connect(gw.http).await.ok()?;
        let text = read_until_closed(&mut stream, Duration::from_secs(1)).await?;
        assert!(t.elapsed() < Duration::from_secs(1), "refused after {:?}", t.elapsed());
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, serde_json::from_str::<Value>(body).ok()?)).filter(|(s, _)| *s == 503)
    })
    .await;
    refused("past the limit", (status, body), 503, "2 connections open");
    gw.sys.stop().await;
}
