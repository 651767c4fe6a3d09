//! The faults of a plan that only a comparison can inject, for the [`baton_fleet::FaultDriver`]:
//! bad messages on the work queues ([`crate::poison`]), the orchestrator's clock moved
//! ([`crate::clock`]), the data dir's own filesystem filled ([`crate::tmpfs`]).

use std::sync::Arc;
use std::time::Duration;

use baton_fleet::{Fault, Hooks, Injection};
use baton_protocol::Mode;

use crate::clock::FakeClock;
use crate::tmpfs::DataDirFs;

/// What a comparison's run can reach beside the fleet and the broker.
pub(crate) struct RunHooks {
    pub mode: Mode,
    pub amqp_url: String,
    /// The orchestrator's fake clock, when libfaketime is there and the plan moves it.
    pub clock: Option<FakeClock>,
    /// The data dir's own filesystem, when the plan fills it and it could be mounted.
    pub fs: Option<DataDirFs>,
    /// The connection the bad messages go out on, opened at the first one.
    poisoner: tokio::sync::Mutex<Option<baton_amqp::Broker>>,
}

impl RunHooks {
    pub fn new(mode: Mode, amqp_url: &str, clock: Option<FakeClock>, fs: Option<DataDirFs>) -> RunHooks {
        RunHooks { mode, amqp_url: amqp_url.to_owned(), clock, fs, poisoner: Default::default() }
    }

    /// Close the bad messages' connection, if one was opened.
    pub async fn close(&self) {
        if let Some(b) = self.poisoner.lock().await.take() {
            b.close().await;
        }
    }

    /// Send the `n`-th bad message. The broker may be restarting or the connection just
    /// dropped: retry a while, as a client would.
    async fn poison(&self, n: usize) -> Option<&'static str> {
        let mut poisoner = self.poisoner.lock().await;
        for attempt in 1..=20 {
            if poisoner.is_none() {
                match baton_amqp::Broker::connect(&self.amqp_url, "chaos").await {
                    Ok(b) => *poisoner = Some(b),
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "cannot send a bad message yet");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let broker = poisoner.as_ref().expect("connected just above");
            match crate::poison::send(broker, self.mode, n).await {
                Ok(what) => {
                    tracing::info!(what, "sent a bad message");
                    return Some("bad input");
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot send a bad message yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        None
    }

    fn move_clock(&self, offset_s: i64) -> Option<&'static str> {
        match self.clock.as_ref()?.set(offset_s) {
            Ok(()) => {
                tracing::info!(offset_s, "the orchestrator's wall clock jumped");
                Some("clock jumps")
            }
            Err(e) => {
                tracing::error!(error = %e, "moving the orchestrator's clock failed");
                None
            }
        }
    }

    /// Fill the disk, keep it full for `for_`, free it. Counted once filled.
    async fn fill_disk(&self, for_: Duration) -> Option<&'static str> {
        let Some(fs) = self.fs.clone() else {
            tracing::debug!("disk-full skipped: the data dir is not on a tmpfs");
            return None;
        };
        match tokio::task::spawn_blocking(move || fs.fill()).await {
            Ok(Ok(filler)) => {
                tokio::time::sleep(for_).await;
                if let Err(e) = std::fs::remove_file(&filler) {
                    tracing::error!(error = %e, "freeing the full disk failed");
                }
                Some("disk full")
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "filling the disk failed");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "the task filling the disk died");
                None
            }
        }
    }
}

impl Hooks for RunHooks {
    fn inject(self: Arc<Self>, fault: Fault) -> Injection {
        Box::pin(async move {
            match fault {
                Fault::Poison { n } => self.poison(n).await,
                Fault::Clock { offset_s } => self.move_clock(offset_s),
                Fault::DiskFull { for_ } => self.fill_disk(for_).await,
                other => {
                    tracing::warn!(fault = ?other, "not a comparison's own fault; skipped");
                    None
                }
            }
        })
    }
}
