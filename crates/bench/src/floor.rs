//! The raw floor: bare durable request/reply round trips through RabbitMQ with Baton's own
//! plumbing (quorum queues, persistent mandatory messages, publisher confirms, ack after the
//! reply is confirmed) and no database. Nothing Baton does per message can be cheaper.

use std::sync::Arc;
use std::time::Duration;

use baton_amqp::topology::COMMANDS;
use baton_amqp::{Outgoing, TraceParent};
use serde::Serialize;
use uuid::Uuid;

use crate::drive::{closed_loop, one_at_a_time};
use crate::rpc::{ECHO, ECHO_KEY, Echo, Rpc};
use crate::stats::{Latency, Throughput};
use crate::{Options, REPLY_TIMEOUT, Say};
use baton_fleet::cpu_ms;

/// The floor's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Floor {
    pub vhost: String,
    /// Round trips one at a time.
    pub sequential: Latency,
    /// Round trips with `in_flight` outstanding. `cpu_ms_per_op` is the bench process's own
    /// (requester and echo responder both live in it).
    pub loaded: Throughput,
    /// Broker messages per second under load: two per round trip.
    pub messages_per_second: f64,
}

/// Measure the floor in a fresh vhost of its own.
pub(crate) async fn measure(opts: &Options, say: &Say) -> anyhow::Result<Floor> {
    let vhost = format!("baton-bench-floor-{}", crate::short_id());
    opts.mgmt.fresh_vhost(&vhost).await?;
    let result = measure_in(&crate::amqp_url(opts, &vhost), &vhost, opts, say).await;
    if !opts.keep_vhosts {
        opts.mgmt.clean_up_vhost(&vhost).await;
    }
    result
}

fn request(key: &str, i: usize) -> Outgoing {
    Outgoing::new(
        COMMANDS,
        ECHO_KEY,
        ECHO,
        Uuid::new_v4(),
        "bench",
        TraceParent::new_root(),
        &serde_json::json!({"schema": baton_protocol::SCHEMA, "n": i}),
    )
    .reply_to(key)
}

async fn measure_in(url: &str, vhost: &str, opts: &Options, say: &Say) -> anyhow::Result<Floor> {
    let echo = Echo::start(url).await?;
    let rpc = Arc::new(Rpc::start(url, "bench requester", "bench.floor").await?);
    let call = {
        let rpc = Arc::clone(&rpc);
        move |i: usize| {
            let rpc = Arc::clone(&rpc);
            async move { rpc.call(&request(rpc.key(), i), REPLY_TIMEOUT).await.map(|_| ()) }
        }
    };
    say(&format!("floor: round trips one at a time ({} after {} warm-up)", opts.sequential, opts.warmup));
    let samples = one_at_a_time(opts.warmup, opts.sequential, &call).await;
    let loaded = match samples {
        Ok(samples) => {
            let sequential = Latency::of(&samples, "floor, one at a time");
            say(&format!(
                "floor: round trips with {} in flight for {} s",
                opts.in_flight,
                opts.floor_duration.as_secs_f64()
            ));
            let cpu = cpu_ms("self").unwrap_or(0.0);
            let (samples, took) = closed_loop(opts.in_flight, opts.floor_duration, call).await;
            let cpu = cpu_ms("self").unwrap_or(0.0) - cpu;
            let loaded = Throughput::of(&samples, opts.in_flight, took, cpu, "floor, loaded");
            Ok((sequential, loaded))
        }
        Err(e) => Err(e.context("the raw floor (echo round trips) failed")),
    };
    rpc.stop().await;
    echo.stop().await;
    let (sequential, loaded) = loaded?;
    let messages_per_second = 2.0 * loaded.per_second;
    Ok(Floor { vhost: vhost.to_owned(), sequential, loaded, messages_per_second })
}

/// The floor's duration when the caller does not choose: long enough for a steady rate.
pub(crate) const DEFAULT_DURATION: Duration = Duration::from_secs(5);
