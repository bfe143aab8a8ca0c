//! The worker threads that serve connections, as delivery sees them: which worker this thread is,
//! and each worker's inbox of publications handed to it.
//!
//! A connection lives on one worker thread: its actor, and the response body that moves frames
//! from its queue into the socket. The thread delivering a publication queues frames itself only
//! for the connections of its own worker, and hands the publication once to each other worker
//! that has subscribers; that worker's delivery task then queues it for its own connections. Each
//! queue is so written and drained by one thread, and a publication costs one hand-off (and at
//! most one wake-up per batch of publishes) per worker, not one per subscriber: with subscribers
//! on every core, the cache line of each subscriber's queue moving between cores was the largest
//! share of a delivery's cost.
//!
//! Hand-offs keep each topic's order. They are made under the topic's lock (`crate::hub`), an
//! inbox is first in, first out, and a thread delivers for its own worker itself only while
//! nothing handed to that worker is waiting or being delivered. An inbox holds at most
//! [`BACKLOG`] publications: beyond that the publishing thread delivers the inbox itself (after
//! leaving the topic's lock), so a publisher can never outrun a busy worker without bound.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};

use parking_lot::Mutex;

use crate::model::Publication;
use crate::queue;

/// A worker thread's index among its broker's workers.
pub(crate) type WorkerId = u8;

/// Workers a broker hands publications to (a [`WorkerSet`] is one bit per worker); threads past
/// this many are not workers, and the connections on them are delivered to by the publisher.
const MAX_WORKERS: usize = 64;

/// Publications an inbox holds before the publisher delivers them itself.
pub(crate) const BACKLOG: usize = 4096;

/// A set of workers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WorkerSet(u64);

impl WorkerSet {
    pub(crate) fn insert(&mut self, worker: WorkerId) {
        self.0 |= 1 << worker;
    }

    pub(crate) fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The workers in the set, lowest first. It visits set bits only: a publication walks this
    /// once or twice, and testing all 64 bits showed as 4% of a publish at one subscriber.
    pub(crate) fn iter(self) -> impl Iterator<Item = WorkerId> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            let worker = bits.trailing_zeros();
            (worker < 64).then(|| {
                bits &= bits - 1;
                worker as WorkerId
            })
        })
    }
}

/// What a worker's delivery task runs on each batch handed to it: false once there is nothing
/// left to deliver to (the broker is gone), which ends the task.
pub(crate) type DeliverBatch = dyn Fn(WorkerId, &[Arc<Publication>]) -> bool + Send + Sync;

/// One broker's workers.
pub(crate) struct Workers {
    /// Tells this broker's workers from another's on the same thread (tests run several).
    id: u64,
    inboxes: [OnceLock<Arc<Inbox>>; MAX_WORKERS],
    joined: Mutex<usize>,
}

struct Inbox {
    pending: Mutex<Pending>,
    /// Publications handed over and not yet queued for the worker's connections: counted up
    /// under `pending`'s lock as each is handed over, down once the batch holding it is
    /// delivered. Idleness is asked on every publish, so it is read without taking a lock.
    outstanding: AtomicUsize,
    /// Held by whoever delivers a batch taken from `pending`, so batches go out in order.
    turn: Mutex<()>,
    /// Cleared (under `pending`'s lock) when the worker's delivery task ends: its thread stopped,
    /// or a delivery panicked. Its connections are then queued for by the publishing thread.
    open: AtomicBool,
    deliver: Arc<DeliverBatch>,
}

#[derive(Default)]
struct Pending {
    publications: Vec<Arc<Publication>>,
    /// The delivery task, waiting for publications.
    waker: Option<Waker>,
}

