//! The hub: this node's subscribers, and how a publication reaches them.
//!
//! The hub keeps exact and pattern subscriptions per topic, queues each publication's frame
//! (encoded once per encoding) for every connection that wants it, once per connection, applying
//! each subscription's delivery mode, and joins a subscription's replay of history to its live
//! stream.
//!
//! The join is done by seq, not by holding any lock of the backend's: a subscription is
//! registered first and holds back the live publications of its topic while it reads and queues
//! history; then it releases those it held, dropping any its replay already had. Anything
//! published before the registration is in the history it reads; anything delivered after it is
//! held or queued; so the join has no gap and no duplicate whatever thread the backend delivers
//! from and however late. Live publications the replay already covered, arriving after the join,
//! are dropped too.
//!
//! Queuing never waits: a slow subscriber's queue drops, conflates or closes (see
//! [`crate::queue`]).

mod patterns;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::backend::{Backend, DeliverySink, HistoryQuery, StreamFilter, Unavailable};
use crate::config::Config;
use crate::connection::Connection;
use crate::frame;
use crate::metrics::{Metrics, Ns};
use crate::model::{
    ConnectionId, DeliveryMode, Encoding, Publication, Replay, StreamPosition, SubscribeOptions,
    Subscribed,
};
use crate::queue::{Moment, Push};
use crate::table::{TopicEntry, TopicTable};
use crate::topic::Subject;
use crate::workers::{Handed, WorkerId, WorkerSet, Workers};
use patterns::PatternIndex;

pub(crate) struct Hub {
    topics: TopicTable<TopicState, Interest>,
    patterns: PatternIndex<PatternRoute>,
    /// The patterns the backend has been told this node subscribes to. Changes are made under
    /// this lock, so the backend hears them in the order they happened.
    pattern_interest: Mutex<HashSet<Arc<str>>>,
    /// How long a topic entry without exact subscribers outlives its last delivery.
    topic_ttl: Duration,
    metrics: Arc<Metrics>,
    topics_with_subscribers: AtomicUsize,
    workers: Workers,
}

/// Counts the hub keeps up to date for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HubStats {
    /// Topics with at least one exact subscription.
    pub topics: usize,
    /// Pattern subscriptions.
    pub patterns: usize,
}

/// Subscribers a publication may have for the publishing thread to queue it for all of them
/// itself, on whatever worker they are.
const DIRECT_DELIVERIES: usize = 8;

/// A topic with subscribers on this node, or one recently delivered to while patterns exist.
type HubTopic = TopicEntry<TopicState, Interest>;

/// Whether the backend has been told of this node's interest in a topic. Taken before the
/// topic's state and never on the delivery path; the sweep only tries it (`try_lock`) while
/// holding the state, which cannot wait on anyone.
#[derive(Default)]
struct Interest(Mutex<bool>);

struct TopicState {
    exact: HashMap<ConnectionId, ExactRoute>,
    /// Pattern routes matching this topic, one per connection, as of a pattern-index generation.
    pattern_matches: (u64, Arc<[PatternRoute]>),
    /// The last delivery or subscription change.
    last_active: Instant,
}

/// How a subscription's messages reach its connection.
#[derive(Clone)]
struct Subscriber {
    conn: Arc<Connection>,
    mode: DeliveryMode,
    /// The connection's worker, kept beside the route: reading it in the connection would touch
    /// memory its own thread writes.
    worker: Option<WorkerId>,
}

impl Subscriber {
    /// Whether a delivery that `reach`es this far queues for this subscriber itself.
    fn reached(&self, reach: Reach) -> bool {
        match reach {
            Reach::Everywhere => true,
            Reach::From { inline } => self.worker.is_none() || self.worker == inline,
            Reach::Only(worker) => self.worker == Some(worker),
        }
    }

    /// Offers a live publication's frame to the connection, as accepted.
    fn offer(&self, publication: &Publication, ns: Ns) -> Push {
        self.offer_from(&mut Frames::shared(publication), ns)
    }

    fn offer_from(&self, frames: &mut Frames<'_>, ns: Ns) -> Push {
        let frame = frames.get(self.conn.encoding, self.encoder());
        self.push(frame, frames.publication, ns, frames.accepted)
    }

