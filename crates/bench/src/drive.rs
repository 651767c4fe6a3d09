//! The ways of sending requests: one at a time, a closed loop that keeps N in flight for a while,
//! and a fixed count with N in flight (the prefill). Each takes the request as a closure, so the
//! floor, HTTP and the orchestrator share them.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::stats::Sample;

/// A run of one-at-a-time requests gives up after this many failures in a row: the system under
/// test is down, and waiting out every request's timeout would only hide it.
const GIVE_UP_AFTER: usize = 10;

/// Send `warmup + n` requests one after the other; return the samples of the last `n`.
pub(crate) async fn one_at_a_time<F, Fut>(warmup: usize, n: usize, f: F) -> anyhow::Result<Vec<Sample>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut out = Vec::with_capacity(n);
    let mut failed_in_a_row = 0;
    for i in 0..warmup + n {
        let t = Instant::now();
        let r = f(i).await;
        let latency = t.elapsed().as_micros() as u64;
        match &r {
            Ok(()) => failed_in_a_row = 0,
            Err(e) => {
                failed_in_a_row += 1;
                if failed_in_a_row >= GIVE_UP_AFTER {
                    bail!("{GIVE_UP_AFTER} requests in a row failed; the last one: {e}");
                }
            }
        }
        if i >= warmup {
            out.push(r.map(|()| latency));
        }
    }
    Ok(out)
}

/// Keep `in_flight` requests going until `duration` is over (a closed loop: each worker sends
/// its next request when the previous one is answered). Returns every sample and the time from
/// the start until the last answer.
pub(crate) async fn closed_loop<F, Fut>(in_flight: usize, duration: Duration, f: F) -> (Vec<Sample>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (f, next) = (Arc::clone(&f), Arc::clone(&next));
        workers.spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let r = f(i).await;
                samples.push(r.map(|()| t.elapsed().as_micros() as u64));
            }
            samples
        });
    }
    let mut samples = Vec::new();
    while let Some(part) = workers.join_next().await {
        match part {
            Ok(part) => samples.extend(part),
            Err(e) => samples.push(Err(format!("a load worker failed: {e}"))),
        }
    }
    (samples, started.elapsed())
}

/// What a run of a fixed count of requests ended with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Count {
    pub(crate) succeeded: usize,
    pub(crate) failed: usize,
    /// The first failure's reason, when one failed.
    pub(crate) first_error: Option<String>,
    pub(crate) elapsed: Duration,
}

/// Send `n` requests with `in_flight` of them at once (each worker sends its next when the
/// previous is answered), calling `progress(answered, failed)` every `every` until done.
pub(crate) async fn fixed_count<F, Fut>(
    n: usize,
    in_flight: usize,
    f: F,
    every: Duration,
    progress: impl Fn(usize, usize),
) -> Count
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.clamp(1, n.max(1)) {
        let (f, next) = (Arc::clone(&f), Arc::clone(&next));
        let (answered, failed, first_error) =
            (Arc::clone(&answered), Arc::clone(&failed), Arc::clone(&first_error));
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Err(e) = f(i).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().expect("first error").get_or_insert(e);
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            part = workers.join_next() => match part {
                None => break,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().expect("first error").get_or_insert(format!("a worker failed: {e}"));
                }
            },
            _ = tick.tick() => progress(answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed)),
        }
    }
    let failed = failed.load(Ordering::Relaxed).min(n);
    let first_error = first_error.lock().expect("first error").take();
    Count { succeeded: n - failed, failed, first_error, elapsed: started.elapsed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_at_a_time_drops_the_warm_up_and_gives_up_on_a_dead_system() {
        let s = one_at_a_time(3, 5, |i| async move { if i == 4 { Err("no".to_string()) } else { Ok(()) } })
            .await
            .unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s.iter().filter(|r| r.is_err()).count(), 1);
        let dead = one_at_a_time(0, 100, |_| async { Err::<(), _>("down".to_string()) }).await;
        assert!(dead.unwrap_err().to_string().contains("in a row"));
    }

    #[tokio::test]
    async fn a_fixed_count_sends_each_request_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let count = fixed_count(
            50,
            8,
            move |i| {
                s.lock().unwrap().push(i);
                async move { if i % 10 == 3 { Err(format!("no {i}")) } else { Ok(()) } }
            },
            Duration::from_secs(60),
            |_, _| {},
        )
        .await;
        assert_eq!((count.succeeded, count.failed), (45, 5));
        assert!(count.first_error.is_some_and(|e| e.starts_with("no ")));
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!(
            fixed_count(0, 8, |_| async { Ok(()) }, Duration::from_secs(1), |_, _| {}).await.succeeded,
            0
        );
    }

    #[tokio::test]
    async fn closed_loop_keeps_going_until_the_end() {
        let (s, took) = closed_loop(4, Duration::from_millis(50), |_| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        })
        .await;
        assert!(s.len() >= 4 && s.iter().all(|r| r.is_ok()));
        assert!(took >= Duration::from_millis(50));
    }
}
