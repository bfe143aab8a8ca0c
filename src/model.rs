//! The vocabulary every layer shares: who a connection is and which encoding it speaks, why a
//! request is refused, where a publication stands in its topic's stream, how a subscription wants
//! its messages, and the publication itself as it travels from a backend to this node's
//! subscribers (with the frames made from it, as opaque bytes).
//!
//! The wire protocol (`frame`), the backends and the hub all speak in these terms; none of them
//! owns them, and nothing here knows how a frame is laid out or where a stream is stored.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::data::Data;

/// An answer ready now, or once a round trip completes (a backend across the network).
pub(crate) enum Answer<T> {
    Now(T),
    Later(BoxFuture<'static, T>),
}

impl<T> Answer<T> {
    /// The answer of a backend that answers at once (tests).
    #[cfg(test)]
    pub(crate) fn now(self) -> T {
        match self {
            Answer::Now(value) => value,
            Answer::Later(_) => panic!("this backend answers later"),
        }
    }

    pub(crate) async fn get(self) -> T {
        match self {
            Answer::Now(value) => value,
            Answer::Later(future) => future.await,
        }
    }
}

/// A connection's identity, unique within this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnectionId(pub u64);

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A wire encoding, chosen per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Encoding {
    Json,
    Msgpack,
}

impl Encoding {
    pub(crate) const ALL: [Encoding; 2] = [Encoding::Json, Encoding::Msgpack];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }

    pub(crate) fn from_name(s: &str) -> Option<Encoding> {
        Encoding::ALL.into_iter().find(|e| e.name() == s)
    }
}

/// Where a publish came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Ws,
    Http,
}

/// Why a request was refused, as the `code` of an `error` frame or of an HTTP error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    BadFrame,
    UnknownOp,
    InvalidTopic,
    PayloadTooLarge,
    TooManySubscriptions,
    /// The connection has not authenticated yet: only `auth` is served.
    Unauthorized,
    /// The credentials do not grant this.
    Forbidden,
    /// A token that is malformed, wrongly signed, expired or not yet valid.
    InvalidToken,
    /// Over the connection's publish rate.
    RateLimited,
    /// The backend (Redis) cannot be reached now; try again later.
    Unavailable,
}

impl ErrorCode {
    /// In declaration order, so that `code as usize` indexes it.
    pub(crate) const ALL: [ErrorCode; 10] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownOp,
        ErrorCode::InvalidTopic,
        ErrorCode::PayloadTooLarge,
        ErrorCode::TooManySubscriptions,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::InvalidToken,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// A point in a topic's stream: its epoch (a new one whenever the topic starts afresh, so that
/// seqs from an earlier life are never mistaken for this one's) and a seq within it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamPosition {
    pub epoch: Arc<str>,
    pub seq: u64,
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
    /// The topic's stream and its latest seq (0 before the first message).
    pub stream: Option<StreamPosition>,
    /// For `since`: whether every message after it was replayed.
    pub recovered: Option<bool>,
}

/// One published message on its way to subscribers and, while retained, in history.
///
/// The wire frames a subscriber needs are made from it at most once per encoding, by whoever
/// first needs them, and shared by every subscriber of that encoding (and by every replay of a
/// retained message). A retained message's frames count in its history's byte total: those made
/// before it entered history when it enters, those made for a replay by the replay. (A frame made
/// by another thread in the instant between a publication's delivery and its entering history,
/// which only a subscription releasing what it held can do, is not counted: at most one frame
/// per such publication.)
pub(crate) struct Publication {
    pub topic: Arc<str>,
    /// The stream the seq belongs to.
    pub epoch: Arc<str>,
    pub seq: u64,
    pub data: Data,
    /// When this node accepted (or received) it.
    pub published_at: Instant,
    frames: [OnceLock<Bytes>; 2],
    /// Bytes counted in its history's total while the message is retained; 0 otherwise.
    counted: AtomicUsize,
    /// Threads still queuing it for this node's subscribers, when it was handed to workers.
    fanning_out: AtomicUsize,
}

impl Publication {
    pub(crate) fn new(
        topic: Arc<str>,
        position: &StreamPosition,
        data: Data,
        published_at: Instant,
    ) -> Self {
        Publication {
            topic,
            epoch: position.epoch.clone(),
            seq: position.seq,
            data,
            published_at,
            frames: Default::default(),
            counted: AtomicUsize::new(0),
            fanning_out: AtomicUsize::new(0),
        }
    }

    /// Whether this publication is at or before `position` in the same stream.
    pub(crate) fn is_at_or_before(&self, position: &StreamPosition) -> bool {
        self.seq <= position.seq && *self.epoch == *position.epoch
    }

