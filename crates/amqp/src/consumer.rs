//! Consuming a work queue: a prefetch window, the handler runs, the delivery is acked only after
//! the handler returned (it has committed), with the other committed ones below the lowest
//! delivery still being handled in one `multiple` ack (`acks`), and bad input goes to the dead-letter queue with the
//! reason, never back to the queue. An outage of the handler's store is waited out in place:
//! the delivery is held and retried with backoff, and no new delivery is taken meanwhile.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use baton_metrics::{Stage, Stopwatch};
use baton_store::Cause;

use crate::acks::AckWindow;
use crate::{Broker, Envelope, Publisher};

/// What the handler wants done with a delivery it could not handle. Each variant carries the
/// cause (a store's error, a publisher's, or a sentence for bad input) and shows as it: its
/// message is the dead-letter reason or the log line.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message can never be handled (wrong shape, unknown type): dead-letter it with this
    /// reason.
    #[error(transparent)]
    Reject(Cause),
    /// The handler failed on this message (a failure injected by a fault plan, the component
    /// crashed under it, an unexpected error): requeue it. The quorum queue's delivery limit
    /// dead-letters a message that keeps failing.
    #[error(transparent)]
    Retry(Cause),
    /// An outage, not a fault of the message (the disk is full, the database is locked, the
    /// database thread is gone): hold the delivery and run the handler again with backoff
    /// until it goes through, never using up the delivery limit; take no new delivery
    /// meanwhile.
    #[error(transparent)]
    Transient(Cause),
    /// Another instance's transaction conflicted with this one's (several instances on one
    /// PostgreSQL database): nothing took effect. Run the handler again at once, a few times
    /// with short jittered pauses, without pausing the consumer; one that keeps conflicting is
    /// then waited out as a [`HandleError::Transient`].
    #[error(transparent)]
    Conflict(Cause),
}

impl HandleError {
    /// Dead-letter the message because of `cause` (a sentence that says what is wrong with it).
    pub fn reject(cause: impl Into<Cause>) -> HandleError {
        HandleError::Reject(cause.into())
    }

    /// Requeue the message because of `cause`.
    pub fn retry(cause: impl Into<Cause>) -> HandleError {
        HandleError::Retry(cause.into())
    }
}

impl From<baton_store::StoreError> for HandleError {
    /// An outage is held and retried in place; unreadable data can never be handled; any
    /// other failure goes back to the queue, whose delivery limit stops a message that
    /// keeps failing.
    fn from(e: baton_store::StoreError) -> Self {
        use baton_store::StoreError;
        match e {
            e if e.is_conflict() => HandleError::Conflict(Box::new(e)),
            e if e.is_transient() => HandleError::Transient(Box::new(e)),
            e @ StoreError::Corrupt { .. } => HandleError::Reject(Box::new(e)),
            e => HandleError::Retry(Box::new(e)),
        }
    }
}

/// Which queue to consume, and how many unacked deliveries to hold at once.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: String,
    pub prefetch: u16,
    /// Passed while this consumer is attached to its queue (readiness).
    pub attached: Option<baton_health::Check>,
    /// A message older than this (by its AMQP `timestamp`, the time it was committed to its
    /// sender's outbox) is dead-lettered on arrival: the retention may have purged the inbox
    /// row or tombstone that would make it a no-op.
    pub max_age: Option<Duration>,
    /// The watchdog's bound: one try of the handler that takes longer is a stall ([`STALL_AFTER`]).
    pub stall_after: Duration,
    outage: Outage,
    /// Bumped by a handler that outlived [`ConsumerConfig::stall_after`]; the consumer loop
    /// watches it.
    stalls: Arc<tokio::sync::watch::Sender<u64>>,
}

/// How long one try of a handler may take before the consumer counts itself stalled: its
/// channel is closed, so that every delivery it holds goes back to the queue for another
/// instance, and it reports itself not attached (not ready) until the stalled handlers have
/// returned. Heartbeats catch a frozen process; this catches a live one whose store stopped
/// answering (a stuck disk, a database thread that never returns). A healthy try takes
/// milliseconds; a store outage makes each try fail fast and is waited out in place instead.
pub const STALL_AFTER: Duration = Duration::from_secs(10);