    /// Offers the frame of a publication replayed from history; one made now counts on `meter`.
    fn offer_replayed(
        &self,
        publication: &Publication,
        ns: Ns,
        meter: Option<&AtomicUsize>,
    ) -> Push {
        let frame = publication.replay_frame(self.conn.encoding, self.encoder(), meter);
        self.push(frame, publication, ns, Moment::now())
    }

    /// Makes a publication's `message` frame in this connection's encoding.
    fn encoder(&self) -> impl FnOnce(&Publication) -> Bytes + use<> {
        let encoding = self.conn.encoding;
        move |p| frame::encode_message(encoding, &p.topic, p.seq, &p.data)
    }

    fn push(&self, frame: Bytes, publication: &Publication, ns: Ns, at: Moment) -> Push {
        match self.mode {
            DeliveryMode::All => self.conn.queue.push_message(frame, ns, at),
            DeliveryMode::Latest { min_interval } => {
                self.conn
                    .queue
                    .push_latest(frame, &publication.topic, ns, at, min_interval)
            }
        }
    }
}

/// What one delivery did.
#[derive(Debug, Default)]
struct Delivered {
    /// Connections it queued the publication for (the policy accepted it, or it was held).
    queued: usize,
    /// Connections it offered the publication to, accepted or not.
    offered: usize,
    /// Subscribers on other workers.
    handed: usize,
    /// Those subscribers' workers, to hand the publication to.
    elsewhere: WorkerSet,
}

/// Which subscribers a delivery queues frames for itself (see `crate::workers`).
#[derive(Debug, Clone, Copy)]
enum Reach {
    /// Every subscriber: for a publication with few of them, handing it over would cost more
    /// than the cache lines it saves moving.
    Everywhere,
    /// A publication as published, on any thread: those on the `inline` worker (this thread's,
    /// when it may deliver for it) and those on no worker; the others' workers are handed it.
    From { inline: Option<WorkerId> },
    /// A publication handed to a worker, on its thread: that worker's.
    Only(WorkerId),
}

/// What one delivery of a publication hands each subscriber: its frame for each encoding, and
/// the moment it was accepted, made once for them all.
struct Frames<'a> {
    publication: &'a Publication,
    /// None: the publication's own frames, made once and shared by every thread. Some: a
    /// worker's own copies, made on first use: its subscribers' queues and socket writers then
    /// count references on memory no other core writes.
    copies: Option<[Option<Bytes>; Encoding::ALL.len()]>,
    accepted: Moment,
}

impl<'a> Frames<'a> {
    fn shared(publication: &'a Publication) -> Self {
        Frames {
            publication,
            copies: None,
            accepted: Moment::of(publication.published_at),
        }
    }

    fn local(publication: &'a Publication) -> Self {
        Frames {
            copies: Some(Default::default()),
            ..Frames::shared(publication)
        }
    }

    fn get(&mut self, encoding: Encoding, encode: impl FnOnce(&Publication) -> Bytes) -> Bytes {
        let publication = self.publication;
        match &mut self.copies {
            None => publication.frame(encoding, encode),
            Some(copies) => copies[encoding as usize]
                .get_or_insert_with(|| Bytes::copy_from_slice(&publication.frame(encoding, encode)))
                .clone(),
        }
    }
}

/// A connection's subscription to exactly this topic.
struct ExactRoute {
    subscriber: Subscriber,
    join: Join,
}

enum Join {
    /// Replaying history: live publications wait here.
    Replaying(Vec<Arc<Publication>>),
    /// Live. Until a publication after `replayed` passes, those up to it are ones the replay had.
    Live { replayed: Option<StreamPosition> },
}

impl ExactRoute {
    /// Ends the route's replay: it is live from now on, dropping what is at or before `replayed`
    /// until something newer passes. Returns what it held meanwhile.
    fn go_live(&mut self, replayed: Option<StreamPosition>) -> Option<Vec<Arc<Publication>>> {
        let Join::Replaying(held) = &mut self.join else {
            return None;
        };
        let held = std::mem::take(held);
        self.join = Join::Live { replayed };
        Some(held)
    }

