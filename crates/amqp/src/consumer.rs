//! Consuming a work queue: a prefetch window, the handler runs, the delivery is acked only after
//! the handler returned (it has committed), and bad input goes to the dead-letter queue with the
//! reason, never back to the queue. An outage of the handler's store is waited out in place:
//! the delivery is held and retried with backoff, and no new delivery is taken meanwhile.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Broker, Envelope, Publisher};

/// What the handler wants done with a delivery it could not handle.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The message can never be handled (wrong shape, unknown type): dead-letter it with this
    /// reason.
    #[error("{0}")]
    Reject(String),
    /// The handler failed on this message (a failure injected by a fault plan, the component
    /// crashed under it, an unexpected error): requeue it. The quorum queue's delivery limit
    /// dead-letters a message that keeps failing.
    #[error("{0}")]
    Retry(String),
    /// An outage, not a fault of the message (the disk is full, the database is locked, the
    /// database thread is gone): hold the delivery and run the handler again with backoff
    /// until it goes through, never using up the delivery limit; take no new delivery
    /// meanwhile.
    #[error("{0}")]
    Transient(String),
}

/// Which queue to consume, and how many unacked deliveries to hold at once.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: String,
    pub prefetch: u16,
    /// Passed while this consumer is attached to its queue (readiness).
    pub attached: Option<baton_health::Check>,
    outage: Outage,
}

impl ConsumerConfig {
    pub fn new(queue: impl Into<String>, prefetch: u16) -> ConsumerConfig {
        ConsumerConfig { queue: queue.into(), prefetch, attached: None, outage: Outage::default() }
    }

    /// Report through `check` whether this consumer is attached to its queue.
    pub fn attached(mut self, check: baton_health::Check) -> ConsumerConfig {
        self.attached = Some(check);
        self
    }
}

/// The first wait before a handler that hit an outage runs again, and the longest.
const OUTAGE_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(5));

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
    /// A handler starts waiting out an outage: the first one pauses the consumer, and says so.
    fn hold(&self, queue: &str, reason: &str) {
        let mut s = self.0.state.lock().expect("outage");
        s.holding += 1;
        if s.holding == 1 {
            s.since = Some(Instant::now());
            self.0.paused.send_replace(true);
            tracing::warn!(
                %queue,
                %reason,
                "store cannot commit; holding the deliveries in hand and taking no new ones until it can"
            );
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
            tracing::info!(%queue, paused_for = ?after, "store commits again; consuming resumed");
        }
    }
}

