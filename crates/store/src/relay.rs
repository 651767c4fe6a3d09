//! The outbox relay: publishes committed outbox rows in order with their confirms in a window
//! kept full across wake-ups, and deletes a row only once the broker confirmed it. A row that fails
//! stays and is tried again (after a restart too), so a message is sent at least once; the
//! receiving inbox makes that exactly-once in effect. When the store fails (a full disk), the
//! relay says so once, backs off, and goes on once it answers again.
//!
//! It publishes through the [`Publish`] trait, which `baton-amqp` implements for its
//! `Publisher`: this crate knows nothing of AMQP beyond what the relay needs of a broker.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt, future};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use baton_metrics::{Stage, Stopwatch};
use baton_protocol::Outgoing;

use crate::{Db, StoreError};

/// Messages published and not yet confirmed, at most: the confirm window. It is kept full
/// across wake-ups: a row committed while earlier ones await their confirms goes out at once.
pub const WINDOW: usize = 256;

/// Why a publish did not count as sent. Every variant leaves the message unsent: the outbox row
/// stays and is tried again.
#[derive(Debug, thiserror::Error, Clone)]
pub enum PublishError {
    /// Counted against the row: after [`crate::outbox::PARK_AFTER`] of these it is set aside.
    #[error("the broker returned the message as unroutable ({0}): no queue is bound for it")]
    Returned(String),
    /// The broker could not take the message: after a node of a cluster is lost, a channel
    /// opened while its quorum queues elected new leaders can go on refusing every publish to
    /// one of them, until that node is back. The relay forgets the channel, as after
    /// [`PublishError::Channel`].
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The channel cannot be trusted after this: the relay forgets it.
    #[error("the channel failed before the broker confirmed: {0}")]
    Channel(#[source] crate::SharedCause),
}

impl PublishError {
    /// A failed channel, because of `cause`: the client's error, or a sentence.
    pub fn channel(cause: impl Into<crate::Cause>) -> PublishError {
        PublishError::Channel(Arc::from(cause.into()))
    }
}

/// What the relay needs of a broker: `baton-amqp` implements it for its `Publisher`, the
/// relay's tests for a fake one.
pub trait Publish: Send + Sync + 'static {
    /// The broker's verdict on one published message, still to come: `Ok` only for an ack of
    /// a routed message.
    type Confirm: Future<Output = Result<(), PublishError>> + Send + 'static;

    /// Hand `msg` to the broker (persistent, mandatory) without waiting for its confirm.
    fn publish(&self, msg: &Outgoing) -> impl Future<Output = Result<Self::Confirm, PublishError>> + Send;

    /// Whether the connection is up now: while it is down, its loss is the connection owner's
    /// to report, not every failed row's.
    fn connected(&self) -> bool;

    /// Changes each time a new connection replaces a lost one: the confirms awaited on the old
    /// one may never come.
    fn replaced(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Drop the channel in use, so that the next publish opens a fresh one.
    fn forget_channel(&self) -> impl Future<Output = ()> + Send;

    /// Called once the broker confirmed a batch, before its rows are deleted (where a test may
    /// crash the process).
    fn before_delete(&self) {}
}

/// Wakes the relay after a commit that added rows, and may hand it those rows; cheap to clone.
#[derive(Clone, Default)]
pub struct Wake(Arc<WakeInner>);

#[derive(Default)]
struct WakeInner {
    notify: Notify,
    /// Rows just committed, in sequence order: a hint that spares the relay a read of the
    /// outbox, never the only copy (the rows are in the outbox whatever happens to this).
    fed: std::sync::Mutex<Fed>,
}

/// The feed's rows, and since when its oldest row waits (the relay's wake-up stage).
#[derive(Default)]
struct Fed {
    rows: Vec<(i64, Outgoing)>,
    since: Stopwatch,
}

/// Rows handed to the connection at once, at most: a batch is polled in order (`join_all`
/// keeps to its order up to 30 futures), which keeps the rows' frames in sequence order.
const SEND_TOGETHER: usize = 16;

/// Rows the feed holds at most; past that it is emptied and the relay reads the outbox.
const FEED_MAX: usize = 4 * WINDOW;

/// How long the relay may go on the feed alone before it reads the outbox again, to pick up
/// any row the feed did not carry (written outside a group commit, or taken over).
const READ_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

impl Wake {
    pub fn wake(&self) {
        // `notify_one` keeps a permit when the relay is busy, so no wake-up is lost.
        self.0.notify.notify_one();
    }

