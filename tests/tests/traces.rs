//! OpenTelemetry traces, exported by real `baton run` processes to an OTLP/HTTP receiver that
//! the test runs itself (protobuf bodies decoded with the opentelemetry-proto types). One
//! request's spans come from every process it went through and form one tree: the HTTP
//! request at its root, the publishes, consumes, handlings and saga steps below it, linked
//! across processes by the messages' `traceparent` headers. A client's own `traceparent` is
//! honoured: the request joins its trace, which `GET /workflows/{id}` names, and so do the
//! request's log lines, in `--log-format json` too.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use baton_tests::{TestEnv, free_port, spawn_baton, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use tokio::process::Child;

/// One exported span, as far as the test looks at it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    /// The span's status code (0 unset, 1 ok, 2 error).
    status: i32,
}

type Spans = Arc<Mutex<Vec<Span>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on 127.0.0.1: what it was sent, and its base URL. A body that does
/// not decode fails the test (400, and the span list never completes).
async fn receiver() -> (Spans, String) {
    let spans: Spans = Arc::default();
    let store = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = Arc::clone(&store);
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut got = store.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.push(Span {
                            service: service.clone(),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            name: span.name,
                            status: span.status.map_or(0, |s| s.code),
                        });
                    }
                }
                // An empty ExportTraceServiceResponse: everything accepted.
                (axum::http::StatusCode::OK, Vec::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (spans, url)
}

