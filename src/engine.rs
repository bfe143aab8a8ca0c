//! The engine: where a publication gets its sequence number, where history is kept, and how a
//! message reaches subscribers.
//!
//! Everything that talks to clients (the connection actors, the HTTP API) goes through this
//! interface. The in-memory engine is [`TopicRegistry`](crate::registry::TopicRegistry); an
//! engine spanning several nodes (over Redis) implements the same trait around it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connection::Connection;
use crate::data::Data;
use crate::metrics::Source;
use crate::topic::Subject;

/// The outcome of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    pub seq: u64,
    /// Connections the message was queued for on this node.
    pub receivers: usize,
}

/// How a subscription's messages are queued for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeliveryMode {
    /// Every message, subject to the connection's slow-consumer policy.
    All,
    /// The freshest message of each topic: a newer message replaces one still queued, and with
    /// `min_interval` at most one frame per interval per topic goes out (the last always does).
    Latest { min_interval: Option<Duration> },
}

/// Messages from history to deliver before live ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Replay {
    None,
    /// Everything after `seq` of the stream `epoch` (recovery after a reconnect).
    Since {
        epoch: String,
        seq: u64,
    },
    /// The last N messages (of every matching topic, for a pattern).
    Rewind(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscribeOptions {
    pub mode: DeliveryMode,
    pub replay: Replay,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            mode: DeliveryMode::All,
            replay: Replay::None,
        }
    }
}

/// What a subscribe's acknowledgement reports (exact topics only; patterns span many streams).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Subscribed {
    /// The topic stream's epoch and its latest seq (0 before the first message).
    pub stream: Option<(Arc<str>, u64)>,
    /// For `since`: whether every message after it was replayed.
    pub recovered: Option<bool>,
}

/// One topic as `GET /api/topics` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopicInfo {
    pub name: Arc<str>,
    pub subscribers: usize,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub history: usize,
}

/// A page of a topic's history, for `GET /api/topics/{topic}/history`.
#[derive(Debug, Clone)]
pub(crate) struct HistoryPage {
    pub epoch: Arc<str>,
    pub seq: u64,
    /// The oldest seq still held, if any.
    pub oldest: Option<u64>,
    pub messages: Vec<(u64, Data)>,
}

/// Counts the engine keeps up to date for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EngineStats {
    pub topics_with_subscribers: usize,
    pub patterns: usize,
    pub history_messages: usize,
    pub history_bytes: usize,
}

pub(crate) trait Engine: Send + Sync + 'static {
    /// Assigns the next sequence number on `topic` (a valid topic, not a pattern), records it in
    /// history and queues the message for every subscriber, in sequence order.
    fn publish(&self, topic: &str, data: Data, source: Source) -> Published;

    /// Starts delivering messages on `subject` to `conn` (or changes how, if it was already
    /// subscribed). `acknowledge` runs before any replayed message is queued and before any
    /// live one can be, so the acknowledgement comes first on the wire.
    fn subscribe(
        &self,
        conn: &Arc<Connection>,
        subject: &Subject,
        options: &SubscribeOptions,
        acknowledge: &mut dyn FnMut(&Subscribed),
    );

    /// Stops delivering messages on `subject` to `conn`; unknown subscriptions are ignored.
    fn unsubscribe(&self, conn: &Connection, subject: &Subject);

    /// Messages after `since` that the topic's history holds, at most `limit`; None for a topic
    /// that does not exist.
    fn history(&self, topic: &str, since: u64, limit: usize) -> Option<HistoryPage>;

    /// Every topic with subscribers or a sequence.
    fn topics(&self) -> Vec<TopicInfo>;

    /// Periodic housekeeping: expires history and forgets topics idle long enough.
    fn sweep(&self, now: Instant);

    fn stats(&self) -> EngineStats;
}