    /// Ends the route's replay and queues what it held meanwhile (except what the replay had).
    fn release(&mut self, replayed: Option<StreamPosition>, ns: Ns) {
        if let Some(held) = self.go_live(replayed) {
            for publication in &held {
                self.offer_live(publication, &mut Frames::shared(publication), ns);
            }
        }
    }

    /// Queues a live publication unless the replay had it; whether it was accepted.
    fn offer_live(
        &mut self,
        publication: &Arc<Publication>,
        frames: &mut Frames<'_>,
        ns: Ns,
    ) -> bool {
        match &mut self.join {
            Join::Replaying(held) => {
                held.push(publication.clone());
                true
            }
            Join::Live { replayed } => {
                if let Some(position) = replayed {
                    if publication.is_at_or_before(position) {
                        return false;
                    }
                    // Publications of a topic arrive in seq order: nothing later can be a repeat.
                    *replayed = None;
                }
                self.subscriber.offer_from(frames, ns).accepted()
            }
        }
    }
}

/// A connection's pattern subscription, as cached by every topic it matches.
#[derive(Clone)]
struct PatternRoute {
    subscriber: Subscriber,
    /// Set for a subscription that replayed history (`rewind`).
    join: Option<Arc<PatternJoin>>,
}

/// The join of a pattern subscription's replay (every matching topic's last messages) to its
/// live stream.
struct PatternJoin {
    /// Live publications held while the replay is queued; None once it is done.
    held: Mutex<Option<Vec<Arc<Publication>>>>,
    /// Where each replayed topic's replay ended, set once the held publications are released.
    replayed: OnceLock<HashMap<Arc<str>, StreamPosition>>,
}

enum Admit {
    Offer,
    Held,
    Replayed,
}

impl PatternJoin {
    fn replaying() -> Self {
        PatternJoin {
            held: Mutex::new(Some(Vec::new())),
            replayed: OnceLock::new(),
        }
    }

    /// Whether live publications are still held for the replay.
    fn is_replaying(&self) -> bool {
        self.replayed.get().is_none()
    }

    fn admit(&self, publication: &Arc<Publication>) -> Admit {
        if let Some(replayed) = self.replayed.get() {
            return Self::filter(replayed, publication);
        }
        let mut held = self.held.lock();
        match held.as_mut() {
            Some(held) => {
                held.push(publication.clone());
                Admit::Held
            }
            // Released since the check above, under this lock.
            None => self
                .replayed
                .get()
                .map_or(Admit::Offer, |replayed| Self::filter(replayed, publication)),
        }
    }

    fn filter(replayed: &HashMap<Arc<str>, StreamPosition>, publication: &Publication) -> Admit {
        let repeat = !replayed.is_empty()
            && replayed
                .get(&publication.topic)
                .is_some_and(|position| publication.is_at_or_before(position));
        if repeat {
            Admit::Replayed
        } else {
            Admit::Offer
        }
    }

    /// Ends the replay: releases what was held, in order, except what the replay had. The
    /// publications are queued a batch at a time outside the lock, so publishers of matching
    /// topics are not kept waiting while a long backlog goes out; what they deliver meanwhile is
    /// held and goes out in the next batch.
    fn release(
        &self,
        replayed: HashMap<Arc<str>, StreamPosition>,
        mut offer: impl FnMut(&Arc<Publication>),
    ) {
        loop {
            let mut held = self.held.lock();
            let batch = held.as_mut().map(std::mem::take).unwrap_or_default();
            if batch.is_empty() {
                *held = None;
                // Set under the lock and after the last batch, so that nothing overtakes them.
                let _ = self.replayed.set(replayed);
                return;
            }
            drop(held);
            for publication in &batch {
                if let Admit::Offer = Self::filter(&replayed, publication) {
                    offer(publication);
                }
            }
        }
    }
}

impl Default for TopicState {
    fn default() -> Self {
        TopicState {
            exact: HashMap::new(),
            pattern_matches: (u64::MAX, Arc::from([])),
            last_active: Instant::now(),
        }
    }
}