    /// Hand the relay rows that were just committed (called after the commit), and wake it.
    pub fn hand(&self, rows: Vec<(i64, Outgoing)>) {
        if rows.is_empty() {
            return;
        }
        {
            let mut fed = self.0.fed.lock().expect("relay feed");
            if fed.rows.len() + rows.len() > FEED_MAX {
                // The relay is behind (the broker is slow or away): it reads the outbox instead.
                fed.rows.clear();
                fed.since = Stopwatch::default();
            } else {
                if fed.rows.is_empty() {
                    fed.since = Stopwatch::start();
                }
                fed.rows.extend(rows);
            }
        }
        self.wake();
    }

    /// The rows handed so far, in sequence order (what the relay takes on each pass).
    pub fn take_fed(&self) -> Vec<(i64, Outgoing)> {
        self.take().0
    }

    /// The rows handed so far, and since when the oldest of them waited.
    fn take(&self) -> (Vec<(i64, Outgoing)>, Stopwatch) {
        let fed = std::mem::take(&mut *self.0.fed.lock().expect("relay feed"));
        (fed.rows, fed.since)
    }
}

/// How soon the relay starts over after a row failed: 50 ms, doubling up to 5 s, with jitter.
/// While the broker is away, connection attempts keep their own schedule (the broker's owner's).
pub const RETRY_PACE: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(50))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

type Confirming = Pin<Box<dyn Future<Output = (i64, Result<(), PublishError>)> + Send>>;

/// Where the relay stands between two passes of its loop. Its methods decide what comes next;
/// the loop does the I/O.
struct Position {
    /// The newest row handed to the broker: every row of this relay at or below it is in
    /// flight, confirmed or failed (one writer per database, so rows commit in sequence order).
    /// Back to 0 to start over from the oldest row left.
    cursor: i64,
    /// A row failed: publish nothing more until the window drains, then start over.
    failed: bool,
    /// When the outbox was last read; `None` has the next pass read it.
    last_read: Option<Instant>,
    /// The pause before each start-over in a row of failures.
    pace: ExponentialBuilder,
    delays: ExponentialBackoff,
}

/// Where the next rows to publish come from.
#[derive(Debug, PartialEq)]
enum Next {
    /// The feed's rows, which continue exactly where the relay stands.
    Fed(Vec<(i64, Outgoing)>),
    /// A read of the outbox: up to `limit` rows above `after`.
    Read { after: i64, limit: usize },
}

impl Position {
    fn new(pace: ExponentialBuilder) -> Self {
        Position { cursor: 0, failed: false, last_read: None, pace, delays: pace.build() }
    }

    /// Whether to publish more, with `in_flight` rows awaiting their confirms.
    fn may_publish(&self, in_flight: usize) -> bool {
        !self.failed && in_flight < WINDOW
    }

    /// Where to take up to `room` rows from, given what the feed holds at `now`. The feed is
    /// used only when it continues exactly where the relay stands (then no row can be missing
    /// in between) and the outbox was read within [`READ_AT_LEAST_EVERY`]; otherwise the
    /// outbox is read, and that read counts from `now`.
    fn next(&mut self, mut fed: Vec<(i64, Outgoing)>, room: usize, now: Instant) -> Next {
        fed.retain(|(seq, _)| *seq > self.cursor);
        let follows =
            fed.len() <= room && fed.iter().zip(self.cursor + 1..).all(|((seq, _), next)| *seq == next);
        let fresh = self.last_read.is_some_and(|t| now.saturating_duration_since(t) < READ_AT_LEAST_EVERY);
        if self.cursor != 0 && follows && fresh {
            Next::Fed(fed)
        } else {
            self.last_read = Some(now);
            Next::Read { after: self.cursor, limit: room }
        }
    }

    /// Row `seq` was handed to the broker.
    fn sent(&mut self, seq: i64) {
        self.cursor = seq;
    }

    /// A publish or its confirm failed.
    fn fail(&mut self) {
        self.failed = true;
    }

