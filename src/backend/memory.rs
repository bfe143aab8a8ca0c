//! The in-memory backend: topics in a concurrent map, each with its seq, epoch and history behind
//! its own lock.
//!
//! A topic's lock is held while its next seq is assigned, the publication is handed to the
//! delivery sink and retained in history, so publications of a topic reach the sink in seq order
//! and a history read sees exactly the publications delivered before it. Different topics never
//! contend; there is no global lock on the publish path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::history::{HistoryIndex, TopicHistory};
use super::{
    Answer, Backend, BackendStats, DeliverySink, HistoryPage, HistoryQuery, Published,
    StreamFilter, StreamInfo, Unavailable,
};
use crate::config::Config;
use crate::data::Data;
use crate::metrics::Metrics;
use crate::model::{Publication, StreamPosition};
use crate::table::{TopicEntry, TopicTable};
use crate::topic::Subject;

pub(crate) struct MemoryBackend {
    topics: TopicTable<TopicState>,
    history: HistoryIndex<Topic>,
    /// How long a topic with no interest and no history keeps its seq and epoch.
    topic_ttl: Duration,
    sink: Arc<dyn DeliverySink>,
}

type Topic = TopicEntry<TopicState>;

pub(crate) struct TopicState {
    /// The latest seq, in a stream whose epoch is new whenever the topic starts afresh.
    position: StreamPosition,
    /// Whether this node has subscribers to the topic.
    interested: bool,
    history: TopicHistory,
    /// The last publish, or the end of interest.
    last_active: Instant,
}

/// A fresh epoch: random, so that a restarted node never reuses one.
pub(crate) fn new_epoch() -> Arc<str> {
    format!("{:016x}", fastrand::u64(..)).into()
}

impl Default for TopicState {
    fn default() -> Self {
        TopicState {
            position: StreamPosition {
                epoch: new_epoch(),
                seq: 0,
            },
            interested: false,
            history: TopicHistory::default(),
            last_active: Instant::now(),
        }
    }
}

impl TopicState {
    fn position(&self) -> StreamPosition {
        self.position.clone()
    }

    /// Whether nothing needs the topic any more.
    fn idle(&self, now: Instant, ttl: Duration) -> bool {
        !self.interested
            && self.history.is_empty()
            && now.saturating_duration_since(self.last_active) >= ttl
    }
}

impl MemoryBackend {
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>, sink: Arc<dyn DeliverySink>) -> Self {
        MemoryBackend {
            topics: TopicTable::default(),
            history: HistoryIndex::new(
                if config.history_enabled() {
                    config.history_size
                } else {
                    0
                },
                config.history_ttl,
                config.history_max_bytes,
                |topic: &Topic, f| topic.with(|state| f(&mut state.history)).is_some(),
                metrics,
            ),
            topic_ttl: config.topic_ttl,
            sink,
        }
    }

    /// Runs `f` on the topic's state under its lock, creating the topic if needed.
    fn with_topic<R>(&self, name: &str, f: impl FnOnce(&Arc<Topic>, &mut TopicState) -> R) -> R {
        self.topics.with_or_create(name, f)
    }

    /// Runs `f` on an existing topic's state under its lock.
    fn with_existing<R>(&self, name: &str, f: impl FnOnce(&mut TopicState) -> R) -> Option<R> {
        self.topics.get(name)?.with(f)
    }

    fn page(&self, state: &mut TopicState, query: HistoryQuery) -> HistoryPage {
        self.history.expire(&mut state.history, Instant::now());
        let publications = match query {
            HistoryQuery::After { seq, limit } => {
                state.history.after(seq).take(limit).cloned().collect()
            }
            HistoryQuery::Last(n) => state.history.last(n).cloned().collect(),
        };
        HistoryPage {
            position: state.position(),
            oldest: state.history.oldest_seq(),
            publications,
            frame_meter: self.history.meter().cloned(),
        }
    }

    /// Publishes at once: delivered and retained before this returns.
    pub(crate) fn publish_now(&self, topic: &str, data: Data) -> Published {
        let accepted = Instant::now();
        let published = self.with_topic(topic, |t, state| {
            state.position.seq += 1;
            state.last_active = accepted;
            let seq = state.position.seq;
            let publication = Arc::new(Publication::new(
                t.name.clone(),
                &state.position,
                data,
                accepted,
            ));
            let receivers = self.sink.deliver(&publication);
            self.history.retain(
                &mut state.history,
                publication,
                || Arc::downgrade(t),
                accepted,
            );
            Published {
                seq,
                receivers: Some(receivers),
            }
        });
        self.history.enforce_cap();
        published
    }

    /// The topics `filter` accepts, as they are now.
    pub(crate) fn streams_now(&self, filter: &StreamFilter) -> Vec<StreamInfo> {
        self.topics
            .entries()
            .iter()
            .filter(|topic| filter.accepts(&topic.name))
            .filter_map(|topic| {
                topic.with(|state| StreamInfo {
                    name: topic.name.clone(),
                    position: state.position(),
                    history: state.history.len(),
                })
            })
            .collect()
    }
}

