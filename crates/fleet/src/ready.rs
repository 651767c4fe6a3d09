//! The waits until a fleet takes work: the gateway answers `/health`, and every work queue has
//! as many consumers as the fleet runs processes on it. Each checks on every round that no
//! process has died, and gives up at its timeout with the logs' tails.

use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::{Fleet, FleetError};

/// Pause between two probes.
const POLL: Duration = Duration::from_millis(100);

/// Lines of each log an error message carries.
pub(crate) const TAIL: usize = 20;

impl Fleet {
    fn not_ready(&self, timeout: Duration, waiting_for: String) -> FleetError {
        FleetError::NotReady { timeout, waiting_for, dir: self.dir.clone(), tails: self.log_tails(TAIL) }
    }

    /// Wait until the gateway at `gateway` (`http://host:port`) answers `/health` with a
    /// success.
    pub async fn wait_healthy(&self, gateway: &str, timeout: Duration) -> Result<(), FleetError> {
        let deadline = Instant::now() + timeout;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        loop {
            self.check_alive()?;
            if let Ok(r) = client.get(format!("{gateway}/health")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.not_ready(timeout, format!("the gateway at {gateway} to answer /health")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until each queue of `queues` has at least its number of consumers.
    pub async fn wait_consumers(
        &self,
        amqp_url: &str,
        queues: &[(String, u32)],
        timeout: Duration,
    ) -> Result<(), FleetError> {
        let deadline = Instant::now() + timeout;
        let broker = baton_amqp::Broker::connect(amqp_url, "fleet readiness probe").await?;
        let mut waiting_for = String::new();
        let ready = loop {
            if let Err(e) = self.check_alive() {
                broker.close().await;
                return Err(e);
            }
            match short_of_consumers(&broker, queues).await {
                Ok(None) => break true,
                Ok(Some((q, has, wants))) => {
                    waiting_for = format!("{wants} consumer(s) on {q} (it has {has})")
                }
                // A queue not declared yet closes the channel; the next try opens another.
                Err(e) => waiting_for = e,
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(POLL).await;
        };
        broker.close().await;
        if ready { Ok(()) } else { Err(self.not_ready(timeout, waiting_for)) }
    }

    /// [`wait_healthy`](Fleet::wait_healthy), then [`wait_consumers`](Fleet::wait_consumers),
    /// within one `timeout`: then every process is up and taking work.
    pub async fn wait_ready(
        &self,
        gateway: &str,
        amqp_url: &str,
        queues: &[(String, u32)],
        timeout: Duration,
    ) -> Result<(), FleetError> {
        let started = Instant::now();
        self.wait_healthy(gateway, timeout).await?;
        self.wait_consumers(amqp_url, queues, timeout.saturating_sub(started.elapsed())).await
    }
}

/// The first queue of `queues` with fewer consumers than it wants, if any: its name, how many it
/// has, how many it wants.
async fn short_of_consumers(
    broker: &baton_amqp::Broker,
    queues: &[(String, u32)],
) -> Result<Option<(String, u32, u32)>, String> {
    let ch = broker.channel().await.map_err(|e| e.to_string())?;
    let mut found = None;
    for (q, wants) in queues {
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let info = ch
            .queue_declare(q.as_str().into(), opts, FieldTable::default())
            .await
            .map_err(|e| format!("queue {q} ({e})"))?;
        if info.consumer_count() < *wants {
            found = Some((q.clone(), info.consumer_count(), *wants));
            break;
        }
    }
    let _ = ch.close(200, "probed".into()).await;
    Ok(found)
}