    /// A batch of confirms was settled, `ok` if none of them failed.
    fn settled(&mut self, ok: bool) {
        self.failed |= !ok;
        if !self.failed {
            self.delays = self.pace.build();
        }
    }

    /// With the window drained: after a failure, start over from the oldest row left (the
    /// failed one among them) after the returned pause.
    fn start_over(&mut self) -> Option<Duration> {
        if !self.failed {
            return None;
        }
        self.cursor = 0;
        self.failed = false;
        Some(self.delays.next().unwrap_or(Duration::from_secs(5)))
    }

    /// Read the outbox at the next pass (it could not be read, or the relay idled).
    fn reread(&mut self) {
        self.last_read = None;
    }

    /// A new connection replaced the lost one: the confirms still awaited may never come, so
    /// the rows they are for go out again, from the oldest.
    fn reconnected(&mut self) {
        self.cursor = 0;
        self.last_read = None;
    }
}

/// Run the relay until `cancel`. Rows are published in order on one confirm-mode channel with
/// up to [`WINDOW`] unconfirmed; each is deleted once confirmed, in batches. Rows come from the
/// feed ([`Wake::hand`]) when it continues exactly where the relay stands, and otherwise (and at
/// least every second) from a read of the outbox. A row that fails stays: once the window has
/// drained, the relay starts over from the oldest row left, after a backoff ([`RETRY_PACE`]).
/// Rows left at shutdown go out at the next start.
pub async fn run<P: Publish>(store: Db, publisher: P, wake: Wake, cancel: CancellationToken) {
    let watched = store.clone();
    let _gauges = baton_metrics::on_scrape(&format!("outbox of {}", store.component), move || {
        watched.clone().outbox_gauges()
    });
    relay(store, publisher, wake, cancel, RETRY_PACE).await
}

async fn relay<P: Publish>(
    store: Db,
    publisher: P,
    wake: Wake,
    cancel: CancellationToken,
    pace: ExponentialBuilder,
) {
    let mut at = Position::new(pace);
    let mut trouble = StoreTrouble::default();
    let mut window: FuturesOrdered<Confirming> = FuturesOrdered::new();
    let mut generation = publisher.replaced();
    generation.borrow_and_update();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if at.may_publish(window.len()) {
            let (fed, since) = wake.take();
            since.record(&store.component, Stage::RelayWake);
            let rows = match at.next(fed, WINDOW - window.len(), Instant::now()) {
                Next::Fed(rows) => Ok(rows),
                Next::Read { after, limit } => store.pending(after, limit).await,
            };
            match rows {
                Ok(rows) => {
                    'rows: for batch in rows.chunks(SEND_TOGETHER) {
                        // Handed to the connection together: each publish queues its frames
                        // when first polled, in order, so the connection's I/O thread writes
                        // the batch at one wake-up and the relay is woken once for it all.
                        let watch = Stopwatch::start();
                        let sent =
                            future::join_all(batch.iter().map(|(_, msg)| publisher.publish(msg))).await;
                        for ((seq, _), published) in batch.iter().zip(sent) {
                            watch.record(&store.component, Stage::Publish);
                            at.sent(*seq);
                            match published {
                                Ok(confirm) => {
                                    let (watch, component, seq) =
                                        (Stopwatch::start(), Arc::clone(&store.component), *seq);
                                    window.push_back(Box::pin(async move {
                                        let confirmed = confirm.await;
                                        watch.record(&component, Stage::Confirm);
                                        (seq, confirmed)
                                    }))
                                }
                                Err(e) => {
                                    // The rows after it in the batch went out or failed too;
                                    // their confirms are awaited, then the relay starts over.
                                    note_failure(&store, &publisher, *seq, e, &mut trouble).await;
                                    at.fail();
                                }
                            }
                        }
                        if at.failed {
                            break 'rows;
                        }
                    }
                }
                Err(e) => {
                    let wait = trouble.failed("reading the outbox", &e);
                    at.reread();
                    pause(&cancel, wait).await;
                    continue;
                }
            }
        }
        if window.is_empty() {
            if !trouble.undeleted.is_empty() {
                // Published and confirmed, but their delete failed (the store was out): delete
                // them before anything else, or they would wait for the next start to go out
                // again.
                let wait = trouble.next_wait();
                pause(&cancel, wait).await;
                settle(&store, &publisher, Vec::new(), &mut trouble).await;
                continue;
            }
            if let Some(wait) = at.start_over() {
                pause(&cancel, wait).await;
                continue;
            }
            tokio::select! {
                _ = wake.0.notify.notified() => {}
                _ = cancel.cancelled() => break,
                // A safety net only; commits wake the relay. The next pass reads the outbox.
                _ = tokio::time::sleep(Duration::from_secs(5)) => at.reread(),
            }
            continue;
        }
        tokio::select! {
            Some(first) = window.next() => {
                // Every confirm already in is handled with the first: one delete for them all.
                let mut settled = vec![first];
                while let Some(Some(more)) = window.next().now_or_never() {
                    settled.push(more);
                }
                at.settled(settle(&store, &publisher, settled, &mut trouble).await);
            }
            _ = wake.0.notify.notified(), if at.may_publish(window.len()) => {}
            Ok(()) = generation.changed() => {
                // The connection went down and came back: the confirms still awaited may never
                // come. Count them as failed now rather than after the publisher's confirm
                // timeout: the rows stay and go out again on a fresh channel (receivers drop
                // any double).
                tracing::warn!(in_flight = window.len(), "connection back; publishing the unconfirmed rows again");
                window = FuturesOrdered::new();
                publisher.forget_channel().await;
                at.reconnected();
            }
            _ = cancel.cancelled() => break,
        }
    }
    // Shutting down: what the broker confirms in the next moments need not go out again.
    let drain = async {
        let mut settled = Vec::new();
        while let Some(one) = window.next().await {
            settled.push(one);
        }
        settled
    };
    if let Ok(settled) = tokio::time::timeout(Duration::from_secs(2), drain).await {
        settle(&store, &publisher, settled, &mut trouble).await;
    }
}

