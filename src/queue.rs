//! A connection's outbound queue: bounded, byte-accounted, holding encoded WebSocket frames until
//! the socket takes them (the response body that drains it is in `crate::ws`).
//!
//! `buffered_bytes` is the byte size of this queue: frames accepted for the client and not yet
//! taken by its socket. The HTTP dispatcher takes a frame only while its own write buffer (32 KiB)
//! has room, and that buffer drains only as fast as the kernel accepts bytes, so when a client
//! stops reading the queue grows until the slow-consumer policy applies.
//!
//! Publishers push into the queue from any thread and never wait: a full queue drops or closes,
//! it never blocks. Control frames (acks, errors, pongs, close) are never dropped by the policy.
//!
//! Subscriptions in `latest` mode conflate: a topic has at most one frame waiting here, and a newer
//! message replaces it in place. With a rate limit, a message that comes too soon waits (replacing
//! any older one waiting) until its topic's next slot, when a timer in the body releases it, so
//! the last value of a burst always goes out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::frame::{self, CloseCode};
use crate::metrics::{DropReason, Metrics, Ns, WaitBatch, WaitHistogram};

/// What became of a message offered to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued, or held for its topic's next rate slot.
    Queued,
    /// Replaced an older message of the same topic still waiting (`latest` mode).
    Conflated,
    /// Dropped by the slow-consumer policy (or the connection closed because of it).
    Dropped,
    /// The connection is closing; it takes no more messages.
    Closed,
}

impl Push {
    /// Whether the message will reach the socket unless something newer replaces it.
    pub(crate) fn accepted(self) -> bool {
        matches!(self, Push::Queued | Push::Conflated)
    }
}

/// Counters kept per connection, readable without taking the queue's lock (each written on a
/// rare event, or only by the thread that hands frames to the socket). Aligned to its own cache
/// lines, away from the queue's lock, which publishers on other threads take.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct QueueStats {
    dropped: AtomicU64,
    conflated: AtomicU64,
    /// Written only by the thread that hands frames to the socket.
    sent_bytes: AtomicU64,
    wait: WaitHistogram,
}

impl QueueStats {
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(crate) fn conflated(&self) -> u64 {
        self.conflated.load(Ordering::Relaxed)
    }

    pub(crate) fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn wait(&self) -> &WaitHistogram {
        &self.wait
    }
}

/// Where [`OutboundQueue::take_frames`] puts the frames it takes, in order.
pub(crate) trait FrameSink {
    fn put(&mut self, frame: Bytes);
}

impl FrameSink for VecDeque<Bytes> {
    fn put(&mut self, frame: Bytes) {
        self.push_back(frame);
    }
}

pub(crate) struct OutboundQueue {
    state: Mutex<QueueState>,
    limit: usize,
    policy: SlowConsumerPolicy,
    stats: QueueStats,
    metrics: Arc<Metrics>,
    /// Signalled when closing begins and when the body ends, for the connection's watcher: it
    /// tears down a closing socket that takes nothing, and ends the connection with its body.
    closing: tokio::sync::Notify,
}

struct QueueState {
    frames: VecDeque<Queued>,
    /// The index of `frames[0]`: a message frame keeps its index while it waits, whatever goes
    /// before it (taken, or evicted).
    head: u64,
    /// Bytes accepted and not yet taken by the socket: queued frames and frames held for a rate slot.
    bytes: usize,
    /// The most `bytes` has been.
    high_water: usize,
    control_bytes: usize,
    /// When the socket last took a frame, or when the queue last became non-empty.
    progress_at: Instant,
    waker: Option<Waker>,
    phase: Phase,
    /// The code the closing handshake started with, kept after the body ends.
    closed_with: Option<CloseCode>,
    /// Topics delivered in `latest` mode.
    latest: HashMap<Arc<str>, LatestSlot>,
    /// When held frames are due, by topic (an entry is stale once its frame has gone).
    due: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
}

/// A frame waiting in the queue: one entry per subscriber per message, written by the delivery
/// and read back once by the socket. At 100 subscribers the queues' entries are more memory than
/// the cache holds, and waiting for the line an entry is written to was the largest share of a
/// delivery (the unlock after it stalled until the store was done). So an entry fills exactly one
/// cache line (with an `Instant` for its time it took 72 bytes, across two lines for most), and
/// the line the next one goes to is asked for as soon as this one is written
/// ([`prefetch_next_slot`]), long before the next message comes.
#[repr(align(64))]
struct Queued {
    bytes: Bytes,
    kind: Kind,
    queued_at: Stamp,
}

const _: () = assert!(std::mem::size_of::<Queued>() == 64);

/// When a frame was queued: nanoseconds since the process's first stamp, half an `Instant`'s
/// size.
#[derive(Debug, Clone, Copy)]
struct Stamp(u64);

