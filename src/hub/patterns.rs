//! Pattern subscriptions (`a.*`, `a.>`), indexed by segment so that finding the patterns that
//! match a topic costs the topic's depth, not the number of other topics or patterns.
//!
//! Every change bumps a generation number; topics cache their matches and recompute them only
//! when the generation moved, so publishing to a topic takes no shared lock in steady state.
//!
//! The index holds one value per connection and pattern, and knows nothing of what the value is.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;

use crate::model::ConnectionId;
use crate::topic;

pub(crate) struct PatternIndex<T> {
    root: RwLock<Node<T>>,
    generation: AtomicU64,
    count: AtomicUsize,
}

impl<T> Default for PatternIndex<T> {
    fn default() -> Self {
        PatternIndex {
            root: RwLock::new(Node::default()),
            generation: AtomicU64::new(0),
            count: AtomicUsize::new(0),
        }
    }
}

struct Node<T> {
    literal: HashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    /// Entries whose pattern ends at this node.
    here: Vec<(ConnectionId, T)>,
    /// Entries whose pattern ends with `>` after this node: one or more further segments.
    rest: Vec<(ConnectionId, T)>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            star: None,
            here: Vec::new(),
            rest: Vec::new(),
        }
    }
}

impl<T: Clone> Node<T> {
    fn is_empty(&self) -> bool {
        self.here.is_empty()
            && self.rest.is_empty()
            && self.star.is_none()
            && self.literal.is_empty()
    }

    fn child(&mut self, segment: &str) -> &mut Node<T> {
        if segment == "*" {
            self.star.get_or_insert_with(Default::default)
        } else {
            self.literal.entry(segment.into()).or_default()
        }
    }

    /// Removes `conn` from the pattern `segments`; returns whether it was there.
    fn remove(&mut self, segments: &[&str], conn: ConnectionId) -> bool {
        let remove_from =
            |list: &mut Vec<(ConnectionId, T)>| match list.iter().position(|(id, _)| *id == conn) {
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

    /// The entries whose pattern is exactly `segments`.
    fn exact(&self, segments: &[&str]) -> Option<&Vec<(ConnectionId, T)>> {
        match segments {
            [] => Some(&self.here),
            [">"] => Some(&self.rest),
            [first, rest @ ..] if *first == "*" => self.star.as_ref()?.exact(rest),
            [first, rest @ ..] => self.literal.get(*first)?.exact(rest),
        }
    }

    fn collect(&self, segments: &[&str], out: &mut Vec<(ConnectionId, T)>) {
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

impl<T: Clone> PatternIndex<T> {
    /// Adds a connection's pattern subscription, or replaces its value if it already has it;
    /// returns the value it replaced.
    pub(crate) fn insert(&self, pattern: &str, conn: ConnectionId, value: T) -> Option<T> {
        let segments: Vec<&str> = pattern.split('.').collect();
        let (last, init) = segments.split_last()?;
        let mut node = &mut *self.root.write();
        for segment in init {
            node = node.child(segment);
        }
        let list = if *last == ">" {
            &mut node.rest
        } else {
            &mut node.child(last).here
        };
        let replaced = match list.iter_mut().find(|(id, _)| *id == conn) {
            Some(existing) => Some(std::mem::replace(&mut existing.1, value)),
            None => {
                list.push((conn, value));
                self.count.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        self.generation.fetch_add(1, Ordering::Release);
        replaced
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

    /// Whether any connection subscribes to exactly `pattern`.
    pub(crate) fn contains(&self, pattern: &str) -> bool {
        let segments: Vec<&str> = pattern.split('.').collect();
        self.root
            .read()
            .exact(&segments)
            .is_some_and(|list| !list.is_empty())
    }

    /// The entries with a pattern matching `topic` (a connection with several matching patterns
    /// appears once for each), and the generation they were computed at.
    pub(crate) fn matching(&self, topic: &str) -> (u64, Vec<(ConnectionId, T)>) {
        let segments: Vec<&str> = topic.split('.').collect();
        let mut out = Vec::new();
        let root = self.root.read();
        let generation = self.generation();
        match segments.split_first() {
            // The broker's own topics are matched only by patterns that name their namespace.
            Some((&first, rest)) if first == topic::SYSTEM_NAMESPACE => {
                if let Some(child) = root.literal.get(first) {
                    child.collect(rest, &mut out);
                }
            }
            _ => root.collect(&segments, &mut out),
        }
        (generation, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(index: &PatternIndex<char>, topic: &str) -> Vec<ConnectionId> {
        let mut ids: Vec<ConnectionId> =
            index.matching(topic).1.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    const A: ConnectionId = ConnectionId(1);
    const B: ConnectionId = ConnectionId(2);

    #[test]
    fn finds_matching_patterns() {
        let index = PatternIndex::default();
        index.insert("metrics.*", A, 'a');
        index.insert("metrics.>", A, 'b');
        index.insert("*.cpu", B, 'c');
        index.insert(">", B, 'd');
        assert_eq!(ids(&index, "metrics.cpu"), vec![A, B]);
        assert_eq!(ids(&index, "metrics.cpu.0"), vec![A, B]);
        assert_eq!(ids(&index, "metrics"), vec![B]);
        assert_eq!(ids(&index, "other.mem"), vec![B]);
        let mut values: Vec<char> = index
            .matching("metrics.cpu")
            .1
            .iter()
            .map(|(_, v)| *v)
            .collect();
        values.sort();
        assert_eq!(
            values,
            vec!['a', 'b', 'c', 'd'],
            "each matching pattern once"
        );
        assert_eq!(index.len(), 4);
        assert!(index.contains("metrics.>") && index.contains("*.cpu") && index.contains(">"));
        assert!(!index.contains("metrics") && !index.contains("*") && !index.contains("x.>"));
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
            index.insert(pattern, A, 'x');
            assert_eq!(
                !ids(&index, topic).is_empty(),
                expected,
                "{pattern} vs {topic}"
            );
        }
    }

    #[test]
    fn insert_replaces_a_connections_value() {
        let index = PatternIndex::default();
        index.insert("a.*", A, 'x');
        index.insert("a.*", A, 'y');
        assert_eq!(index.matching("a.b").1, vec![(A, 'y')]);
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn removal_prunes_and_moves_the_generation() {
        let index = PatternIndex::default();
        index.insert("a.*.c", A, 'x');
        let before = index.generation();
        assert_eq!(ids(&index, "a.b.c"), vec![A]);
        index.remove("a.*.c", A);
        assert!(index.generation() > before);
        assert!(ids(&index, "a.b.c").is_empty());
        assert!(index.root.read().is_empty());
        assert_eq!(index.len(), 0);
        assert!(!index.contains("a.*.c"));
        // Removing what is not there changes nothing.
        let generation = index.generation();
        index.remove("a.*.c", A);
        assert_eq!(index.generation(), generation);
    }
}
