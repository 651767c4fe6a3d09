//! `baton compare` and `baton chaos` watch their fleet and keep their results: a component that
//! exits on its own (hybrid mode's search index too) is started again and shown in the table, one that cannot come back ends the
//! run at once with its log, and a vhost the management API will not delete costs a warning, not
//! the comparison.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_compare::{Options, chaos, compare, report};
use baton_faults::FaultPlan;
use baton_mgmt::Mgmt;
use baton_protocol::Mode;
use baton_tests::{amqp_base, baton_bin, mgmt_base};

/// A stand-in for `baton` that runs the real one, except that the starts of routing numbered in
/// `failing_starts` (counted in `<dir>/routing.starts`) exit at once with an error.
fn wrapper(dir: &Path, failing_starts: &str) -> PathBuf {
    wrapper_of(dir, "routing", failing_starts)
}

/// [`wrapper`] for the starts of `component`.
fn wrapper_of(dir: &Path, component: &str, failing_starts: &str) -> PathBuf {
    let bin = dir.join("baton-wrapper");
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = run ] && [ "$2" = {component} ]; then
    n=$(cat "{dir}/{component}.starts" 2>/dev/null || echo 0)
    n=$((n + 1))
    echo "$n" > "{dir}/{component}.starts"
    case " {failing_starts} " in
        *" $n "*) echo "error: {component} cannot come back (start $n, made to fail by the test)" >&2; exit 2 ;;
    esac
fi
exec "{real}" "$@"
"#,
        dir = dir.display(),
        real = baton_bin().display(),
    );
    std::fs::write(&bin, script).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn options(bin: PathBuf, out: &Path, plan: &str, mgmt: Mgmt) -> Options {
    Options {
        modes: vec![Mode::Workflow, Mode::Events],
        requests: 120,
        concurrency: 8,
        seed: 5,
        faults: FaultPlan::parse(plan, 5).unwrap(),
        deadline: Some(Duration::from_secs(5)),
        ..Options::new(bin, amqp_base(), mgmt, out.to_owned())
    }
}

fn mgmt() -> Mgmt {
    Mgmt::new(&mgmt_base(), "guest", "guest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_exits_on_its_own_is_started_again_and_shown_in_the_table() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    // Routing is crashed by the plan; its first start after that fails, the next one works.
    let bin = wrapper(out.path(), "2");
    let opts = options(bin, out.path(), "crash.routing=30%+1s", mgmt());
    let run = tokio::time::timeout(Duration::from_secs(150), chaos(&opts, Mode::Workflow))
        .await
        .expect("the run ends")
        .expect("the run survives a component that exits once");
    assert_eq!(run.restarted.get("routing"), Some(&1), "{:?}", run.restarted);
    assert_eq!(run.restarted.len(), 1, "only routing exited on its own: {:?}", run.restarted);
    assert!(run.nothing_lost(), "unfinished {} outbox {}", run.unfinished, run.left_in_outbox);
    assert!(run.audit.is_consistent(), "{:?}", run.audit.inconsistencies);
    assert!(run.audit.uncertain.is_empty(), "no 504 expected: {:?}", run.audit.uncertain);
    let table = report::table(&baton_compare::Comparison {
        requests: opts.requests,
        concurrency: opts.concurrency,
        seed: opts.seed,
        refusal_rate: opts.refusal_rate,
        plan: opts.faults.to_string(),
        retry_timeouts: None,
        runs: vec![run],
    });
    let row = table.lines().find(|l| l.starts_with("components that exited")).expect("the row");
    assert!(row.contains("routing x1"), "{row}");
}

/// Hybrid mode's own component, the search index, crashed by the plan and failing its first
/// start after: started again, shown in the table, and every success still indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_hybrid_mode_a_search_index_that_exits_is_started_again() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    let bin = wrapper_of(out.path(), "search", "2");
    let opts =
        Options { modes: vec![Mode::Hybrid], ..options(bin, out.path(), "crash.search=30%+1s", mgmt()) };
    let run = tokio::time::timeout(Duration::from_secs(150), chaos(&opts, Mode::Hybrid))
        .await
        .expect("the run ends")
        .expect("the run survives a search index that exits once");
    assert_eq!(run.injected.get("crash search"), Some(&1), "{:?}", run.injected);
    assert_eq!(run.restarted.get("search"), Some(&1), "{:?}", run.restarted);
    assert_eq!(run.restarted.len(), 1, "only search exited on its own: {:?}", run.restarted);
    assert!(run.nothing_lost(), "unfinished {} outbox {}", run.unfinished, run.left_in_outbox);
    assert!(run.audit.is_consistent(), "every 200 has its search entry: {:?}", run.audit.inconsistencies);
    assert_eq!(run.audit.complete, run.stats.ok, "{:?}", run.stats);
    let table = report::table(&baton_compare::Comparison {
        requests: opts.requests,
        concurrency: opts.concurrency,
        seed: opts.seed,
        refusal_rate: opts.refusal_rate,
        plan: opts.faults.to_string(),
        retry_timeouts: None,
        runs: vec![run],
    });
    assert!(table.lines().nth(1).is_some_and(|h| h.trim() == "hybrid"), "{table}");
    let row = table.lines().find(|l| l.starts_with("components that exited")).expect("the row");
    assert!(row.contains("search x1"), "{row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_cannot_come_back_ends_the_run_at_once_with_its_log() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    // Every start of routing after the plan's crash fails.
    let bin = wrapper(out.path(), "2 3 4 5 6 7 8 9 10 11 12");
    let opts = options(bin, out.path(), "crash.routing=30%+1s", mgmt());
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(150), chaos(&opts, Mode::Workflow))
        .await
        .expect("the run ends")
        .expect_err("the run cannot succeed without routing");
    let took = started.elapsed();
    let text = format!("{err:#}");
    assert!(text.contains("routing") && text.contains("gave up"), "{text}");
    assert!(text.contains("cannot come back"), "the error carries the component's log: {text}");
    assert!(!text.contains("rabbitmq-server -detached"), "the broker is not to blame: {text}");
    // Five quick exits with pauses of 0.5 to 4 s: well under the 5 s deadline of each request
    // plus the minute of settling a run would otherwise wait out.
    assert!(took < Duration::from_secs(60), "gave up after {took:?}");
}