impl ConsumerConfig {
    pub fn new(queue: impl Into<String>, prefetch: u16) -> ConsumerConfig {
        ConsumerConfig {
            queue: queue.into(),
            prefetch,
            attached: None,
            max_age: None,
            stall_after: STALL_AFTER,
            outage: Outage::default(),
            stalls: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Count a try of the handler longer than `bound` as a stall instead of [`STALL_AFTER`].
    pub fn stall_after(mut self, bound: Duration) -> ConsumerConfig {
        self.stall_after = bound;
        self
    }

    /// Dead-letter messages older than `max_age` on arrival (the component's retention).
    pub fn max_age(mut self, max_age: Duration) -> ConsumerConfig {
        self.max_age = Some(max_age);
        self
    }

    /// Report through `check` whether this consumer is attached to its queue.
    pub fn attached(mut self, check: baton_health::Check) -> ConsumerConfig {
        self.attached = Some(check);
        self
    }
}

/// The first wait before a handler that hit an outage runs again, and the longest.
const OUTAGE_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

/// The pauses before a handler that conflicted with another instance runs again (jittered,
/// so that two instances do not collide again in step), and how many such tries before the
/// conflicts count as an outage.
const CONFLICT_BACKOFF: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));
const CONFLICT_RETRIES: usize = 10;

/// The handlers of one consumer that are waiting out an outage: while there is any, the
/// consumer takes no new delivery (there would be no store to commit it to).
#[derive(Debug, Clone)]
struct Outage(Arc<OutageInner>);

#[derive(Debug)]
struct OutageInner {
    state: Mutex<OutageState>,
    /// `true` while paused; the consumer loop watches it.
    paused: tokio::sync::watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct OutageState {
    holding: usize,
    since: Option<Instant>,
    /// Whether the pause was said at WARN (an outage), not only at DEBUG (conflicts with
    /// another instance, which pass by themselves): its end is said at the same level.
    said: bool,
}

impl Default for Outage {
    fn default() -> Self {
        Outage(Arc::new(OutageInner {
            state: Mutex::default(),
            paused: tokio::sync::watch::Sender::new(false),
        }))
    }
}

impl Outage {
    /// A handler starts waiting out an outage: the first one pauses the consumer, and says so
    /// (at DEBUG when it is a streak of conflicts with another instance: no operator need act).
    fn hold(&self, queue: &str, reason: &str, conflict: bool) {
        let mut s = self.0.state.lock().expect("outage");
        s.holding += 1;
        if s.holding == 1 {
            s.since = Some(Instant::now());
            s.said = !conflict;
            self.0.paused.send_replace(true);
            if conflict {
                tracing::debug!(%queue, %reason, "conflicts with another instance go on; holding the deliveries in hand meanwhile");
            } else {
                tracing::warn!(
                    %queue,
                    %reason,
                    "store cannot commit; holding the deliveries in hand and taking no new ones until it can"
                );
            }
        }
    }

