//! History: each topic's last messages, for recovery after a reconnect and for rewind.
//!
//! Each topic keeps at most `--history-size` messages for at most `--history-ttl`. All histories
//! together hold at most `--history-max-bytes`: above it, the oldest messages of all topics go
//! first. That order comes from a heap of topic heads (each topic's oldest message) that
//! publishing touches only when a topic's history goes from empty to non-empty. A key in the heap
//! may be older than its topic's actual head (the topic evicted on its own since); such a stale key
//! is fixed when it reaches the top, which keeps the top the true oldest message of all.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::{EvictReason, Metrics};
use crate::model::Publication;

/// Bookkeeping bytes counted for each retained message besides its data and frames.
const ENTRY_OVERHEAD: usize = 160;

/// A topic's retained messages, oldest first. Lives under its topic's lock.
#[derive(Default)]
pub(crate) struct TopicHistory {
    entries: VecDeque<Arc<Publication>>,
    /// Whether the topic has a key in the index's heap (or an evictor holds it and will put it
    /// back or clear this).
    indexed: bool,
}

/// How the index reaches a topic's history: runs the function on it under the topic's lock, and
/// says false if the topic is gone.
pub(crate) type HistoryAccess<T> = fn(&T, &mut dyn FnMut(&mut TopicHistory)) -> bool;

/// The limits and the global accounting shared by every topic's history.
pub(crate) struct HistoryIndex<T> {
    size: usize,
    ttl: Duration,
    max_bytes: usize,
    /// Bytes retained (frames made for replays included): shared with the pages of history
    /// read, whose replays count the frames they make.
    bytes: Arc<AtomicUsize>,
    messages: AtomicUsize,
    heads: Mutex<BinaryHeap<Reverse<Head<T>>>>,
    access: HistoryAccess<T>,
    metrics: Arc<Metrics>,
}

/// A topic in the heap, keyed at (or before) the time of its oldest message.
struct Head<T> {
    at: Instant,
    topic: Weak<T>,
}

impl<T> PartialEq for Head<T> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl<T> Eq for Head<T> {}
impl<T> PartialOrd for Head<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Head<T> {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.at.cmp(&other.at).then_with(|| {
            self.topic
                .as_ptr()
                .cast::<()>()
                .cmp(&other.topic.as_ptr().cast())
        })
    }
}

impl TopicHistory {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn oldest_seq(&self) -> Option<u64> {
        self.entries.front().map(|p| p.seq)
    }

    /// Retained messages with a seq above `seq`, oldest first.
    pub(crate) fn after(&self, seq: u64) -> impl Iterator<Item = &Arc<Publication>> {
        let skip = self.entries.partition_point(|p| p.seq <= seq);
        self.entries.iter().skip(skip)
    }

    /// The last `n` retained messages, oldest first.
    pub(crate) fn last(&self, n: usize) -> impl Iterator<Item = &Arc<Publication>> {
        self.entries
            .iter()
            .skip(self.entries.len().saturating_sub(n))
    }

