//! The reader: turns what Redis pushes to this node into deliveries to the hub, once each and in
//! seq order per topic.
//!
//! A topic's publications can reach the node twice (an exact channel and a pattern, or in a
//! cluster its shard channel and the pattern broadcast), and some can be missed (the pub/sub
//! connection was lost for a while). So the reader remembers the last seq it delivered of each
//! topic someone here wants: a repeat is dropped, and a gap is filled from the topic's history
//! before what follows it. A topic nothing has been delivered of yet starts from where a new
//! subscription's history read found it (its floor). Delivery itself never waits (the hub's
//! queues drop, conflate or close instead), so a slow client never holds the reader back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::health::Health;
use super::interest::Interest;
use super::keys::Wire;
use super::metrics::Op;
use super::scripts::bytes_of;
use super::store::Store;
use crate::backend::{DeliverySink, HistoryQuery};
use crate::data::Data;
use crate::model::{Publication, StreamPosition};
use crate::topic::Subject;

/// Where each wanted topic's stream stands on this node.
#[derive(Default)]
pub(crate) struct Delivered {
    /// The last publication delivered.
    last: HashMap<Arc<str>, StreamPosition>,
    /// For a topic nothing has been delivered of yet: the position a subscription's history read
    /// found, which its live stream continues from.
    floors: HashMap<Arc<str>, StreamPosition>,
}

/// What to do with a publication that arrived.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Deliver,
    /// Already delivered.
    Repeat,
    /// Publications after this seq (of the publication's epoch) were missed: fetch them first.
    After(u64),
}

impl Delivered {
    /// Judges a publication and records it as delivered (if it is to be); returns the topic's
    /// shared name too.
    fn judge(&mut self, topic: &str, epoch: &Arc<str>, seq: u64) -> (Arc<str>, Verdict) {
        let position = StreamPosition {
            epoch: epoch.clone(),
            seq,
        };
        let known = self.last.get_key_value(topic).map(|(name, _)| name.clone());
        let Some((name, last)) = known.and_then(|name| Some((name, self.last.get_mut(topic)?)))
        else {
            let (name, verdict) = match self.floors.remove_entry(topic) {
                Some((name, floor)) if *floor.epoch == **epoch && seq > floor.seq + 1 => {
                    (name, Verdict::After(floor.seq))
                }
                Some((name, _)) => (name, Verdict::Deliver),
                None => (topic.into(), Verdict::Deliver),
            };
            self.last.insert(name.clone(), position);
            return (name, verdict);
        };
        let after = if *last.epoch != **epoch {
            // The topic started afresh (its keys expired, or Redis lost its data): everything
            // of the new stream is news.
            0
        } else if seq <= last.seq {
            return (name, Verdict::Repeat);
        } else {
            last.seq
        };
        *last = position;
        let verdict = if seq == after + 1 {
            Verdict::Deliver
        } else {
            Verdict::After(after)
        };
        (name, verdict)
    }

    /// A subscription's history read found `topic` at `position`.
    pub(crate) fn floor(&mut self, topic: &Arc<str>, position: StreamPosition) {
        if !self.last.contains_key(&**topic) {
            self.floors.insert(topic.clone(), position);
        }
    }

    /// Puts a topic back to where it was before a publication whose missed predecessors could
    /// not be fetched: the next catch-up fetches them all.
    fn rewind(&mut self, topic: &str, to: StreamPosition) {
        if let Some(last) = self.last.get_mut(topic) {
            *last = to;
        }
    }

    fn forget(&mut self, topic: &str) {
        self.last.remove(topic);
        self.floors.remove(topic);
    }

    /// Forgets the topics no one on this node wants any more (after `subject` lost its last
    /// local subscriber): when they are wanted again, their stream starts where Redis is then.
    pub(crate) fn forget_unwanted(&mut self, subject: &Subject, sink: &dyn DeliverySink) {
        match subject {
            Subject::Topic(t) => {
                if !sink.wants(t) {
                    self.forget(t);
                }
            }
            Subject::Pattern(_) => {
                // The Redis glob may have brought topics the pattern itself does not match.
                self.last.retain(|t, _| sink.wants(t));
                self.floors.retain(|t, _| sink.wants(t));
            }
        }
    }

