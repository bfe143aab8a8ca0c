//! The engine: where a publication gets its sequence number and how it reaches subscribers.
//!
//! Everything that talks to clients (the connection actors, the HTTP API) goes through this
//! interface. The in-memory engine is [`TopicRegistry`](crate::registry::TopicRegistry); an
//! engine spanning several nodes (over Redis) implements the same trait around it.

use std::sync::Arc;
use std::time::Instant;

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

/// One topic as `GET /api/topics` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopicInfo {
    pub name: Arc<str>,
    pub subscribers: usize,
    pub seq: u64,
}

/// Counts the engine keeps up to date for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct EngineStats {
    pub topics_with_subscribers: usize,
    pub patterns: usize,
}

pub(crate) trait Engine: Send + Sync + 'static {
    /// Assigns the next sequence number on `topic` (a valid topic, not a pattern) and queues the
    /// message for every subscriber, in sequence order.
    fn publish(&self, topic: &str, data: Data, source: Source) -> Published;

    /// Starts delivering messages on `subject` to `conn`.
    fn subscribe(&self, conn: &Arc<Connection>, subject: &Subject);

    /// Stops delivering messages on `subject` to `conn`; unknown subscriptions are ignored.
    fn unsubscribe(&self, conn: &Connection, subject: &Subject);

    /// Every topic with subscribers or a sequence.
    fn topics(&self) -> Vec<TopicInfo>;

    /// Periodic housekeeping: forgets topics that have been idle long enough.
    fn sweep(&self, now: Instant);

    fn stats(&self) -> EngineStats;
}
