//! The in-memory engine: topics in a concurrent map, each with its sequence number and its
//! subscribers behind its own lock, plus the pattern index.
//!
//! A topic's lock is held while its next sequence number is assigned and the message is queued
//! for every subscriber, so each subscriber sees a topic's messages in sequence order. Different
//! topics never contend; there is no global lock on the publish path. Queuing never waits: a
//! slow subscriber's queue drops or closes (see [`crate::queue`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::connection::{Connection, ConnectionId};
use crate::data::Data;
use crate::engine::{Engine, EngineStats, Published, TopicInfo};
use crate::frame::{self, Encoding};
use crate::metrics::{Metrics, Source};
use crate::patterns::PatternIndex;
use crate::queue::Push;
use crate::topic::Subject;

pub(crate) struct TopicRegistry {
    topics: DashMap<Arc<str>, Arc<Topic>>,
    patterns: PatternIndex,
    /// How long a topic without subscribers keeps its sequence after its last publish.
    topic_ttl: Duration,
    metrics: Arc<Metrics>,
    topics_with_subscribers: AtomicUsize,
}

struct Topic {
    name: Arc<str>,
    state: Mutex<TopicState>,
}

struct TopicState {
    seq: u64,
    subscribers: HashMap<ConnectionId, Arc<Connection>>,
    /// Connections with a matching pattern, as of a pattern-index generation.
    pattern_matches: (u64, Arc<[Arc<Connection>]>),
    last_publish: Instant,
    /// Set when the topic left the map; whoever still holds it must look it up again.
    removed: bool,
}

/// A message on its way to subscribers, encoded at most once per encoding.
pub(crate) struct Publication {
    topic: Arc<str>,
    seq: u64,
    data: Data,
    frames: [OnceLock<Bytes>; 2],
}

impl Publication {
    fn new(topic: Arc<str>, seq: u64, data: Data) -> Self {
        Publication {
            topic,
            seq,
            data,
            frames: Default::default(),
        }
    }

    /// The complete WebSocket frame for `encoding`, shared by every subscriber using it.
    pub(crate) fn frame(&self, encoding: Encoding) -> Bytes {
        let slot = match encoding {
            Encoding::Json => &self.frames[0],
            Encoding::Msgpack => &self.frames[1],
        };
        slot.get_or_init(|| frame::encode_message(encoding, &self.topic, self.seq, &self.data))
            .clone()
    }
}

impl TopicState {
    fn new() -> Self {
        TopicState {
            seq: 0,
            subscribers: HashMap::new(),
            pattern_matches: (u64::MAX, Arc::from([])),
            last_publish: Instant::now(),
            removed: false,
        }
    }

    fn refresh_pattern_matches(
        &mut self,
        name: &str,
        patterns: &PatternIndex,
    ) -> Arc<[Arc<Connection>]> {
        if self.pattern_matches.0 != patterns.generation() {
            self.pattern_matches = patterns.matching(name);
        }
        self.pattern_matches.1.clone()
    }

    /// Connections that receive this topic's messages, each once: exact subscribers first,
    /// then pattern subscribers that have no exact subscription.
    fn for_each_receiver(
        &mut self,
        name: &str,
        patterns: &PatternIndex,
        mut f: impl FnMut(&Arc<Connection>),
    ) {
        for conn in self.subscribers.values() {
            f(conn);
        }
        if patterns.len() > 0 {
            let matches = self.refresh_pattern_matches(name, patterns);
            for conn in matches
                .iter()
                .filter(|c| !self.subscribers.contains_key(&c.id))
            {
                f(conn);
            }
        }
    }

    /// Marks the topic removed if nothing needs it any more.
    fn retire(&mut self, now: Instant, ttl: Duration) -> bool {
        let idle = self.seq == 0 || now.saturating_duration_since(self.last_publish) >= ttl;
        if !self.removed && self.subscribers.is_empty() && idle {
            self.removed = true;
        }
        self.removed
    }
}

impl TopicRegistry {
    pub(crate) fn new(topic_ttl: Duration, metrics: Arc<Metrics>) -> Self {
        TopicRegistry {
            topics: DashMap::new(),
            patterns: PatternIndex::default(),
            topic_ttl,
            metrics,
            topics_with_subscribers: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on the topic's state under its lock, creating the topic if needed.
    fn with_topic<R>(&self, name: &str, mut f: impl FnMut(&Arc<str>, &mut TopicState) -> R) -> R {
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
                return f(&topic.name, &mut state);
            }
        }
    }

