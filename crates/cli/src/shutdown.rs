//! SIGINT and SIGTERM cancel one token; the caller waits for its tasks, within a grace period.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long components get to finish what they hold after a signal.
pub const GRACE: Duration = Duration::from_secs(10);

/// Cancel `token` at the first SIGINT or SIGTERM.
pub fn on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
            _ = token.cancelled() => return,
        }
        // Cancel first: the shutdown must not depend on the log line being written.
        token.cancel();
        tracing::info!("signal received; shutting down (Ctrl-C again does not hurry it)");
    });
}
