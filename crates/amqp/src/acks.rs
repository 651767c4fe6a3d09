//! Acks that cover several deliveries at once (`multiple`), never one before its own commit.
//!
//! A channel's deliveries carry rising tags. A handler that committed hands its delivery's
//! acker here; whoever sends next sends every ack ready by then: one `basic.ack` with
//! `multiple` for the ready tags below the lowest delivery still being handled (everything
//! below it is ready or already settled), and one plain ack for each ready tag above it. So no
//! delivery is acked before its own commit, and a slow handler holds up no other's ack.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use lapin::Acker;
use lapin::options::BasicAckOptions;

/// What one flush sends: the tag of a `multiple` ack covering every ready tag up to it, and
/// the ready tags above the lowest busy one, each acked on its own.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) multiple: Option<u64>,
    pub(crate) singles: Vec<u64>,
}

/// Split the `ready` tags (in rising order) by the lowest tag still being handled, if any.
pub(crate) fn plan(ready: &[u64], lowest_busy: Option<u64>) -> Plan {
    let below = ready.iter().take_while(|t| lowest_busy.is_none_or(|b| **t < b)).count();
    Plan { multiple: ready[..below].last().copied(), singles: ready[below..].to_vec() }
}

/// The deliveries of one channel not yet settled, and the committed ones awaiting their ack.
#[derive(Default)]
pub(crate) struct AckWindow {
    state: Mutex<State>,
    /// Held while acks are sent, so that they leave in the order they were planned.
    sending: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Delivered and neither committed-and-handed-here nor settled otherwise.
    busy: BTreeSet<u64>,
    ready: BTreeMap<u64, Acker>,
}

impl AckWindow {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("ack window")
    }

    /// A delivery came with `tag`: its handler runs from now.
    pub(crate) fn delivered(&self, tag: u64) {
        self.state().busy.insert(tag);
    }

    /// The delivery `tag` was settled by its handler itself (a nack, a dead-letter, or left
    /// unacked for the channel's end), after that settlement went out.
    pub(crate) fn settled(&self, tag: u64) {
        self.state().busy.remove(&tag);
    }

    /// The delivery `tag` committed: ack it, with whatever else is ready by the time the acks
    /// go out. Errs if an ack that covered it failed.
    pub(crate) async fn ack(&self, tag: u64, acker: Acker) -> Result<(), lapin::Error> {
        {
            let mut s = self.state();
            s.busy.remove(&tag);
            s.ready.insert(tag, acker);
        }
        let _sending = self.sending.lock().await;
        let (ready, lowest_busy) = {
            let mut s = self.state();
            (std::mem::take(&mut s.ready), s.busy.first().copied())
        };
        // Another flush took this one's ack with its own.
        if ready.is_empty() {
            return Ok(());
        }
        let tags: Vec<u64> = ready.keys().copied().collect();
        let Plan { multiple, singles } = plan(&tags, lowest_busy);
        let mut result = Ok(());
        if let Some(upto) = multiple {
            let opts = BasicAckOptions { multiple: true };
            if let Err(e) = ready[&upto].ack(opts).await {
                result = Err(e);
            }
        }
        for t in singles {
            if let Err(e) = ready[&t].ack(BasicAckOptions::default()).await {
                result = Err(e);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_tags_below_the_lowest_busy_one_go_in_one_multiple_ack() {
        assert_eq!(plan(&[1, 2, 3], None), Plan { multiple: Some(3), singles: vec![] });
        assert_eq!(plan(&[1, 2, 5, 7], Some(4)), Plan { multiple: Some(2), singles: vec![5, 7] });
    }

    #[test]
    fn a_ready_tag_above_a_busy_one_is_acked_alone_never_covering_the_busy_one() {
        assert_eq!(plan(&[5, 6], Some(4)), Plan { multiple: None, singles: vec![5, 6] });
        assert_eq!(plan(&[3], Some(4)), Plan { multiple: Some(3), singles: vec![] });
    }
}
