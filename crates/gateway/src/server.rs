//! The accept loop: the gateway's start-up, its HTTP connections with their limits, and its
//! shutdown.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_amqp::topology;
use baton_amqp::{Broker, ConsumerConfig, Identity, Publisher, consume};
use baton_health::{Kind, running};
use baton_protocol::Mode;
use baton_store::Db;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::options::{HttpLimits, Options};
use crate::{COMPONENT, MIGRATIONS, idempotency};

/// Bind `opts.http` and serve until `cancel`.
pub async fn run(opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(opts.http).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} ({e}); is another gateway running there? pick another with --http",
            opts.http
        )
    })?;
    serve(listener, opts, cancel).await
}

/// Serve on an already bound listener (tests bind port 0) until `cancel`.
pub async fn serve(listener: TcpListener, opts: Options, cancel: CancellationToken) -> anyhow::Result<()> {
    opts.limits.check()?;
    if opts.metrics {
        baton_metrics::install(&opts.instance);
    }
    let db = Db::open(&opts.store, COMPONENT, MIGRATIONS, &opts.instance).await?;
    db.health().register(&opts.health, COMPONENT);
    let broker = Broker::connect(opts.amqp_url.expose(), &format!("{COMPONENT} {}", opts.instance)).await?;
    let _broker_watch = baton_amqp::health::watch_broker(&opts.health, COMPONENT, &broker);
    let outcomes = topology::gateway_outcome_queue(&opts.instance);
    let event_queue = topology::gateway_event_queue(&opts.instance);
    broker.declare_topology(&[outcomes.clone(), event_queue.clone()], opts.queue_type).await?;
    let publisher = Publisher::new(broker.clone());
    let incoming = match opts.mode {
        Mode::Workflow | Mode::Hybrid => outcomes.name.clone(),
        Mode::Events => event_queue.name.clone(),
    };
    let gw = Arc::new(Gateway {
        slots: Semaphore::new(opts.max_in_flight),
        incoming,
        reply_key: topology::reply_key(COMPONENT, &opts.instance),
        identity: Identity::of_url(COMPONENT, broker.url()),
        opts,
        broker: broker.clone(),
        publisher: publisher.clone(),
        db,
        pending: Mutex::new(HashMap::new()),
        waiters: AtomicU64::new(0),
    });
    // The consumer (with its handlers), waited for once the HTTP side has stopped.
    let mut tasks = JoinSet::new();
    let g = Arc::clone(&gw);
    let queue = gw.incoming.clone();
    let health = &gw.opts.health;
    let cfg = ConsumerConfig::new(queue.clone(), 256)
        .attached(health.check(COMPONENT, &format!("consuming {queue}"), Kind::Ready))
        .max_age(gw.opts.retain);
    tasks.spawn(running(
        health.check(COMPONENT, "retention running", Kind::Live),
        baton_store::retention::run(
            gw.db.clone(),
            baton_store::retention::Retention::new(gw.opts.retain),
            vec![idempotency::purge(gw.opts.idempotency_ttl)],
            cancel.clone(),
        ),
    ));
    let alive = health.check(COMPONENT, &format!("consumer of {queue} running"), Kind::Live);
    match gw.opts.mode {
        Mode::Workflow | Mode::Hybrid => tasks.spawn(running(
            alive,
            consume(
                broker.clone(),
                publisher,
                cfg,
                move |env| Arc::clone(&g).on_outcome(env),
                cancel.clone(),
            ),
        )),
        Mode::Events => tasks.spawn(running(
            alive,
            consume(broker.clone(), publisher, cfg, move |env| Arc::clone(&g).on_event(env), cancel.clone()),
        )),
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "gateway listening");
    let app = crate::api::router(Arc::clone(&gw));
    http(listener, app, gw.opts.limits, &cancel).await;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a task of the gateway died");
        }
    }
    broker.close().await;
    Ok(())
}

/// Serve HTTP/1 on `listener` until `cancel`, then stop accepting, let each connection finish
/// the request it is on and wait for them all, as `axum::serve(..).with_graceful_shutdown(..)`
/// does. Not `axum::serve` itself: it builds each connection with no timer, so hyper's
/// `header_read_timeout` cannot be set through it, and nothing else can time a request's
/// headers (before them there is no request for a tower layer to time; a read timeout on the
/// socket would also cut a client that waits for a slow outcome). Each connection holds one of
/// `limits.max_connections` permits until it closes; one more gets a 503 at once.
async fn http(listener: TcpListener, app: axum::Router, limits: HttpLimits, cancel: &CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(crate::early::MAX_HEAD)
        .max_headers(crate::early::MAX_HEADERS);
    // Refusals are warned of at most every 10 s, with how many there were: a flood at the
    // limit would otherwise write a line per connection.
    let (mut refused, mut warned) = (0u64, None::<tokio::time::Instant>);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        refused += 1;
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            tracing::warn!(
                                max = limits.max_connections,
                                refused,
                                "HTTP connection limit reached; new connections get a 503 until some close"
                            );
                            (refused, warned) = (0, Some(tokio::time::Instant::now()));
                        }
                        tracing::debug!(%peer, "connection refused: too many open");
                        refuse(stream, limits.max_connections);
                        continue;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(crate::early::JsonErrors::new(stream)), service);
                    let conn = graceful.watch(conn);
                    // Watched by `graceful`, which the shutdown below waits on.
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = conn.await {
                            tracing::trace!(error = %e, "failed to serve a connection");
                        }
                    });
                }
                // As axum's listener: errors of one connection are skipped; others (too many
                // open files) get a pause, so as not to spin.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) => {}
                Err(e) => {
                    tracing::error!(error = %e, "accepting an HTTP connection failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => break,
                    }
                }
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Answer a connection past the limit with a 503 and close it, without waiting on the client:
/// the answer fits a fresh socket's send buffer, so a write that would block is skipped (the
/// client then sees the connection closed, which says the same). What the client already sent
/// is read first, so that the close does not reset the connection and lose the answer.
fn refuse(stream: tokio::net::TcpStream, max: usize) {
    let body = format!(
        r#"{{"error":"the gateway has {max} connections open, its limit; retry shortly","status":503}}"#
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         retry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Plain non-blocking system calls: tokio's `try_*` would say "would block" until the
    // reactor has seen the new socket, and this one is never polled.
    let Ok(mut stream) = stream.into_std() else { return };
    let mut sink = [0u8; 4096];
    while matches!(std::io::Read::read(&mut stream, &mut sink), Ok(n) if n > 0) {}
    let _ = std::io::Write::write(&mut stream, answer.as_bytes());
}