impl TopicState {
    fn refresh_pattern_matches(
        &mut self,
        name: &str,
        patterns: &PatternIndex<PatternRoute>,
    ) -> Arc<[PatternRoute]> {
        if self.pattern_matches.0 != patterns.generation() {
            let (generation, routes) = patterns.matching(name);
            self.pattern_matches = (generation, one_route_per_connection(routes));
        }
        self.pattern_matches.1.clone()
    }

    /// Queues `publication` for every connection that wants it, once each: exact subscribers
    /// first, then pattern subscribers whose connection has no exact subscription to the topic.
    ///
    /// Only the routes within `reach` are offered the publication; with `Reach::From`, the
    /// others are counted and their workers returned, to be handed it.
    fn deliver(
        &mut self,
        name: &str,
        publication: &Arc<Publication>,
        ns: Ns,
        patterns: &PatternIndex<PatternRoute>,
        reach: Reach,
    ) -> Delivered {
        let mut receivers = 0;
        let mut offered = 0;
        let mut handed = 0;
        let mut elsewhere = WorkerSet::default();
        let mut reached = |subscriber: &Subscriber| {
            if subscriber.reached(reach) {
                offered += 1;
                return true;
            }
            if let (Reach::From { .. }, Some(worker)) = (reach, subscriber.worker) {
                elsewhere.insert(worker);
                handed += 1;
            }
            false
        };
        let mut frames = match reach {
            Reach::Everywhere | Reach::From { .. } => Frames::shared(publication),
            Reach::Only(_) => Frames::local(publication),
        };
        for route in self.exact.values_mut() {
            if reached(&route.subscriber) && route.offer_live(publication, &mut frames, ns) {
                receivers += 1;
            }
        }
        if patterns.len() > 0 {
            let matches = self.refresh_pattern_matches(name, patterns);
            for route in matches
                .iter()
                .filter(|r| !self.exact.contains_key(&r.subscriber.conn.id))
            {
                if !reached(&route.subscriber) {
                    continue;
                }
                let admit = route
                    .join
                    .as_ref()
                    .map_or(Admit::Offer, |j| j.admit(publication));
                let accepted = match admit {
                    Admit::Offer => route.subscriber.offer_from(&mut frames, ns).accepted(),
                    Admit::Held => true,
                    Admit::Replayed => false,
                };
                if accepted {
                    receivers += 1;
                }
            }
        }
        Delivered {
            queued: receivers,
            offered,
            handed,
            elsewhere,
        }
    }

    /// For a connection about to (re)subscribe to exactly this topic: whether it already receives
    /// it (Some), through an exact subscription or a pattern, and if so what that subscription
    /// still drops as repeats of its own replay.
    fn continuing(
        &mut self,
        name: &str,
        id: ConnectionId,
        patterns: &PatternIndex<PatternRoute>,
    ) -> Option<Option<StreamPosition>> {
        if let Some(route) = self.exact.get(&id) {
            return Some(match &route.join {
                Join::Live { replayed } => replayed.clone(),
                Join::Replaying(_) => None,
            });
        }
        let by_pattern = patterns.len() > 0
            && self
                .refresh_pattern_matches(name, patterns)
                .iter()
                .any(|r| r.subscriber.conn.id == id);
        by_pattern.then_some(None)
    }

    /// How many connections would receive a publication now.
    fn receivers(&mut self, name: &str, patterns: &PatternIndex<PatternRoute>) -> usize {
        let mut receivers = self.exact.len();
        if patterns.len() > 0 {
            let matches = self.refresh_pattern_matches(name, patterns);
            receivers += matches
                .iter()
                .filter(|r| !self.exact.contains_key(&r.subscriber.conn.id))
                .count();
        }
        receivers
    }
}

/// Keeps one route per connection, preferring one not replaying: a connection that already
/// receives a topic through a pattern goes on receiving it there without a pause (nothing held,
/// nothing dropped), and a rewind's replay of that topic is an extra copy.
fn one_route_per_connection(mut routes: Vec<(ConnectionId, PatternRoute)>) -> Arc<[PatternRoute]> {
    routes.sort_by_key(|(id, route)| (*id, route.join.as_ref().is_some_and(|j| j.is_replaying())));
    routes.dedup_by_key(|(id, _)| *id);
    routes.into_iter().map(|(_, route)| route).collect()
}