    /// A handler is through (committed, rejected, or gave up at shutdown): the last one
    /// resumes the consumer, and says so.
    fn release(&self, queue: &str) {
        let mut s = self.0.state.lock().expect("outage");
        s.holding = s.holding.saturating_sub(1);
        if s.holding == 0 {
            let after = s.since.take().map(|t| t.elapsed()).unwrap_or_default();
            self.0.paused.send_replace(false);
            if s.said {
                tracing::info!(%queue, paused_for = ?after, "store commits again; consuming resumed");
            } else {
                tracing::debug!(%queue, paused_for = ?after, "through the conflicts; consuming resumed");
            }
        }
    }
}

/// Consume `cfg.queue` until `cancel` fires, surviving connection loss: a consumer that stops
/// (its channel or connection failed) consumes again on a fresh channel, after a backoff with
/// jitter ([`RESTART_PACE`]). On cancel, stops taking deliveries and waits for the handlers
/// already running, so each of them still acks after its commit.
///
/// The handlers' tasks belong to this future (a `JoinSet`): if it is dropped instead, they are
/// aborted with it and give up their deliveries unacked.
pub async fn consume<H, Fut>(
    broker: Broker,
    publisher: Publisher,
    cfg: ConsumerConfig,
    handler: H,
    cancel: CancellationToken,
) where
    H: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    let mut handlers = JoinSet::new();
    let mut delays = RESTART_PACE.build();
    // Failures since the consumer last consumed: the first is said, the others only at debug.
    let mut failures = 0u32;
    while !cancel.is_cancelled() {
        match run_once(&broker, &publisher, &cfg, &handler, &mut handlers, &cancel).await {
            Ok(()) => break,
            Err(stop) => {
                if stop.consumed {
                    delays = RESTART_PACE.build();
                    failures = 0;
                }
                failures += 1;
                let retry_in = delays.next().unwrap_or(Duration::from_secs(5));
                // A lost connection is said once by the broker, not again for every queue; a
                // replaced one is no news.
                if failures == 1 && broker.connected() && !stop.replaced {
                    tracing::warn!(queue = %cfg.queue, error = %stop.why, ?retry_in, "consumer stopped; restarting");
                } else {
                    tracing::debug!(queue = %cfg.queue, error = %stop.why, ?retry_in, failures, "consumer not running; restarting");
                }
                let pause = tokio::time::sleep(retry_in);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        _ = cancel.cancelled() => break,
                        Some(done) = handlers.join_next(), if !handlers.is_empty() => reaped(&cfg.queue, done),
                    }
                }
            }
        }
    }
    while let Some(done) = handlers.join_next().await {
        reaped(&cfg.queue, done);
    }
    tracing::debug!(queue = %cfg.queue, "consumer stopped");
}

/// How soon a stopped consumer tries again: 100 ms, doubling up to 5 s, with jitter, so that
/// the consumers of a process do not all come back at the same instant. Connection attempts
/// have their own, slower schedule in [`Broker`]: a consumer that comes early gets its error at
/// once.
pub const RESTART_PACE: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

/// Why `run_once` gave up, whether it had been consuming (then the backoff starts over), and
/// whether only because the broker replaced its connection (then nothing went wrong here).
struct Stop {
    why: String,
    consumed: bool,
    replaced: bool,
}

impl Stop {
    fn setup(why: String) -> Stop {
        Stop { why, consumed: false, replaced: false }
    }
}

/// A handler's task ended: say so if it panicked (its delivery goes back to the queue with the
/// channel, or when the consumer stops).
fn reaped(queue: &str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(%queue, error = %e, "a handler panicked");
    }
}