    /// Removes the topic from the map if nothing needs it any more.
    fn try_remove(&self, name: &str, now: Instant) {
        self.topics.remove_if(name, |_, topic| {
            topic.state.lock().retire(now, self.topic_ttl)
        });
    }
}

impl Engine for TopicRegistry {
    fn publish(&self, topic: &str, data: Data, source: Source) -> Published {
        let accepted = Instant::now();
        let ns = self.metrics.namespace(topic);
        let published = self.with_topic(topic, |name, state| {
            state.seq += 1;
            state.last_publish = accepted;
            let publication = Publication::new(name.clone(), state.seq, data.clone());
            let mut receivers = 0;
            state.for_each_receiver(name, &self.patterns, |conn| {
                let frame = publication.frame(conn.encoding);
                if conn.queue.push_message(frame, ns, accepted) == Push::Queued {
                    receivers += 1;
                }
            });
            Published {
                seq: state.seq,
                receivers,
            }
        });
        self.metrics
            .published(ns, source, accepted.elapsed(), published.receivers);
        published
    }

    fn subscribe(&self, conn: &Arc<Connection>, subject: &Subject) {
        match subject {
            Subject::Topic(name) => self.with_topic(name, |_, state| {
                let first = state.subscribers.is_empty();
                if state.subscribers.insert(conn.id, conn.clone()).is_none() && first {
                    self.topics_with_subscribers.fetch_add(1, Ordering::Relaxed);
                }
            }),
            Subject::Pattern(pattern) => self.patterns.insert(pattern, conn),
        }
    }

    fn unsubscribe(&self, conn: &Connection, subject: &Subject) {
        match subject {
            Subject::Topic(name) => {
                let Some(topic) = self.topics.get(&**name).map(|t| t.clone()) else {
                    return;
                };
                let now_unused = {
                    let mut state = topic.state.lock();
                    if state.subscribers.remove(&conn.id).is_some() && state.subscribers.is_empty()
                    {
                        self.topics_with_subscribers.fetch_sub(1, Ordering::Relaxed);
                    }
                    state.subscribers.is_empty() && state.seq == 0
                };
                if now_unused {
                    self.try_remove(name, Instant::now());
                }
            }
            Subject::Pattern(pattern) => self.patterns.remove(pattern, conn.id),
        }
    }

    fn topics(&self) -> Vec<TopicInfo> {
        let topics: Vec<Arc<Topic>> = self.topics.iter().map(|t| t.value().clone()).collect();
        let mut infos: Vec<TopicInfo> = topics
            .iter()
            .filter_map(|topic| {
                let mut state = topic.state.lock();
                if state.removed {
                    return None;
                }
                let mut subscribers = 0;
                state.for_each_receiver(&topic.name, &self.patterns, |_| subscribers += 1);
                Some(TopicInfo {
                    name: topic.name.clone(),
                    subscribers,
                    seq: state.seq,
                })
            })
            .collect();
        infos.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    fn sweep(&self, now: Instant) {
        let idle: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|t| {
                let state = t.state.lock();
                state.subscribers.is_empty()
                    && now.saturating_duration_since(state.last_publish) >= self.topic_ttl
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::queue::OutboundQueue;

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

    fn registry() -> TopicRegistry {
        TopicRegistry::new(Duration::from_secs(60), metrics())
    }

    fn json(s: &'static str) -> Data {
        Data::Json(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn sequences_count_per_topic_and_receivers_are_counted_once() {
        let registry = registry();
        let (a, b) = (conn(Encoding::Json), conn(Encoding::Msgpack));
        registry.subscribe(&a, &Subject::parse("x.y").unwrap());
        registry.subscribe(&a, &Subject::parse("x.*").unwrap());
        registry.subscribe(&b, &Subject::parse("x.>").unwrap());
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
        assert!(a.queue.stats().buffered_bytes() > 0);
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
    }

    #[test]
    fn unused_topics_are_forgotten() {
        let registry = registry();
        let a = conn(Encoding::Json);
        let subject = Subject::parse("t").unwrap();
        registry.subscribe(&a, &subject);
        registry.unsubscribe(&a, &subject);
        assert!(
            registry.topics().is_empty(),
            "never published, no subscribers"
        );

        registry.publish("t", json("1"), Source::Ws);
        registry.sweep(Instant::now());
        assert_eq!(
            registry.topics().len(),
            1,
            "keeps its sequence for the topic ttl"
        );
        registry.sweep(Instant::now() + Duration::from_secs(61));
        assert!(registry.topics().is_empty());
        assert_eq!(registry.publish("t", json("1"), Source::Ws).seq, 1);
    }
}
