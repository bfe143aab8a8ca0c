//! The in-memory engine: topics in a concurrent map, each with its sequence, epoch, history and
//! subscribers behind its own lock, plus the pattern index.
//!
//! A topic's lock is held while its next sequence number is assigned, the message is queued for
//! every subscriber and retained in history, so each subscriber sees a topic's messages in
//! sequence order. A subscription that asks for history is registered and served its replay
//! under the same lock, so nothing falls between the replay and the live messages and nothing
//! comes twice. Different topics never contend; there is no global lock on the publish path.
//! Queuing never waits: a slow subscriber's queue drops, conflates or closes (see
//! [`crate::queue`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::config::Config;
use crate::connection::{Connection, ConnectionId};
use crate::data::Data;
use crate::engine::{
    DeliveryMode, Engine, EngineStats, HistoryPage, Published, Replay, SubscribeOptions,
    Subscribed, TopicInfo,
};
use crate::frame::{self, Encoding};
use crate::history::{HistoryIndex, HistoryOwner, TopicHistory};
use crate::metrics::{Metrics, Ns, Source};
use crate::patterns::PatternIndex;
use crate::queue::Push;
use crate::topic::{self, Subject};

pub(crate) struct TopicRegistry {
    topics: DashMap<Arc<str>, Arc<Topic>>,
    patterns: PatternIndex,
    history: HistoryIndex<Topic>,
    /// How long a topic with no subscribers and no history keeps its sequence and epoch.
    topic_ttl: Duration,
    metrics: Arc<Metrics>,
    topics_with_subscribers: AtomicUsize,
}

pub(crate) struct Topic {
    name: Arc<str>,
    state: Mutex<TopicState>,
}

/// A connection's subscription as the fan-out sees it.
#[derive(Clone)]
pub(crate) struct Subscriber {
    pub conn: Arc<Connection>,
    pub mode: DeliveryMode,
    /// Stands in for a pattern subscription while it is being set up with a rewind.
    bridge: bool,
}

impl Subscriber {
    pub(crate) fn new(conn: Arc<Connection>, mode: DeliveryMode) -> Self {
        Subscriber {
            conn,
            mode,
            bridge: false,
        }
    }

    /// Offers a message's frame to the subscriber's connection.
    fn offer(&self, frame: Bytes, topic: &Arc<str>, ns: Ns, now: Instant) -> Push {
        match self.mode {
            DeliveryMode::All => self.conn.queue.push_message(frame, ns, now),
            DeliveryMode::Latest { min_interval } => {
                self.conn
                    .queue
                    .push_latest(frame, topic, ns, now, min_interval)
            }
        }
    }
}

struct TopicState {
    seq: u64,
    /// Identifies this stream of sequence numbers: a new one whenever the topic starts afresh.
    epoch: Arc<str>,
    subscribers: HashMap<ConnectionId, Subscriber>,
    /// How many of `subscribers` are bridges.
    bridges: usize,
    /// Subscribers with a matching pattern, as of a pattern-index generation.
    pattern_matches: (u64, Arc<[Subscriber]>),
    history: TopicHistory,
    /// The last publish or unsubscribe.
    last_active: Instant,
    /// Set when the topic left the map; whoever still holds it must look it up again.
    removed: bool,
}

/// A message on its way to subscribers, encoded at most once per encoding.
pub(crate) struct Publication {
    topic: Arc<str>,
    seq: u64,
    data: Data,
    published_at: Instant,
    frames: [OnceLock<Bytes>; 2],
    /// Bytes counted in the history's total while the message is retained; 0 otherwise.
    counted: AtomicUsize,
}

