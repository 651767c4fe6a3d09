//! `baton reconcile`: the cron job of the events mode, which finds what failed or stuck flows left
//! behind and undoes it.
//!
//! Owns: choosing what to undo (from `baton-audit`'s scan: a space that did not complete, that no
//! saga is still working on, that its client was not told succeeded, and whose oldest row is
//! older than a grace period) and undoing it through the services' own compensations, sent as
//! commands over the broker, never by editing their databases. Must not touch: any database
//! (it reads them read-only through `baton-audit`).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use baton_amqp::topology::{self, COMMANDS};
use baton_amqp::{Broker, ConsumerConfig, Identity, Outgoing, Publisher, TraceParent, consume};
use baton_protocol::{Action, Context, Outcome, SCHEMA, Service, StepCommand, StepReply, reply_type};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesOrdered;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Where to look and how patient to be.
#[derive(Debug, Clone)]
pub struct Options {
    /// The broker (its password never shown).
    pub amqp_url: baton_amqp::AmqpUrl,
    /// The components' stores: a data dir's SQLite files, or a PostgreSQL database.
    pub store: baton_store::Location,
    /// Leave alone spaces whose oldest row is younger than this: their flow may still be moving.
    pub older_than: Duration,
    /// How long to wait for the next confirmation of a compensation before giving up on the rest.
    pub timeout: Duration,
}

/// What one run found and fixed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub spaces_scanned: usize,
    pub scan_ms: u64,
    /// Spaces left behind, and the rows they held.
    pub found: usize,
    pub found_rows: BTreeMap<Service, usize>,
    /// Rows undone, confirmed by their service.
    pub fixed_rows: BTreeMap<Service, usize>,
    /// Compensations that failed or were not confirmed in time.
    pub failed: Vec<String>,
    /// Emails of spaces that did not complete: sent, and impossible to take back.
    pub emails_sent_in_vain: usize,
    pub took_ms: u64,
}

impl Summary {
    pub fn fixed(&self) -> usize {
        self.fixed_rows.values().sum()
    }