/// An exact route registered by a subscription still waiting on the backend. Dropped before
/// `done`, it takes the route out again: a subscription being changed goes on live as before
/// (in its new mode), a new one is removed.
struct PendingRoute<'a> {
    hub: &'a Hub,
    backend: &'a dyn Backend,
    topic: &'a Arc<HubTopic>,
    id: ConnectionId,
    /// Set when the connection already had an exact subscription to the topic: what its stream
    /// was dropping as repeats of its own replay.
    changed: Option<Option<StreamPosition>>,
    done: bool,
}

impl PendingRoute<'_> {
    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for PendingRoute<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let ns = self.hub.metrics.namespace(&self.topic.name);
        let emptied = self.topic.with(|state| match self.changed.take() {
            Some(inherited) => {
                if let Some(route) = state.exact.get_mut(&self.id) {
                    route.release(inherited, ns);
                }
                false
            }
            None => self.hub.remove_exact(state, self.id) && state.exact.is_empty(),
        });
        if emptied == Some(true) {
            self.hub.reconcile_interest(self.backend, self.topic);
        }
    }
}

/// A pattern route registered by a subscription still waiting on the backend; dropped before
/// `done`, it puts back the route it replaced (or none).
struct PendingPattern<'a> {
    hub: &'a Hub,
    backend: &'a dyn Backend,
    pattern: &'a Arc<str>,
    id: ConnectionId,
    previous: Option<PatternRoute>,
    done: bool,
}

impl PendingPattern<'_> {
    fn done(&mut self) {
        self.done = true;
    }
}

impl Drop for PendingPattern<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.previous.take() {
            Some(previous) => {
                self.hub.patterns.insert(self.pattern, self.id, previous);
            }
            None => self.hub.patterns.remove(self.pattern, self.id),
        }
        self.hub
            .reconcile_pattern_interest(self.backend, self.pattern);
    }
}

