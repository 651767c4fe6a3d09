//! Baton on a three-node RabbitMQ cluster (scripts/cluster.sh) under load: the node that leads
//! the orchestrator's queues killed, then brought back, then every node restarted in turn.
//! Every component is given the three nodes' URLs; nothing may be lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton_tests::cluster::Cluster;
use baton_tests::{System, SystemConfig, TestEnv, wait_for};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Clients sending requests one after the other until stopped, each with a name and an owner
/// of its own (so that every request can succeed).
struct Load {
    answered: Arc<AtomicUsize>,
    stop: CancellationToken,
    clients: JoinSet<Vec<Answer>>,
}

/// One request's status, body, and how long its answer took.
type Answer = (u16, serde_json::Value, Duration);

impl Load {
    fn start(sys: &Arc<System>, clients: usize) -> Load {
        let (answered, stop) = (Arc::new(AtomicUsize::new(0)), CancellationToken::new());
        let mut set = JoinSet::new();
        for c in 0..clients {
            let (sys, answered, stop) = (Arc::clone(sys), Arc::clone(&answered), stop.clone());
            set.spawn(async move {
                let mut answers = Vec::new();
                for i in 0.. {
                    if stop.is_cancelled() {
                        break;
                    }
                    let name = format!("c{c}-{i}");
                    let sent = std::time::Instant::now();
                    // The gateway's deadline is 30 s at most: an answer comes before 60 s,
                    // whatever happens.
                    let (status, body) =
                        tokio::time::timeout(Duration::from_secs(60), sys.create(&name, &name))
                            .await
                            .unwrap_or_else(|_| panic!("POST /spaces {name} had no answer within 60 s"));
                    answers.push((status, body, sent.elapsed()));
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                answers
            });
        }
        Load { answered, stop, clients: set }
    }

    /// Wait (at most 60 s) until `more` requests beyond those answered now are answered: the
    /// system still makes progress. Every 10 s without an answer, the cluster's queues are
    /// printed (where the messages wait, which queue lost its consumer or its leader).
    async fn progress(&self, cluster: &Cluster, more: usize, during: &str) {
        let bound = Duration::from_secs(60);
        let target = self.answered.load(Ordering::Relaxed) + more;
        let started = tokio::time::Instant::now();
        let (mut seen, mut since) = (self.answered.load(Ordering::Relaxed), started);
        loop {
            let now = self.answered.load(Ordering::Relaxed);
            if now >= target {
                return;
            }
            assert!(
                started.elapsed() < bound,
                "{more} more answers {during}: {} within {bound:?}",
                more + now - target
            );
            if now != seen {
                (seen, since) = (now, tokio::time::Instant::now());
            } else if since.elapsed() >= Duration::from_secs(10) {
                eprintln!("no answer for 10 s {during}; the queues:\n{}", cluster.queue_snapshot().await);
                since = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stop the clients and return every answer.
    async fn finish(mut self) -> Vec<Answer> {
        self.stop.cancel();
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(r) = self.clients.join_next().await {
                all.extend(r.expect("a load client"));
            }
        })
        .await
        .expect("the load clients finish within 90 s");
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_and_every_node_restarted_in_turn_loses_nothing() {
    let t0 = std::time::Instant::now();
    let phase = |what: String| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let cluster = Cluster::start().await;
    phase(format!("cluster up: {}", cluster.urls()));
    let env = TestEnv::on_broker(&cluster.urls());
    let sys = Arc::new(
        System::start(&env, SystemConfig { delay: Duration::from_millis(3), ..SystemConfig::default() })
            .await,
    );
    // Every quorum queue the components declared has a member on each of the three nodes.
    cluster.wait_replicated(Duration::from_secs(30)).await;
    let load = Load::start(&sys, 4);
    load.progress(&cluster, 20, "at the start").await;

    // The node that leads the orchestrator's command queue (all components went to node 1,
    // the first of the list, and it leads what they declared) is killed.
    let leader = wait_for("the leader of orchestrator.commands", Duration::from_secs(10), || {
        cluster.leader("orchestrator.commands")
    })
    .await;
    let replies = cluster.leader("orchestrator.replies").await;
    phase(format!("killing node {leader}, which leads orchestrator.commands (and replies: {replies:?})"));
    cluster.kill(leader).await;
    let new = wait_for("a new leader of orchestrator.commands", Duration::from_secs(30), || async {
        cluster.leader("orchestrator.commands").await.filter(|n| *n != leader)
    })
    .await;
    phase(format!("node {new} leads orchestrator.commands now"));
    load.progress(&cluster, 20, &format!("with node {leader} dead")).await;

    // Brought back: it rejoins, and every queue has its three members again.
    cluster.start_missing().await;
    cluster.wait_replicated(Duration::from_secs(60)).await;
    load.progress(&cluster, 10, &format!("with node {leader} back")).await;
    phase(format!("node {leader} back, every queue whole again"));

    // A rolling restart: each node stopped cleanly and started again, the next one only once
    // every queue is whole again (a majority of each queue is up throughout).
    for n in 1..=baton_tests::cluster::NODES {
        cluster.stop_node(n).await;
        load.progress(&cluster, 10, &format!("with node {n} stopped")).await;
        phase(format!("node {n} stopped"));
        cluster.start_missing().await;
        cluster.wait_replicated(Duration::from_secs(60)).await;
        phase(format!("node {n} restarted, every queue whole again"));
    }
    load.progress(&cluster, 10, "after the rolling restart").await;

    let answers = load.finish().await;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (status, body, _) in &answers {
        *by_status.entry(*status).or_default() += 1;
        // A definite answer: done, or (while a connection was being replaced) turned away
        // before anything started, or rolled back after a step could not be reached.
        let ok = match status {
            200 => true,
            503 => {
                let error = body["error"].as_str().unwrap_or_default();
                error.contains("not taking new work")
                    || (body["step"].is_string() && error.contains("did not answer"))
            }
            _ => false,
        };
        assert!(
            ok,
            "{status} {body}\n{}",
            body["workflow_id"]
                .as_str()
                .map(|id| baton_tests::saga_story(&env.store(), id))
                .unwrap_or_default()
        );
    }
    phase(format!("{} requests answered: {by_status:?}", answers.len()));

    baton_tests::every_saga_ends(&env, Duration::from_secs(60)).await;
    baton_tests::every_outbox_drains(&env, Duration::from_secs(30)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    assert!(report.uncertain.is_empty(), "no 504 expected: {:#?}", report.uncertain);
    assert_eq!(report.complete, by_status.get(&200).copied().unwrap_or(0), "every 200 is a complete space");
    // Nothing was dead-lettered on the way.
    for q in baton_amqp::topology::all_queues("main") {
        let dlq = baton_amqp::topology::dead_letter_queue(&q.name);
        assert_eq!(env.queue_depth(&dlq).await, Some(0), "{dlq} holds dead letters");
    }
    Arc::into_inner(sys).unwrap().stop().await;
}

/// A list whose first node does not answer: the component connects to the next one, at once
/// and without a warning (the shared broker stands for the second node).
#[tokio::test]
async fn a_list_whose_first_node_is_down_connects_to_the_next() {
    let env = TestEnv::new().await;
    let dead = format!("amqp://guest:guest@127.0.0.1:{}/{}", baton_tests::free_port(), env.vhost);
    let list = format!("{dead},{}", env.amqp_url());
    let started = std::time::Instant::now();
    let broker = baton_amqp::Broker::connect(&list, "test").await.expect("the second node answers");
    broker.channel().await.expect("a channel on the second node");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    broker.close().await;
}

/// The first node of the list, which leads the orchestrator's queues, frozen (SIGSTOP) for 60 s
/// under the load of 16 clients: its sockets stay open and it answers nothing. Every component
/// is on another node within 15 s (heartbeats and confirm timeouts give the frozen node up); no
/// answer comes later than the gateway's deadline plus 1 s; once it is let go, every saga ends
/// and the audit finds nothing inconsistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_node_frozen_for_a_minute_is_failed_over_within_seconds() {
    const DEADLINE: Duration = Duration::from_secs(5);
    let t0 = std::time::Instant::now();
    let phase = |what: String| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let cluster = Cluster::start().await;
    phase(format!("cluster up: {}", cluster.urls()));
    let env = TestEnv::on_broker(&cluster.urls());
    let sys = Arc::new(
        System::start(
            &env,
            SystemConfig { delay: Duration::from_millis(3), deadline: DEADLINE, ..SystemConfig::default() },
        )
        .await,
    );
    cluster.wait_replicated(Duration::from_secs(30)).await;
    let load = Load::start(&sys, 16);
    load.progress(&cluster, 20, "at the start").await;
    let leader = wait_for("the leader of orchestrator.commands", Duration::from_secs(10), || {
        cluster.leader("orchestrator.commands")
    })
    .await;
    assert_eq!(leader, 1, "the first node of the list leads what the components declared on it");
    // The management API lists a connection once the node emits its statistics (every 5 s).
    let before = wait_for("the components' connections listed", Duration::from_secs(30), || async {
        let first = connections(&cluster).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let again = connections(&cluster).await;
        (!first.is_empty() && first.len() == again.len()).then_some(again)
    })
    .await;
    assert!(before.iter().all(|c| c.node == 1), "every component starts on node 1: {before:?}");

    let frozen_at = epoch_ms();
    cluster.freeze(1).await;
    phase("node 1 frozen".into());
    // Every component's connection is made again on node 2 or 3.
    let names: std::collections::BTreeSet<String> = before.iter().map(|c| c.name.clone()).collect();
    let moved = wait_for("every component on another node", Duration::from_secs(45), || async {
        let now = connections(&cluster).await;
        let moved: Vec<Connection> =
            now.into_iter().filter(|c| c.node != 1 && c.connected_at >= frozen_at).collect();
        names.iter().all(|n| moved.iter().any(|c| &c.name == n)).then_some(moved)
    })
    .await;
    let slowest = names
        .iter()
        .map(|n| moved.iter().filter(|c| &c.name == n).map(|c| c.connected_at).min().unwrap() - frozen_at)
        .max()
        .unwrap();
    phase(format!("every component on node 2 or 3, the last {slowest} ms after the freeze"));
    assert!(slowest <= 15_000, "a component moved only {slowest} ms after the freeze");
    load.progress(&cluster, 20, "with node 1 frozen").await;

    let thaw_in = Duration::from_secs(60).saturating_sub(Duration::from_millis(epoch_ms() - frozen_at));
    tokio::time::sleep(thaw_in).await;
    cluster.thaw(1).await;
    phase("node 1 thawed".into());
    load.progress(&cluster, 20, "after the thaw").await;

    let answers = load.finish().await;
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for (status, body, took) in &answers {
        *by_status.entry(*status).or_default() += 1;
        assert!(matches!(status, 200 | 503 | 504), "{status} {body}");
        assert!(*took <= DEADLINE + Duration::from_secs(1), "{status} after {took:?}: {body}");
    }
    let slowest = answers.iter().map(|a| a.2).max().unwrap_or_default();
    phase(format!("{} requests answered: {by_status:?}, the slowest in {slowest:?}", answers.len()));
    baton_tests::every_saga_ends(&env, Duration::from_secs(60)).await;
    baton_tests::every_outbox_drains(&env, Duration::from_secs(60)).await;
    let report = env.audit();
    assert!(report.is_consistent(), "{:#?}", report.inconsistencies);
    Arc::into_inner(sys).unwrap().stop().await;
}

/// A client connection of the cluster: the name a component gave it, its node, since when.
#[derive(Debug)]
struct Connection {
    name: String,
    node: usize,
    connected_at: u64,
}

async fn connections(cluster: &Cluster) -> Vec<Connection> {
    let all = cluster.mgmt_get("/connections").await.unwrap_or_default();
    all.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some(Connection {
                name: c["user_provided_name"].as_str()?.to_owned(),
                node: cluster.number(c["node"].as_str()?)?,
                connected_at: c["connected_at"].as_u64()?,
            })
        })
        .collect()
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}