impl Publication {
    fn new(topic: Arc<str>, seq: u64, data: Data, published_at: Instant) -> Self {
        Publication {
            topic,
            seq,
            data,
            published_at,
            frames: Default::default(),
            counted: AtomicUsize::new(0),
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn published_at(&self) -> Instant {
        self.published_at
    }

    fn slot(&self, encoding: Encoding) -> &OnceLock<Bytes> {
        match encoding {
            Encoding::Json => &self.frames[0],
            Encoding::Msgpack => &self.frames[1],
        }
    }

    /// The complete WebSocket frame for `encoding`, shared by every subscriber using it.
    fn frame(&self, encoding: Encoding) -> Bytes {
        self.slot(encoding)
            .get_or_init(|| frame::encode_message(encoding, &self.topic, self.seq, &self.data))
            .clone()
    }

    /// The frame, and how many bytes encoding it now added to a retained message's count.
    pub(crate) fn frame_counted(&self, encoding: Encoding) -> (Bytes, usize) {
        let existed = self.slot(encoding).get().is_some();
        let frame = self.frame(encoding);
        let retained = self.counted.load(Ordering::Relaxed) > 0;
        let added = if !existed && retained { frame.len() } else { 0 };
        self.counted.fetch_add(added, Ordering::Relaxed);
        (frame, added)
    }

    /// Marks the message retained; returns the bytes it counts for (data, frames, bookkeeping).
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
    pub(crate) fn retire_from_history(&self) -> usize {
        self.counted.swap(0, Ordering::Relaxed)
    }
}

impl HistoryOwner for Topic {
    fn with_history<R>(&self, f: impl FnOnce(&mut TopicHistory) -> R) -> Option<R> {
        let mut state = self.state.lock();
        (!state.removed).then(|| f(&mut state.history))
    }
}

fn new_epoch() -> Arc<str> {
    format!("{:016x}", fastrand::u64(..)).into()
}

impl TopicState {
    fn new() -> Self {
        TopicState {
            seq: 0,
            epoch: new_epoch(),
            subscribers: HashMap::new(),
            bridges: 0,
            pattern_matches: (u64::MAX, Arc::from([])),
            history: TopicHistory::default(),
            last_active: Instant::now(),
            removed: false,
        }
    }

    fn exact_subscribers(&self) -> usize {
        self.subscribers.len() - self.bridges
    }

    fn refresh_pattern_matches(
        &mut self,
        name: &str,
        patterns: &PatternIndex,
    ) -> Arc<[Subscriber]> {
        if self.pattern_matches.0 != patterns.generation() {
            self.pattern_matches = patterns.matching(name);
        }
        self.pattern_matches.1.clone()
    }

    /// Subscribers that receive this topic's messages, one per connection: exact subscribers
    /// (and bridges) first, then pattern subscribers whose connection has neither.
    fn for_each_receiver(
        &mut self,
        name: &str,
        patterns: &PatternIndex,
        mut f: impl FnMut(&Subscriber),
    ) {
        for subscriber in self.subscribers.values() {
            f(subscriber);
        }
        if patterns.len() > 0 {
            let matches = self.refresh_pattern_matches(name, patterns);
            for subscriber in matches
                .iter()
                .filter(|s| !self.subscribers.contains_key(&s.conn.id))
            {
                f(subscriber);
            }
        }
    }

    /// Marks the topic removed if nothing needs it any more.
    fn retire(&mut self, now: Instant, ttl: Duration) -> bool {
        let idle = now.saturating_duration_since(self.last_active) >= ttl;
        if !self.removed && self.subscribers.is_empty() && self.history.is_empty() && idle {
            self.removed = true;
        }
        self.removed
    }
}

impl TopicRegistry {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        TopicRegistry {
            topics: DashMap::new(),
            patterns: PatternIndex::default(),
            history: HistoryIndex::new(
                if config.history_enabled() {
                    config.history_size
                } else {
                    0
                },
                config.history_ttl,
                config.history_max_bytes,
                metrics.clone(),
            ),
            topic_ttl: config.topic_ttl,
            metrics,
            topics_with_subscribers: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on the topic's state under its lock, creating the topic if needed.
    fn with_topic<R>(&self, name: &str, f: impl FnOnce(&Arc<Topic>, &mut TopicState) -> R) -> R {
        loop {
            let topic = match self.topics.get(name) {
                Some(topic) => topic.clone(),
                None => {
                    let name: Arc<str> = name.into();
                    let topic = self.topics.entry(name.clone()).or_insert_with(|| {
                        Arc::new(Topic {
                            name,
                            state: Mutex::new(TopicState::new()),
                        })
                    });
                    topic.clone()
                }
            };
            let mut state = topic.state.lock();
            if !state.removed {
                return f(&topic, &mut state);
            }
        }
    }

    /// Removes the topic from the map if nothing needs it any more.
    fn try_remove(&self, name: &str, now: Instant) {
        self.topics.remove_if(name, |_, topic| {
            topic.state.lock().retire(now, self.topic_ttl)
        });
    }

    /// Adds or updates an exact subscription, keeping the count of topics with subscribers.
    fn add_subscriber(&self, state: &mut TopicState, subscriber: Subscriber) {
        let before = state.exact_subscribers();
        if subscriber.bridge {
            state.bridges += 1;
        }
        if let Some(replaced) = state.subscribers.insert(subscriber.conn.id, subscriber)
            && replaced.bridge
        {
            state.bridges -= 1;
        }
        if before == 0 && state.exact_subscribers() > 0 {
            self.topics_with_subscribers.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove_subscriber(&self, state: &mut TopicState, conn: ConnectionId) {
        let before = state.exact_subscribers();
        if let Some(removed) = state.subscribers.remove(&conn)
            && removed.bridge
        {
            state.bridges -= 1;
        }
        if before > 0 && state.exact_subscribers() == 0 {
            self.topics_with_subscribers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Queues retained messages for `subscriber` (under the topic's lock).
    fn replay<'a>(
        &self,
        subscriber: &Subscriber,
        topic: &Arc<str>,
        messages: impl Iterator<Item = &'a Arc<Publication>>,
    ) {
        let ns = self.metrics.namespace(topic);
        let now = Instant::now();
        for publication in messages {
            let frame = self.history.frame(publication, subscriber.conn.encoding);
            subscriber.offer(frame, topic, ns, now);
        }
    }

    fn subscribe_topic(
        &self,
        name: &str,
        subscriber: Subscriber,
        replay: &Replay,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) {
        self.with_topic(name, |topic, state| {
            self.history.expire(&mut state.history, Instant::now());
            self.add_subscriber(state, subscriber.clone());
            let recovered = match replay {
                Replay::Since { epoch, seq } => Some(
                    // Same stream, and nothing after `seq` has been evicted.
                    **epoch == *state.epoch
                        && *seq <= state.seq
                        && (*seq == state.seq
                            || state
                                .history
                                .oldest_seq()
                                .is_some_and(|oldest| oldest <= seq + 1)),
                ),
                _ => None,
            };
            acknowledge(&Subscribed {
                stream: Some((state.epoch.clone(), state.seq)),
                recovered,
            });
            match replay {
                Replay::Rewind(n) => self.replay(&subscriber, &topic.name, state.history.last(*n)),
                Replay::Since { epoch, seq } if **epoch == *state.epoch => {
                    self.replay(&subscriber, &topic.name, state.history.after(*seq))
                }
                // Another stream (the topic started afresh): its seqs mean nothing to the client.
                Replay::Since { .. } | Replay::None => {}
            }
        });
    }

    /// A pattern subscription with a rewind: every matching topic with history replays its last
    /// `n` messages before its live ones. Until the pattern is in the index, a bridge (an exact
    /// entry) carries each such topic's messages; both may deliver for a moment, and the fan-out
    /// sends each message to a connection once.
    fn subscribe_pattern_with_rewind(&self, pattern: &str, subscriber: Subscriber, n: usize) {
        let matching: Vec<Arc<Topic>> = self
            .topics
            .iter()
            .filter(|t| topic::matches(pattern, t.key()))
            .map(|t| t.value().clone())
            .collect();
        let mut bridged = Vec::new();
        for topic in matching {
            let mut state = topic.state.lock();
            self.history.expire(&mut state.history, Instant::now());
            if state.removed || state.history.is_empty() {
                continue;
            }
            if !state.subscribers.contains_key(&subscriber.conn.id) {
                self.add_subscriber(
                    &mut state,
                    Subscriber {
                        bridge: true,
                        ..subscriber.clone()
                    },
                );
                bridged.push(topic.clone());
            }
            self.replay(&subscriber, &topic.name, state.history.last(n));
        }
        let conn = subscriber.conn.id;
        self.patterns.insert(pattern, subscriber);
        for topic in bridged {
            let mut state = topic.state.lock();
            if state.subscribers.get(&conn).is_some_and(|s| s.bridge) {
                self.remove_subscriber(&mut state, conn);
            }
        }
    }
}

impl Engine for TopicRegistry {
    fn publish(&self, topic: &str, data: Data, source: Source) -> Published {
        let accepted = Instant::now();
        let ns = self.metrics.namespace(topic);
        let published = self.with_topic(topic, |t, state| {
            state.seq += 1;
            state.last_active = accepted;
            let publication = Arc::new(Publication::new(t.name.clone(), state.seq, data, accepted));
            let mut receivers = 0;
            state.for_each_receiver(&t.name, &self.patterns, |subscriber| {
                let frame = publication.frame(subscriber.conn.encoding);
                if subscriber.offer(frame, &t.name, ns, accepted).accepted() {
                    receivers += 1;
                }
            });
            self.history.retain(
                &mut state.history,
                publication,
                &Arc::downgrade(t),
                accepted,
            );
            Published {
                seq: state.seq,
                receivers,
            }
        });
        self.history.enforce_cap();
        self.metrics
            .published(ns, source, accepted.elapsed(), published.receivers);
        published
    }

    fn subscribe(
        &self,
        conn: &Arc<Connection>,
        subject: &Subject,
        options: &SubscribeOptions,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) {
        let subscriber = Subscriber::new(conn.clone(), options.mode);
        match subject {
            Subject::Topic(name) => {
                self.subscribe_topic(name, subscriber, &options.replay, acknowledge)
            }
            Subject::Pattern(pattern) => {
                acknowledge(&Subscribed::default());
                match options.replay {
                    Replay::Rewind(n) if n > 0 && self.history.enabled() => {
                        self.subscribe_pattern_with_rewind(pattern, subscriber, n)
                    }
                    _ => self.patterns.insert(pattern, subscriber),
                }
            }
        }
    }

    fn unsubscribe(&self, conn: &Connection, subject: &Subject) {
        match subject {
            Subject::Topic(name) => {
                let Some(topic) = self.topics.get(&**name).map(|t| t.clone()) else {
                    return;
                };
                let mut state = topic.state.lock();
                self.remove_subscriber(&mut state, conn.id);
                state.last_active = Instant::now();
            }
            Subject::Pattern(pattern) => self.patterns.remove(pattern, conn.id),
        }
    }

    fn history(&self, topic: &str, since: u64, limit: usize) -> Option<HistoryPage> {
        let topic = self.topics.get(topic).map(|t| t.clone())?;
        let mut state = topic.state.lock();
        if state.removed {
            return None;
        }
        self.history.expire(&mut state.history, Instant::now());
        Some(HistoryPage {
            epoch: state.epoch.clone(),
            seq: state.seq,
            oldest: state.history.oldest_seq(),
            messages: state
                .history
                .after(since)
                .take(limit)
                .map(|p| (p.seq, p.data.clone()))
                .collect(),
        })
    }

    fn topics(&self) -> Vec<TopicInfo> {
        let topics: Vec<Arc<Topic>> = self.topics.iter().map(|t| t.value().clone()).collect();
        let mut infos: Vec<TopicInfo> = topics
            .iter()
            .filter_map(|topic| {
                let mut state = topic.state.lock();
                let mut subscribers = 0;
                state.for_each_receiver(&topic.name, &self.patterns, |_| subscribers += 1);
                let listed = !state.removed && (subscribers > 0 || state.seq > 0);
                listed.then(|| TopicInfo {
                    name: topic.name.clone(),
                    subscribers,
                    seq: state.seq,
                    epoch: state.epoch.clone(),
                    history: state.history.len(),
                })
            })
            .collect();
        infos.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn sweep(&self, now: Instant) {
        self.history.sweep(now);
        let idle: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|t| {
                let state = t.state.lock();
                state.subscribers.is_empty()
                    && state.history.is_empty()
                    && now.saturating_duration_since(state.last_active) >= self.topic_ttl
            })
            .map(|t| t.key().clone())
            .collect();
        for name in idle {
            self.try_remove(&name, now);
        }
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            topics_with_subscribers: self.topics_with_subscribers.load(Ordering::Relaxed),
            patterns: self.patterns.len(),
            history_messages: self.history.messages(),
            history_bytes: self.history.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::frame::decode_for_test;
    use crate::queue::OutboundQueue;
    use serde_json::{Value, json};

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&[], 1 << 20, std::sync::Weak::new()))
    }

    fn conn(encoding: Encoding) -> Arc<Connection> {
        Arc::new(Connection::new(
            None,
            encoding,
            OutboundQueue::new(1 << 20, SlowConsumerPolicy::DropOldest, metrics()),
            None,
        ))
    }

    fn registry_with(adjust: impl FnOnce(&mut Config)) -> TopicRegistry {
        let mut config = Config::default();
        adjust(&mut config);
        TopicRegistry::new(&config, metrics())
    }

    fn registry() -> TopicRegistry {
        registry_with(|_| {})
    }

    fn json(s: &str) -> Data {
        Data::Json(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Frames waiting for the connection, decoded.
    fn received(conn: &Connection) -> Vec<Value> {
        conn.queue
            .drain_ready()
            .iter()
            .map(decode_for_test)
            .collect()
    }

    fn seqs(frames: &[Value]) -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f["op"] == "message")
            .map(|f| f["seq"].as_u64().unwrap())
            .collect()
    }

    /// Subscribes; returns what the acknowledgement reported.
    fn subscribe(
        registry: &TopicRegistry,
        conn: &Arc<Connection>,
        subject: &str,
        options: SubscribeOptions,
    ) -> Subscribed {
        let mut ack = None;
        registry.subscribe(
            conn,
            &Subject::parse(subject).unwrap(),
            &options,
            &mut |s| ack = Some(s.clone()),
        );
        ack.expect("acknowledged")
    }

    fn since(epoch: &str, seq: u64) -> SubscribeOptions {
        SubscribeOptions {
            replay: Replay::Since {
                epoch: epoch.into(),
                seq,
            },
            ..Default::default()
        }
    }

    fn rewind(n: usize) -> SubscribeOptions {
        SubscribeOptions {
            replay: Replay::Rewind(n),
            ..Default::default()
        }
    }

    #[test]
    fn sequences_count_per_topic_and_receivers_are_counted_once() {
        let registry = registry();
        let (a, b) = (conn(Encoding::Json), conn(Encoding::Msgpack));
        subscribe(&registry, &a, "x.y", SubscribeOptions::default());
        subscribe(&registry, &a, "x.*", SubscribeOptions::default());
        subscribe(&registry, &b, "x.>", SubscribeOptions::default());
        assert_eq!(
            registry.publish("x.y", json("1"), Source::Http),
            Published {
                seq: 1,
                receivers: 2
            }
        );
        assert_eq!(
            registry.publish("x.y", json("2"), Source::Http),
            Published {
                seq: 2,
                receivers: 2
            }
        );
        assert_eq!(
            registry.publish("x.z", json("3"), Source::Http),
            Published {
                seq: 1,
                receivers: 2
            }
        );
        assert_eq!(
            registry.publish("q", json("4"), Source::Ws),
            Published {
                seq: 1,
                receivers: 0
            }
        );
        assert_eq!(seqs(&received(&a)), vec![1, 2, 1]);
        assert_eq!(seqs(&received(&b)), vec![1, 2, 1]);
        let names: Vec<_> = registry
            .topics()
            .iter()
            .map(|t| (t.name.to_string(), t.subscribers, t.seq))
            .collect();
        assert_eq!(
            names,
            vec![
                ("q".into(), 0, 1),
                ("x.y".into(), 2, 2),
                ("x.z".into(), 2, 1)
            ]
        );
        let stats = registry.stats();
        assert_eq!(
            (
                stats.topics_with_subscribers,
                stats.patterns,
                stats.history_messages
            ),
            (1, 2, 4)
        );
    }

    #[test]
    fn idle_topics_are_forgotten_and_restart_with_a_new_epoch() {
        let registry = registry_with(|c| c.history_size = 0);
        let a = conn(Encoding::Json);
        let first = subscribe(&registry, &a, "t", SubscribeOptions::default());
        registry.publish("t", json("1"), Source::Ws);
        registry.unsubscribe(&a, &Subject::parse("t").unwrap());
        registry.sweep(Instant::now());
        assert_eq!(
            registry.topics().len(),
            1,
            "keeps its sequence for the topic ttl"
        );
        registry.sweep(Instant::now() + Duration::from_secs(301));
        assert!(registry.topics().is_empty());
        assert_eq!(registry.publish("t", json("1"), Source::Ws).seq, 1);
        let again = subscribe(&registry, &a, "t", SubscribeOptions::default());
        assert_ne!(
            first.stream.unwrap().0,
            again.stream.unwrap().0,
            "a new stream, a new epoch"
        );
    }

    #[test]
    fn history_keeps_the_last_n_messages() {
        let registry = registry_with(|c| c.history_size = 3);
        for i in 1..=5 {
            registry.publish("t", json(&i.to_string()), Source::Http);
        }
        let page = registry.history("t", 0, 100).unwrap();
        assert_eq!((page.seq, page.oldest), (5, Some(3)));
        assert_eq!(
            page.messages.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let page = registry.history("t", 3, 1).unwrap();
        assert_eq!(page.messages, vec![(4, json("4"))]);
        assert!(registry.history("nope", 0, 10).is_none());
    }

    #[test]
    fn history_expires_after_its_ttl() {
        let registry = registry_with(|c| c.history_ttl = Duration::from_millis(50));
        registry.publish("t", json("1"), Source::Http);
        assert_eq!(registry.stats().history_messages, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            registry.history("t", 0, 10).unwrap().messages.is_empty(),
            "readers never see expired messages"
        );
        registry.sweep(Instant::now());
        assert_eq!(
            (
                registry.stats().history_messages,
                registry.stats().history_bytes
            ),
            (0, 0)
        );
    }

    #[test]
    fn the_global_cap_evicts_the_oldest_messages_of_all_topics_first() {
        let data = format!("\"{}\"", "x".repeat(98));
        let publish_all = |registry: &TopicRegistry, topics: &[&str]| {
            let a = conn(Encoding::Json);
            subscribe(registry, &a, ">", SubscribeOptions::default());
            for topic in topics {
                registry.publish(topic, json(&data), Source::Http);
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        // What one retained message counts for: its data, its encoded frame, bookkeeping.
        let probe = registry();
        publish_all(&probe, &["one"]);
        let each = probe.stats().history_bytes;
        assert!(each > data.len(), "{each}");

        let cap = each * 7 / 2;
        let registry = registry_with(|c| c.history_max_bytes = cap);
        publish_all(&registry, &["old", "mid", "new", "old", "new"]);
        let held = |t: &str| {
            registry
                .history(t, 0, 100)
                .unwrap()
                .messages
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
        };
        // Publish order: old#1, mid#1, new#1, old#2, new#2; three fit, the two oldest went.
        assert_eq!(held("old"), vec![2]);
        assert_eq!(held("mid"), Vec::<u64>::new());
        assert_eq!(held("new"), vec![1, 2]);
        assert_eq!(
            (
                registry.stats().history_messages,
                registry.stats().history_bytes
            ),
            (3, 3 * each)
        );
    }

    #[test]
    fn recovery_replays_what_was_missed_after_the_ack() {
        let registry = registry();
        let a = conn(Encoding::Json);
        let ack = subscribe(&registry, &a, "t", SubscribeOptions::default());
        let (epoch, seq) = ack.stream.unwrap();
        assert_eq!(seq, 0);
        for i in 1..=5 {
            registry.publish("t", json(&i.to_string()), Source::Http);
        }
        registry.unsubscribe(&a, &Subject::parse("t").unwrap());
        let _ = received(&a);
        for i in 6..=8 {
            registry.publish("t", json(&i.to_string()), Source::Http);
        }

        let b = conn(Encoding::Msgpack);
        let ack = subscribe(&registry, &b, "t", since(&epoch, 5));
        assert_eq!((ack.stream.unwrap().1, ack.recovered), (8, Some(true)));
        registry.publish("t", json("9"), Source::Http);
        assert_eq!(
            seqs(&received(&b)),
            vec![6, 7, 8, 9],
            "replay, then live, nothing twice"
        );

        let c = conn(Encoding::Json);
        assert_eq!(
            subscribe(&registry, &c, "t", since(&epoch, 9)).recovered,
            Some(true),
            "up to date"
        );
        assert!(received(&c).is_empty());
        assert_eq!(
            subscribe(&registry, &c, "t", since("another", 3)).recovered,
            Some(false),
            "epoch changed"
        );
        assert!(
            received(&c).is_empty(),
            "another stream's seqs mean nothing"
        );
        assert_eq!(
            subscribe(&registry, &c, "t", since(&epoch, 99)).recovered,
            Some(false),
            "from the future"
        );
    }

    #[test]
    fn recovery_past_what_history_holds_is_partial() {
        let registry = registry_with(|c| c.history_size = 2);
        let a = conn(Encoding::Json);
        let (epoch, _) = subscribe(&registry, &a, "t", SubscribeOptions::default())
            .stream
            .unwrap();
        for i in 1..=5 {
            registry.publish("t", json(&i.to_string()), Source::Http);
        }
        let b = conn(Encoding::Json);
        let ack = subscribe(&registry, &b, "t", since(&epoch, 1));
        assert_eq!(ack.recovered, Some(false));
        assert_eq!(seqs(&received(&b)), vec![4, 5], "what history still holds");
        let c = conn(Encoding::Json);
        assert_eq!(
            subscribe(&registry, &c, "t", since(&epoch, 3)).recovered,
            Some(true)
        );
        assert_eq!(seqs(&received(&c)), vec![4, 5]);
    }

    #[test]
    fn rewind_replays_the_last_messages_of_a_topic_or_of_every_matching_topic() {
        let registry = registry();
        for (topic, n) in [("metrics.cpu", 3), ("metrics.mem", 2), ("other", 2)] {
            for i in 1..=n {
                registry.publish(topic, json(&i.to_string()), Source::Http);
            }
        }
        let a = conn(Encoding::Json);
        subscribe(&registry, &a, "metrics.cpu", rewind(2));
        assert_eq!(seqs(&received(&a)), vec![2, 3]);

        let dash = conn(Encoding::Json);
        let ack = subscribe(&registry, &dash, "metrics.*", rewind(1));
        assert_eq!(ack, Subscribed::default(), "a pattern's ack has no stream");
        let mut last: Vec<(String, u64)> = received(&dash)
            .iter()
            .map(|f| {
                (
                    f["topic"].as_str().unwrap().to_owned(),
                    f["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        last.sort();
        assert_eq!(
            last,
            vec![("metrics.cpu".into(), 3), ("metrics.mem".into(), 2)]
        );
        // The bridges are gone, the pattern delivers, and only once.
        registry.publish("metrics.cpu", json("4"), Source::Http);
        assert_eq!(seqs(&received(&dash)), vec![4]);
        assert_eq!(
            registry.stats().topics_with_subscribers,
            1,
            "bridges are not subscribers"
        );
    }

    #[test]
    fn latest_mode_delivers_the_freshest_value() {
        let registry = registry();
        let dash = conn(Encoding::Json);
        let latest = SubscribeOptions {
            mode: DeliveryMode::Latest { min_interval: None },
            ..Default::default()
        };
        subscribe(&registry, &dash, "gauge", latest);
        for i in 1..=100 {
            registry.publish("gauge", json(&i.to_string()), Source::Http);
        }
        let frames = received(&dash);
        assert_eq!(
            frames.len(),
            1,
            "one frame waited; each newer value replaced it"
        );
        assert_eq!(
            frames[0],
            json!({"op": "message", "topic": "gauge", "seq": 100, "data": 100})
        );
        assert_eq!(dash.queue.stats().conflated(), 99);
    }
}