thread_local! {
    /// The worker this thread is, per broker it joined: (Workers::id, worker).
    static HERE: RefCell<Vec<(u64, WorkerId)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Default for Workers {
    fn default() -> Self {
        Workers {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            inboxes: std::array::from_fn(|_| OnceLock::new()),
            joined: Mutex::new(0),
        }
    }
}

impl Workers {
    /// The worker this thread is, if it joined.
    pub(crate) fn here(&self) -> Option<WorkerId> {
        HERE.with(|here| {
            here.borrow()
                .iter()
                .find(|(id, _)| *id == self.id)
                .map(|(_, worker)| *worker)
        })
    }

    /// Makes this thread a worker, if it is not one yet and runs an actix arbiter (as the HTTP
    /// server's worker threads do): a delivery task on it then runs `deliver` on every batch
    /// handed to it. None on any other thread; connections there get their frames from
    /// whichever thread publishes.
    pub(crate) fn join(&self, deliver: impl FnOnce() -> Arc<DeliverBatch>) -> Option<WorkerId> {
        if let Some(worker) = self.here() {
            return Some(worker);
        }
        let arbiter = actix::Arbiter::try_current()?;
        let mut joined = self.joined.lock();
        if *joined >= MAX_WORKERS {
            return None;
        }
        let worker = *joined as WorkerId;
        let inbox = Arc::new(Inbox {
            pending: Mutex::new(Pending::default()),
            outstanding: AtomicUsize::new(0),
            turn: Mutex::new(()),
            open: AtomicBool::new(true),
            deliver: deliver(),
        });
        if !arbiter.spawn(deliver_handed(inbox.clone(), worker)) {
            return None;
        }
        let _ = self.inboxes[worker as usize].set(inbox);
        *joined += 1;
        HERE.with(|here| here.borrow_mut().push((self.id, worker)));
        Some(worker)
    }

    /// Whether `worker` has nothing handed to it waiting or being delivered: only then may its
    /// own thread deliver to its connections directly without overtaking what was handed over.
    pub(crate) fn is_idle(&self, worker: WorkerId) -> bool {
        self.inboxes[worker as usize]
            .get()
            .is_none_or(|inbox| inbox.is_idle())
    }

    /// Whether every worker is idle ([`Workers::is_idle`]).
    pub(crate) fn all_idle(&self) -> bool {
        self.inboxes
            .iter()
            .map_while(|slot| slot.get())
            .all(|inbox| inbox.is_idle())
    }

    /// Hands `publication` to `worker`. Past a backlog of [`BACKLOG`], the caller should
    /// [`Workers::help`] once it holds no topic's lock; for a worker that has stopped, the caller
    /// queues for that worker's connections itself.
    pub(crate) fn hand_over(&self, worker: WorkerId, publication: &Arc<Publication>) -> Handed {
        let Some(inbox) = self.inboxes[worker as usize].get() else {
            return Handed::Stopped;
        };
        let mut pending = inbox.pending.lock();
        if !inbox.open.load(Ordering::Relaxed) {
            return Handed::Stopped;
        }
        pending.publications.push(publication.clone());
        inbox.outstanding.fetch_add(1, Ordering::Relaxed);
        let backlog = pending.publications.len() > BACKLOG;
        let waker = pending.waker.take();
        drop(pending);
        // Held back, like a subscriber's wake-up, until the publisher's batch is done.
        queue::wake(waker);
        if backlog {
            Handed::Backlog
        } else {
            Handed::Queued
        }
    }

    /// Delivers what waits for `worker` on this thread, after any batch being delivered now.
    pub(crate) fn help(&self, worker: WorkerId) {
        if let Some(inbox) = self.inboxes[worker as usize].get() {
            inbox.deliver_batch(worker, &mut Vec::new());
        }
    }
}

/// What became of a hand-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handed {
    Queued,
    /// Queued, behind more than [`BACKLOG`] others.
    Backlog,
    /// The worker has stopped: nothing was queued.
    Stopped,
}

impl Inbox {
    fn is_idle(&self) -> bool {
        // Acquire, against the Release of the count-down: once this reads 0, everything handed
        // over before has been queued. Whoever asks for a topic's next publication holds that
        // topic's lock, under which its earlier hand-offs were counted up, so it cannot read a
        // count from before them. A stopped worker holds nothing.
        !self.open.load(Ordering::Acquire) || self.outstanding.load(Ordering::Acquire) == 0
    }

    /// Takes what is waiting and delivers it; false once the broker is gone.
    fn deliver_batch(&self, worker: WorkerId, batch: &mut Vec<Arc<Publication>>) -> bool {
        /// Counts the batch down even if its delivery unwinds.
        struct Delivered<'a>(&'a AtomicUsize, usize);
        impl Drop for Delivered<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(self.1, Ordering::Release);
            }
        }
        let _turn = self.turn.lock();
        std::mem::swap(&mut self.pending.lock().publications, batch);
        let _delivered = Delivered(&self.outstanding, batch.len());
        let more = queue::coalescing_wakes(|| (self.deliver)(worker, batch));
        batch.clear();
        more
    }
}