/// The relay's view of an outage of its store: said once (WARN) when it starts and once
/// (INFO) when it is over, waited out with a growing pause in between.
#[derive(Default)]
struct StoreTrouble {
    since: Option<Instant>,
    waits: Option<backon::ExponentialBackoff>,
    /// Rows the broker confirmed whose delete failed: deleted again later.
    undeleted: Vec<i64>,
}

impl StoreTrouble {
    /// The store failed at `what`: how long to wait before reading the outbox again.
    fn failed(&mut self, what: &str, e: &StoreError) -> Duration {
        if self.since.is_none() {
            self.since = Some(Instant::now());
            tracing::warn!(error = %e, "{what} failed; the rows stay in the outbox until the store answers again");
        } else {
            tracing::debug!(error = %e, "{what} failed again");
        }
        self.next_wait()
    }

    /// The next pause of the outage.
    fn next_wait(&mut self) -> Duration {
        let waits = self.waits.get_or_insert_with(|| {
            use backon::BackoffBuilder;
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times()
                .build()
        });
        waits.next().unwrap_or(Duration::from_secs(5))
    }

    /// The store took a write.
    fn over(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(after = ?since.elapsed(), "the outbox's store answers again");
        }
        self.waits = None;
    }
}

/// Delete the confirmed rows of `settled` and record the failures; `false` if any failed.
async fn settle<P: Publish>(
    store: &Db,
    publisher: &P,
    settled: Vec<(i64, Result<(), PublishError>)>,
    trouble: &mut StoreTrouble,
) -> bool {
    let mut done = std::mem::take(&mut trouble.undeleted);
    let mut ok = true;
    for (seq, result) in settled {
        match result {
            Ok(()) => done.push(seq),
            Err(e) => {
                ok = false;
                note_failure(store, publisher, seq, e, trouble).await;
            }
        }
    }
    if !done.is_empty() {
        publisher.before_delete();
        let watch = Stopwatch::start();
        let deleted = store.confirmed(done.clone()).await;
        watch.record(&store.component, Stage::Delete);
        match deleted {
            Ok(()) => {
                baton_metrics::relay(&store.component, "confirmed", done.len() as u64);
                trouble.over()
            }
            Err(e) => {
                trouble.failed("deleting confirmed outbox rows", &e);
                trouble.undeleted = done;
            }
        }
    }
    ok
}

