//! The reader: turns what Redis pushes to this node into deliveries to the hub, once each and in
//! seq order per topic.
//!
//! A topic's publications can reach the node twice (an exact channel and a pattern, or in a
//! cluster its shard channel and the pattern broadcast), and some can be missed (the pub/sub
//! connection was lost for a while). So the reader remembers the last seq it delivered of each
//! topic: a repeat is dropped, and a gap is filled from the topic's history before what follows
//! it. Delivery itself never waits (the hub's queues drop, conflate or close instead), so a slow
//! client never holds the reader back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use parking_lot::Mutex;

use super::health::Health;
use super::interest::Interest;
use super::keys::Wire;
use super::metrics::Op;
use super::scripts::bytes_of;
use super::store::Store;
use crate::backend::{DeliverySink, HistoryQuery};
use crate::data::Data;
use crate::model::{Publication, StreamPosition};

/// The last publication delivered of each topic this node receives.
#[derive(Default)]
pub(crate) struct Delivered(HashMap<Arc<str>, StreamPosition>);

/// What to do with a publication that arrived.
enum Verdict {
    Deliver,
    /// Already delivered.
    Repeat,
    /// Publications after this seq were missed: fetch them first.
    After(u64),
}

impl Delivered {
    /// Judges a publication and records it as delivered (if it is to be); returns the topic's
    /// shared name too.
    fn judge(&mut self, topic: &str, epoch: &Arc<str>, seq: u64) -> (Arc<str>, Verdict) {
        let known = self.0.get_key_value(topic).map(|(name, _)| name.clone());
        let Some((name, last)) = known.and_then(|name| Some((name, self.0.get_mut(topic)?))) else {
            let name: Arc<str> = topic.into();
            let position = StreamPosition {
                epoch: epoch.clone(),
                seq,
            };
            self.0.insert(name.clone(), position);
            return (name, Verdict::Deliver);
        };
        if *last.epoch != **epoch {
            // The topic started afresh (its keys expired, or Redis lost its data).
            *last = StreamPosition {
                epoch: epoch.clone(),
                seq,
            };
            return (name, Verdict::Deliver);
        }
        if seq <= last.seq {
            return (name, Verdict::Repeat);
        }
        let after = last.seq;
        last.seq = seq;
        let verdict = if seq == after + 1 {
            Verdict::Deliver
        } else {
            Verdict::After(after)
        };
        (name, verdict)
    }

    pub(crate) fn forget(&mut self, topic: &str) {
        self.0.remove(topic);
    }

    pub(crate) fn forget_where(&mut self, mut drop: impl FnMut(&str) -> bool) {
        self.0.retain(|topic, _| !drop(topic));
    }

    fn snapshot(&self) -> Vec<(Arc<str>, StreamPosition)> {
        self.0.iter().map(|(t, p)| (t.clone(), p.clone())).collect()
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
    shared: Reader,
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    mut catch_up: mpsc::UnboundedReceiver<()>,
) {
    loop {
        tokio::select! {
            biased;
            push = pushes.recv() => {
                let Some(push) = push else { return };
                on_push(&shared, push).await;
            }
            Some(()) = catch_up.recv() => {
                let topics = shared.delivered.lock().snapshot();
                for (topic, last) in topics {
                    fill(&shared, &topic, &last.epoch, last.seq, None).await;
                }
            }
        }
    }
}

async fn on_push(shared: &Reader, push: PushInfo) {
    let mut data = push.data.into_iter();
    let (channel, message) = match push.kind {
        PushKind::Message | PushKind::SMessage => (data.next(), data.next()),
        PushKind::PMessage => (data.nth(1), data.next()),
        PushKind::Disconnection => {
            shared.health.need_resync();
            return shared.interest.lost("the connection to Redis was lost");
        }
        _ => return,
    };
    let (Some(channel), Some(Value::BulkString(message))) = (channel, message) else {
        return;
    };
    let Some(topic) = bytes_of(&channel)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| shared.store.keys.topic_of(c))
        .filter(|t| crate::topic::validate_topic(t).is_ok())
    else {
        return;
    };
    let Some(wire) = Wire::parse(Bytes::from(message)) else {
        tracing::warn!(
            topic,
            "ignored a message on a Crier channel that Crier did not publish"
        );
        return;
    };
    let (name, verdict) = shared.delivered.lock().judge(topic, &wire.epoch, wire.seq);
    match verdict {
        Verdict::Repeat => return,
        Verdict::Deliver => {}
        Verdict::After(after) => fill(shared, &name, &wire.epoch, after, Some(wire.seq)).await,
    }
    deliver(shared, name, wire.epoch, wire.seq, wire.data);
}

/// Delivers what history holds of `topic` after `after` (and before `before`): publications the
/// node missed. A topic that started afresh meanwhile is followed into its new epoch.
async fn fill(
    shared: &Reader,
    topic: &Arc<str>,
    epoch: &Arc<str>,
    after: u64,
    before: Option<u64>,
) {
    let limit = before.map_or(usize::MAX, |b| (b - after - 1) as usize);
    let query = HistoryQuery::After { seq: after, limit };
    let Ok(Some(page)) = shared.store.read_history(topic, query, false).await else {
        return;
    };
    let fresh = *page.position.epoch != **epoch;
    if fresh && before.is_some() {
        return;
    }
    let publications = if fresh {
        // Everything of the new stream is news.
        let query = HistoryQuery::After {
            seq: 0,
            limit: usize::MAX,
        };
        match shared.store.read_history(topic, query, false).await {
            Ok(Some(page)) => page.publications,
            _ => return,
        }
    } else {
        page.publications
    };
    shared.store.metrics.operation(Op::Fill);
    for publication in publications {
        if before.is_some_and(|b| publication.seq >= b) {
            break;
        }
        if before.is_none() {
            let (_, verdict) =
                shared
                    .delivered
                    .lock()
                    .judge(topic, &publication.epoch, publication.seq);
            if let Verdict::Repeat = verdict {
                continue;
            }
        }
        deliver(
            shared,
            topic.clone(),
            publication.epoch.clone(),
            publication.seq,
            publication.data.clone(),
        );
    }
}

fn deliver(shared: &Reader, topic: Arc<str>, epoch: Arc<str>, seq: u64, data: Data) {
    let position = StreamPosition { epoch, seq };
    let publication = Arc::new(Publication::new(topic, &position, data, Instant::now()));
    shared.store.metrics.received.inc();
    shared.sink.deliver(&publication);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_are_dropped_gaps_found_and_new_epochs_followed() {
        let mut delivered = Delivered::default();
        let (e1, e2): (Arc<str>, Arc<str>) = ("e1".into(), "e2".into());
        let mut verdicts = Vec::new();
        for (epoch, seq) in [
            (&e1, 5),
            (&e1, 6),
            (&e1, 6),
            (&e1, 4),
            (&e1, 9),
            (&e1, 10),
            (&e2, 1),
        ] {
            verdicts.push(match delivered.judge("t", epoch, seq).1 {
                Verdict::Deliver => "deliver".to_string(),
                Verdict::Repeat => "repeat".to_string(),
                Verdict::After(after) => format!("after {after}"),
            });
        }
        assert_eq!(
            verdicts,
            [
                "deliver", "deliver", "repeat", "repeat", "after 6", "deliver", "deliver"
            ]
        );
        delivered.forget("t");
        assert!(matches!(delivered.judge("t", &e1, 3).1, Verdict::Deliver));
    }
}