async fn run_once<H, Fut>(
    broker: &Broker,
    publisher: &Publisher,
    cfg: &ConsumerConfig,
    handler: &Arc<H>,
    handlers: &mut JoinSet<()>,
    cancel: &CancellationToken,
) -> Result<(), Stop>
where
    H: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send + 'static,
{
    // Subscribed before the channel exists, so that no recovery can slip in between.
    let mut generation = broker.generation();
    generation.borrow_and_update();
    // Raced with the cancel: a shutdown does not wait for a connection attempt.
    let ch = tokio::select! {
        ch = broker.channel() => ch.map_err(|e| Stop::setup(e.to_string()))?,
        _ = cancel.cancelled() => return Ok(()),
    };
    let patience = crate::broker::SETUP_PATIENCE;
    let no_answer = |what: &str| {
        Stop::setup(format!("RabbitMQ did not answer {what} on {} within {patience:?}", cfg.queue))
    };
    tokio::time::timeout(patience, ch.basic_qos(cfg.prefetch, BasicQosOptions::default()))
        .await
        .map_err(|_| no_answer("basic.qos"))?
        .map_err(|e| Stop::setup(e.to_string()))?;
    let tag = format!("{} {}", broker.name(), uuid::Uuid::new_v4().simple());
    let consume = ch.basic_consume(
        cfg.queue.as_str().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let mut consumer = match tokio::time::timeout(patience, consume).await {
        Ok(c) => c.map_err(|e| Stop::setup(format!("cannot consume {}: {e}", cfg.queue)))?,
        Err(_) => {
            // The consume may still land later: close the channel so that no consumer nobody
            // reads can hold deliveries unacked.
            let _ = tokio::time::timeout(patience, ch.close(200, "consume timed out".into())).await;
            return Err(no_answer("basic.consume"));
        }
    };
    let stopped = |why: String| Stop { why, consumed: true, replaced: false };
    tracing::debug!(queue = %cfg.queue, prefetch = cfg.prefetch, "consuming");
    let attached = Attached::new(cfg.attached.clone());
    // This channel's deliveries, for acks that cover several at once.
    let acks = Arc::new(AckWindow::default());
    let mut paused = cfg.outage.0.paused.subscribe();
    let mut stalls = cfg.stalls.subscribe();
    stalls.borrow_and_update();
    loop {
        let pause = *paused.borrow_and_update();
        tokio::select! {
            _ = cancel.cancelled() => {
                // Bounded: a channel in a bad state must not hold up the shutdown.
                let cancel_consumer = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                let _ = tokio::time::timeout(Duration::from_secs(2), cancel_consumer).await;
                return Ok(());
            }
            Some(done) = handlers.join_next(), if !handlers.is_empty() => reaped(&cfg.queue, done),
            Ok(()) = generation.changed() => {
                // A new connection replaced the one this consumer was on: consume again on it.
                tracing::debug!(queue = %cfg.queue, "connection replaced; consuming again on a fresh channel");
                tokio::spawn(retire(ch, consumer, cfg.queue.clone()));
                let why = format!("the connection of {} was replaced", cfg.queue);
                return Err(Stop { why, consumed: true, replaced: true });
            }
            // Paused by an outage of the store: the deliveries already sent stay with lapin,
            // unacked, until it is over.
            Ok(()) = paused.changed() => {}
            Ok(()) = stalls.changed() => {
                // A handler outlived the watchdog: every delivery this channel holds goes back
                // to the queue (for another instance), and none is taken until the stalled
                // handlers have returned.
                let why = format!(
                    "a handler of {} has held its delivery for more than {:?}; its deliveries went back to the queue",
                    cfg.queue, cfg.stall_after
                );
                tokio::spawn(retire(ch, consumer, cfg.queue.clone()));
                drop(attached);
                if let Some(c) = &cfg.attached {
                    c.fail(&why);
                }
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        done = handlers.join_next() => match done {
                            Some(done) => reaped(&cfg.queue, done),
                            None => break,
                        },
                    }
                }
                tracing::info!(queue = %cfg.queue, "the stalled handlers returned; consuming again");
                return Err(Stop { why, consumed: true, replaced: false });
            }
            next = consumer.next(), if !pause => match next {
                Some(Ok(delivery)) => {
                    acks.delivered(delivery.delivery_tag);
                    let handler = Arc::clone(handler);
                    let publisher = publisher.clone();
                    let on = On {
                        queue: cfg.queue.clone(),
                        outage: cfg.outage.clone(),
                        max_age: cfg.max_age,
                        cancel: cancel.clone(),
                        stall_after: cfg.stall_after,
                        stalls: Arc::clone(&cfg.stalls),
                        acks: Arc::clone(&acks),
                    };
                    // Boxed: the handler's future is kilobytes, which the task would
                    // otherwise copy at its spawn and again at its end, at every delivery.
                    handlers.spawn(Box::pin(process(delivery, on, publisher, handler)));
                }
                Some(Err(e)) => {
                    // The channel or its connection failed: start over on a fresh channel (the
                    // loop above), and close this one if it is still open.
                    tokio::spawn(retire(ch, consumer, cfg.queue.clone()));
                    return Err(stopped(format!("the delivery stream of {} failed: {e}", cfg.queue)));
                }
                None => return Err(stopped(format!("the broker ended the consumer on {}", cfg.queue))),
            }
        }
    }
}