impl Stamp {
    fn of(at: Instant) -> Stamp {
        static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        Stamp(u64::try_from(at.saturating_duration_since(*EPOCH).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A moment a frame is queued at: as an `Instant`, for the queue's clock arithmetic, and as the
/// [`Stamp`] its entry keeps. Turning one into the other is about 90 instructions, so a
/// publication makes its moment once for all its subscribers ([`Moment::of`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moment {
    instant: Instant,
    stamp: Stamp,
}

impl Moment {
    pub(crate) fn of(instant: Instant) -> Moment {
        Moment {
            instant,
            stamp: Stamp::of(instant),
        }
    }

    pub(crate) fn now() -> Moment {
        Moment::of(Instant::now())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A published message: its topic's namespace (for the drop counters), and its topic if it
    /// is delivered in `latest` mode.
    Message {
        ns: Ns,
        latest: Option<Arc<str>>,
    },
    Control,
    Close,
}

/// One topic delivered in `latest` mode on this connection.
#[derive(Default)]
struct LatestSlot {
    /// The index of this topic's frame waiting in the queue.
    queued: Option<u64>,
    /// A frame held back until `next_at` by the rate limit.
    held: Option<Held>,
    /// When the next frame of this topic may be queued.
    next_at: Option<Instant>,
    min_interval: Option<Duration>,
}

struct Held {
    bytes: Bytes,
    ns: Ns,
    queued_at: Stamp,
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
    /// While closing: how long the socket has taken nothing since closing began.
    pub closing_idle_for: Option<Duration>,
    /// The body has ended: the connection is over.
    pub finished: bool,
}

/// What the body should do next.
#[derive(Debug, PartialEq)]
pub(crate) enum Next {
    /// Frames were moved into the body's batch.
    Taken,
    End,
    /// Nothing to send now; a held frame is due at this time, if any.
    Wait(Option<Instant>),
}

/// How many idle `latest` slots a connection keeps before it tidies them away.
const IDLE_SLOTS_KEPT: usize = 256;

/// The most entries' room (64 bytes each) an emptied queue keeps: past it, a burst's room is
/// released once the socket has taken everything, so that connections do not each keep what
/// their deepest moment needed. Below it, a busy connection keeps its room from batch to batch.
const EMPTY_ENTRIES_KEPT: usize = 1024;

impl OutboundQueue {
    pub(crate) fn new(limit: usize, policy: SlowConsumerPolicy, metrics: Arc<Metrics>) -> Self {
        OutboundQueue {
            state: Mutex::new(QueueState {
                frames: VecDeque::new(),
                head: 0,
                bytes: 0,
                high_water: 0,
                control_bytes: 0,
                progress_at: Instant::now(),
                waker: None,
                phase: Phase::Open,
                closed_with: None,
                latest: HashMap::new(),
                due: BinaryHeap::new(),
            }),
            limit,
            policy,
            stats: QueueStats::default(),
            metrics,
            closing: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when the connection starts closing or its body ends (at once if either happened
    /// since the last call).
    pub(crate) async fn closing_or_finished(&self) {
        self.closing.notified().await;
    }

    pub(crate) fn stats(&self) -> &QueueStats {
        &self.stats
    }

    /// `buffered_bytes` now, and its high-water mark.
    pub(crate) fn buffered(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.bytes, st.high_water)
    }

    /// Offers a published message's frame, accepted at `at`; never blocks.
    #[inline]
    pub(crate) fn push_message(&self, frame: Bytes, ns: Ns, at: Moment) -> Push {
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return Push::Closed;
        }
        if let Err((push, waker)) = self.make_room(&mut st, frame.len(), ns) {
            drop(st);
            wake(waker);
            return push;
        }
        let waker = self.enqueue(&mut st, frame, Kind::Message { ns, latest: None }, at);
        drop(st);
        wake(waker);
        Push::Queued
    }

    /// Offers a message for a `latest` subscription on `topic`: it replaces the topic's frame
    /// still waiting, if any, and goes out no sooner than `min_interval` after the last one.
    pub(crate) fn push_latest(
        &self,
        frame: Bytes,
        topic: &Arc<str>,
        ns: Ns,
        at: Moment,
        min_interval: Option<Duration>,
    ) -> Push {
        let now = at.instant;
        let mut st = self.state.lock();
        if st.phase != Phase::Open {
            return Push::Closed;
        }
        let st = &mut *st;
        let slot = st.latest.entry(topic.clone()).or_default();
        slot.min_interval = min_interval;

        // A frame of this topic is still waiting in the queue: the new one takes its place.
        if let Some(index) = slot.queued {
            if let Some(waiting) = index
                .checked_sub(st.head)
                .and_then(|i| st.frames.get_mut(i as usize))
                && let Kind::Message {
                    ns: old_ns,
                    latest: Some(t),
                } = &waiting.kind
                && t == topic
            {
                let old_ns = *old_ns;
                st.bytes = st.bytes - waiting.bytes.len() + frame.len();
                waiting.bytes = frame;
                waiting.kind = Kind::Message {
                    ns,
                    latest: Some(topic.clone()),
                };
                self.count_conflated(old_ns);
                self.publish_size(st);
                return Push::Conflated;
            }
            slot.queued = None;
        }

        // Too soon after the last one: hold it for the topic's next slot.
        if let Some(next_at) = slot.next_at.filter(|&next_at| now < next_at) {
            let len = frame.len();
            let push = match slot.held.replace(Held {
                bytes: frame,
                ns,
                queued_at: at.stamp,
            }) {
                Some(older) => {
                    st.bytes = st.bytes - older.bytes.len() + len;
                    self.count_conflated(older.ns);
                    Push::Conflated
                }
                None => {
                    st.bytes += len;
                    st.due.push(Reverse((next_at, topic.clone())));
                    Push::Queued
                }
            };
            self.publish_size(st);
            // The body may be waiting without a timer for this slot.
            let waker = st.waker.take();
            wake(waker);
            return push;
        }

        // Its slot is open: a frame still held (its timer has not fired yet) is older than this
        // one and must not follow it.
        let mut push = Push::Queued;
        if let Some(older) = slot.held.take() {
            st.bytes -= older.bytes.len();
            self.count_conflated(older.ns);
            push = Push::Conflated;
        }
        if let Err((refused, waker)) = self.make_room(st, frame.len(), ns) {
            self.publish_size(st);
            wake(waker);
            return refused;
        }
        let index = st.head + st.frames.len() as u64;
        let waker = self.enqueue(
            st,
            frame,
            Kind::Message {
                ns,
                latest: Some(topic.clone()),
            },
            at,
        );
        if let Some(slot) = st.latest.get_mut(topic) {
            slot.queued = Some(index);
        }
        wake(waker);
        push
    }

    /// Applies the slow-consumer policy so that `len` more bytes fit; on refusal, what became of
    /// the message and whom to wake.
    #[inline]
    fn make_room(
        &self,
        st: &mut QueueState,
        len: usize,
        ns: Ns,
    ) -> Result<(), (Push, Option<Waker>)> {
        if st.bytes + len <= self.limit {
            return Ok(());
        }
        self.apply_policy(st, len, ns)
    }

    #[cold]
    fn apply_policy(
        &self,
        st: &mut QueueState,
        len: usize,
        ns: Ns,
    ) -> Result<(), (Push, Option<Waker>)> {
        match self.policy {
            SlowConsumerPolicy::DropNewest => {
                self.count_drop(ns, DropReason::BufferFullNewest);
                Err((Push::Dropped, None))
            }
            SlowConsumerPolicy::DropOldest => {
                while st.bytes + len > self.limit {
                    match st.evict_oldest_message() {
                        Some(evicted) => self.count_drop(evicted, DropReason::BufferFullOldest),
                        None => break,
                    }
                }
                if st.bytes + len > self.limit {
                    // Only control and held frames are left, or the frame alone exceeds the limit.
                    self.count_drop(ns, DropReason::BufferFullNewest);
                    self.publish_size(st);
                    return Err((Push::Dropped, None));
                }
                Ok(())
            }
            SlowConsumerPolicy::Disconnect => {
                self.count_drop(ns, DropReason::SlowConsumer);
                let waker = self.begin_close(st, CloseCode::SLOW_CONSUMER, true);
                Err((Push::Dropped, waker))
            }
        }
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
            self.enqueue(&mut st, frame, Kind::Control, Moment::now())
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
        self.closing.notify_one();
        self.discard(&mut st, DropReason::Closed);
        let waker = st.waker.take();
        drop(st);
        wake(waker);
    }

    /// Whether the body has ended (the connection is gone).
    pub(crate) fn is_finished(&self) -> bool {
        self.state.lock().phase == Phase::Finished
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
            closing_idle_for: match st.phase {
                Phase::Closing { since, .. } => {
                    Some(now.saturating_duration_since(since.max(st.progress_at)))
                }
                _ => None,
            },
            finished: st.phase == Phase::Finished,
        }
    }

    /// Moves the next frames (up to `limit` bytes, at least one) into `taken` for the socket,
    /// releasing held frames that are due. One lock and one clock read per batch, not per frame.
    pub(crate) fn take_frames(
        &self,
        cx: &mut Context<'_>,
        taken: &mut impl FrameSink,
        limit: usize,
    ) -> Next {
        let mut st = self.state.lock();
        if st.phase == Phase::Finished {
            return Next::End;
        }
        let now = Instant::now();
        let stamp = Stamp::of(now);
        let next_due = st.release_due(now);
        let (mut took, mut moved) = (0, 0);
        let mut waits = WaitBatch::default();
        while took < limit {
            let Some(queued) = st.frames.pop_front() else {
                break;
            };
            let index = st.head;
            st.head += 1;
            let len = queued.bytes.len();
            match &queued.kind {
                Kind::Message { latest: None, .. } => {}
                Kind::Message {
                    latest: Some(topic),
                    ..
                } => st.taken_latest(topic, index, now),
                Kind::Control => st.control_bytes -= len,
                Kind::Close => {
                    st.control_bytes -= len;
                    if let Phase::Closing { close_sent, .. } = &mut st.phase {
                        *close_sent = true;
                    }
                }
            }
            st.bytes -= len;
            took += len;
            moved += 1;
            waits.observe(stamp.0.saturating_sub(queued.queued_at.0));
            taken.put(queued.bytes);
        }
        if st.frames.is_empty() && st.frames.capacity() > EMPTY_ENTRIES_KEPT {
            st.frames = VecDeque::new();
        }
        if moved > 0 {
            st.progress_at = now;
            drop(st);
            self.stats
                .sent_bytes
                .fetch_add(took as u64, Ordering::Relaxed);
            self.stats.wait.add(&waits);
            return Next::Taken;
        }
        if let Phase::Closing {
            close_sent: true,
            peer_closed: true,
            ..
        } = st.phase
        {
            st.phase = Phase::Finished;
            self.closing.notify_one();
            return Next::End;
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Next::Wait(next_due)
    }

    fn enqueue(&self, st: &mut QueueState, bytes: Bytes, kind: Kind, at: Moment) -> Option<Waker> {
        if st.frames.is_empty() {
            st.progress_at = at.instant;
        }
        st.bytes += bytes.len();
        if !matches!(kind, Kind::Message { .. }) {
            st.control_bytes += bytes.len();
        }
        st.frames.push_back(Queued {
            bytes,
            kind,
            queued_at: at.stamp,
        });
        prefetch_next_slot(&st.frames);
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
        // Stores a permit if the watcher is not waiting yet.
        self.closing.notify_one();
        self.enqueue(
            st,
            frame::close_frame(code.code, code.reason),
            Kind::Close,
            Moment::now(),
        )
    }

    /// Empties the queue and the held frames, counting the messages as dropped for `reason`.
    fn discard(&self, st: &mut QueueState, reason: DropReason) {
        for queued in st.frames.drain(..) {
            if let Kind::Message { ns, .. } = queued.kind {
                self.count_drop(ns, reason);
            }
        }
        for slot in st.latest.values_mut() {
            if let Some(held) = slot.held.take() {
                self.count_drop(held.ns, reason);
            }
        }
        st.latest.clear();
        st.due.clear();
        st.bytes = 0;
        st.control_bytes = 0;
        self.publish_size(st);
    }

    fn count_drop(&self, ns: Ns, reason: DropReason) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped(ns, reason, 1);
    }

    fn count_conflated(&self, ns: Ns) {
        self.stats.conflated.fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped(ns, DropReason::Conflated, 1);
    }

    fn publish_size(&self, st: &mut QueueState) {
        st.high_water = st.high_water.max(st.bytes);
    }
}

/// Asks the CPU for the cache line the queue's next entry will be written to (it is not there
/// when the queue is full and wraps to its start, and nothing comes of a prefetch that misses).
#[inline]
fn prefetch_next_slot(frames: &VecDeque<Queued>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(last) = frames.back() {
        let next = std::ptr::from_ref(last).wrapping_add(1);
        // SAFETY: a prefetch is a hint: it reads nothing and cannot fault, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(next.cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = frames;
}

impl QueueState {
    /// Removes the oldest waiting message frame; returns its namespace, None if there is none.
    ///
    /// Only control frames can wait before it, since an evicted message leaves no entry behind,
    /// so finding it and removing it touch a few entries, however long a consumer has been
    /// evicting: its queue stays the size of what still waits.
    fn evict_oldest_message(&mut self) -> Option<Ns> {
        let position = self
            .frames
            .iter()
            .position(|q| matches!(q.kind, Kind::Message { .. }))?;
        let index = self.head + position as u64;
        let victim = self.frames.remove(position)?;
        // The entries after it keep their indices (a `latest` slot finds its frame by index);
        // those before it are control frames, which nothing finds by index.
        self.head += 1;
        let Kind::Message { ns, latest } = victim.kind else {
            return None;
        };
        self.bytes -= victim.bytes.len();
        if let Some(slot) = latest.and_then(|topic| self.latest.get_mut(&topic))
            && slot.queued == Some(index)
        {
            slot.queued = None;
        }
        Some(ns)
    }

    /// The socket took `topic`'s frame at `index`: its next one may follow after the interval.
    fn taken_latest(&mut self, topic: &Arc<str>, index: u64, now: Instant) {
        let Some(slot) = self.latest.get_mut(topic) else {
            return;
        };
        if slot.queued == Some(index) {
            slot.queued = None;
        }
        slot.next_at = slot.min_interval.map(|interval| now + interval);
        if slot.queued.is_none() && slot.held.is_none() && slot.next_at.is_none() {
            self.latest.remove(topic);
        }
    }

    /// Moves held frames that are due into the queue; returns when the next one is due.
    fn release_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((due, _))) = self.due.peek() {
            if *due > now {
                return Some(*due);
            }
            let Some(Reverse((_, topic))) = self.due.pop() else {
                break;
            };
            let Some(slot) = self.latest.get_mut(&topic) else {
                continue;
            };
            let Some(held) = slot.held.take() else {
                continue;
            };
            let index = self.head + self.frames.len() as u64;
            slot.queued = Some(index);
            if self.frames.is_empty() {
                self.progress_at = now;
            }
            // Its bytes were counted when it was held.
            self.frames.push_back(Queued {
                bytes: held.bytes,
                kind: Kind::Message {
                    ns: held.ns,
                    latest: Some(topic),
                },
                queued_at: held.queued_at,
            });
        }
        if self.latest.len() > IDLE_SLOTS_KEPT {
            self.latest.retain(|_, slot| {
                slot.queued.is_some()
                    || slot.held.is_some()
                    || slot.next_at.is_some_and(|at| at > now)
            });
        }
        None
    }
}

#[cfg(test)]
impl OutboundQueue {
    /// How many entries the queue has room for without growing.
    pub(crate) fn room(&self) -> usize {
        self.state.lock().frames.capacity()
    }

    /// How many entries are waiting, whatever they hold.
    pub(crate) fn entries(&self) -> usize {
        self.state.lock().frames.len()
    }

    /// Everything ready to go out now, as the socket would take it.
    pub(crate) fn drain_ready(&self) -> Vec<Bytes> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut taken = VecDeque::new();
        while self.take_frames(&mut cx, &mut taken, usize::MAX) == Next::Taken {}
        taken.into()
    }
}

thread_local! {
    /// Wakers held back while this thread handles a batch of publishes (see [`coalescing_wakes`]).
    static HELD_WAKERS: std::cell::RefCell<Option<Vec<Waker>>> = const { std::cell::RefCell::new(None) };
    /// The list of the last batch, emptied, kept for the next: a batch for a hundred subscribers
    /// otherwise grew a new one seven times.
    static SPARE_WAKERS: std::cell::Cell<Vec<Waker>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The most wakers' room [`SPARE_WAKERS`] keeps.
const SPARE_WAKERS_KEPT: usize = 4096;

/// Wakes `waker` now, or at the end of the batch when called inside [`coalescing_wakes`].
pub(crate) fn wake(waker: Option<Waker>) {
    let Some(waker) = waker else { return };
    let held = HELD_WAKERS.with(|held| match held.borrow_mut().as_mut() {
        Some(list) => {
            list.push(waker);
            None
        }
        None => Some(waker),
    });
    if let Some(waker) = held {
        waker.wake();
    }
}

/// Runs `f` (which publishes) holding back the wake-ups of the connections it queues frames
/// for, and wakes each of them once at the end: a subscriber's socket then takes a whole batch of
/// frames in one write (and one WebSocket message when batching), instead of one write per frame
/// when its writer runs on another thread.
pub(crate) fn coalescing_wakes<R>(f: impl FnOnce() -> R) -> R {
    let outermost = HELD_WAKERS.with(|held| {
        let mut held = held.borrow_mut();
        if held.is_some() {
            return false;
        }
        *held = Some(SPARE_WAKERS.take());
        true
    });
    // Releases the wake-ups even if `f` panics, so that this thread does not hold all its
    // later ones back.
    struct Release(bool);
    impl Drop for Release {
        fn drop(&mut self) {
            if self.0 {
                let mut wakers = HELD_WAKERS
                    .with(|held| held.borrow_mut().take())
                    .unwrap_or_default();
                for waker in wakers.drain(..) {
                    waker.wake();
                }
                if wakers.capacity() <= SPARE_WAKERS_KEPT {
                    SPARE_WAKERS.set(wakers);
                }
            }
        }
    }
    let _release = Release(outermost);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&[]))
    }