/// A management API in front of the real one that refuses to delete a vhost that exists: the clean-up of a
/// run fails as it did when the API answered late.
async fn refusing_mgmt_proxy() -> (String, tokio::task::JoinHandle<()>) {
    use axum::body::Body;
    use axum::http::{Method, Request, Response, StatusCode};
    let upstream = mgmt_base();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let (upstream, client) = (upstream.clone(), client.clone());
        async move {
            // Only a vhost that exists: deleting a missing one (before creating it) is a no-op.
            let path = req.uri().path().to_owned();
            let exists = async {
                let url = format!("{upstream}{path}");
                let r = client.get(url).basic_auth("guest", Some("guest")).send().await;
                r.is_ok_and(|r| r.status().is_success())
            };
            if req.method() == Method::DELETE && req.uri().path().starts_with("/api/vhosts/") && exists.await
            {
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Body::from("{\"error\":\"made to fail by the test\"}"))
                    .unwrap();
            }
            let url = format!("{upstream}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
            let mut fwd = client.request(req.method().clone(), url);
            for (k, v) in req.headers() {
                if k != "host" {
                    fwd = fwd.header(k, v);
                }
            }
            let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap_or_default();
            match fwd.body(body).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let bytes = r.bytes().await.unwrap_or_default();
                    Response::builder().status(status).body(Body::from(bytes)).unwrap()
                }
                Err(e) => Response::builder().status(502).body(Body::from(e.to_string())).unwrap(),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vhost_that_cannot_be_deleted_costs_a_warning_not_the_comparison() {
    baton_tests::init_logs();
    let out = tempfile::tempdir().unwrap();
    let (proxy, server) = refusing_mgmt_proxy().await;
    let opts = Options {
        modes: vec![Mode::Workflow, Mode::Events],
        requests: 60,
        ..options(baton_bin(), out.path(), "refuse=0.05", Mgmt::new(&proxy, "guest", "guest"))
    };
    let c = tokio::time::timeout(Duration::from_secs(150), compare(&opts))
        .await
        .expect("the comparison ends")
        .expect("a failed clean-up does not throw the comparison away");
    assert_eq!(c.runs.len(), 2, "both modes ran");
    // The vhosts are still there (the delete really failed); this test cleans them up.
    let real = mgmt();
    for r in &c.runs {
        assert!(r.stats.requests == 60, "{}: {:?}", r.mode, r.stats);
        let listed = reqwest::Client::new()
            .get(format!("{}/api/vhosts/{}", mgmt_base(), r.vhost))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .unwrap();
        assert!(listed.status().is_success(), "vhost {} was left behind, as the failed delete says", r.vhost);
        real.delete_vhost(&r.vhost).await.unwrap();
    }
    server.abort();
}

#[tokio::test]
async fn a_management_api_that_is_not_there_is_named_as_such() {
    // A port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let err = Mgmt::new(&format!("http://127.0.0.1:{port}"), "guest", "guest")
        .delete_vhost("nope")
        .await
        .expect_err("nothing answers");
    let text = format!("{err:#}");
    assert!(text.contains("nothing answers at") && text.contains("rabbitmq_management"), "{text}");
    // A user the API refuses is told so, not blamed on the plugin.
    let err =
        Mgmt::new(&mgmt_base(), "guest", "wrong-password").delete_vhost("nope").await.expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("refused user guest") && !text.contains("rabbitmq_management"), "{text}");
}