async fn note_failure<P: Publish>(
    store: &Db,
    publisher: &P,
    seq: i64,
    e: PublishError,
    trouble: &mut StoreTrouble,
) {
    if publisher.connected() {
        tracing::warn!(seq, error = %e, "outbox row not confirmed; it stays for another try");
    } else {
        // The broker reports its lost connection itself, once; not again at every try.
        tracing::debug!(seq, error = %e, "outbox row not sent while the connection is lost; it stays");
    }
    let result = if matches!(e, PublishError::Channel(_)) { "failed" } else { "nacked" };
    baton_metrics::relay(&store.component, result, 1);
    if matches!(e, PublishError::Channel(_) | PublishError::Nacked) {
        // After a channel failure or a nack the channel cannot be trusted: the next publish
        // opens another.
        publisher.forget_channel().await;
    }
    if let Err(e) = store.failed(seq, matches!(e, PublishError::Returned(_)), e.to_string()).await {
        trouble.failed("recording an outbox failure", &e);
    }
}

async fn pause(cancel: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures_util::future::{self, BoxFuture};
    use tokio::sync::watch;

    use super::*;
    use crate::outbox::{self, PARK_AFTER};
    use crate::tests::message;

    /// What the fake broker answers to the `nth` publish (from 1) of the message whose body is `n`.
    type Verdicts = dyn Fn(u32, usize) -> Verdict + Send + Sync;

    #[derive(Clone, Copy)]
    enum Verdict {
        Ack,
        Nack,
        Return,
        /// No confirm ever comes (the connection went away with it).
        Never,
    }

    /// A broker that answers each publish as `verdicts` says, and remembers every publish.
    #[derive(Clone)]
    struct FakeBroker(Arc<Fake>);

    struct Fake {
        verdicts: Box<Verdicts>,
        /// The bodies published, in order, a message published twice showing twice.
        published: Mutex<Vec<u32>>,
        generation: watch::Sender<u64>,
        forgotten: AtomicUsize,
    }

    impl FakeBroker {
        fn new(verdicts: impl Fn(u32, usize) -> Verdict + Send + Sync + 'static) -> Self {
            FakeBroker(Arc::new(Fake {
                verdicts: Box::new(verdicts),
                published: Mutex::default(),
                generation: watch::Sender::new(0),
                forgotten: AtomicUsize::new(0),
            }))
        }

        fn published(&self) -> Vec<u32> {
            self.0.published.lock().unwrap().clone()
        }

        /// How many times each body was published.
        fn times(&self) -> HashMap<u32, usize> {
            self.published().into_iter().fold(HashMap::new(), |mut m, n| {
                *m.entry(n).or_default() += 1;
                m
            })
        }

        /// The connection was lost and a new one replaced it.
        fn reconnect(&self) {
            self.0.generation.send_modify(|g| *g += 1);
        }
    }

    impl Publish for FakeBroker {
        type Confirm = BoxFuture<'static, Result<(), PublishError>>;

        async fn publish(&self, msg: &Outgoing) -> Result<Self::Confirm, PublishError> {
            let n: u32 = msg.body.as_str().parse().expect("a test message");
            let nth = {
                let mut published = self.0.published.lock().unwrap();
                published.push(n);
                published.iter().filter(|m| **m == n).count()
            };
            Ok(match (self.0.verdicts)(n, nth) {
                Verdict::Ack => Box::pin(future::ready(Ok(()))),
                Verdict::Nack => Box::pin(future::ready(Err(PublishError::Nacked))),
                Verdict::Return => {
                    Box::pin(future::ready(Err(PublishError::Returned("312 NO_ROUTE".into()))))
                }
                Verdict::Never => Box::pin(future::pending()),
            })
        }

        fn connected(&self) -> bool {
            true
        }

        fn replaced(&self) -> watch::Receiver<u64> {
            self.0.generation.subscribe()
        }

        async fn forget_channel(&self) {
            self.0.forgotten.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Start-overs within milliseconds, so that a row failing ten times takes no test long.
    const QUICK: ExponentialBuilder = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(1))
        .with_max_delay(Duration::from_millis(10))
        .without_max_times();

    /// A relay of `db` publishing to `broker`, stopped (and awaited) when dropped.
    struct Running {
        wake: Wake,
        cancel: CancellationToken,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Running {
        fn start(db: &Db, broker: &FakeBroker) -> Running {
            let wake = Wake::default();
            db.feed(wake.clone());
            let cancel = CancellationToken::new();
            let task = tokio::spawn(relay(db.clone(), broker.clone(), wake.clone(), cancel.clone(), QUICK));
            Running { wake, cancel, task: Some(task) }
        }

        async fn stop(mut self) {
            self.cancel.cancel();
            let task = self.task.take().expect("running");
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("the relay stops").unwrap();
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    /// A relay of instance `a` of a fresh database, publishing to a broker that answers as
    /// `verdicts` says.
    async fn relay_to(
        verdicts: impl Fn(u32, usize) -> Verdict + Send + Sync + 'static,
    ) -> (tempfile::TempDir, Db, FakeBroker, Running) {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir, "a").await;
        let broker = FakeBroker::new(verdicts);
        let relay = Running::start(&db, &broker);
        (dir, db, broker, relay)
    }

    async fn open(dir: &tempfile::TempDir, owner: &str) -> Db {
        Db::open(&crate::Location::Dir(dir.path().to_owned()), "relay", &[], owner).await.unwrap()
    }

    /// Commit messages `bodies` to the outbox, in one transaction.
    async fn push(db: &Db, bodies: impl IntoIterator<Item = u32> + Send + 'static) {
        db.transaction(move |tx| bodies.into_iter().try_for_each(|n| outbox::push(tx, message(n))))
            .await
            .unwrap();
    }

    /// The outbox's rows, the parked ones, and the messages counted as published.
    async fn counts(db: &Db) -> (i64, i64, i64) {
        db.call(|c| {
            let parked = c.query_row("SELECT COUNT(*) FROM outbox_parked", (), |r| r.get(0))?;
            Ok((outbox::len(c)?, parked, outbox::published(c)?))
        })
        .await
        .unwrap()
    }

    /// Wait, at most 10 s, until `done` says so.
    async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
        let started = Instant::now();
        while !done().await {
            assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn drained(db: &Db) {
        until("the outbox to drain", || async { counts(db).await.0 == 0 }).await;
    }

    #[tokio::test]
    async fn confirmed_rows_go_out_in_order_and_are_deleted_and_counted() {
        let (_dir, db, broker, relay) = relay_to(|_, _| Verdict::Ack).await;
        push(&db, 0..5).await;
        push(&db, 5..8).await;
        drained(&db).await;
        assert_eq!(broker.published(), (0..8).collect::<Vec<_>>());
        assert_eq!(counts(&db).await, (0, 0, 8));
        relay.stop().await;
    }

    #[tokio::test]
    async fn a_nacked_row_stays_and_goes_out_again_on_a_fresh_channel_without_counting_against_it() {
        let (_dir, db, broker, relay) =
            relay_to(|n, nth| if n == 1 && nth == 1 { Verdict::Nack } else { Verdict::Ack }).await;
        push(&db, 0..3).await;
        drained(&db).await;
        assert_eq!(broker.times(), HashMap::from([(0, 1), (1, 2), (2, 1)]));
        assert_eq!(counts(&db).await, (0, 0, 3));
        // The channel that nacked is not used again (a cluster's channel can go on refusing).
        assert_eq!(broker.0.forgotten.load(Ordering::SeqCst), 1);
        relay.stop().await;
    }

    #[tokio::test]
    async fn a_returned_row_is_tried_again_and_parked_after_park_after_returns() {
        let (_dir, db, broker, relay) =
            relay_to(|n, _| if n == 1 { Verdict::Return } else { Verdict::Ack }).await;
        push(&db, 0..3).await;
        drained(&db).await;
        let times = broker.times();
        assert_eq!(times[&1], PARK_AFTER as usize, "{times:?}");
        assert_eq!((times[&0], times[&2]), (1, 1), "the others went out once: {times:?}");
        assert_eq!(counts(&db).await, (0, 1, 2), "parked, not published");
        let reason: String =
            db.call(|c| c.query_row("SELECT reason FROM outbox_parked", (), |r| r.get(0))).await.unwrap();
        assert!(reason.contains("unroutable"), "{reason}");
        relay.stop().await;
    }

    #[tokio::test]
    async fn a_new_connection_has_the_unconfirmed_rows_published_again_on_a_fresh_channel() {
        // The first connection loses every confirm.
        let (_dir, db, broker, relay) =
            relay_to(|_, nth| if nth == 1 { Verdict::Never } else { Verdict::Ack }).await;
        push(&db, 0..3).await;
        until("three publishes", || async { broker.published().len() == 3 }).await;
        assert_eq!(counts(&db).await.0, 3, "unconfirmed rows stay");
        broker.reconnect();
        drained(&db).await;
        assert_eq!(broker.published(), vec![0, 1, 2, 0, 1, 2]);
        assert!(broker.0.forgotten.load(Ordering::SeqCst) >= 1, "the old channel is let go");
        assert_eq!(counts(&db).await, (0, 0, 3));
        relay.stop().await;
    }

    #[tokio::test]
    async fn rows_another_instance_left_unpublished_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let gone = open(&dir, "b").await;
        push(&gone, [7, 8]).await;
        drop(gone);
        let db = open(&dir, "a").await;
        db.take_over_after(Duration::from_millis(100));
        let broker = FakeBroker::new(|_, _| Verdict::Ack);
        let relay = Running::start(&db, &broker);
        push(&db, [1]).await;
        // Its own row at once; the other instance's once watched for the lease.
        until("the other instance's rows", || async {
            relay.wake.wake();
            broker.published().len() == 3
        })
        .await;
        assert_eq!(broker.published()[0], 1, "{:?}", broker.published());
        drained(&db).await;
        assert_eq!(broker.times(), HashMap::from([(1, 1), (7, 1), (8, 1)]));
        relay.stop().await;
    }

    /// A row of the feed (every one holds the same message: only the sequence numbers matter).
    fn row(seq: i64) -> (i64, Outgoing) {
        static MESSAGE: std::sync::OnceLock<Outgoing> = std::sync::OnceLock::new();
        (seq, MESSAGE.get_or_init(|| message(0)).clone())
    }

    #[test]
    fn the_feed_is_used_only_when_it_follows_the_cursor_and_the_outbox_was_read_within_a_second() {
        let mut at = Position::new(QUICK);
        let t0 = Instant::now();
        assert_eq!(at.next(vec![row(1)], 10, t0), Next::Read { after: 0, limit: 10 }, "first a read");
        at.sent(3);
        assert_eq!(
            at.next(vec![row(2), row(3), row(4)], 10, t0),
            Next::Fed(vec![row(4)]),
            "sent rows dropped"
        );
        at.sent(4);
        assert_eq!(at.next(vec![row(6)], 10, t0), Next::Read { after: 4, limit: 10 }, "a gap");
        assert_eq!(at.next(vec![row(5), row(6)], 1, t0), Next::Read { after: 4, limit: 1 }, "no room");
        let later = t0 + READ_AT_LEAST_EVERY;
        assert_eq!(at.next(vec![row(5)], 10, later), Next::Read { after: 4, limit: 10 }, "a second on");
        assert_eq!(at.next(vec![row(5)], 10, later), Next::Fed(vec![row(5)]), "that read counts");
        at.reread();
        assert_eq!(at.next(Vec::new(), 10, later), Next::Read { after: 4, limit: 10 }, "asked to read");
    }

    #[test]
    fn a_failure_stops_publishing_until_the_window_drains_then_starts_over_from_the_oldest_row() {
        let mut at = Position::new(QUICK);
        let t0 = Instant::now();
        at.next(Vec::new(), WINDOW, t0);
        at.sent(5);
        assert!(at.may_publish(WINDOW - 1) && !at.may_publish(WINDOW), "the window is the bound");
        assert_eq!(at.start_over(), None, "nothing failed");
        at.settled(false);
        assert!(!at.may_publish(0));
        let pause = at.start_over().expect("a failure starts over");
        assert!(pause <= Duration::from_millis(10), "{pause:?}");
        assert!(at.may_publish(0));
        assert_eq!(at.next(vec![row(6)], 10, t0), Next::Read { after: 0, limit: 10 }, "from the oldest");
        at.sent(9);
        at.reconnected();
        assert_eq!(
            at.next(vec![row(10)], 10, t0),
            Next::Read { after: 0, limit: 10 },
            "again after a new connection"
        );
    }
}