/// The processes of one mode, exporting to `endpoint`; the gateway's base URL.
async fn start(env: &TestEnv, mode: &str, endpoint: &str, procs: &mut Vec<Child>) -> String {
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let services = ["records", "placement", "entitlements", "routing", "notifier"];
    let others: &[&str] = if mode == "workflow" { &["orchestrator"] } else { &[] };
    for c in services.iter().chain(others) {
        procs.push(spawn_baton(env, &["run", c, "--mode", mode], &otel, &format!("{c}.log")));
    }
    let http = format!("127.0.0.1:{}", free_port());
    procs.push(spawn_baton(env, &["run", "gateway", "--mode", mode, "--http", &http], &otel, "gateway.log"));
    let client = reqwest::Client::new();
    let gateway = format!("http://{http}");
    wait_for("the gateway to be ready", Duration::from_secs(30), || async {
        let r = client.get(format!("{gateway}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    for s in services {
        let queue = if mode == "workflow" {
            baton_amqp::topology::command_queue(s)
        } else {
            baton_amqp::topology::event_queue(s)
        };
        wait_for(&format!("a consumer on {queue}"), Duration::from_secs(30), || async {
            (env.queue_consumers(&queue).await? > 0).then_some(())
        })
        .await;
    }
    gateway
}

/// Wait until the spans of `trace_id` come from every one of `processes` and form one tree
/// (every span's parent among them but the root's), the HTTP request at its root; the spans,
/// and the root. Spans come as they end, each process on its own: until the last, a part of
/// the tree may hang from a span still to come.
async fn one_tree(spans: &Spans, trace_id: &str, processes: &[&str], names: &[&str]) -> (Vec<Span>, Span) {
    let what = format!(
        "the spans of trace {trace_id} from {processes:?}, as one tree under POST /spaces with {names:?}"
    );
    wait_for(&what, Duration::from_secs(20), || async {
        let of: Vec<Span> =
            spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        let ids: BTreeSet<&str> = of.iter().map(|s| s.span_id.as_str()).collect();
        let roots: Vec<&Span> = of.iter().filter(|s| !ids.contains(s.parent.as_str())).collect();
        let from: BTreeSet<&str> = of.iter().map(|s| s.service.as_str()).collect();
        let has = |name: &str| of.iter().any(|s| s.name == name);
        let complete = roots.len() == 1
            && roots[0].name == "POST /spaces"
            && processes.iter().all(|p| from.contains(p))
            && names.iter().all(|n| has(n));
        complete.then(|| (of.clone(), roots[0].clone()))
    })
    .await
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.parent == parent.span_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_one_trace_across_every_process_and_keeps_the_clients_trace() {
    let env = TestEnv::new().await;
    let (spans, endpoint) = receiver().await;
    let mut procs = Vec::new();
    let gateway = start(&env, "workflow", &endpoint, &mut procs).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();

    // The client's own trace: the request joins it.
    let (trace_id, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let r = client
        .post(format!("{gateway}/spaces"))
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&serde_json::json!({"name": "traced", "owner": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let saga = body["workflow_id"].as_str().expect("a workflow id");
    let view: serde_json::Value =
        client.get(format!("{gateway}/workflows/{saga}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(view["trace_id"], trace_id, "{view}");

    let every = ["gateway", "orchestrator", "records", "placement", "entitlements", "routing", "notifier"];
    let steps = ["saga step records", "saga step routing", "saga step notifier"];
    let (tree, root) = one_tree(&spans, trace_id, &every, &steps).await;
    assert_eq!(root.service, "gateway", "{tree:#?}");
    assert_eq!(root.parent, client_span, "the request's span is the child of the client's");
    // The request published the start; the orchestrator consumed it, started the saga, sent
    // the first step; the records service consumed that command and handled it.
    let publish = children(&tree, &root);
    assert!(publish.iter().any(|s| s.name == "publish orchestrator.start"), "{tree:#?}");
    let by_name: HashMap<&str, &Span> = tree.iter().map(|s| (s.name.as_str(), s)).collect();
    let handle = by_name.get("handle records.create").expect("the records service's handling");
    assert_eq!(handle.service, "records");
    let consume = tree.iter().find(|s| s.span_id == handle.parent).expect("its consume");
    assert!(consume.name.starts_with("consume "), "{consume:?}");
    let publish = tree.iter().find(|s| s.span_id == consume.parent).expect("the command's publish");
    assert_eq!((publish.name.as_str(), publish.service.as_str()), ("publish records.create", "orchestrator"));
    let step = tree.iter().find(|s| s.span_id == publish.parent).expect("the step");
    assert_eq!(step.name, "saga step records");

    // A rollback: each compensation is a span of the same tree, and a request without a
    // `traceparent` is a trace of its own, its HTTP span the root.
    let r = client
        .post(format!("{gateway}/spaces"))
        .json(&serde_json::json!({"name": "admin", "owner": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    let saga = body["workflow_id"].as_str().expect("a workflow id");
    let view: serde_json::Value =
        client.get(format!("{gateway}/workflows/{saga}")).send().await.unwrap().json().await.unwrap();
    let rolled_back = view["trace_id"].as_str().expect("a trace id").to_owned();
    assert!(rolled_back.len() == 32 && rolled_back != trace_id, "{view}");
    let compensations =
        ["saga compensate records", "saga compensate placement", "saga compensate entitlements"];
    let (_, root) = one_tree(&spans, &rolled_back, &every[..6], &compensations).await;
    assert_eq!(root.parent, "", "no client trace: the request is the root");
    drop(procs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_of_events_is_one_trace_across_every_process() {
    let env = TestEnv::new().await;
    let (spans, endpoint) = receiver().await;
    let mut procs = Vec::new();
    let gateway = start(&env, "events", &endpoint, &mut procs).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let r = client
        .post(format!("{gateway}/spaces"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&serde_json::json!({"name": "flowing", "owner": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let every = ["gateway", "records", "placement", "entitlements", "routing", "notifier"];
    let handled = ["handle space.requested", "publish space.requested"];
    let (tree, root) = one_tree(&spans, trace_id, &every, &handled).await;
    assert_eq!(root.service, "gateway", "{tree:#?}");
    for s in &every[1..] {
        assert!(
            tree.iter().any(|span| span.service == *s && span.name.starts_with("handle ")),
            "{s}: {tree:#?}"
        );
    }
    drop(procs);
}

/// A 5xx answer is an error on the request's span (OpenTelemetry's HTTP conventions for a
/// server); a 4xx is not. A gateway alone, in events mode with a 1 s deadline: a request that
/// no service handles is answered 504, an invalid one 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_ends_the_request_span_with_an_error_status() {
    let env = TestEnv::new().await;
    let (spans, endpoint) = receiver().await;
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let http = format!("127.0.0.1:{}", free_port());
    let args = ["run", "gateway", "--mode", "events", "--deadline", "1s", "--http", &http];
    let _gateway = spawn_baton(&env, &args, &otel, "gateway.log");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let gateway = format!("http://{http}");
    wait_for("the gateway to answer", Duration::from_secs(30), || async {
        client.get(format!("{gateway}/health/live")).send().await.ok().map(|_| ())
    })
    .await;
    let send = |trace_id: &'static str, body: serde_json::Value| {
        client
            .post(format!("{gateway}/spaces"))
            .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
            .json(&body)
            .send()
    };
    let (late, bad) = ("5bf92f3577b34da6a3ce929d0e0e4736", "6bf92f3577b34da6a3ce929d0e0e4736");
    let r = send(late, serde_json::json!({"name": "unanswered", "owner": "alice"})).await.unwrap();
    assert_eq!(r.status(), 504);
    let r = send(bad, serde_json::json!({"name": ""})).await.unwrap();
    assert_eq!(r.status(), 422);
    let status_of = |trace_id: &str| {
        let trace_id = trace_id.to_owned();
        let spans = Arc::clone(&spans);
        async move {
            let got = spans.lock().unwrap();
            got.iter().find(|s| s.trace_id == trace_id && s.name == "POST /spaces").map(|s| s.status)
        }
    };
    let late = wait_for("the 504's span", Duration::from_secs(20), || status_of(late)).await;
    assert_eq!(late, 2, "a 504 is an error span");
    let bad = wait_for("the 422's span", Duration::from_secs(20), || status_of(bad)).await;
    assert_eq!(bad, 0, "a 422 leaves the status unset");
}

/// `--log-format json`: every line of a process's stderr (not a terminal) is one JSON object,
/// without escape codes, and a line logged for a request carries its trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_requests_trace_id() {
    let env = TestEnv::new().await;
    let http = format!("127.0.0.1:{}", free_port());
    let log = env.data_dir().join("gateway.json.log");
    let mut gateway = tokio::process::Command::new(baton_tests::baton_bin())
        .args(["--log", "info,baton_gateway=debug", "--log-format", "json", "run", "gateway"])
        .args(["--http", &http, "--deadline", "1s", "--amqp-url", &env.amqp_url()])
        .args(env.store_args())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let gateway_url = format!("http://{http}");
    wait_for("the gateway to be ready", Duration::from_secs(30), || async {
        let r = client.get(format!("{gateway_url}/health/ready")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    // No orchestrator: the request waits out its deadline, logged at debug under its span.
    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let r = client
        .post(format!("{gateway_url}/spaces"))
        .header("traceparent", format!("00-{trace_id}-051581bf3cb55c13-01"))
        .json(&serde_json::json!({"name": "logged", "owner": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let _ = gateway.kill().await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\x1b'), "{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l["level"].is_string() && l["fields"]["message"].is_string()), "{text}");
    let accepted = lines
        .iter()
        .find(|l| l["fields"]["message"] == "request accepted")
        .unwrap_or_else(|| panic!("the request's line: {text}"));
    assert_eq!(accepted["span"]["trace_id"], trace_id, "{accepted}");
}
