//! A connection's outbound path: a bounded, byte-accounted queue of encoded WebSocket frames, and
//! the response body that hands them to the socket.
//!
//! `buffered_bytes` is the byte size of this queue: frames accepted for the client and not yet
//! taken by its socket. The HTTP dispatcher takes a frame only while its own write buffer (32 KiB)
//! has room, and that buffer drains only as fast as the kernel accepts bytes, so when a client
//! stops reading the queue grows until the slow-consumer policy applies.
//!
//! Publishers push into the queue from any thread and never wait: a full queue drops or closes,
//! it never blocks. Control frames (acks, errors, pongs, close) are never dropped by the policy.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use bytes::Bytes;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::connection::Connection;
use crate::frame::{self, CloseCode};
use crate::metrics::{DropReason, Metrics, Ns, WaitHistogram};

/// What became of a message offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    Queued,
    /// Dropped by the slow-consumer policy (or the connection closed because of it).
    Dropped,
    /// The connection is closing; it takes no more messages.
    Closed,
}

/// Counters kept per connection, readable without taking the queue's lock.
#[derive(Debug, Default)]
pub(crate) struct QueueStats {
    buffered: AtomicUsize,
    high_water: AtomicUsize,
    dropped: AtomicU64,
    /// Written only by the thread that hands frames to the socket.
    sent_bytes: AtomicU64,
    wait: WaitHistogram,
}

impl QueueStats {
    pub(crate) fn buffered_bytes(&self) -> usize {
        self.buffered.load(Ordering::Relaxed)
    }

    pub(crate) fn high_water(&self) -> usize {
        self.high_water.load(Ordering::Relaxed)
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn wait(&self) -> &WaitHistogram {
        &self.wait
    }
}

pub(crate) struct OutboundQueue {
    state: Mutex<QueueState>,
    limit: usize,
    policy: SlowConsumerPolicy,
    stats: QueueStats,
    metrics: Arc<Metrics>,
}

struct QueueState {
    frames: VecDeque<Queued>,
    bytes: usize,
    control_bytes: usize,
    /// When the socket last took a frame, or when the queue last became non-empty.
    progress_at: Instant,
    waker: Option<Waker>,
    phase: Phase,
    /// The code the closing handshake started with, kept after the body ends.
    closed_with: Option<CloseCode>,
}

struct Queued {
    bytes: Bytes,
    kind: Kind,
    queued_at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A published message, tagged with its topic's namespace for the drop counters.
    Message(Ns),
    Control,
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Closing {
        since: Instant,
        close_sent: bool,
        peer_closed: bool,
    },
    /// The body has ended, or must end now.
    Finished,
}

/// What the connection's heartbeat needs to know about the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueHealth {
    /// How long the socket has taken nothing while frames wait.
    pub stalled_for: Option<Duration>,
    /// How long ago closing began, if it has.
    pub closing_for: Option<Duration>,
    /// The body has ended: the connection is over.
    pub finished: bool,
}

