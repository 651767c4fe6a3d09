//! The outbox relay: publishes committed outbox rows in order with their confirms in a window
//! kept full across wake-ups, and deletes a row only once the broker confirmed it. A row that fails
//! stays and is tried again (after a restart too), so a message is sent at least once; the
//! receiving inbox makes that exactly-once in effect. When the store fails (a full disk), the
//! relay says so once, backs off, and goes on once it answers again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::FutureExt;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Outgoing, PublishError, Publisher};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Messages published and not yet confirmed, at most: the confirm window. It is kept full
/// across wake-ups: a row committed while earlier ones await their confirms goes out at once.
pub const WINDOW: usize = 256;

/// How the relay reads and updates an outbox; the storage crate implements it.
pub trait OutboxStore: Send + Sync + 'static {
    /// Up to `limit` rows with a sequence number above `after`, oldest first.
    fn pending(
        &self,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(i64, Outgoing)>, BoxError>> + Send;
    /// The broker confirmed these rows: delete them.
    fn confirmed(&self, seqs: Vec<i64>) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// Publishing this row failed. The store counts the attempt, and may set aside (never drop)
    /// a row that keeps coming back unroutable, so that it does not block the others.
    fn failed(&self, seq: i64, error: PublishError) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Wakes the relay after a commit that added rows, and may hand it those rows; cheap to clone.
#[derive(Clone, Default)]
pub struct Wake(Arc<WakeInner>);

#[derive(Default)]
struct WakeInner {
    notify: Notify,
    /// Rows just committed, in sequence order: a hint that spares the relay a read of the
    /// outbox, never the only copy (the rows are in the outbox whatever happens to this).
    fed: std::sync::Mutex<Vec<(i64, Outgoing)>>,
}

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
            if fed.len() + rows.len() > FEED_MAX {
                // The relay is behind (the broker is slow or away): it reads the outbox instead.
                fed.clear();
            } else {
                fed.extend(rows);
            }
        }
        self.wake();
    }

    /// The rows handed so far, in sequence order (what the relay takes on each pass).
    pub fn take_fed(&self) -> Vec<(i64, Outgoing)> {
        std::mem::take(&mut *self.0.fed.lock().expect("relay feed"))
    }
}

/// How soon the relay starts over after a row failed: 50 ms, doubling up to 5 s, with jitter.
/// While the broker is away, connection attempts keep their own schedule in [`crate::Broker`].
pub const RETRY_PACE: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(50))
    .with_max_delay(Duration::from_secs(5))
    .with_jitter()
    .without_max_times();

type Confirming = Pin<Box<dyn Future<Output = (i64, Result<(), PublishError>)> + Send>>;