/// A worker's delivery task: delivers each batch handed to it, on its own thread.
async fn deliver_handed(inbox: Arc<Inbox>, worker: WorkerId) {
    struct Stopped<'a>(&'a Inbox);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            let mut pending = self.0.pending.lock();
            self.0.open.store(false, Ordering::Release);
            let dropped = pending.publications.len();
            pending.publications.clear();
            self.0.outstanding.fetch_sub(dropped, Ordering::Release);
            pending.waker = None;
        }
    }
    let _stopped = Stopped(&inbox);
    let mut batch = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            let mut pending = inbox.pending.lock();
            if !pending.publications.is_empty() {
                return Poll::Ready(());
            }
            if !pending
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                pending.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
        .await;
        if !inbox.deliver_batch(worker, &mut batch) {
            return;
        }
        // The connections on this thread take their frames before the next batch.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Data;
    use crate::model::StreamPosition;
    use bytes::Bytes;
    use std::time::{Duration, Instant};

    #[test]
    fn a_worker_set_yields_its_members_lowest_first() {
        for members in [
            vec![],
            vec![0],
            vec![63],
            vec![0, 1],
            vec![2, 5, 31, 32, 62, 63],
        ] {
            let mut set = WorkerSet::default();
            for &worker in members.iter().rev() {
                set.insert(worker);
            }
            assert_eq!(set.iter().collect::<Vec<_>>(), members);
            assert_eq!(set.len(), members.len());
            assert_eq!(set.is_empty(), members.is_empty());
        }
    }

    fn publication(seq: u64) -> Arc<Publication> {
        let position = StreamPosition {
            epoch: "e".into(),
            seq,
        };
        let data = Data::from_json(Bytes::from(seq.to_string())).unwrap();
        Arc::new(Publication::new(
            "t".into(),
            &position,
            data,
            Instant::now(),
        ))
    }

    /// A worker on an arbiter thread records what it is handed, and stalls on its first batch
    /// until another thread, handing it far more, has passed the backlog and helps: everything
    /// arrives once, in order.
    #[test]
    fn handed_publications_arrive_once_in_order_even_past_the_backlog() {
        let workers = Arc::new(Workers::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let backlogged = Arc::new(AtomicBool::new(false));
        let _system = actix::System::new();
        let arbiter = actix::Arbiter::new();
        let (joined, ready) = std::sync::mpsc::channel();
        {
            let (workers, seen, backlogged) = (workers.clone(), seen.clone(), backlogged.clone());
            arbiter.spawn_fn(move || {
                let worker = workers.join(|| {
                    Arc::new(move |_, batch: &[Arc<Publication>]| {
                        seen.lock().extend(batch.iter().map(|p| p.seq));
                        while !backlogged.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        true
                    })
                });
                joined.send(worker).unwrap();
            });
        }
        let worker = ready
            .recv()
            .unwrap()
            .expect("an arbiter thread can be a worker");
        assert_eq!(workers.here(), None, "this thread is not a worker");

        // Taken from the inbox but not yet delivered: the worker is not idle, or a publisher
        // would queue for its connections ahead of this publication.
        assert_eq!(workers.hand_over(worker, &publication(1)), Handed::Queued);
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().is_empty() {
            assert!(Instant::now() < deadline, "the worker never took its batch");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!workers.is_idle(worker) && !workers.all_idle());

        let total = 5 * BACKLOG as u64;
        let mut helped = 0;
        for seq in 2..=total {
            match workers.hand_over(worker, &publication(seq)) {
                Handed::Queued => {}
                Handed::Backlog => {
                    backlogged.store(true, Ordering::Relaxed);
                    helped += 1;
                    workers.help(worker);
                }
                Handed::Stopped => panic!("the worker stopped"),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !workers.is_idle(worker) {
            assert!(Instant::now() < deadline, "the worker never caught up");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(helped > 0, "the publisher outran the worker");
        assert_eq!(*seen.lock(), (1..=total).collect::<Vec<_>>());

        arbiter.stop();
        arbiter.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while workers.hand_over(worker, &publication(0)) != Handed::Stopped {
            assert!(
                Instant::now() < deadline,
                "a stopped worker still takes publications"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Nothing waits for it any more: a stopped worker never holds the others up.
        assert!(workers.is_idle(worker) && workers.all_idle());
    }
}
