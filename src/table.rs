//! A table of topics: each topic's entry behind its own lock in a concurrent map, so that
//! different topics never contend and the publish path takes no global lock. The memory backend
//! keeps its streams in one, the hub its subscribers in another.
//!
//! An entry leaves the table only when its owner finds it idle under the entry's own lock, and is
//! marked removed as it leaves: whoever still holds the entry then looks the topic up again, so
//! nothing is ever added to an entry that is no longer in the table.

use std::sync::Arc;

use ahash::RandomState;
use dashmap::DashMap;
use parking_lot::Mutex;

pub(crate) struct TopicTable<S, X = ()> {
    // Topic names come from clients: the hasher is keyed per map, at random.
    map: DashMap<Arc<str>, Arc<TopicEntry<S, X>>, RandomState>,
}

pub(crate) struct TopicEntry<S, X = ()> {
    pub name: Arc<str>,
    state: Mutex<Guarded<S>>,
    /// What the owner keeps beside the state, outside its lock.
    pub extra: X,
}

struct Guarded<S> {
    value: S,
    removed: bool,
}

impl<S, X> TopicEntry<S, X> {
    /// Runs `f` on the state under the entry's lock; None once the entry has left the table.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        let mut state = self.state.lock();
        (!state.removed).then(|| f(&mut state.value))
    }
}

impl<S: Default, X: Default> Default for TopicTable<S, X> {
    fn default() -> Self {
        TopicTable {
            map: DashMap::default(),
        }
    }
}

impl<S: Default, X: Default> TopicTable<S, X> {
    /// Runs `f` on the topic's entry under its lock, creating the entry if there is none.
    pub(crate) fn with_or_create<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Arc<TopicEntry<S, X>>, &mut S) -> R,
    ) -> R {
        loop {
            let entry = self.get_or_create(name);
            let mut state = entry.state.lock();
            // Removed since the lookup, so no longer in the map: look again.
            if !state.removed {
                return f(&entry, &mut state.value);
            }
        }
    }

    /// Runs `f` on the topic's entry under its lock. A topic without an entry gets a new one if
    /// `create` says so; otherwise the answer is None.
    pub(crate) fn with<R>(
        &self,
        name: &str,
        create: impl Fn() -> bool,
        f: impl FnOnce(&Arc<TopicEntry<S, X>>, &mut S) -> R,
    ) -> Option<R> {
        loop {
            let entry = match self.get(name) {
                Some(entry) => entry,
                None if create() => self.get_or_create(name),
                None => return None,
            };
            let mut state = entry.state.lock();
            if !state.removed {
                return Some(f(&entry, &mut state.value));
            }
        }
    }

    fn get_or_create(&self, name: &str) -> Arc<TopicEntry<S, X>> {
        if let Some(entry) = self.get(name) {
            return entry;
        }
        let name: Arc<str> = name.into();
        let entry = self.map.entry(name.clone()).or_insert_with(|| {
            Arc::new(TopicEntry {
                name,
                state: Mutex::new(Guarded {
                    value: S::default(),
                    removed: false,
                }),
                extra: X::default(),
            })
        });
        entry.clone()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<TopicEntry<S, X>>> {
        self.map.get(name).map(|entry| entry.clone())
    }

    /// A snapshot of the entries (never hold a map reference while using them).
    pub(crate) fn entries(&self) -> Vec<Arc<TopicEntry<S, X>>> {
        self.map.iter().map(|entry| entry.value().clone()).collect()
    }

    /// Removes the entries `idle` says nothing needs any more (asked under each entry's lock).
    pub(crate) fn remove_idle(&self, idle: impl Fn(&TopicEntry<S, X>, &S) -> bool) {
        let candidates: Vec<Arc<str>> = self
            .entries()
            .into_iter()
            .filter(|entry| entry.with(|state| idle(entry, state)).unwrap_or(false))
            .map(|entry| entry.name.clone())
            .collect();
        for name in candidates {
            self.map.remove_if(&name, |_, entry| {
                let mut state = entry.state.lock();
                if !state.removed && idle(entry, &state.value) {
                    state.removed = true;
                }
                state.removed
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_removed_while_held_is_looked_up_afresh() {
        let table: TopicTable<u32> = TopicTable::default();
        assert_eq!(table.with("t", || false, |_, n| *n), None, "not created");
        table.with("t", || true, |_, n| *n = 7);
        let held = table.get("t").unwrap();
        table.remove_idle(|_, n| *n == 8);
        assert_eq!(held.with(|n| *n), Some(7), "not idle: kept");
        table.remove_idle(|entry, n| entry.name.as_ref() == "t" && *n == 7);
        assert_eq!(held.with(|n| *n), None, "left the table");
        assert!(table.get("t").is_none() && table.entries().is_empty());
        assert_eq!(table.with("t", || true, |_, n| *n), Some(0), "a new entry");
    }
}