    fn pop_front<T>(&mut self, index: &HistoryIndex<T>, reason: EvictReason) -> bool {
        let Some(freed) = self.take_front(index, reason) else {
            return false;
        };
        index.bytes.fetch_sub(freed, Ordering::Relaxed);
        index.messages.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Evicts the oldest message, leaving the index's totals to the caller; returns the bytes
    /// it counted for.
    fn take_front<T>(&mut self, index: &HistoryIndex<T>, reason: EvictReason) -> Option<usize> {
        let evicted = self.entries.pop_front()?;
        index.metrics.history_evicted(reason);
        Some(evicted.leave_history())
    }

    fn head_key(&self) -> Option<Instant> {
        self.entries.front().map(|p| p.published_at)
    }
}

impl<T> HistoryIndex<T> {
    /// Histories of at most `size` messages each, none older than `ttl`, `max_bytes` together;
    /// topics (of type `T`) are reached through `access`.
    pub(crate) fn new(
        size: usize,
        ttl: Duration,
        max_bytes: usize,
        access: HistoryAccess<T>,
        metrics: Arc<Metrics>,
    ) -> Self {
        HistoryIndex {
            size,
            ttl,
            max_bytes,
            bytes: Arc::new(AtomicUsize::new(0)),
            messages: AtomicUsize::new(0),
            heads: Mutex::new(BinaryHeap::new()),
            access,
            metrics,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// What a replay of retained messages counts the frames it makes on.
    pub(crate) fn meter(&self) -> Option<&Arc<AtomicUsize>> {
        self.enabled().then_some(&self.bytes)
    }

    pub(crate) fn messages(&self) -> usize {
        self.messages.load(Ordering::Relaxed)
    }

    /// Retains `publication` in `history` (its topic's, under the topic's lock), within the
    /// topic's limits. Call [`HistoryIndex::enforce_cap`] once the topic's lock is released.
    /// `owner` gives the topic's handle, asked for only when the topic is first indexed (a weak
    /// reference made per publish was two atomic operations for nothing).
    pub(crate) fn retain(
        &self,
        history: &mut TopicHistory,
        publication: Arc<Publication>,
        owner: impl FnOnce() -> Weak<T>,
        now: Instant,
    ) {
        if !self.enabled() {
            return;
        }
        self.expire(history, now);
        let counted = publication.enter_history(ENTRY_OVERHEAD);
        history.entries.push_back(publication);
        // A full history evicts one message per publish: the totals take the difference in one
        // atomic operation (and the message count none), not one per message each way.
        let (mut freed, mut evicted) = (0, 0);
        while history.entries.len() > self.size {
            let Some(bytes) = history.take_front(self, EvictReason::Size) else {
                break;
            };
            freed += bytes;
            evicted += 1;
        }
        match counted.cmp(&freed) {
            CmpOrdering::Greater => self.bytes.fetch_add(counted - freed, Ordering::Relaxed),
            CmpOrdering::Less => self.bytes.fetch_sub(freed - counted, Ordering::Relaxed),
            CmpOrdering::Equal => 0,
        };
        match evicted {
            0 => self.messages.fetch_add(1, Ordering::Relaxed),
            1 => 0,
            more => self.messages.fetch_sub(more - 1, Ordering::Relaxed),
        };
        if !history.indexed {
            history.indexed = true;
            if let Some(at) = history.head_key() {
                self.heads.lock().push(Reverse(Head { at, topic: owner() }));
            }
        }
    }

    /// Drops the topic's messages older than the TTL (under the topic's lock).
    pub(crate) fn expire(&self, history: &mut TopicHistory, now: Instant) {
        // Comparing with a cutoff instead of taking each head's age saves a clock subtraction
        // per publish. No cutoff (a TTL longer than the clock has run) means none has expired.
        let Some(cutoff) = now.checked_sub(self.ttl) else {
            return;
        };
        while history.head_key().is_some_and(|at| at <= cutoff) {
            history.pop_front(self, EvictReason::Ttl);
        }
    }

    /// Evicts the oldest messages of all topics until the histories fit in the byte cap. Must
    /// not be called with a topic's lock held.
    pub(crate) fn enforce_cap(&self) {
        while self.bytes() > self.max_bytes {
            if !self.evict_oldest(|history| history.pop_front(self, EvictReason::Memory)) {
                return;
            }
        }
    }

    /// Expires every topic's messages older than the TTL. Must not be called with a topic's
    /// lock held.
    pub(crate) fn sweep(&self, now: Instant) {
        loop {
            let expired =
                self.heads.lock().peek().is_some_and(|Reverse(head)| {
                    now.saturating_duration_since(head.at) >= self.ttl
                });
            if !expired
                || !self.evict_oldest(|history| {
                    self.expire(history, now);
                    true
                })
            {
                return;
            }
        }
    }

    /// Runs `f` on `topic`'s history under its lock; None if the topic is gone.
    fn with_history<R>(&self, topic: &T, f: impl FnOnce(&mut TopicHistory) -> R) -> Option<R> {
        let (mut f, mut out) = (Some(f), None);
        (self.access)(topic, &mut |history| {
            if let Some(f) = f.take() {
                out = Some(f(history));
            }
        });
        out
    }

    /// Takes the topic whose oldest message is the oldest of all and applies `evict` to its
    /// history (fixing stale keys on the way). Returns false when there is nothing to evict.
    fn evict_oldest(&self, evict: impl Fn(&mut TopicHistory) -> bool) -> bool {
        loop {
            // Never take a topic's lock while holding the heap's: publishers hold their topic's
            // lock when they push into the heap.
            let Some(Reverse(head)) = self.heads.lock().pop() else {
                return false;
            };
            let Some(topic) = head.topic.upgrade() else {
                continue;
            };
            let outcome = self.with_history(&topic, |history| {
                if history.head_key() != Some(head.at) {
                    // Stale: put the topic back at its actual head.
                    return (false, history.head_key());
                }
                let evicted = evict(history);
                (evicted, history.head_key())
            });
            let Some((evicted, next)) = outcome else {
                continue;
            };
            match next {
                Some(at) => self.heads.lock().push(Reverse(Head {
                    at,
                    topic: head.topic,
                })),
                None => {
                    self.with_history(&topic, |history| {
                        // Nothing left; a publish since then re-indexes the topic itself.
                        if history.is_empty() {
                            history.indexed = false;
                        } else if let Some(at) = history.head_key() {
                            self.heads.lock().push(Reverse(Head {
                                at,
                                topic: head.topic.clone(),
                            }));
                        }
                    });
                }
            }
            if evicted {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Data;
    use crate::model::StreamPosition;
    use bytes::Bytes;

    #[test]
    fn a_full_history_keeps_its_totals_as_it_evicts() {
        let index: HistoryIndex<()> = HistoryIndex::new(
            3,
            Duration::from_secs(3600),
            usize::MAX,
            |_, _| false,
            Arc::new(Metrics::new(&[])),
        );
        let mut history = TopicHistory::default();
        let now = Instant::now();
        // Data whose size goes up and down with the seq: what a publish evicts is sometimes
        // bigger than what it adds, sometimes smaller, and the totals must follow both.
        let publication = |seq: u64| {
            let position = StreamPosition {
                epoch: "e".into(),
                seq,
            };
            let digits = "7".repeat((seq as usize * 7) % 5 * 10 + 1);
            let data = Data::from_json(Bytes::from(digits)).unwrap();
            Publication::new("t".into(), &position, data, now)
        };
        let counted = |seq: u64| publication(seq).enter_history(ENTRY_OVERHEAD);
        for seq in 1..=10 {
            index.retain(&mut history, Arc::new(publication(seq)), Weak::new, now);
            let kept = seq.saturating_sub(2).max(1)..=seq;
            assert_eq!(index.messages(), kept.clone().count(), "after {seq}");
            assert_eq!(
                index.bytes(),
                kept.map(counted).sum::<usize>(),
                "after {seq}"
            );
        }
        assert_eq!(history.oldest_seq(), Some(8));
    }

    #[test]
    fn a_message_expires_when_its_age_reaches_the_ttl() {
        let ttl = Duration::from_secs(10);
        let index: HistoryIndex<()> = HistoryIndex::new(
            100,
            ttl,
            usize::MAX,
            |_, _| false,
            Arc::new(Metrics::new(&[])),
        );
        let mut history = TopicHistory::default();
        let start = Instant::now();
        for (seq, at) in [(1, start), (2, start + Duration::from_secs(1))] {
            let position = StreamPosition {
                epoch: "e".into(),
                seq,
            };
            let data = Data::from_json(Bytes::from_static(b"1")).unwrap();
            let publication = Arc::new(Publication::new("t".into(), &position, data, at));
            index.retain(&mut history, publication, Weak::new, at);
        }
        index.expire(&mut history, start + ttl - Duration::from_nanos(1));
        assert_eq!(history.oldest_seq(), Some(1), "younger than the TTL");
        index.expire(&mut history, start + ttl);
        assert_eq!(history.oldest_seq(), Some(2), "exactly the TTL old");
        index.expire(&mut history, start + ttl + Duration::from_secs(5));
        assert!(history.is_empty());
        assert_eq!(index.messages(), 0);

        // A TTL longer than the clock has run expires nothing.
        let forever: HistoryIndex<()> = HistoryIndex::new(
            100,
            Duration::from_secs(u64::MAX / 4),
            usize::MAX,
            |_, _| false,
            Arc::new(Metrics::new(&[])),
        );
        let position = StreamPosition {
            epoch: "e".into(),
            seq: 1,
        };
        let data = Data::from_json(Bytes::from_static(b"1")).unwrap();
        let publication = Arc::new(Publication::new("t".into(), &position, data, start));
        forever.retain(&mut history, publication, Weak::new, start);
        forever.expire(&mut history, start + Duration::from_secs(3600));
        assert_eq!(history.len(), 1);
    }
}