    fn queue(limit: usize, policy: SlowConsumerPolicy) -> OutboundQueue {
        OutboundQueue::new(limit, policy, metrics())
    }

    /// Pushes a message frame on the `other` namespace.
    fn push(q: &OutboundQueue, frame: Bytes) -> Push {
        let ns = q.metrics.namespace("t");
        q.push_message(frame, ns, Moment::now())
    }

    /// Takes one frame, as the body would with a one-byte limit.
    fn poll(queue: &OutboundQueue) -> Poll<Option<Bytes>> {
        let mut taken = VecDeque::new();
        match queue.take_frames(&mut Context::from_waker(Waker::noop()), &mut taken, 1) {
            Next::Taken => Poll::Ready(taken.pop_front()),
            Next::End => Poll::Ready(None),
            Next::Wait(_) => Poll::Pending,
        }
    }

    fn latest(
        q: &OutboundQueue,
        topic: &Arc<str>,
        frame: &'static [u8],
        interval: Option<Duration>,
    ) -> Push {
        let ns = q.metrics.namespace(topic);
        q.push_latest(
            Bytes::from_static(frame),
            topic,
            ns,
            Moment::now(),
            interval,
        )
    }

    fn drain(q: &OutboundQueue) -> Vec<Bytes> {
        std::iter::from_fn(|| match poll(q) {
            Poll::Ready(Some(b)) => Some(b),
            _ => None,
        })
        .collect()
    }