/// Passes the consumer's `attached` check while a consume is up, fails it once that ends.
struct Attached(Option<baton_health::Check>);

impl Attached {
    fn new(check: Option<baton_health::Check>) -> Attached {
        if let Some(c) = &check {
            c.pass();
        }
        Attached(check)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fail("not consuming (stopped, or starting again on a fresh channel)");
        }
    }
}

/// Put a replaced channel to rest: close it if it is still open, so that whatever reached its
/// consumer goes back to the queue. lapin's recovery is off, so a channel that is not open
/// now never comes back. Bounded: a channel in a bad state may never answer the close.
async fn retire(ch: lapin::Channel, consumer: lapin::Consumer, queue: String) {
    if ch.status().connected() {
        let close = ch.close(200, "replaced".into());
        match tokio::time::timeout(crate::broker::CLOSE_PATIENCE, close).await {
            Ok(Ok(())) => tracing::debug!(%queue, "replaced channel closed"),
            _ => tracing::debug!(%queue, "a replaced channel did not close; its connection's end will"),
        }
    }
    drop(consumer);
}

/// Where a delivery is processed: its queue, the consumer's outage state, the shutdown.
struct On {
    queue: String,
    outage: Outage,
    max_age: Option<Duration>,
    cancel: CancellationToken,
    stall_after: Duration,
    stalls: Arc<tokio::sync::watch::Sender<u64>>,
    /// The channel's deliveries not yet settled: an ack may cover several committed ones.
    acks: Arc<AckWindow>,
}

/// One try of a handler, under the watchdog: past [`On::stall_after`] the consumer is told (it
/// gives its deliveries back), and the try is still awaited, since its transaction may yet
/// commit (its ack then fails, and the redelivery finds the inbox row).
async fn watched<Fut: Future>(on: &On, attempt: Fut) -> Fut::Output {
    tokio::pin!(attempt);
    tokio::select! {
        done = &mut attempt => return done,
        _ = tokio::time::sleep(on.stall_after) => {}
    }
    tracing::warn!(
        queue = %on.queue,
        bound = ?on.stall_after,
        "a handler has held its delivery past the watchdog's bound; giving this consumer's deliveries back to the queue"
    );
    on.stalls.send_modify(|n| *n += 1);
    attempt.await
}

/// Why a message stamped `sent_secs` (AMQP `timestamp`) is too old to handle at `now_secs`, if
/// it is. A second of slack for the stamp's rounding.
fn too_old(sent_secs: Option<u64>, now_secs: u64, max_age: Option<Duration>) -> Option<String> {
    let (sent, max) = (sent_secs?, max_age?);
    let age = now_secs.saturating_sub(sent);
    (age > max.as_secs() + 1).then(|| {
        format!(
            "the message is {age} s old, older than the retention ({} s): the inbox row or tombstone that \
             would make it a no-op may be purged already, so it is not handled",
            max.as_secs()
        )
    })
}