    /// Every topic with its position: where a catch-up fetches from.
    fn positions(&self) -> Vec<(Arc<str>, StreamPosition)> {
        self.last
            .iter()
            .chain(self.floors.iter())
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect()
    }
}

/// What the reader works with.
pub(crate) struct Reader {
    pub store: Arc<Store>,
    pub interest: Arc<Interest>,
    pub health: Arc<Health>,
    pub delivered: Arc<Mutex<Delivered>>,
    pub sink: Arc<dyn DeliverySink>,
}

/// Reads pushes until the connection goes away for good; `catch_up` asks for every topic's
/// publications since its last delivered one (after the pub/sub connection was restored).
pub(crate) async fn run(
    reader: Reader,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut catch_up: mpsc::UnboundedReceiver<()>,
) {
    loop {
        tokio::select! {
            biased;
            push = pushes.recv() => {
                let Some(push) = push else { return };
                reader.on_push(push).await;
            }
            Some(()) = catch_up.recv() => reader.catch_up().await,
        }
    }
}

impl Reader {
    async fn on_push(&self, push: PushInfo) {
        let mut data = push.data.into_iter();
        let (channel, message) = match push.kind {
            PushKind::Message | PushKind::SMessage => (data.next(), data.next()),
            PushKind::PMessage => (data.nth(1), data.next()),
            PushKind::Disconnection => {
                self.health.need_resync();
                return self.interest.lost("the connection to Redis was lost");
            }
            _ => return,
        };
        let (Some(channel), Some(Value::BulkString(message))) = (channel, message) else {
            return;
        };
        let Some(topic) = bytes_of(&channel)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| self.store.keys.topic_of(c))
            .filter(|t| crate::topic::validate_topic(t).is_ok())
        else {
            return;
        };
        if !self.sink.wants(topic) {
            // Brought by a glob broader than its pattern, or still queued after the last
            // subscriber left: no one here is owed it.
            self.delivered.lock().forget(topic);
            return;
        }
        let Some(wire) = Wire::parse(Bytes::from(message)) else {
            tracing::warn!(
                topic,
                "ignored a message on a Crier channel that Crier did not publish"
            );
            return;
        };
        let (name, verdict) = self.delivered.lock().judge(topic, &wire.epoch, wire.seq);
        match verdict {
            Verdict::Repeat => return,
            Verdict::Deliver => {}
            Verdict::After(after) => {
                if !self.fill(&name, &wire.epoch, after, Some(wire.seq)).await {
                    // Delivered later, with what it follows, by the catch-up after the resync.
                    let to = StreamPosition {
                        epoch: wire.epoch.clone(),
                        seq: after,
                    };
                    self.delivered.lock().rewind(&name, to);
                    self.health.need_resync();
                    return;
                }
            }
        }
        self.deliver(name, wire.epoch, wire.seq, wire.data);
    }

    /// Fetches, for every topic, what was published since its last delivery.
    async fn catch_up(&self) {
        let positions = self.delivered.lock().positions();
        for (topic, position) in positions {
            if !self.fill(&topic, &position.epoch, position.seq, None).await {
                self.health.need_resync();
            }
        }
    }

    /// Delivers what history holds of `topic` after `after` in `epoch` (and before `before`):
    /// publications the node missed. With no `before` (a catch-up), a topic that started afresh
    /// meanwhile is followed into its new epoch. False if history could not be read.
    async fn fill(
        &self,
        topic: &Arc<str>,
        epoch: &Arc<str>,
        after: u64,
        before: Option<u64>,
    ) -> bool {
        let limit = before.map_or(usize::MAX, |b| (b - after - 1) as usize);
        let query = HistoryQuery::After { seq: after, limit };
        self.store.metrics.operation(Op::Fill);
        let page = match self.store.read_history(topic, query, false).await {
            Ok(Some(page)) => page,
            Ok(None) => return true,
            Err(_) => return false,
        };
        let page = if *page.position.epoch == **epoch {
            page
        } else if before.is_some() {
            // Restarted again since: what this publication follows is gone.
            return true;
        } else {
            let query = HistoryQuery::After {
                seq: 0,
                limit: usize::MAX,
            };
            match self.store.read_history(topic, query, false).await {
                Ok(Some(page)) => page,
                Ok(None) => return true,
                Err(_) => return false,
            }
        };
        for publication in page.publications {
            if before.is_some_and(|b| publication.seq >= b) {
                break;
            }
            if before.is_none() {
                // A catch-up races the live stream: judge each, as if it had been pushed.
                let (_, verdict) =
                    self.delivered
                        .lock()
                        .judge(topic, &publication.epoch, publication.seq);
                if verdict == Verdict::Repeat {
                    continue;
                }
            }
            self.deliver(
                topic.clone(),
                publication.epoch.clone(),
                publication.seq,
                publication.data.clone(),
            );
        }
        true
    }

    fn deliver(&self, topic: Arc<str>, epoch: Arc<str>, seq: u64, data: Data) {
        let position = StreamPosition { epoch, seq };
        let publication = Arc::new(Publication::new(topic, &position, data, Instant::now()));
        self.store.metrics.received.inc();
        self.sink.deliver(&publication);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(delivered: &mut Delivered, arrivals: &[(&Arc<str>, u64)]) -> Vec<Verdict> {
        arrivals
            .iter()
            .map(|(epoch, seq)| delivered.judge("t", epoch, *seq).1)
            .collect()
    }

    #[test]
    fn repeats_are_dropped_gaps_found_and_new_epochs_filled_from_their_start() {
        let mut delivered = Delivered::default();
        let (e1, e2): (Arc<str>, Arc<str>) = ("e1".into(), "e2".into());
        let seen = verdicts(
            &mut delivered,
            &[
                (&e1, 5),
                (&e1, 6),
                (&e1, 6),
                (&e1, 4),
                (&e1, 9),
                (&e1, 10),
                (&e2, 1),
                (&e1, 3),
            ],
        );
        use Verdict::*;
        assert_eq!(
            seen,
            [
                Deliver,
                Deliver,
                Repeat,
                Repeat,
                After(6),
                Deliver,
                Deliver,
                After(0)
            ]
        );
        assert_eq!(verdicts(&mut delivered, &[(&e2, 4)]), [After(0)]);
        delivered.forget("t");
        assert_eq!(verdicts(&mut delivered, &[(&e1, 3)]), [Deliver]);
    }

    #[test]
    fn a_floor_says_where_a_topic_with_nothing_delivered_continues_from() {
        let mut delivered = Delivered::default();
        let e1: Arc<str> = "e1".into();
        let topic: Arc<str> = "t".into();
        let at = |seq| StreamPosition {
            epoch: e1.clone(),
            seq,
        };
        delivered.floor(&topic, at(4));
        // Missed while the connection was lost: 5 and 6.
        assert_eq!(verdicts(&mut delivered, &[(&e1, 7)]), [Verdict::After(4)]);
        // A floor never moves a stream that is already delivering.
        delivered.floor(&topic, at(2));
        assert_eq!(verdicts(&mut delivered, &[(&e1, 8)]), [Verdict::Deliver]);
        let other: Arc<str> = "u".into();
        delivered.floor(&other, at(4));
        // At or before the floor: still delivered (a pattern subscriber may be owed it).
        assert_eq!(delivered.judge("u", &e1, 4).1, Verdict::Deliver);
        let positions: Vec<u64> = delivered.positions().iter().map(|(_, p)| p.seq).collect();
        assert_eq!(positions.len(), 2);
        delivered.rewind("t", at(6));
        assert_eq!(delivered.judge("t", &e1, 8).1, Verdict::After(6));
    }
}