    fn waits(q: &OutboundQueue) -> crate::metrics::WaitTotals {
        let mut totals = crate::metrics::WaitTotals::default();
        q.stats().wait().add_to(&mut totals);
        totals
    }

    #[test]
    fn an_emptied_queue_releases_a_bursts_room_and_keeps_a_little() {
        let q = queue(usize::MAX, SlowConsumerPolicy::DropOldest);
        for _ in 0..100 {
            push(&q, Bytes::from_static(b"m"));
        }
        let small = q.room();
        assert!(small >= 100);
        assert_eq!(drain(&q).len(), 100);
        assert_eq!(q.room(), small, "a small queue keeps its room");

        for _ in 0..5000 {
            push(&q, Bytes::from_static(b"m"));
        }
        assert!(q.room() >= 5000);
        // Not yet: frames still wait.
        let mut cx = Context::from_waker(Waker::noop());
        let mut taken = VecDeque::new();
        assert_eq!(q.take_frames(&mut cx, &mut taken, 100), Next::Taken);
        assert!(q.room() >= 5000);
        assert_eq!(drain(&q).len(), 5000 - taken.len());
        assert_eq!(q.room(), 0, "the burst's room is released");
        // And the queue goes on as before.
        push(&q, Bytes::from_static(b"after"));
        assert_eq!(drain(&q), [Bytes::from_static(b"after")]);
    }

