//! Pattern subscriptions (`a.*`, `a.>`), indexed by segment so that finding the patterns that
//! match a topic costs the topic's depth, not the number of other topics or patterns.
//!
//! Every change bumps a generation number; topics cache their matches and recompute them only
//! when the generation moved, so publishing to a topic takes no shared lock in steady state.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;

use crate::connection::ConnectionId;
use crate::registry::Subscriber;

#[derive(Default)]
pub(crate) struct PatternIndex {
    root: RwLock<Node>,
    generation: AtomicU64,
    count: AtomicUsize,
}

#[derive(Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Subscribers whose pattern ends at this node.
    here: Vec<Subscriber>,
    /// Subscribers whose pattern ends with `>` after this node: one or more further segments.
    rest: Vec<Subscriber>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.here.is_empty()
            && self.rest.is_empty()
            && self.star.is_none()
            && self.literal.is_empty()
    }

    fn child(&mut self, segment: &str) -> &mut Node {
        if segment == "*" {
            self.star.get_or_insert_with(Default::default)
        } else {
            self.literal.entry(segment.into()).or_default()
        }
    }

    /// Removes `conn` from the pattern `segments`; returns whether it was there.
    fn remove(&mut self, segments: &[&str], conn: ConnectionId) -> bool {
        let remove_from =
            |list: &mut Vec<Subscriber>| match list.iter().position(|s| s.conn.id == conn) {
                Some(i) => {
                    list.swap_remove(i);
                    true
                }
                None => false,
            };
        match segments {
            [] => remove_from(&mut self.here),
            [">"] => remove_from(&mut self.rest),
            [first, rest @ ..] => {
                let removed;
                if *first == "*" {
                    let Some(child) = self.star.as_mut() else {
                        return false;
                    };
                    removed = child.remove(rest, conn);
                    if child.is_empty() {
                        self.star = None;
                    }
                } else {
                    let Some(child) = self.literal.get_mut(*first) else {
                        return false;
                    };
                    removed = child.remove(rest, conn);
                    if child.is_empty() {
                        self.literal.remove(*first);
                    }
                }
                removed
            }
        }
    }

    fn collect(&self, segments: &[&str], out: &mut Vec<Subscriber>) {
        let Some((first, rest)) = segments.split_first() else {
            out.extend(self.here.iter().cloned());
            return;
        };
        out.extend(self.rest.iter().cloned());
        if let Some(child) = self.literal.get(*first) {
            child.collect(rest, out);
        }
        if let Some(child) = &self.star {
            child.collect(rest, out);
        }
    }
}

impl PatternIndex {
    /// Adds a pattern subscription, or changes its mode if the connection already has it.
    pub(crate) fn insert(&self, pattern: &str, subscriber: Subscriber) {
        let segments: Vec<&str> = pattern.split('.').collect();
        let Some((last, init)) = segments.split_last() else {
            return;
        };
        let mut node = &mut *self.root.write();
        for segment in init {
            node = node.child(segment);
        }
        let list = if *last == ">" {
            &mut node.rest
        } else {
            &mut node.child(last).here
        };
        match list.iter_mut().find(|s| s.conn.id == subscriber.conn.id) {
            Some(existing) => *existing = subscriber,
            None => {
                list.push(subscriber);
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn remove(&self, pattern: &str, conn: ConnectionId) {
        let segments: Vec<&str> = pattern.split('.').collect();
        let mut root = self.root.write();
        if root.remove(&segments, conn) {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// How many pattern subscriptions exist.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The subscribers with a pattern matching `topic`, each connection once (its first matching
    /// pattern decides the mode), and the generation they were computed at.
    pub(crate) fn matching(&self, topic: &str) -> (u64, Arc<[Subscriber]>) {
        let segments: Vec<&str> = topic.split('.').collect();
        let mut out = Vec::new();
        let root = self.root.read();
        let generation = self.generation();
        root.collect(&segments, &mut out);
        drop(root);
        out.sort_by_key(|s| s.conn.id);
        out.dedup_by_key(|s| s.conn.id);
        (generation, out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::connection::Connection;
    use crate::engine::DeliveryMode;
    use crate::frame::Encoding;
    use crate::queue::OutboundQueue;

    fn conn() -> Arc<Connection> {
        Arc::new(Connection::new(
            None,
            Encoding::Json,
            OutboundQueue::new(
                1024,
                SlowConsumerPolicy::DropOldest,
                Arc::new(crate::metrics::Metrics::new(
                    &[],
                    1024,
                    std::sync::Weak::new(),
                )),
            ),
            None,
        ))
    }

    fn ids(index: &PatternIndex, topic: &str) -> Vec<ConnectionId> {
        index.matching(topic).1.iter().map(|s| s.conn.id).collect()
    }

    fn sub(conn: &Arc<Connection>) -> Subscriber {
        Subscriber::new(conn.clone(), DeliveryMode::All)
    }

    #[test]
    fn finds_matching_patterns_once_per_connection() {
        let index = PatternIndex::default();
        let (a, b) = (conn(), conn());
        index.insert("metrics.*", sub(&a));
        index.insert("metrics.>", sub(&a));
        index.insert("*.cpu", sub(&b));
        index.insert(">", sub(&b));
        let mut both = vec![a.id, b.id];
        both.sort();
        assert_eq!(ids(&index, "metrics.cpu"), both);
        assert_eq!(ids(&index, "metrics.cpu.0"), both);
        assert_eq!(ids(&index, "metrics"), vec![b.id]);
        assert_eq!(ids(&index, "other.mem"), vec![b.id]);
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn wildcards_match_as_in_nats() {
        let cases = [
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b", true),
            ("a.>", "a.b.c.d", true),
            ("a.>", "a", false),
            (">", "a", true),
            (">", "a.b", true),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*.b", "a.b", true),
            ("*.b", "a.c", false),
            ("a.*.c", "a.x.c", true),
            ("a.*.c", "a.x.d", false),
            ("a.*.>", "a.x.y", true),
            ("a.*.>", "a.x", false),
            ("a.b", "a.b", true),
            ("a.b", "a.bc", false),
            ("*.*", "a.b", true),
            ("*.*", "a.b.c", false),
        ];
        for (pattern, topic, expected) in cases {
            let index = PatternIndex::default();
            let c = conn();
            index.insert(pattern, sub(&c));
            assert_eq!(
                !ids(&index, topic).is_empty(),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }

    #[test]
    fn removal_prunes_and_moves_the_generation() {
        let index = PatternIndex::default();
        let a = conn();
        index.insert("a.*.c", sub(&a));
        let before = index.generation();
        assert_eq!(ids(&index, "a.b.c"), vec![a.id]);
        index.remove("a.*.c", a.id);
        assert!(index.generation() > before);
        assert!(ids(&index, "a.b.c").is_empty());
        assert!(index.root.read().is_empty());
        assert_eq!(index.len(), 0);
        // Removing what is not there changes nothing.
        let generation = index.generation();
        index.remove("a.*.c", a.id);
        assert_eq!(index.generation(), generation);
    }
}