/// Consume `cfg.queue` until `cancel` fires, surviving connection loss (lapin's recovery, then a
/// fresh channel with backoff). On cancel, stops taking deliveries and waits for the handlers
/// already running, so each of them still acks after its commit.
///
/// The handlers' tasks belong to this future (a `JoinSet`): if it is dropped instead (the task
/// running it aborted, as `baton up` does to crash a component), they are aborted with it, give
/// up their deliveries unacked and let go of the connection, as a killed process would.
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
    let mut backoff = Duration::from_millis(100);
    while !cancel.is_cancelled() {
        match run_once(&broker, &publisher, &cfg, &handler, &mut handlers, &cancel, &mut backoff).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(queue = %cfg.queue, error = %e, retry_in = ?backoff, "consumer stopped; restarting");
                let pause = tokio::time::sleep(backoff);
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        _ = cancel.cancelled() => break,
                        Some(done) = handlers.join_next(), if !handlers.is_empty() => reaped(&cfg.queue, done),
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    while let Some(done) = handlers.join_next().await {
        reaped(&cfg.queue, done);
    }
    tracing::debug!(queue = %cfg.queue, "consumer stopped");
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
    backoff: &mut Duration,
) -> Result<(), String>
where
    H: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send + 'static,
{
    // Subscribed before the channel exists, so that no recovery can slip in between.
    let mut generation = broker.generation();
    generation.borrow_and_update();
    let ch = broker.channel().await.map_err(|e| e.to_string())?;
    let patience = crate::broker::SETUP_PATIENCE;
    let no_answer =
        |what: &str| format!("RabbitMQ did not answer {what} on {} within {patience:?}", cfg.queue);
    tokio::time::timeout(patience, ch.basic_qos(cfg.prefetch, BasicQosOptions::default()))
        .await
        .map_err(|_| no_answer("basic.qos"))?
        .map_err(|e| e.to_string())?;
    let tag = format!("{} {}", broker.name(), uuid::Uuid::new_v4().simple());
    let consume = ch.basic_consume(
        cfg.queue.as_str().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    );
    let mut consumer = match tokio::time::timeout(patience, consume).await {
        Ok(c) => c.map_err(|e| format!("cannot consume {}: {e}", cfg.queue))?,
        Err(_) => {
            // The consume may still land later: close the channel so that no consumer nobody
            // reads can hold deliveries unacked.
            let _ = tokio::time::timeout(patience, ch.close(200, "consume timed out".into())).await;
            return Err(no_answer("basic.consume"));
        }
    };
    *backoff = Duration::from_millis(100);
    tracing::debug!(queue = %cfg.queue, prefetch = cfg.prefetch, "consuming");
    let _attached = Attached::new(cfg.attached.clone());
    let mut paused = cfg.outage.0.paused.subscribe();
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
                // The connection went down and came back: whatever lapin says of this consumer,
                // consume again on a fresh channel, and close this one (its unacked deliveries
                // go back to the queue).
                tracing::info!(queue = %cfg.queue, "connection back; consuming again on a fresh channel");
                tokio::spawn(retire(ch, consumer, cfg.queue.clone()));
                return Err(format!("the connection of {} came back", cfg.queue));
            }
            // Paused by an outage of the store: the deliveries already sent stay with lapin,
            // unacked, until it is over.
            Ok(()) = paused.changed() => {}
            next = consumer.next(), if !pause => match next {
                Some(Ok(delivery)) => {
                    let handler = Arc::clone(handler);
                    let publisher = publisher.clone();
                    let on = On { queue: cfg.queue.clone(), outage: cfg.outage.clone(), cancel: cancel.clone() };
                    handlers.spawn(process(delivery, on, publisher, handler));
                }
                Some(Err(e)) => {
                    // lapin's recovery of a consumer is not trusted: after a broker restart it can
                    // report the channel recovered while the broker has no consumer behind it,
                    // and this loop would wait forever on a queue that fills up. Start over on a
                    // fresh channel instead (the loop above), and close this one once lapin is
                    // done with it, so that a consumer it revives cannot hold deliveries nobody
                    // reads.
                    tracing::warn!(queue = %cfg.queue, error = %e, "delivery stream failed; consuming again on a fresh channel");
                    tokio::spawn(retire(ch, consumer, cfg.queue.clone()));
                    return Err(format!("the delivery stream of {} failed", cfg.queue));
                }
                None => return Err(format!("the broker ended the consumer on {}", cfg.queue)),
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

/// How long a replaced channel is watched before it is left to itself.
const RETIRE_FOR: Duration = Duration::from_secs(120);

/// Put a replaced channel to rest. lapin may still be recovering it (a `close` then fails at
/// once), and a recovery that finishes later revives its consumer: a ghost that takes
/// deliveries nobody reads and holds them unacked for as long as the process lives. So watch
/// it for a while and close it as soon as it is up: whatever reached it goes back to the queue.
async fn retire(ch: lapin::Channel, mut consumer: lapin::Consumer, queue: String) {
    let until = tokio::time::Instant::now() + RETIRE_FOR;
    let mut stream_open = true;
    while tokio::time::Instant::now() < until {
        let status = ch.status();
        if status.connected() {
            let close = ch.close(200, "replaced".into());
            if let Ok(Ok(())) = tokio::time::timeout(crate::broker::RECOVERY_PATIENCE, close).await {
                tracing::debug!(%queue, "replaced channel closed");
                return;
            }
        } else if !status.initializing() && !status.closing() {
            return; // closed or failed for good: nothing can come back on it
        }
        tokio::select! {
            next = consumer.next(), if stream_open => match next {
                // Not handled and not nacked one by one (each return counts towards the queue's
                // delivery limit): the close just above, next time round, returns them all.
                Some(Ok(_)) => tracing::warn!(%queue, "a replaced consumer came back to life; closing its channel"),
                Some(Err(_)) => tokio::time::sleep(Duration::from_millis(250)).await,
                None => stream_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    tracing::warn!(%queue, "a replaced channel never came up to be closed; leaving it");
}

/// Where a delivery is processed: its queue, the consumer's outage state, the shutdown.
struct On {
    queue: String,
    outage: Outage,
    cancel: CancellationToken,
}

async fn process<H, Fut>(delivery: Delivery, on: On, publisher: Publisher, handler: Arc<H>)
where
    H: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandleError>> + Send + 'static,
{
    let queue = on.queue.clone();
    let span = tracing::info_span!("delivery", %queue, message_id = tracing::field::Empty, kind = tracing::field::Empty);
    async move {
        let env = match Envelope::from_delivery(&delivery.properties, &delivery.data, delivery.redelivered) {
            Ok(env) => env,
            Err(reason) => return dead_letter(&publisher, &queue, delivery, &reason).await,
        };
        tracing::Span::current().record("message_id", tracing::field::display(env.message_id));
        tracing::Span::current().record("kind", env.kind.as_str());
        let Some(result) = until_through(&on, || handler(env.clone())).await else {
            // Shutting down in the middle of an outage: the delivery goes back with the
            // channel, unacked and not nacked, so it does not count against the message.
            tracing::debug!("shutting down during an outage; the delivery goes back unacked");
            return;
        };
        match result {
            Ok(()) => {
                crate::crash::point(crate::crash::AFTER_COMMIT_BEFORE_ACK);
                if let Err(e) = settle(delivery.acker.ack(BasicAckOptions::default())).await {
                    // Committed but not acked: the redelivery is answered from the inbox.
                    tracing::warn!(error = %e, "ack failed after commit; the redelivery will be deduplicated");
                }
            }
            Err(HandleError::Reject(reason)) => dead_letter(&publisher, &queue, delivery, &reason).await,
            Err(HandleError::Retry(reason) | HandleError::Transient(reason)) => {
                tracing::warn!(%reason, "handler failed; requeueing (the delivery limit stops a loop)");
                let _ = settle(delivery.acker.nack(BasicNackOptions { requeue: true, ..Default::default() })).await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Run the handler until it returns anything but [`HandleError::Transient`], waiting between
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
    let mut holding = false;
    let result = loop {
        match run().await {
            Err(HandleError::Transient(reason)) => {
                if !holding {
                    holding = true;
                    on.outage.hold(&on.queue, &reason);
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
async fn dead_letter(publisher: &Publisher, queue: &str, delivery: Delivery, reason: &str) {
    tracing::warn!(%reason, "dead-lettering a message");
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
async fn settle<T>(f: impl Future<Output = lapin::Result<T>>) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(r) => r.map(drop).map_err(|e| e.to_string()),
        Err(_) => Err("no answer to the ack within 5 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn on() -> On {
        On { queue: "q".into(), outage: Outage::default(), cancel: CancellationToken::new() }
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
}