    #[test]
    fn a_frame_waits_from_when_it_was_offered_to_when_the_socket_took_it() {
        let q = queue(1000, SlowConsumerPolicy::DropOldest);
        let ns = q.metrics.namespace("t");
        let offered = Instant::now();
        assert_eq!(
            q.push_message(Bytes::from_static(b"m"), ns, Moment::of(offered)),
            Push::Queued
        );
        std::thread::sleep(Duration::from_millis(20));
        let taken_by = Instant::now();
        assert_eq!(drain(&q).len(), 1);
        let waited = Duration::from_nanos(waits(&q).sum_nanos);
        assert_eq!(waits(&q).count, 1);
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited <= offered.elapsed(), "{waited:?}");
        assert!(waited >= taken_by - offered, "{waited:?}");

        // A frame held for its topic's next slot waits from its offer too, not from its release.
        let topic: Arc<str> = "t".into();
        let interval = Some(Duration::from_millis(30));
        assert_eq!(latest(&q, &topic, b"first", interval), Push::Queued);
        assert_eq!(drain(&q).len(), 1);
        let offered = Instant::now();
        assert_eq!(latest(&q, &topic, b"held", interval), Push::Queued);
        let before = waits(&q);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(drain(&q), [Bytes::from_static(b"held")]);
        let after = waits(&q);
        assert_eq!(after.count - before.count, 1);
        let waited = Duration::from_nanos(after.sum_nanos - before.sum_nanos);
        assert!(waited >= Duration::from_millis(40), "{waited:?}");
        assert!(waited <= offered.elapsed(), "{waited:?}");
    }

    #[test]
    fn latest_keeps_one_frame_per_topic_in_its_place() {
        let q = queue(1000, SlowConsumerPolicy::DropOldest);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(latest(&q, &a, b"a1", None), Push::Queued);
        assert_eq!(latest(&q, &b, b"b1", None), Push::Queued);
        assert_eq!(latest(&q, &a, b"a2", None), Push::Conflated);
        assert_eq!(latest(&q, &a, b"a3!", None), Push::Conflated);
        push(&q, Bytes::from_static(b"all"));
        assert_eq!(q.buffered().0, 3 + 2 + 3);
        assert_eq!(q.stats().conflated(), 2);
        assert_eq!(drain(&q), vec![&b"a3!"[..], b"b1", b"all"]);
        // Once taken, the next one queues again.
        assert_eq!(latest(&q, &a, b"a4", None), Push::Queued);
        assert_eq!(drain(&q), vec![&b"a4"[..]]);
        assert!(
            q.metrics.render().contains(
                r#"crier_messages_dropped_total{namespace="other",reason="conflated"} 2"#
            )
        );
    }

    #[test]
    fn an_evicted_latest_frame_leaves_room_for_the_next() {
        let q = queue(10, SlowConsumerPolicy::DropOldest);
        let a: Arc<str> = "a".into();
        assert_eq!(latest(&q, &a, b"aaaaaa", None), Push::Queued);
        assert_eq!(
            push(&q, Bytes::from_static(b"xxxxxx")),
            Push::Queued,
            "evicts the latest frame"
        );
        assert_eq!(
            latest(&q, &a, b"aa", None),
            Push::Queued,
            "queued anew, not conflated"
        );
        assert_eq!(drain(&q), vec![&b"xxxxxx"[..], b"aa"]);
    }

    #[test]
    fn a_frame_held_past_its_slot_never_follows_a_newer_one() {
        let q = queue(1000, SlowConsumerPolicy::DropOldest);
        let a: Arc<str> = "a".into();
        let interval = Some(Duration::from_millis(20));
        latest(&q, &a, b"1", interval);
        assert_eq!(drain(&q), vec![&b"1"[..]]);
        assert_eq!(latest(&q, &a, b"2", interval), Push::Queued, "held");
        // The slot opens, but nothing has released the held frame yet.
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(
            latest(&q, &a, b"3", interval),
            Push::Conflated,
            "the held one is stale"
        );
        assert_eq!(drain(&q), vec![&b"3"[..]]);
        assert_eq!(q.buffered().0, 0);
    }

    #[test]
    fn max_rate_holds_the_freshest_frame_until_its_slot() {
        let q = queue(1000, SlowConsumerPolicy::DropOldest);
        let a: Arc<str> = "a".into();
        let interval = Some(Duration::from_millis(50));
        assert_eq!(latest(&q, &a, b"1", interval), Push::Queued);
        assert_eq!(drain(&q), vec![&b"1"[..]]);
        assert_eq!(latest(&q, &a, b"2", interval), Push::Queued, "held");
        assert_eq!(
            latest(&q, &a, b"3", interval),
            Push::Conflated,
            "replaces the held one"
        );
        assert_eq!(q.buffered().0, 1, "held bytes count as buffered");
        let Next::Wait(Some(due)) = q.take_frames(
            &mut Context::from_waker(Waker::noop()),
            &mut VecDeque::new(),
            1,
        ) else {
            panic!("a held frame should be due later");
        };
        assert!(due > Instant::now());
        std::thread::sleep(due - Instant::now());
        assert_eq!(
            drain(&q),
            vec![&b"3"[..]],
            "the last value goes out at its slot"
        );
        assert_eq!(q.buffered().0, 0);
        // Held frames that never went out are counted when the connection ends.
        latest(&q, &a, b"4", interval);
        q.finish();
        assert!(
            q.metrics
                .render()
                .contains(r#"crier_messages_dropped_total{namespace="other",reason="closed"} 1"#)
        );
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A publisher that panics while its wake-ups are held back still wakes them, and later
    /// wake-ups on its thread are not held.
    #[test]
    fn held_wakes_are_released_when_the_batch_panics() {
        let count = Arc::new(Count::default());
        let waker = || Some(Waker::from(count.clone()));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            coalescing_wakes(|| {
                wake(waker());
                assert_eq!(count.0.load(Ordering::Relaxed), 0, "held");
                panic!("a delivery failed");
            })
        }));
        assert!(panicked.is_err());
        assert_eq!(
            count.0.load(Ordering::Relaxed),
            1,
            "released when the batch ended"
        );
        wake(waker());
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "no longer held");
    }

    /// Each batch wakes what it held, once, and the next batch reuses the list's room.
    #[test]
    fn consecutive_batches_wake_all_they_held_and_reuse_the_list() {
        let count = Arc::new(Count::default());
        for batch in 1..=3 {
            coalescing_wakes(|| {
                if batch > 1 {
                    let room = HELD_WAKERS.with(|held| held.borrow().as_ref().map(Vec::capacity));
                    assert!(room >= Some(100), "the last batch's list: {room:?}");
                }
                for _ in 0..100 {
                    wake(Some(Waker::from(count.clone())));
                }
                assert_eq!(count.0.load(Ordering::Relaxed), (batch - 1) * 100, "held");
            });
            assert_eq!(count.0.load(Ordering::Relaxed), batch * 100, "released");
        }
    }

    fn msg(n: usize) -> Bytes {
        Bytes::from(vec![b'm'; n])
    }

    #[test]
    fn buffered_bytes_follow_push_and_take() {
        let q = queue(100, SlowConsumerPolicy::DropOldest);
        assert_eq!(push(&q, msg(30)), Push::Queued);
        assert!(q.push_control(Bytes::from_static(b"ack")));
        assert_eq!(q.buffered().0, 33);
        assert_eq!(poll(&q), Poll::Ready(Some(msg(30))));
        assert_eq!(q.buffered().0, 3);
        assert_eq!(poll(&q), Poll::Ready(Some(Bytes::from_static(b"ack"))));
        assert_eq!(q.buffered().0, 0);
        assert_eq!(q.buffered().1, 33);
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
        assert_eq!(q.buffered().0, 90);
        let order: Vec<u8> = std::iter::from_fn(|| match poll(&q) {
            Poll::Ready(Some(b)) => Some(b[0]),
            _ => None,
        })
        .collect();
        assert_eq!(order, vec![0, 2, 3]);
    }

    /// A consumer whose socket takes nothing for a while (its TCP window is full, but not for
    /// the write timeout) keeps receiving messages: each evicts the oldest, and what it evicts
    /// must not stay behind as an entry. Left there, the entries grew by one per message, and
    /// each eviction searched past all of them for the oldest message still waiting: a minute's
    /// memory and a quadratic cost for the publisher's thread, paid by every other client.
    #[test]
    fn drop_oldest_keeps_no_entry_for_what_it_evicts() {
        let q = queue(1000, SlowConsumerPolicy::DropOldest);
        assert!(q.push_control(Bytes::from_static(b"pong")));
        for i in 0..10_000u32 {
            assert_eq!(
                push(&q, Bytes::from(i.to_be_bytes().repeat(25))),
                Push::Queued
            );
        }
        assert_eq!(q.stats().dropped(), 10_000 - 9);
        assert_eq!(q.buffered().0, 4 + 9 * 100);
        assert_eq!(
            q.entries(),
            1 + 9,
            "the control frame and the nine newest messages"
        );
        let taken = drain(&q);
        assert_eq!(taken[0], Bytes::from_static(b"pong"));
        let firsts: Vec<u32> = taken[1..]
            .iter()
            .map(|frame| u32::from_be_bytes(frame[..4].try_into().unwrap()))
            .collect();
        assert_eq!(firsts, (10_000 - 9..10_000).collect::<Vec<u32>>());
    }

    /// Evicting a message from behind a control frame leaves the frames after it where their
    /// `latest` slots look for them: a newer value still replaces the one waiting, in its place.
    #[test]
    fn an_eviction_behind_a_control_frame_keeps_latest_frames_found() {
        let q = queue(30, SlowConsumerPolicy::DropOldest);
        let topic: Arc<str> = "t".into();
        assert!(q.push_control(Bytes::from_static(b"ctl")));
        assert_eq!(push(&q, Bytes::from_static(b"old message")), Push::Queued);
        assert_eq!(latest(&q, &topic, b"value 1", None), Push::Queued);
        // 3 + 11 + 7 bytes wait; 10 more evict the old message.
        assert_eq!(push(&q, Bytes::from_static(b"newer msg!")), Push::Queued);
        assert_eq!(q.stats().dropped(), 1);
        assert_eq!(q.entries(), 3);
        assert_eq!(latest(&q, &topic, b"value 2", None), Push::Conflated);
        let taken: Vec<Bytes> = drain(&q);
        assert_eq!(
            taken,
            [&b"ctl"[..], b"value 2", b"newer msg!"]
                .map(Bytes::from_static)
                .to_vec()
        );
        assert_eq!(q.buffered().0, 0);
    }

    #[test]
    fn drop_newest_refuses_what_does_not_fit() {
        let q = queue(100, SlowConsumerPolicy::DropNewest);
        push(&q, Bytes::from(vec![1u8; 60]));
        assert_eq!(push(&q, Bytes::from(vec![2u8; 60])), Push::Dropped);
        assert_eq!(push(&q, Bytes::from(vec![3u8; 40])), Push::Queued);
        assert_eq!(q.stats().dropped(), 1);
        assert_eq!(q.buffered().0, 100);
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
        assert_eq!(q.buffered().0, 0);
        assert_eq!(poll(&q), Poll::Ready(None));
    }
}