impl Hub {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        Hub {
            topics: TopicTable::default(),
            patterns: PatternIndex::default(),
            pattern_interest: Mutex::new(HashSet::new()),
            topic_ttl: config.topic_ttl,
            metrics,
            topics_with_subscribers: AtomicUsize::new(0),
            workers: Workers::default(),
        }
    }

    /// Makes this thread one of the workers publications are handed to (`crate::workers`).
    pub(crate) fn join_worker(hub: &Arc<Hub>) -> Option<WorkerId> {
        hub.workers.join(|| {
            let hub = Arc::downgrade(hub);
            Arc::new(move |worker, batch: &[Arc<Publication>]| {
                let Some(hub) = hub.upgrade() else {
                    return false;
                };
                for publication in batch {
                    hub.deliver_on(worker, publication);
                }
                true
            })
        })
    }

    /// Which subscribers of a publication this thread queues for itself (see `crate::workers`).
    /// Called under the topic's lock.
    fn reach(&self, name: &str, state: &mut TopicState) -> Reach {
        // Nothing handed over before may still be waiting to go out ahead of this publication.
        if state.receivers(name, &self.patterns) <= DIRECT_DELIVERIES && self.workers.all_idle() {
            return Reach::Everywhere;
        }
        let inline = self.workers.here().filter(|w| self.workers.is_idle(*w));
        Reach::From { inline }
    }

    /// Queues a publication handed to `worker` for that worker's subscribers.
    fn deliver_on(&self, worker: WorkerId, publication: &Arc<Publication>) {
        let name = &publication.topic;
        let ns = self.metrics.namespace(name);
        let queued = self.topics.with(
            name,
            || self.patterns.len() > 0,
            |_, state| {
                state
                    .deliver(name, publication, ns, &self.patterns, Reach::Only(worker))
                    .queued
            },
        );
        self.metrics.delivered(ns, queued.unwrap_or(0));
        if publication.fanned_out_on_one() {
            self.metrics.fanned_out(publication.published_at.elapsed());
        }
    }

    /// Starts delivering messages on `subject` to `conn` (or changes how, if it was already
    /// subscribed), after the replay `options` ask for. `acknowledge` runs before any replayed
    /// or live message of the subscription is queued. When the backend cannot be reached the
    /// subscription is not made (or, if it existed, goes on as it was, in its new mode).
    pub(crate) async fn subscribe(
        &self,
        backend: &dyn Backend,
        conn: &Arc<Connection>,
        subject: &Subject,
        options: &SubscribeOptions,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) -> Result<(), Unavailable> {
        let subscriber = Subscriber {
            conn: conn.clone(),
            mode: options.mode,
            worker: conn.worker,
        };
        match subject {
            Subject::Topic(name) => {
                self.subscribe_topic(backend, name, subscriber, &options.replay, acknowledge)
                    .await
            }
            Subject::Pattern(pattern) => {
                let rewind = match options.replay {
                    Replay::Rewind(n) => n,
                    _ => 0,
                };
                self.subscribe_pattern(backend, pattern, subscriber, rewind, acknowledge)
                    .await
            }
        }
    }

    async fn subscribe_topic(
        &self,
        backend: &dyn Backend,
        name: &Arc<str>,
        subscriber: Subscriber,
        replay: &Replay,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) -> Result<(), Unavailable> {
        let id = subscriber.conn.id;
        let route = ExactRoute {
            subscriber: subscriber.clone(),
            join: Join::Replaying(Vec::new()),
        };
        let (topic, continuing, had_exact) = self.topics.with_or_create(name, |topic, state| {
            let continuing = state.continuing(name, id, &self.patterns);
            let had_exact = state.exact.contains_key(&id);
            self.add_exact(state, id, route);
            (topic.clone(), continuing, had_exact)
        });
        self.reconcile_interest(backend, &topic);
        // Undoes the registration if the backend fails us or the subscriber goes away meanwhile.
        let mut pending = PendingRoute {
            hub: self,
            backend,
            topic: &topic,
            id,
            changed: continuing.clone().filter(|_| had_exact),
            done: false,
        };

        let query = match replay {
            Replay::Since { seq, .. } => HistoryQuery::After {
                seq: *seq,
                limit: usize::MAX,
            },
            Replay::Rewind(n) => HistoryQuery::Last(*n),
            Replay::None => HistoryQuery::Last(0),
        };
        let subject = Subject::Topic(name.clone());
        backend.listening(&subject).get().await?;
        let page = backend.history(name, query).get().await?;
        pending.done();
        let recovered = match replay {
            Replay::Since { epoch, seq } => {
                Some(page.as_ref().is_some_and(|p| p.covers_after(epoch, *seq)))
            }
            _ => None,
        };
        acknowledge(&Subscribed {
            stream: page.as_ref().map(|p| p.position.clone()),
            recovered,
        });
        let (position, publications, meter) = match page {
            Some(page) => {
                let same_stream = match replay {
                    Replay::Since { epoch, .. } => **epoch == *page.position.epoch,
                    _ => true,
                };
                // Another stream's seqs (the topic started afresh) mean nothing to the client.
                let publications = if same_stream {
                    page.publications
                } else {
                    Vec::new()
                };
                (Some(page.position), publications, page.frame_meter)
            }
            None => (None, Vec::new(), None),
        };
        let ns = self.metrics.namespace(name);
        let replay_all = |subscriber: &Subscriber| {
            for publication in &publications {
                subscriber.offer_replayed(publication, ns, meter.as_deref());
            }
        };

        // Live from here. (The entry stays in the table while it has this route.)
        let Some(inherited) = continuing else {
            // A new stream for this connection: the replay, then what arrived meanwhile, except
            // what the replay had or what came before the position the ack named.
            replay_all(&subscriber);
            topic.with(|state| {
                if let Some(route) = state.exact.get_mut(&id) {
                    route.release(position.clone(), ns);
                }
            });
            return Ok(());
        };
        // The connection already received the topic (a subscription being changed, or through a
        // pattern): its stream goes on uninterrupted, with nothing dropped, and the replay asked
        // for comes where the stream was when history was read. What was handed to the
        // connection's worker before that is delivered first, so that the route holds it now.
        if let Some(worker) = subscriber.worker {
            self.workers.help(worker);
        }
        topic.with(|state| {
            let Some(route) = state.exact.get_mut(&id) else {
                return;
            };
            let Some(held) = route.go_live(inherited) else {
                return;
            };
            let (before, after): (Vec<_>, Vec<_>) = held.into_iter().partition(|p| {
                position
                    .as_ref()
                    .is_some_and(|position| p.is_at_or_before(position))
            });
            for publication in &before {
                route.offer_live(publication, &mut Frames::shared(publication), ns);
            }
            replay_all(&route.subscriber);
            for publication in &after {
                route.offer_live(publication, &mut Frames::shared(publication), ns);
            }
        });
        Ok(())
    }

    /// A pattern subscription. Its live messages are held until the backend listens and the
    /// acknowledgement is queued; with a rewind, every matching topic with history replays its
    /// last `rewind` messages before its live ones.
    async fn subscribe_pattern(
        &self,
        backend: &dyn Backend,
        pattern: &Arc<str>,
        subscriber: Subscriber,
        rewind: usize,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) -> Result<(), Unavailable> {
        let id = subscriber.conn.id;
        let join = Arc::new(PatternJoin::replaying());
        let route = PatternRoute {
            subscriber: subscriber.clone(),
            join: Some(join.clone()),
        };
        // A subscription being changed: its old route, to put back if this one fails.
        let previous = self.patterns.insert(pattern, id, route);
        self.reconcile_pattern_interest(backend, pattern);
        let mut pending = PendingPattern {
            hub: self,
            backend,
            pattern,
            id,
            previous,
            done: false,
        };
        let subject = Subject::Pattern(pattern.clone());
        backend.listening(&subject).get().await?;
        let mut pages = Vec::new();
        if rewind > 0 {
            let filter = StreamFilter::Matching(pattern.clone());
            for stream in backend.streams(filter).get().await? {
                if stream.history == 0 {
                    continue;
                }
                if let Some(page) = backend
                    .history(&stream.name, HistoryQuery::Last(rewind))
                    .get()
                    .await?
                {
                    pages.push((stream.name, page));
                }
            }
        }
        pending.done();
        acknowledge(&Subscribed::default());

        let mut replayed = HashMap::new();
        for (name, page) in pages {
            let ns = self.metrics.namespace(&name);
            for publication in &page.publications {
                subscriber.offer_replayed(publication, ns, page.frame_meter.as_deref());
            }
            replayed.insert(name, page.position);
        }
        join.release(replayed, |publication| {
            let ns = self.metrics.namespace(&publication.topic);
            subscriber.offer(publication, ns);
        });
        Ok(())
    }

    /// Stops delivering messages on `subject` to `conn`; unknown subscriptions are ignored.
    pub(crate) fn unsubscribe(&self, backend: &dyn Backend, conn: ConnectionId, subject: &Subject) {
        match subject {
            Subject::Topic(name) => {
                let Some(topic) = self.topics.get(name) else {
                    return;
                };
                let emptied = topic.with(|state| {
                    let removed = self.remove_exact(state, conn);
                    state.last_active = Instant::now();
                    removed && state.exact.is_empty()
                });
                if emptied == Some(true) {
                    self.reconcile_interest(backend, &topic);
                }
            }
            Subject::Pattern(pattern) => {
                self.patterns.remove(pattern, conn);
                self.reconcile_pattern_interest(backend, pattern);
            }
        }
    }

    /// Adds or replaces an exact route, keeping the count of topics with subscribers.
    fn add_exact(&self, state: &mut TopicState, id: ConnectionId, route: ExactRoute) {
        state.last_active = Instant::now();
        if state.exact.insert(id, route).is_none() && state.exact.len() == 1 {
            self.topics_with_subscribers.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove_exact(&self, state: &mut TopicState, id: ConnectionId) -> bool {
        let removed = state.exact.remove(&id).is_some();
        if removed && state.exact.is_empty() {
            self.topics_with_subscribers.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Tells the backend whether this node wants the topic, if that changed. Whoever calls this
    /// last after a change tells the backend the latest state, so concurrent subscribes and
    /// unsubscribes cannot leave it with a stale one.
    fn reconcile_interest(&self, backend: &dyn Backend, topic: &HubTopic) {
        let mut told = topic.extra.0.lock();
        // An entry that left the table has no subscriber.
        let wanted = topic.with(|state| !state.exact.is_empty()) == Some(true);
        if wanted != *told {
            backend.interest(&Subject::Topic(topic.name.clone()), wanted);
            *told = wanted;
        }
    }

    fn reconcile_pattern_interest(&self, backend: &dyn Backend, pattern: &Arc<str>) {
        let mut told = self.pattern_interest.lock();
        let wanted = self.patterns.contains(pattern);
        if wanted != told.contains(pattern) {
            backend.interest(&Subject::Pattern(pattern.clone()), wanted);
            if wanted {
                told.insert(pattern.clone());
            } else {
                told.remove(pattern);
            }
        }
    }

    /// How many connections on this node a publication on `topic` would reach now.
    pub(crate) fn receivers(&self, topic: &str) -> usize {
        self.topics
            .with(
                topic,
                || false,
                |_, state| state.receivers(topic, &self.patterns),
            )
            .unwrap_or_else(|| {
                if self.patterns.len() == 0 {
                    return 0;
                }
                one_route_per_connection(self.patterns.matching(topic).1).len()
            })
    }

    pub(crate) fn stats(&self) -> HubStats {
        HubStats {
            topics: self.topics_with_subscribers.load(Ordering::Relaxed),
            patterns: self.patterns.len(),
        }
    }

    /// Forgets topic entries that have no exact subscriber and saw nothing for the topic ttl.
    pub(crate) fn sweep(&self, now: Instant) {
        self.topics.remove_idle(|topic, state| {
            state.exact.is_empty()
                && now.saturating_duration_since(state.last_active) >= self.topic_ttl
                // Never while the backend may still be told this node wants the topic.
                && topic.extra.0.try_lock().is_some_and(|told| !*told)
        });
    }
}

impl DeliverySink for Hub {
    fn wants(&self, topic: &str) -> bool {
        self.receivers(topic) > 0
    }

    fn deliver(&self, publication: &Arc<Publication>) -> usize {
        let name = &publication.topic;
        let ns = self.metrics.namespace(name);
        // A topic without an entry has no exact subscriber; with no pattern either, there is
        // no one to deliver to.
        let (delivered, backlogged) = self
            .topics
            .with(
                name,
                || self.patterns.len() > 0,
                |_, state| {
                    state.last_active = publication.published_at;
                    let reach = self.reach(name, state);
                    let mut delivered = state.deliver(name, publication, ns, &self.patterns, reach);
                    let mut backlogged = WorkerSet::default();
                    if !delivered.elsewhere.is_empty() {
                        // Each worker handed it counts down, and so does this thread.
                        publication.fan_out_on(delivered.elsewhere.len() + 1);
                    }
                    // Under the topic's lock, so each worker gets the topic's publications in order.
                    for worker in delivered.elsewhere.iter() {
                        match self.workers.hand_over(worker, publication) {
                            Handed::Queued => {}
                            Handed::Backlog => backlogged.insert(worker),
                            Handed::Stopped => {
                                let reach = Reach::Only(worker);
                                let here =
                                    state.deliver(name, publication, ns, &self.patterns, reach);
                                delivered.queued += here.queued;
                                delivered.handed -= here.offered;
                                publication.fanned_out_on_one();
                            }
                        }
                    }
                    (delivered, backlogged)
                },
            )
            .unwrap_or_default();
        for worker in backlogged.iter() {
            self.workers.help(worker);
        }
        self.metrics.delivered(ns, delivered.queued);
        if delivered.elsewhere.is_empty() || publication.fanned_out_on_one() {
            self.metrics.fanned_out(publication.published_at.elapsed());
        }
        // What was handed over is counted as queued: the worker queues it without asking back.
        delivered.queued + delivered.handed
    }
}
