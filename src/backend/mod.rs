//! The backend: where a publication gets its seq, where history is kept, and how publications
//! reach this node. A backend knows topics, publications and history, never a connection.
//!
//! Every publication, whichever node it was published on, reaches this node's subscribers by
//! one path: the backend hands it to the node's [`DeliverySink`] (the hub), in seq order per
//! topic. The in-memory backend does so at once, on the publisher's thread; a backend shared by
//! several nodes (Redis) does so later, from the task that reads it. The hub never relies on which.
//!
//! A backend answers at once or later ([`Answer`]): the memory backend always at once, so its
//! callers never allocate or wait; the Redis backend after a round trip, and with
//! [`Unavailable`] when Redis cannot be reached.

mod history;
pub(crate) mod memory;
pub(crate) mod redis;

#[cfg(test)]
pub(crate) mod delayed;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use crate::data::Data;
pub(crate) use crate::model::Answer;
use crate::model::{Publication, StreamPosition};
use crate::topic::Subject;

/// The backend cannot be reached now; the request had no effect, or none that was confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which topics [`Backend::streams`] lists.
#[derive(Debug, Clone)]
pub(crate) enum StreamFilter {
    All,
    /// Those the pattern matches.
    Matching(Arc<str>),
}

impl StreamFilter {
    pub(crate) fn accepts(&self, name: &str) -> bool {
        match self {
            StreamFilter::All => true,
            StreamFilter::Matching(pattern) => crate::topic::matches(pattern, name),
        }
    }
}

/// This node's side of the backend: where publications are delivered.
pub(crate) trait DeliverySink: Send + Sync + 'static {
    /// Queues `publication` for this node's subscribers; returns how many connections it was
    /// queued for (or held for, by a subscription still replaying). Publications of one topic
    /// arrive in seq order, from any thread.
    fn deliver(&self, publication: &Arc<Publication>) -> usize;

    /// Whether any connection on this node would receive a publication on `topic` now.
    fn wants(&self, topic: &str) -> bool {
        let _ = topic;
        true
    }
}

/// The outcome of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Published {
    /// The message's seq in its topic's stream.
    pub seq: u64,
    /// Connections on this node the message was queued for, when the backend delivered it
    /// before answering.
    pub receivers: Option<usize>,
}

/// Which retained messages a history read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HistoryQuery {
    /// Those after this seq, oldest first, at most `limit`.
    After { seq: u64, limit: usize },
    /// The last N (none: only the stream's position).
    Last(usize),
}

/// A topic's stream position and some of its retained messages, read at one instant.
#[derive(Debug, Clone)]
pub(crate) struct HistoryPage {
    pub position: StreamPosition,
    /// The oldest seq still retained, if any.
    pub oldest: Option<u64>,
    pub publications: Vec<Arc<Publication>>,
    /// Where frames made to replay these publications count (a history's byte total), for a
    /// backend that keeps them in this process.
    pub frame_meter: Option<Arc<AtomicUsize>>,
}

impl HistoryPage {
    /// Whether the page's messages, with what is retained, cover everything after `seq` of the
    /// stream `epoch`: the same stream, and nothing after `seq` has been evicted.
    pub(crate) fn covers_after(&self, epoch: &str, seq: u64) -> bool {
        *self.position.epoch == *epoch
            && seq <= self.position.seq
            && (seq == self.position.seq || self.oldest.is_some_and(|oldest| oldest <= seq + 1))
    }
}

/// One topic as the backend knows it.
#[derive(Debug, Clone)]
pub(crate) struct StreamInfo {
    pub name: Arc<str>,
    pub position: StreamPosition,
    /// Messages retained.
    pub history: usize,
}

/// Counts the backend keeps up to date for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BackendStats {
    pub history_messages: usize,
    pub history_bytes: usize,
}

/// What the hub's replay→live join relies on from every backend:
///
/// - a publication can be read from `history` no later than it is handed to the sink;
/// - every seq at or before the position a history read returns is in the page it returns (or
///   was evicted, which the page's `oldest` shows);
/// - once `listening(subject)` has answered Ok, every publication on the subject from then on
///   reaches the sink;
/// - after `interest(topic, true)`, `history` knows the topic, with an epoch that lasts (on this
///   node's watch) until the interest ends.
pub(crate) trait Backend: Send + Sync + 'static {
    /// What `/api/topics` and `/metrics` call it.
    fn name(&self) -> &'static str;

    /// Assigns the next seq on `topic` (a valid topic, not a pattern), retains the message in
    /// history and hands it to the delivery sink. Publishes made one after another on one thread
    /// get their seqs in that order. An answer of Ok means the message is stored.
    fn publish(&self, topic: &str, data: Data) -> Answer<Result<Published, Unavailable>>;

    /// The topic's position and the retained messages `query` asks for; None for a topic the
    /// backend does not know.
    fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Answer<Result<Option<HistoryPage>, Unavailable>>;

    /// This node gained its first subscriber to `subject` (`on`) or lost its last. Called in the
    /// order the changes happen; returns at once (the change reaches the backend in order).
    fn interest(&self, subject: &Subject, on: bool);

    /// Answers once publications on `subject` (which this node has declared interest in) reach
    /// the sink.
    fn listening(&self, subject: &Subject) -> Answer<Result<(), Unavailable>>;

    /// The topics the backend knows (with a seq, with retained messages, or with interest) that
    /// `filter` accepts.
    fn streams(&self, filter: StreamFilter) -> Answer<Result<Vec<StreamInfo>, Unavailable>>;

    /// Whether requests can be served now (`/readyz`).
    fn ready(&self) -> bool {
        true
    }

    /// Periodic housekeeping: expires history and forgets topics idle long enough.
    fn sweep(&self, now: Instant);

    fn stats(&self) -> BackendStats;
}