impl OutboundQueue {
    pub(crate) fn new(limit: usize, policy: SlowConsumerPolicy, metrics: Arc<Metrics>) -> Self {
        OutboundQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                bytes: 0,
                control_bytes: 0,
                progress_at: Instant::now(),
                waker: None,
                phase: Phase::Open,
                closed_with: None,
            }),
            limit,
            policy,
            stats: QueueStats::default(),
            metrics,
        }
    }

    pub(crate) fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// Offers a published message's frame, queued at `now`; never blocks.
    pub(crate) fn push_message(&self, frame: Bytes, ns: Ns, now: Instant) -> Push {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return Push::Closed;
        }
        let len = frame.len();
        if st.bytes + len > self.limit {
            match self.policy {
                SlowConsumerPolicy::DropNewest => {
                    self.count_drop(ns, DropReason::BufferFullNewest);
                    return Push::Dropped;
                }
                SlowConsumerPolicy::DropOldest => {
                    while st.bytes + len > self.limit {
                        match st.remove_oldest_message() {
                            Some(evicted) => self.count_drop(evicted, DropReason::BufferFullOldest),
                            None => break,
                        }
                    }
                    if st.bytes + len > self.limit {
                        // Only control frames are left, or the frame alone exceeds the limit.
                        self.count_drop(ns, DropReason::BufferFullNewest);
                        self.publish_size(&st);
                        return Push::Dropped;
                    }
                }
                SlowConsumerPolicy::Disconnect => {
                    self.count_drop(ns, DropReason::SlowConsumer);
                    let waker = self.begin_close(&mut st, CloseCode::SLOW_CONSUMER, true);
                    drop(st);
                    wake(waker);
                    return Push::Dropped;
                }
            }
        }
        let waker = self.enqueue(&mut st, frame, Kind::Message(ns), now);
        drop(st);
        wake(waker);
        Push::Queued
    }

    /// Queues a control frame (ack, error, pong, ping). Returns false once the connection is
    /// closing. A client that piles up more control frames than the buffer holds (it sends
    /// requests and reads none of the answers) is closed as a slow consumer.
    pub(crate) fn push_control(&self, frame: Bytes) -> bool {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return false;
        }
        let waker = if st.control_bytes + frame.len() > self.limit {
            self.begin_close(&mut st, CloseCode::SLOW_CONSUMER, true)
        } else {
            self.enqueue(&mut st, frame, Kind::Control, Instant::now())
        };
        let open = st.phase == Phase::Open;
        drop(st);
        wake(waker);
        open
    }

    /// Starts the closing handshake with `code`: the close frame goes out after what is queued,
    /// or at once when `discard` is set (queued messages are then dropped). Returns false if
    /// the connection was already closing.
    pub(crate) fn close(&self, code: CloseCode, discard: bool) -> bool {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return false;
        }
        let waker = self.begin_close(&mut st, code, discard);
        drop(st);
        wake(waker);
        true
    }

    /// The client sent its close frame: answer it (if we had not started closing) and end the
    /// body once our close frame is out.
    pub(crate) fn peer_closed(&self, code: CloseCode) {
        let mut st = self.state.lock();
        let waker = match st.phase {
            Phase::Open => self.begin_close(&mut st, code, false),
            Phase::Closing { .. } => st.waker.take(),
            Phase::Finished => None,
        };
        if let Phase::Closing { peer_closed, .. } = &mut st.phase {
            *peer_closed = true;
        }
        drop(st);
        wake(waker);
    }

    /// Ends the body now, whatever is queued (the connection is gone or being torn down).
    pub(crate) fn finish(&self) {
        let mut st = self.state.lock();
        st.phase = Phase::Finished;
        self.discard(&mut st, DropReason::Closed);
        let waker = st.waker.take();
        drop(st);
        wake(waker);
    }

    /// The close code the connection is closing (or closed) with, if a close was started.
    pub(crate) fn closing_code(&self) -> Option<CloseCode> {
        self.state.lock().closed_with
    }

    pub(crate) fn health(&self, now: Instant) -> QueueHealth {
        let st = self.state.lock();
        let waiting = !st.frames.is_empty();
        QueueHealth {
            stalled_for: waiting.then(|| now.saturating_duration_since(st.progress_at)),
            closing_for: match st.phase {
                Phase::Closing { since, .. } => Some(now.saturating_duration_since(since)),
                _ => None,
            },
            finished: st.phase == Phase::Finished,
        }
    }

    /// Hands the next frame to the socket.
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut st = self.state.lock();
        if st.phase == Phase::Finished {
            return Poll::Ready(None);
        }
        if let Some(queued) = st.frames.pop_front() {
            let now = Instant::now();
            st.bytes -= queued.bytes.len();
            self.stats
                .sent_bytes
                .fetch_add(queued.bytes.len() as u64, Ordering::Relaxed);
            self.stats
                .wait
                .observe(now.saturating_duration_since(queued.queued_at));
            match queued.kind {
                Kind::Message(_) => {}
                Kind::Control => st.control_bytes -= queued.bytes.len(),
                Kind::Close => {
                    st.control_bytes -= queued.bytes.len();
                    if let Phase::Closing { close_sent, .. } = &mut st.phase {
                        *close_sent = true;
                    }
                }
            }
            st.progress_at = now;
            self.publish_size(&st);
            return Poll::Ready(Some(queued.bytes));
        }
        if let Phase::Closing {
            close_sent: true,
            peer_closed: true,
            ..
        } = st.phase
        {
            st.phase = Phase::Finished;
            return Poll::Ready(None);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn enqueue(
        &self,
        st: &mut QueueState,
        bytes: Bytes,
        kind: Kind,
        now: Instant,
    ) -> Option<Waker> {
        if st.frames.is_empty() {
            st.progress_at = now;
        }
        st.bytes += bytes.len();
        if !matches!(kind, Kind::Message(_)) {
            st.control_bytes += bytes.len();
        }
        st.frames.push_back(Queued {
            bytes,
            kind,
            queued_at: now,
        });
        self.publish_size(st);
        st.waker.take()
    }

    fn begin_close(&self, st: &mut QueueState, code: CloseCode, discard: bool) -> Option<Waker> {
        if discard {
            self.discard(st, DropReason::SlowConsumer);
        }
        st.closed_with = Some(code);
        st.phase = Phase::Closing {
            since: Instant::now(),
            close_sent: false,
            peer_closed: false,
        };
        self.enqueue(
            st,
            frame::close_frame(code.code, code.reason),
            Kind::Close,
            Instant::now(),
        )
    }

    /// Empties the queue, counting the messages in it as dropped for `reason`.
    fn discard(&self, st: &mut QueueState, reason: DropReason) {
        for queued in st.frames.drain(..) {
            if let Kind::Message(ns) = queued.kind {
                self.count_drop(ns, reason);
            }
        }
        st.bytes = 0;
        st.control_bytes = 0;
        self.publish_size(st);
    }

    fn count_drop(&self, ns: Ns, reason: DropReason) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped(ns, reason, 1);
    }

    fn publish_size(&self, st: &QueueState) {
        self.stats.buffered.store(st.bytes, Ordering::Relaxed);
        self.stats.high_water.fetch_max(st.bytes, Ordering::Relaxed);
    }
}