    /// Notes that `threads` will queue this publication for this node's subscribers.
    pub(crate) fn fan_out_on(&self, threads: usize) {
        self.fanning_out.store(threads, Ordering::Relaxed);
    }

    /// One of those threads is done; true for the last one.
    pub(crate) fn fanned_out_on_one(&self) -> bool {
        self.fanning_out.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// The frame for `encoding`, made by `encode` if no one has made it yet.
    #[inline]
    pub(crate) fn frame(
        &self,
        encoding: Encoding,
        encode: impl FnOnce(&Publication) -> Bytes,
    ) -> Bytes {
        self.frame_made(encoding, encode).0
    }

    /// The frame for a replay from history: one made now counts on `meter`, the history's byte
    /// total, for as long as the message stays retained.
    pub(crate) fn replay_frame(
        &self,
        encoding: Encoding,
        encode: impl FnOnce(&Publication) -> Bytes,
        meter: Option<&AtomicUsize>,
    ) -> Bytes {
        let (frame, made) = self.frame_made(encoding, encode);
        if let Some(meter) = meter.filter(|_| made) {
            // The meter goes up before the message's own count and back down if the message left
            // history meanwhile, so it never shows less than what is retained.
            meter.fetch_add(frame.len(), Ordering::Relaxed);
            let counted = self
                .counted
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                    (c > 0).then_some(c + frame.len())
                });
            if counted.is_err() {
                meter.fetch_sub(frame.len(), Ordering::Relaxed);
            }
        }
        frame
    }

    fn frame_made(
        &self,
        encoding: Encoding,
        encode: impl FnOnce(&Publication) -> Bytes,
    ) -> (Bytes, bool) {
        let slot = &self.frames[encoding as usize];
        if let Some(frame) = slot.get() {
            return (frame.clone(), false);
        }
        let mut made = false;
        let frame = slot
            .get_or_init(|| {
                made = true;
                encode(self)
            })
            .clone();
        (frame, made)
    }

    /// Marks the message retained; returns the bytes it counts for in its history's total (data,
    /// topic, the frames made so far and `overhead` for bookkeeping).
    pub(crate) fn enter_history(&self, overhead: usize) -> usize {
        let frames: usize = self
            .frames
            .iter()
            .filter_map(|f| f.get())
            .map(Bytes::len)
            .sum();
        let counted = overhead + self.topic.len() + self.data.len() + frames;
        self.counted.store(counted, Ordering::Relaxed);
        counted
    }

    /// Marks the message no longer retained; returns the bytes it counted for.
    pub(crate) fn leave_history(&self) -> usize {
        self.counted.swap(0, Ordering::Relaxed)
    }
}

impl fmt::Debug for Publication {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publication")
            .field("topic", &self.topic)
            .field("seq", &self.seq)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication() -> Publication {
        let data = Data::from_json(Bytes::from_static(b"[1,2]")).unwrap();
        let position = StreamPosition {
            epoch: "e".into(),
            seq: 1,
        };
        Publication::new("t".into(), &position, data, Instant::now())
    }

    #[test]
    fn frames_are_made_once_per_encoding() {
        let p = publication();
        let mut made = 0;
        for _ in 0..3 {
            let frame = p.frame(Encoding::Json, |_| {
                made += 1;
                Bytes::from_static(b"json")
            });
            assert_eq!(frame, "json");
        }
        p.frame(Encoding::Msgpack, |_| {
            made += 1;
            Bytes::from_static(b"mp")
        });
        assert_eq!(made, 2);
    }

    #[test]
    fn a_retained_message_counts_its_frames_until_it_leaves() {
        let meter = AtomicUsize::new(0);
        let p = publication();
        p.frame(Encoding::Json, |_| Bytes::from_static(b"0123456789"));
        let counted = p.enter_history(100);
        assert_eq!(counted, 100 + 1 + 5 + 10);
        meter.fetch_add(counted, Ordering::Relaxed);
        p.replay_frame(
            Encoding::Msgpack,
            |_| Bytes::from_static(b"01234"),
            Some(&meter),
        );
        assert_eq!(meter.load(Ordering::Relaxed), counted + 5);
        p.replay_frame(
            Encoding::Msgpack,
            |_| Bytes::from_static(b"again"),
            Some(&meter),
        );
        assert_eq!(meter.load(Ordering::Relaxed), counted + 5, "made once");
        meter.fetch_sub(p.leave_history(), Ordering::Relaxed);
        assert_eq!(meter.load(Ordering::Relaxed), 0);
        // A frame made after it left is not counted.
        let q = publication();
        q.enter_history(0);
        q.leave_history();
        q.replay_frame(
            Encoding::Json,
            |_| Bytes::from_static(b"late"),
            Some(&meter),
        );
        assert_eq!(meter.load(Ordering::Relaxed), 0);
    }
}