/// Run the relay until `cancel`. Rows are published in order on one confirm-mode channel with
/// up to [`WINDOW`] unconfirmed; each is deleted once confirmed, in batches. Rows come from the
/// feed ([`Wake::hand`]) when it continues exactly where the relay stands, and otherwise (and at
/// least every second) from a read of the outbox. A row that fails stays: once the window has
/// drained, the relay starts over from the oldest row left, after a backoff. Rows left at
/// shutdown go out at the next start.
pub async fn run<S: OutboxStore>(store: S, publisher: Publisher, wake: Wake, cancel: CancellationToken) {
    let mut delays = RETRY_PACE.build();
    let mut trouble = StoreTrouble::default();
    // The newest row handed to the broker: every row of this relay at or below it is in flight,
    // confirmed or failed (one writer per database, so rows commit in sequence order). It goes
    // back to 0 after a failure, to start over from the oldest row left.
    let mut cursor = 0i64;
    let mut window: FuturesOrdered<Confirming> = FuturesOrdered::new();
    // A row failed: publish nothing more until the window drains, then start over.
    let mut failed = false;
    let mut last_read: Option<std::time::Instant> = None;
    let mut generation = publisher.broker().generation();
    generation.borrow_and_update();
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if !failed && window.len() < WINDOW {
            let room = WINDOW - window.len();
            let mut fed = wake.take_fed();
            fed.retain(|(seq, _)| *seq > cursor);
            // The feed is used only when it continues exactly where the relay stands: then no
            // row can be missing in between. Otherwise, and now and then, read the outbox.
            let follows =
                fed.len() <= room && fed.iter().zip(cursor + 1..).all(|((seq, _), next)| *seq == next);
            let fresh = last_read.is_some_and(|t| t.elapsed() < READ_AT_LEAST_EVERY);
            let rows = if cursor != 0 && follows && fresh {
                Ok(fed)
            } else {
                last_read = Some(std::time::Instant::now());
                store.pending(cursor, room).await
            };
            match rows {
                Ok(rows) => {
                    for (seq, msg) in rows {
                        cursor = seq;
                        match publisher.publish(&msg).await {
                            Ok(confirm) => {
                                window.push_back(Box::pin(async move { (seq, confirm.wait().await) }))
                            }
                            Err(e) => {
                                note_failure(&store, &publisher, seq, e, &mut trouble).await;
                                failed = true;
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    let wait = trouble.failed("reading the outbox", &*e);
                    last_read = None;
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
            if failed {
                // Start over from the oldest row left, which includes the one that failed.
                cursor = 0;
                failed = false;
                pause(&cancel, delays.next().unwrap_or(Duration::from_secs(5))).await;
                continue;
            }
            tokio::select! {
                _ = wake.0.notify.notified() => {}
                _ = cancel.cancelled() => break,
                // A safety net only; commits wake the relay. The next pass reads the outbox.
                _ = tokio::time::sleep(Duration::from_secs(5)) => last_read = None,
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
                failed |= !settle(&store, &publisher, settled, &mut trouble).await;
                if !failed {
                    delays = RETRY_PACE.build();
                }
            }
            _ = wake.0.notify.notified(), if !failed && window.len() < WINDOW => {}
            Ok(()) = generation.changed() => {
                // The connection went down and came back: the confirms still awaited may never
                // come. Count them as failed now rather than after CONFIRM_TIMEOUT: the rows stay
                // and go out again on a fresh channel (receivers drop any double).
                tracing::warn!(in_flight = window.len(), "connection back; publishing the unconfirmed rows again");
                window = FuturesOrdered::new();
                publisher.forget_channel().await;
                cursor = 0;
                last_read = None;
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
    since: Option<std::time::Instant>,
    waits: Option<backon::ExponentialBackoff>,
    /// Rows the broker confirmed whose delete failed: deleted again later.
    undeleted: Vec<i64>,
}

impl StoreTrouble {
    /// The store failed at `what`: how long to wait before reading the outbox again.
    fn failed(&mut self, what: &str, e: &dyn std::error::Error) -> Duration {
        if self.since.is_none() {
            self.since = Some(std::time::Instant::now());
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
async fn settle<S: OutboxStore>(
    store: &S,
    publisher: &Publisher,
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
        #[cfg(feature = "crash-points")]
        baton_crash::point(baton_crash::AFTER_PUBLISH_BEFORE_DELETE);
        match store.confirmed(done.clone()).await {
            Ok(()) => trouble.over(),
            Err(e) => {
                trouble.failed("deleting confirmed outbox rows", &*e);
                trouble.undeleted = done;
            }
        }
    }
    ok
}

async fn note_failure<S: OutboxStore>(
    store: &S,
    publisher: &Publisher,
    seq: i64,
    e: PublishError,
    trouble: &mut StoreTrouble,
) {
    if publisher.broker().connected() {
        tracing::warn!(seq, error = %e, "outbox row not confirmed; it stays for another try");
    } else {
        // The broker reports its lost connection itself, once; not again at every try.
        tracing::debug!(seq, error = %e, "outbox row not sent while the connection is lost; it stays");
    }
    if matches!(e, PublishError::Channel(_)) {
        // After a channel failure the channel cannot be trusted: the next publish opens another.
        publisher.forget_channel().await;
    }
    if let Err(e) = store.failed(seq, e).await {
        trouble.failed("recording an outbox failure", &*e);
    }
}

async fn pause(cancel: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.cancelled() => {}
    }
}