impl QueueState {
    /// Removes the oldest message frame and returns its namespace; None if there is none.
    fn remove_oldest_message(&mut self) -> Option<Ns> {
        let i = self
            .frames
            .iter()
            .position(|q| matches!(q.kind, Kind::Message(_)))?;
        let removed = self.frames.remove(i)?;
        self.bytes -= removed.bytes.len();
        match removed.kind {
            Kind::Message(ns) => Some(ns),
            _ => None,
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// The body of a WebSocket's 101 response: the connection's outbound frames.
pub(crate) struct OutboundBody {
    conn: Arc<Connection>,
    /// actix-ws's own body, never polled. actix-ws's `MessageStream` (the read side) keeps reading
    /// only while this exists, which is exactly as long as the socket is ours.
    _ws_body: BoxBody,
}

impl OutboundBody {
    pub(crate) fn new(conn: Arc<Connection>, ws_body: BoxBody) -> Self {
        OutboundBody {
            conn,
            _ws_body: ws_body,
        }
    }
}

impl MessageBody for OutboundBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.conn.queue.poll_frame(cx).map(|frame| frame.map(Ok))
    }
}

impl Drop for OutboundBody {
    fn drop(&mut self) {
        // The dispatcher drops the body before it closes the socket.
        self.conn.release_socket();
        self.conn.queue.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&[], 100, std::sync::Weak::new()))
    }

    fn queue(limit: usize, policy: SlowConsumerPolicy) -> OutboundQueue {
        OutboundQueue::new(limit, policy, metrics())
    }

    /// Pushes a message frame on the `other` namespace.
    fn push(q: &OutboundQueue, frame: Bytes) -> Push {
        let ns = q.metrics.namespace("t");
        q.push_message(frame, ns, Instant::now())
    }

    fn poll(queue: &OutboundQueue) -> Poll<Option<Bytes>> {
        queue.poll_frame(&mut Context::from_waker(Waker::noop()))
    }

    fn msg(n: usize) -> Bytes {
        Bytes::from(vec![b'm'; n])
    }

    #[test]
    fn buffered_bytes_follow_push_and_take() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        assert_eq!(push(&q, msg(30)), Push::Queued);
        assert!(q.push_control(Bytes::from_static(b"ack")));
        assert_eq!(q.stats().buffered_bytes(), 33);
        assert_eq!(poll(&q), Poll::Ready(Some(msg(30))));
        assert_eq!(q.stats().buffered_bytes(), 3);
        assert_eq!(poll(&q), Poll::Ready(Some(Bytes::from_static(b"ack"))));
        assert_eq!(q.stats().buffered_bytes(), 0);
        assert_eq!(q.stats().high_water(), 33);
        assert_eq!(poll(&q), Poll::Pending);
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_the_control_frames() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        push(&q, Bytes::from(vec![1u8; 40]));
        q.push_control(Bytes::from(vec![0u8; 10]));
        push(&q, Bytes::from(vec![2u8; 40]));
        assert_eq!(push(&q, Bytes::from(vec![3u8; 40])), Push::Queued);
        assert_eq!(q.stats().dropped(), 1);
        assert_eq!(q.stats().buffered_bytes(), 90);
        let order: Vec<u8> = std::iter::from_fn(|| match poll(&q) {
            Poll::Ready(Some(b)) => Some(b[0]),
            _ => None,
        })
        .collect();
        assert_eq!(order, vec![0, 2, 3]);
    }

    #[test]
    fn drop_newest_refuses_what_does_not_fit() {
        let q = queue(100, SlowConsumerPolicy::DropNewest);
        push(&q, Bytes::from(vec![1u8; 60]));
        assert_eq!(push(&q, Bytes::from(vec![2u8; 60])), Push::Dropped);
        assert_eq!(push(&q, Bytes::from(vec![3u8; 40])), Push::Queued);
        assert_eq!(q.stats().dropped(), 1);
        assert_eq!(q.stats().buffered_bytes(), 100);
    }

    #[test]
    fn disconnect_discards_and_sends_4008() {
        let q = queue(100, SlowConsumerPolicy::Disconnect);
        push(&q, msg(60));
        assert_eq!(push(&q, msg(60)), Push::Dropped);
        assert_eq!(q.closing_code(), Some(CloseCode::SLOW_CONSUMER));
        assert_eq!(q.stats().dropped(), 2);
        assert_eq!(push(&q, msg(1)), Push::Closed);
        let Poll::Ready(Some(close)) = poll(&q) else {
            panic!("close frame expected")
        };
        assert_eq!(&close[..4], &[0x88, 15, 0x0f, 0xa8]);
        assert_eq!(&close[4..], b"slow consumer");
        // The body waits for the client's close frame, then ends.
        assert_eq!(poll(&q), Poll::Pending);
        q.peer_closed(CloseCode::NORMAL);
        assert_eq!(poll(&q), Poll::Ready(None));
    }

    #[test]
    fn a_client_close_is_answered_after_what_is_queued() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        push(&q, msg(5));
        q.peer_closed(CloseCode::NORMAL);
        assert_eq!(poll(&q), Poll::Ready(Some(msg(5))));
        let Poll::Ready(Some(close)) = poll(&q) else {
            panic!("close frame expected")
        };
        assert_eq!(close[0], 0x88);
        assert_eq!(poll(&q), Poll::Ready(None));
    }

    #[test]
    fn control_flood_closes_as_slow_consumer() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        let mut accepted = 0;
        while q.push_control(msg(30)) {
            accepted += 1;
        }
        assert_eq!(accepted, 3);
        assert_eq!(q.closing_code(), Some(CloseCode::SLOW_CONSUMER));
    }

    #[test]
    fn health_reports_a_stalled_socket() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        let later = Instant::now() + Duration::from_secs(5);
        assert!(q.health(later).stalled_for.is_none());
        push(&q, msg(1));
        assert!(q.health(later).stalled_for.unwrap() >= Duration::from_secs(4));
    }

    #[test]
    fn messages_still_queued_at_the_end_are_counted_as_closed() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        push(&q, msg(10));
        push(&q, msg(10));
        q.push_control(msg(5));
        q.finish();
        assert_eq!(q.stats().dropped(), 2);
        assert!(
            q.metrics
                .render()
                .contains(r#"crier_messages_dropped_total{namespace="other",reason="closed"} 2"#)
        );
        assert_eq!(q.stats().buffered_bytes(), 0);
        assert_eq!(poll(&q), Poll::Ready(None));
    }
}