async fn process<H, Fut>(delivery: Delivery, on: On, publisher: Publisher, handler: Arc<H>)
where
    H: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send + 'static,
{
    let mut watch = Stopwatch::start();
    let queue = on.queue.clone();
    let tag = delivery.delivery_tag;
    // The queue's owner, the first part of its name: the `component` of the stage timings.
    let component = queue.split('.').next().unwrap_or(&queue).to_owned();
    let envelope = Envelope::from_delivery(&delivery.properties, &delivery.data, delivery.redelivered);
    // The consume is a span of its own, the child of the sender's publish (the message's
    // `traceparent`): its trace id is in every log line of the handling. What the message says
    // is given as the span opens: each field recorded later costs every layer a call of its own.
    // A field whose value is `None` stays empty.
    let env = envelope.as_ref().ok();
    let span = tracing::info_span!(
        "delivery",
        %queue,
        message_id = env.map(|env| tracing::field::display(env.message_id)),
        kind = env.map(|env| env.kind.as_str()),
        trace_id = tracing::field::Empty,
        otel.name = format!("consume {queue}"),
        otel.kind = "consumer",
    );
    if let Some(env) = env {
        baton_telemetry::follow(&span, &env.traceparent);
        let own = baton_telemetry::traceparent_of(&span).unwrap_or_else(|| env.traceparent.clone());
        span.record("trace_id", own.trace_id());
    }
    watch.lap(&component, Stage::Decode);
    async move {
        let env = match envelope {
            Ok(env) => env,
            Err(reason) => {
                dead_letter(&publisher, &queue, delivery, &reason, "invalid").await;
                return on.acks.settled(tag);
            }
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(reason) = too_old(*delivery.properties.timestamp(), now, on.max_age) {
            dead_letter(&publisher, &queue, delivery, &reason, "too_old").await;
            return on.acks.settled(tag);
        }
        let Some(result) = until_through(&on, || handler(env.clone())).await else {
            // Shutting down in the middle of an outage: the delivery goes back with the
            // channel, unacked and not nacked, so it does not count against the message.
            tracing::debug!("shutting down during an outage; the delivery goes back unacked");
            return;
        };
        watch.lap(&component, Stage::Handle);
        match result {
            Ok(()) => {
                baton_crash::crash_point!(baton_crash::AFTER_COMMIT_BEFORE_ACK);
                // Once committed, acked with whatever else is ready then (`multiple`).
                let acked = settle(on.acks.ack(tag, delivery.acker.clone())).await;
                watch.record(&component, Stage::Ack);
                if let Err(e) = acked {
                    // Committed but not acked: the redelivery is answered from the inbox. At
                    // shutdown the connection may close under the ack: expected, no news.
                    if on.cancel.is_cancelled() {
                        tracing::debug!(error = %e, "ack lost to the shutdown after commit; the redelivery will be deduplicated");
                    } else {
                        tracing::warn!(error = %e, "ack failed after commit; the redelivery will be deduplicated");
                    }
                }
            }
            Err(HandleError::Reject(reason)) => {
                dead_letter(&publisher, &queue, delivery, &reason.to_string(), "rejected").await;
                on.acks.settled(tag);
            }
            Err(HandleError::Retry(reason) | HandleError::Transient(reason) | HandleError::Conflict(reason)) => {
                tracing::warn!(
                    reason = &*reason as &dyn std::error::Error,
                    "handler failed; requeueing (the delivery limit stops a loop)"
                );
                let _ = settle(delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() })).await;
                on.acks.settled(tag);
            }
        }
    }
    .instrument(span)
    .await
}

/// Run the handler until it returns anything but [`HandleError::Transient`] (or
/// [`HandleError::Conflict`], first tried again at once a few times), waiting between
/// tries with exponential backoff and jitter (capped, never giving up: the limit is for
/// poison, not for outages). While it waits, this consumer takes no new delivery. `None` when
/// the component shuts down first.
async fn until_through<F, Fut>(on: &On, mut run: F) -> Option<Result<(), HandleError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), HandleError>>,
{
    let mut waits = backon::ExponentialBuilder::default()
        .with_min_delay(OUTAGE_BACKOFF.0)
        .with_max_delay(OUTAGE_BACKOFF.1)
        .with_jitter()
        .without_max_times()
        .build();
    let mut conflicts = backon::ExponentialBuilder::default()
        .with_min_delay(CONFLICT_BACKOFF.0)
        .with_max_delay(CONFLICT_BACKOFF.1)
        .with_jitter()
        .with_max_times(CONFLICT_RETRIES)
        .build();
    let mut holding = false;
    let result = loop {
        let result = watched(on, run()).await;
        if let Err(HandleError::Conflict(reason)) = &result
            && !holding
            && let Some(wait) = conflicts.next()
        {
            tracing::debug!(%reason, "conflict with another instance's transaction; running the delivery again");
            baton_metrics::store_conflict_retried(on.queue.split('.').next().unwrap_or(&on.queue));
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = on.cancel.cancelled() => break None,
            }
        }
        match result {
            Err(e @ (HandleError::Transient(_) | HandleError::Conflict(_))) => {
                let conflict = matches!(e, HandleError::Conflict(_));
                let reason = e.to_string();
                if !holding {
                    holding = true;
                    on.outage.hold(&on.queue, &reason, conflict);
                }
                tracing::debug!(%reason, "store outage; trying the delivery again after a pause");
                let wait = waits.next().unwrap_or(OUTAGE_BACKOFF.1);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = on.cancel.cancelled() => break None,
                }
            }
            other => break Some(other),
        }
    };
    if holding {
        on.outage.release(&on.queue);
    }
    result
}

