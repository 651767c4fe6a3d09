//! The outbox relay: publishes committed outbox rows in order, many per wake-up with their
//! confirms in a window, and deletes a row only once the broker confirmed it. A row that fails
//! stays and is tried again (after a restart too), so a message is sent at least once; the
//! receiving inbox makes that exactly-once in effect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Outgoing, PublishError, Publisher};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Rows published per wake-up (and so the window of unconfirmed messages).
pub const BATCH: usize = 256;

/// How the relay reads and updates an outbox; the storage crate implements it.
pub trait OutboxStore: Send + Sync + 'static {
    /// Up to `limit` rows, oldest first.
    fn pending(&self, limit: usize) -> impl Future<Output = Result<Vec<(i64, Outgoing)>, BoxError>> + Send;
    /// The broker confirmed these rows: delete them.
    fn confirmed(&self, seqs: Vec<i64>) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// Publishing this row failed. The store counts the attempt, and may set aside (never drop)
    /// a row that keeps coming back unroutable, so that it does not block the others.
    fn failed(&self, seq: i64, error: PublishError) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Wakes the relay after a commit that added rows; cheap to clone.
#[derive(Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    pub fn wake(&self) {
        // `notify_one` keeps a permit when the relay is busy, so no wake-up is lost.
        self.0.notify_one();
    }
}

/// Run the relay until `cancel`. Rows left at shutdown go out at the next start.
pub async fn run<S: OutboxStore>(store: S, publisher: Publisher, wake: Wake, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let batch = match store.pending(BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading the outbox failed");
                pause(&cancel, Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.0.notified() => {}
                _ = cancel.cancelled() => break,
                // A safety net only; commits wake the relay.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        }
        let mut pending = Vec::with_capacity(batch.len());
        for (seq, msg) in &batch {
            pending.push((*seq, publisher.publish(msg).await));
        }
        let mut done = Vec::with_capacity(batch.len());
        let mut failures = 0usize;
        let mut channel_failed = false;
        for (seq, sent) in pending {
            let result = match sent {
                Ok(confirm) => confirm.wait().await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => done.push(seq),
                Err(e) => {
                    failures += 1;
                    channel_failed |= matches!(e, PublishError::Channel(_));
                    tracing::warn!(seq, error = %e, "outbox row not confirmed; it stays for another try");
                    if let Err(e) = store.failed(seq, e).await {
                        tracing::error!(error = %e, "recording an outbox failure failed");
                    }
                }
            }
        }
        if !done.is_empty() {
            crate::crash::point(crate::crash::AFTER_PUBLISH_BEFORE_DELETE);
        }
        if !done.is_empty()
            && let Err(e) = store.confirmed(done).await
        {
            // The rows go out again: duplicates, which inboxes absorb.
            tracing::error!(error = %e, "deleting confirmed outbox rows failed");
        }
        if channel_failed {
            publisher.forget_channel().await;
        }
        if failures > 0 {
            pause(&cancel, backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        } else {
            backoff = Duration::from_millis(50);
        }
    }
}

async fn pause(cancel: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = cancel.cancelled() => {}
    }
}