    /// Add this run's findings to the metrics (`baton reconcile --every --metrics`).
    fn count_in_metrics(&self) {
        baton_metrics::reconcile_findings("spaces_scanned", self.spaces_scanned as u64);
        baton_metrics::reconcile_findings("spaces_left_behind", self.found as u64);
        baton_metrics::reconcile_findings("rows_found", self.found_rows.values().sum::<usize>() as u64);
        baton_metrics::reconcile_findings("rows_fixed", self.fixed() as u64);
        baton_metrics::reconcile_findings("compensations_failed", self.failed.len() as u64);
        baton_metrics::reconcile_findings("emails_sent_in_vain", self.emails_sent_in_vain as u64);
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = |m: &BTreeMap<Service, usize>| {
            if m.is_empty() {
                return "none".to_string();
            }
            m.iter()
                .map(|(s, n)| format!("{n} {}{}", baton_audit::row_name(*s), if *n == 1 { "" } else { "s" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "scanned {} spaces in {} ms", self.spaces_scanned, self.scan_ms)?;
        writeln!(f, "found {} spaces left behind, holding: {}", self.found, rows(&self.found_rows))?;
        writeln!(f, "undid: {}", rows(&self.fixed_rows))?;
        if self.emails_sent_in_vain > 0 {
            writeln!(
                f,
                "cannot undo {} email(s) sent for spaces that do not exist",
                self.emails_sent_in_vain
            )?;
        }
        for e in &self.failed {
            writeln!(f, "failed: {e}")?;
        }
        write!(f, "took {} ms in all", self.took_ms)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// One run: scan, undo, wait for the confirmations.
pub async fn reconcile(opts: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let spaces = baton_audit::scan(&opts.store).await?;
    let mut summary = Summary {
        spaces_scanned: spaces.len(),
        scan_ms: started.elapsed().as_millis() as u64,
        ..Default::default()
    };
    let cutoff = now_ms() - opts.older_than.as_millis() as i64;
    let left: Vec<_> = spaces
        .into_iter()
        .filter(|s| {
            !s.is_complete()
                && !s.present.is_empty()
                && !s.in_flight
                && s.told != Some(200)
                && s.oldest_ms.is_some_and(|t| t <= cutoff)
        })
        .collect();
    summary.found = left.len();
    let mut todo: Vec<(Uuid, Uuid, Service)> = Vec::new();
    for s in &left {
        for svc in &s.present {
            *summary.found_rows.entry(*svc).or_default() += 1;
        }
        if s.present.contains(&Service::Notifier) {
            summary.emails_sent_in_vain += 1;
        }
        let (Ok(space_id), Some(Ok(saga_id))) =
            (Uuid::parse_str(&s.space_id), s.saga_id.as_deref().map(Uuid::parse_str))
        else {
            summary.failed.push(format!("space {} has ids that are not UUIDs", s.space_id));
            continue;
        };
        for svc in s.present.iter().filter(|x| x.undo_type().is_some()) {
            todo.push((space_id, saga_id, *svc));
        }
    }
    if !todo.is_empty() {
        undo_all(opts, &todo, &mut summary).await?;
    }
    summary.took_ms = started.elapsed().as_millis() as u64;
    summary.count_in_metrics();
    Ok(summary)
}

/// Unconfirmed compensations allowed at once.
const CONFIRM_WINDOW: usize = 256;

/// Send every compensation at once, then collect the confirmations.
async fn undo_all(
    opts: &Options,
    todo: &[(Uuid, Uuid, Service)],
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let broker = Broker::connect(opts.amqp_url.expose(), "reconcile").await?;
    // It declares no queue of its own; one missing is made of the default kind.
    broker.declare_topology(&[], baton_amqp::topology::QueueType::default()).await?;
    let me = format!("reconcile.{}", &Uuid::new_v4().simple().to_string()[..8]);
    let queue = format!("{me}.replies");
    topology::declare_private_reply_queue(&broker.channel().await?, &queue, &me).await?;
    let publisher = Publisher::new(broker.clone());
    // The replies to the compensations it sends.
    let kinds: Vec<String> =
        Service::ALL.into_iter().filter_map(Service::undo_type).map(reply_type).collect();
    let (tx, mut rx) = mpsc::unbounded_channel::<StepReply>();
    // A reply counts only from the service whose step it answers.
    let identity = Identity::of_url("reconcile", opts.amqp_url.expose());
    let cancel = CancellationToken::new();
    let listener = tokio::spawn(consume(
        broker.clone(),
        publisher.clone(),
        ConsumerConfig::new(queue.clone(), 256),
        move |env| {
            let (tx, queue, kinds, identity) = (tx.clone(), queue.clone(), kinds.clone(), identity.clone());
            async move {
                let reply: StepReply = env.decode(&queue, &kinds)?;
                identity.expect(&env, &[reply.step.name()])?;
                let _ = tx.send(reply);
                Ok(())
            }
        },
        cancel.clone(),
    ));
    let mut waiting: HashSet<(Uuid, Service)> = HashSet::new();
    let mut confirms = FuturesOrdered::new();
    for (space_id, saga_id, svc) in todo {
        let kind = svc.undo_type().expect("only compensable steps are undone");
        let cmd = StepCommand {
            schema: SCHEMA,
            saga_id: *saga_id,
            space_id: *space_id,
            step: *svc,
            action: Action::Undo,
            attempt: 1,
            index: None,
            context: Context::default(),
        };
        let msg =
            Outgoing::new(COMMANDS, svc.name(), kind, *saga_id, "reconcile", TraceParent::new_root(), &cmd)
                .reply_to(me.as_str())
                .mode("reconcile");
        // A window of confirms, not one awaited at a time: a big repair sends thousands.
        if confirms.len() >= CONFIRM_WINDOW
            && let Some(sent) = confirms.next().await
        {
            sent?;
        }
        let pending = publisher
            .publish(&msg)
            .await
            .map_err(|e| anyhow::anyhow!("sending {kind} for {space_id}: {e}"))?;
        let what = format!("sending {kind} for {space_id}");
        confirms.push_back(async move { pending.wait().await.map_err(|e| anyhow::anyhow!("{what}: {e}")) });
        waiting.insert((*space_id, *svc));
    }
    while let Some(sent) = confirms.next().await {
        sent?;
    }
    // The services work through a big repair at their own pace: give up only when none of
    // them has answered for `timeout`.
    while !waiting.is_empty() {
        match tokio::time::timeout(opts.timeout, rx.recv()).await {
            Ok(Some(r)) if r.action == Action::Undo && waiting.remove(&(r.space_id, r.step)) => {
                if r.outcome == Outcome::Done {
                    *summary.fixed_rows.entry(r.step).or_default() += 1;
                } else {
                    summary.failed.push(format!(
                        "{} could not undo space {}: {}",
                        r.step,
                        r.space_id,
                        r.reason.unwrap_or_default()
                    ));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for (space_id, svc) in waiting {
        summary.failed.push(format!(
            "{svc} did not confirm undoing space {space_id} (no answer for {:?})",
            opts.timeout
        ));
    }
    cancel.cancel();
    let _ = listener.await;
    broker.close().await;
    Ok(())
}