/// Publish the delivery to `<queue>.dlq` with the reason, then ack it. If that publish fails,
/// reject without requeue so the broker dead-letters it itself: never lost, never looping.
/// `class` is the reason's kind, for the metrics: `invalid`, `too_old` or `rejected`.
async fn dead_letter(publisher: &Publisher, queue: &str, delivery: Delivery, reason: &str, class: &str) {
    tracing::warn!(%reason, "dead-lettering a message");
    baton_metrics::dead_lettered(queue, class);
    match publisher.dead_letter(queue, &delivery.properties, &delivery.data, reason).await {
        Ok(()) => {
            let _ = settle(delivery.acker.ack(BasicAckOptions::default())).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not publish to the dead-letter queue; rejecting to the broker's DLX");
            let _ =
                settle(delivery.acker.nack(BasicNackOptions { requeue: false, ..Default::default() })).await;
        }
    }
}

/// An ack or nack, bounded: on a channel that died under it, the broker requeues the delivery
/// anyway, and a handler task must not wait forever (it would hold up the shutdown).
async fn settle<T>(f: impl Future<Output = lapin::Result<T>>) -> Result<(), Unsettled> {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(r) => r.map(drop).map_err(Unsettled::Failed),
        Err(_) => Err(Unsettled::NoAnswer),
    }
}