impl Backend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn publish(&self, topic: &str, data: Data) -> Answer<Result<Published, Unavailable>> {
        Answer::Now(Ok(self.publish_now(topic, data)))
    }

    fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Answer<Result<Option<HistoryPage>, Unavailable>> {
        Answer::Now(Ok(
            self.with_existing(topic, |state| self.page(state, query))
        ))
    }

    fn interest(&self, subject: &Subject, on: bool) {
        // Every publication reaches the sink whatever the interest; it only keeps a subscribed
        // topic (and so its epoch) alive.
        let Subject::Topic(name) = subject else {
            return;
        };
        if on {
            self.with_topic(name, |_, state| state.interested = true);
        } else {
            self.with_existing(name, |state| {
                state.interested = false;
                state.last_active = Instant::now();
            });
        }
    }

    fn listening(&self, _subject: &Subject) -> Answer<Result<(), Unavailable>> {
        Answer::Now(Ok(()))
    }

    fn streams(&self, filter: StreamFilter) -> Answer<Result<Vec<StreamInfo>, Unavailable>> {
        Answer::Now(Ok(self.streams_now(&filter)))
    }

    fn sweep(&self, now: Instant) {
        self.history.sweep(now);
        self.topics
            .remove_idle(|_, state| state.idle(now, self.topic_ttl));
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            history_messages: self.history.messages(),
            history_bytes: self.history.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use parking_lot::Mutex;

    /// A sink that keeps what it is given.
    #[derive(Default)]
    struct Collect(Mutex<Vec<Arc<Publication>>>);

    impl DeliverySink for Collect {
        fn deliver(&self, publication: &Arc<Publication>) -> usize {
            self.0.lock().push(publication.clone());
            1
        }
    }

    fn backend_with(adjust: impl FnOnce(&mut Config)) -> (MemoryBackend, Arc<Collect>) {
        let mut config = Config::default();
        adjust(&mut config);
        let sink = Arc::new(Collect::default());
        let metrics = Arc::new(Metrics::new(&[]));
        (MemoryBackend::new(&config, metrics, sink.clone()), sink)
    }

    fn json(s: &str) -> Data {
        Data::Json(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn seqs(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().map(|p| p.seq).collect()
    }

    #[test]
    fn publications_reach_the_sink_in_seq_order_and_stay_in_history() {
        let (backend, sink) = backend_with(|_| {});
        for i in 1..=3 {
            let published = backend.publish_now("t", json(&i.to_string()));
            assert_eq!((published.seq, published.receivers), (i, Some(1)));
        }
        backend.publish_now("u", json("1"));
        let delivered: Vec<(String, u64)> = sink
            .0
            .lock()
            .iter()
            .map(|p| (p.topic.to_string(), p.seq))
            .collect();
        assert_eq!(
            delivered,
            vec![
                ("t".into(), 1),
                ("t".into(), 2),
                ("t".into(), 3),
                ("u".into(), 1)
            ]
        );
        let page = backend
            .history("t", HistoryQuery::After { seq: 1, limit: 10 })
            .now()
            .unwrap()
            .unwrap();
        assert_eq!(
            (seqs(&page), page.oldest, page.position.seq),
            (vec![2, 3], Some(1), 3)
        );
        assert_eq!(
            seqs(
                &backend
                    .history("t", HistoryQuery::Last(1))
                    .now()
                    .unwrap()
                    .unwrap()
            ),
            vec![3]
        );
        assert!(
            backend
                .history("nope", HistoryQuery::Last(0))
                .now()
                .unwrap()
                .is_none()
        );
        assert_eq!(backend.name(), "memory");
    }

    #[test]
    fn interest_keeps_a_topic_and_its_epoch_alive() {
        let (backend, _) = backend_with(|c| c.history_size = 0);
        let t = Subject::parse("t").unwrap();
        backend.interest(&t, true);
        let epoch = backend
            .history("t", HistoryQuery::Last(0))
            .now()
            .unwrap()
            .unwrap()
            .position
            .epoch;
        let later = Instant::now() + Duration::from_secs(3600);
        backend.sweep(later);
        assert_eq!(
            backend.streams_now(&StreamFilter::All).len(),
            1,
            "kept while interested"
        );
        backend.interest(&t, false);
        backend.sweep(Instant::now());
        assert_eq!(
            backend.streams_now(&StreamFilter::All).len(),
            1,
            "kept for the topic ttl"
        );
        backend.sweep(later);
        assert!(backend.streams_now(&StreamFilter::All).is_empty());
        backend.interest(&t, true);
        let again = backend
            .history("t", HistoryQuery::Last(0))
            .now()
            .unwrap()
            .unwrap()
            .position
            .epoch;
        assert_ne!(epoch, again, "a new stream, a new epoch");
        // Patterns change nothing here: every publication reaches the sink anyway.
        backend.interest(&Subject::parse("a.*").unwrap(), true);
        assert_eq!(backend.streams_now(&StreamFilter::All).len(), 1);
    }
}