/// An ack or nack that did not go through: the broker requeues the delivery with the channel.
#[derive(Debug, thiserror::Error)]
enum Unsettled {
    #[error(transparent)]
    Failed(lapin::Error),
    #[error("no answer to the ack within 5 s")]
    NoAnswer,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn on() -> On {
        On {
            queue: "q".into(),
            outage: Outage::default(),
            max_age: None,
            cancel: CancellationToken::new(),
            stall_after: STALL_AFTER,
            stalls: Arc::new(tokio::sync::watch::Sender::new(0)),
            acks: Arc::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_past_the_watchdog_bound_tells_the_consumer_and_is_still_awaited() {
        let on = on();
        let stalls = on.stalls.subscribe();
        let quick = watched(&on, async { 1 }).await;
        assert_eq!((quick, *stalls.borrow()), (1, 0), "a quick try is no stall");
        let slow = watched(&on, async {
            tokio::time::sleep(STALL_AFTER + Duration::from_secs(5)).await;
            2
        })
        .await;
        assert_eq!(slow, 2, "the stalled try still finishes: its commit may yet land");
        assert_eq!(*stalls.borrow(), 1, "the consumer is told once");
    }

    #[test]
    fn a_message_older_than_the_retention_is_refused_with_its_age_and_others_pass() {
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(too_old(Some(1_000), 1_000 + 86_400, day), None);
        let why = too_old(Some(1_000), 1_000 + 86_402, day).expect("too old");
        assert!(why.contains("86402 s old") && why.contains("retention (86400 s)"), "{why}");
        assert_eq!(too_old(None, 1_000_000, day), None, "unstamped: nothing to judge by");
        assert_eq!(too_old(Some(1), 1_000_000, None), None, "no retention: no bound");
        assert_eq!(too_old(Some(2_000), 1_000, day), None, "a sender's clock ahead is not an age");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_retried_in_place_with_growing_pauses_and_pauses_the_consumer_meanwhile() {
        let on = on();
        let tries = Arc::new(AtomicUsize::new(0));
        let paused = on.outage.0.paused.subscribe();
        let started = tokio::time::Instant::now();
        let (t, p) = (Arc::clone(&tries), paused.clone());
        let result = until_through(&on, move || {
            let n = t.fetch_add(1, Ordering::SeqCst);
            let paused_now = *p.borrow();
            async move {
                assert_eq!(paused_now, n > 0, "paused from the first outage until through");
                if n < 6 { Err(HandleError::Transient("database or disk is full".into())) } else { Ok(()) }
            }
        })
        .await;
        assert!(matches!(result, Some(Ok(()))));
        assert_eq!(tries.load(Ordering::SeqCst), 7, "held through six outages, not given up");
        assert!(!*paused.borrow(), "resumed once through");
        // Six pauses from 50 ms doubling (with jitter), capped at 5 s: well over a second.
        assert!(started.elapsed() >= Duration::from_millis(50 * 63), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_conflict_is_run_again_at_once_without_pausing_the_consumer_then_waited_out() {
        let on = on();
        let paused = on.outage.0.paused.subscribe();
        let (tries, started) = (Arc::new(AtomicUsize::new(0)), tokio::time::Instant::now());
        let (t, p) = (Arc::clone(&tries), paused.clone());
        let result = until_through(&on, move || {
            let n = t.fetch_add(1, Ordering::SeqCst);
            let paused_now = *p.borrow();
            async move {
                assert!(!paused_now, "a few conflicts do not pause the consumer");
                if n < 3 { Err(HandleError::Conflict("could not serialize access".into())) } else { Ok(()) }
            }
        })
        .await;
        assert!(matches!(result, Some(Ok(()))));
        assert_eq!(tries.load(Ordering::SeqCst), 4);
        assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());

        // One that keeps conflicting past the quick tries is held like an outage.
        let on = self::on();
        let paused = on.outage.0.paused.subscribe();
        let tries = Arc::new(AtomicUsize::new(0));
        let (t, p) = (Arc::clone(&tries), paused.clone());
        let result = until_through(&on, move || {
            let n = t.fetch_add(1, Ordering::SeqCst);
            let paused_now = *p.borrow();
            async move {
                assert_eq!(paused_now, n > CONFLICT_RETRIES, "paused once the quick tries are used up");
                if n <= CONFLICT_RETRIES + 2 { Err(HandleError::Conflict("deadlock".into())) } else { Ok(()) }
            }
        })
        .await;
        assert!(matches!(result, Some(Ok(()))));
        assert_eq!(tries.load(Ordering::SeqCst), CONFLICT_RETRIES + 4);
        assert!(!*paused.borrow(), "resumed once through");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_during_an_outage_gives_the_delivery_back_and_other_errors_are_not_retried() {
        let on = on();
        let cancel = on.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            cancel.cancel();
        });
        let result = until_through(&on, || async { Err(HandleError::Transient("locked".into())) }).await;
        assert!(result.is_none(), "no answer: the delivery goes back unacked");
        assert!(!*on.outage.0.paused.borrow());
        let tries = AtomicUsize::new(0);
        let result = until_through(&self::on(), || {
            tries.fetch_add(1, Ordering::SeqCst);
            async { Err(HandleError::Retry("injected".into())) }
        })
        .await;
        assert!(matches!(result, Some(Err(HandleError::Retry(_)))));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_store_outage_is_held_unreadable_data_rejected_and_the_rest_retried() {
        use baton_store::StoreError;
        let closed = HandleError::from(StoreError::Closed("records.db".into()));
        assert!(matches!(closed, HandleError::Transient(_)), "{closed:?}");
        let corrupt = HandleError::from(StoreError::Corrupt { table: "inbox", cause: "bad json".into() });
        assert!(matches!(corrupt, HandleError::Reject(_)), "{corrupt:?}");
        let open = HandleError::from(StoreError::Open { path: "x.db".into(), cause: "denied".into() });
        assert!(matches!(open, HandleError::Retry(_)), "{open:?}");
    }
}
