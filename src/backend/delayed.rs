//! A backend for tests that shows the hub's replay→live join does not lean on the backend: it
//! assigns seqs under its own lock and delivers each publication later, from its own thread
//! after a random delay (publications of one topic in seq order), or only when a test says so.
//! This is how a backend shared by several nodes behaves: the history read and the live stream
//! come apart in time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::memory::new_epoch;
use super::{
    Answer, Backend, BackendStats, DeliverySink, HistoryPage, HistoryQuery, Published,
    StreamFilter, StreamInfo, Unavailable,
};
use crate::data::Data;
use crate::model::{Publication, StreamPosition};
use crate::topic::Subject;

/// When a publication reaches the sink.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Delay {
    /// From the backend's own thread, between 0 and this long after it was published.
    Random(Duration),
    /// When the test calls [`DelayedBackend::release`].
    Held,
}

type Hook = Box<dyn FnOnce(&DelayedBackend) + Send>;

pub(crate) struct DelayedBackend {
    streams: Mutex<HashMap<Arc<str>, Stream>>,
    history_size: usize,
    delay: Delay,
    pending: Arc<Pending>,
    sink: Arc<dyn DeliverySink>,
    /// Every `interest` call, in order.
    interest: Mutex<Vec<(String, bool)>>,
    /// Runs once, inside the next history read, after the page is read.
    during_history: Mutex<Option<Hook>>,
    thread: Option<JoinHandle<()>>,
}

struct Stream {
    position: StreamPosition,
    history: VecDeque<Arc<Publication>>,
    /// When this topic's last publication is due: later ones are never due before it.
    last_due: Instant,
}

#[derive(Default)]
struct Pending {
    queue: Mutex<Queue>,
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    due: BinaryHeap<Reverse<Due>>,
    /// Publish order, breaking ties between equal due times.
    next: u64,
    stopped: bool,
}

struct Due {
    at: Instant,
    order: u64,
    publication: Arc<Publication>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

impl Stream {
    fn new(now: Instant) -> Self {
        Stream {
            position: StreamPosition {
                epoch: new_epoch(),
                seq: 0,
            },
            history: VecDeque::new(),
            last_due: now,
        }
    }
}

impl DelayedBackend {
    pub(crate) fn new(history_size: usize, delay: Delay, sink: Arc<dyn DeliverySink>) -> Self {
        let pending = Arc::new(Pending::default());
        let thread = matches!(delay, Delay::Random(_)).then(|| {
            let (pending, sink) = (pending.clone(), sink.clone());
            std::thread::spawn(move || deliver_when_due(&pending, &*sink))
        });
        DelayedBackend {
            streams: Mutex::new(HashMap::new()),
            history_size,
            delay,
            pending,
            sink,
            interest: Mutex::new(Vec::new()),
            during_history: Mutex::new(None),
            thread,
        }
    }

    /// Delivers every publication held so far, in publish order.
    pub(crate) fn release(&self) {
        let held: Vec<Arc<Publication>> = {
            let mut queue = self.pending.queue.lock();
            let mut due: Vec<Due> = std::mem::take(&mut queue.due)
                .into_iter()
                .map(|Reverse(d)| d)
                .collect();
            due.sort_by_key(|d| d.order);
            due.into_iter().map(|d| d.publication).collect()
        };
        for publication in held {
            self.sink.deliver(&publication);
        }
    }

    /// Runs `hook` inside the next history read, just after the page was read: what it publishes
    /// or releases reaches the hub while that subscription is replaying.
    pub(crate) fn during_next_history(&self, hook: impl FnOnce(&DelayedBackend) + Send + 'static) {
        *self.during_history.lock() = Some(Box::new(hook));
    }

    /// The `interest` calls so far.
    pub(crate) fn interest_log(&self) -> Vec<(String, bool)> {
        self.interest.lock().clone()
    }
}

fn deliver_when_due(pending: &Pending, sink: &dyn DeliverySink) {
    let mut queue = pending.queue.lock();
    loop {
        if queue.stopped {
            return;
        }
        let now = Instant::now();
        match queue.due.peek().map(|Reverse(d)| d.at) {
            Some(at) if at <= now => {
                if let Some(Reverse(due)) = queue.due.pop() {
                    drop(queue);
                    sink.deliver(&due.publication);
                    queue = pending.queue.lock();
                }
            }
            Some(at) => {
                pending.ready.wait_until(&mut queue, at);
            }
            None => pending.ready.wait(&mut queue),
        }
    }
}

impl Drop for DelayedBackend {
    fn drop(&mut self) {
        self.pending.queue.lock().stopped = true;
        self.pending.ready.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl DelayedBackend {
    fn publish_now(&self, topic: &str, data: Data) -> Published {
        let now = Instant::now();
        let mut streams = self.streams.lock();
        let stream = streams
            .entry(topic.into())
            .or_insert_with(|| Stream::new(now));
        stream.position.seq += 1;
        let publication = Arc::new(Publication::new(topic.into(), &stream.position, data, now));
        stream.history.push_back(publication.clone());
        while stream.history.len() > self.history_size {
            stream.history.pop_front();
        }
        let delay = match self.delay {
            Delay::Random(max) => max.mul_f64(fastrand::f64()),
            Delay::Held => Duration::ZERO,
        };
        let at = (now + delay).max(stream.last_due);
        stream.last_due = at;
        let seq = stream.position.seq;
        // Queued under the streams lock, so that one topic's publications queue in seq order.
        let mut queue = self.pending.queue.lock();
        let order = queue.next;
        queue.next += 1;
        queue.due.push(Reverse(Due {
            at,
            order,
            publication,
        }));
        drop(queue);
        drop(streams);
        self.pending.ready.notify_one();
        Published {
            seq,
            receivers: None,
        }
    }

    fn history_now(&self, topic: &str, query: HistoryQuery) -> Option<HistoryPage> {
        let page = {
            let streams = self.streams.lock();
            let stream = streams.get(topic)?;
            let publications = match query {
                HistoryQuery::After { seq, limit } => stream
                    .history
                    .iter()
                    .filter(|p| p.seq > seq)
                    .take(limit)
                    .cloned()
                    .collect(),
                HistoryQuery::Last(n) => {
                    let skip = stream.history.len().saturating_sub(n);
                    stream.history.iter().skip(skip).cloned().collect()
                }
            };
            HistoryPage {
                position: stream.position.clone(),
                oldest: stream.history.front().map(|p| p.seq),
                publications,
                frame_meter: None,
            }
        };
        let hook = self.during_history.lock().take();
        if let Some(hook) = hook {
            hook(self);
        }
        Some(page)
    }

    fn declare_interest(&self, subject: &Subject, on: bool) {
        let name = match subject {
            Subject::Topic(name) | Subject::Pattern(name) => name.to_string(),
        };
        if let Subject::Topic(topic) = subject
            && on
        {
            self.streams
                .lock()
                .entry(topic.clone())
                .or_insert_with(|| Stream::new(Instant::now()));
        }
        self.interest.lock().push((name, on));
    }

    fn streams_now(&self, filter: &StreamFilter) -> Vec<StreamInfo> {
        self.streams
            .lock()
            .iter()
            .filter(|(name, _)| filter.accepts(name))
            .map(|(name, stream)| StreamInfo {
                name: name.clone(),
                position: stream.position.clone(),
                history: stream.history.len(),
            })
            .collect()
    }

    fn history_stats(&self) -> BackendStats {
        let streams = self.streams.lock();
        BackendStats {
            history_messages: streams.values().map(|s| s.history.len()).sum(),
            history_bytes: 0,
        }
    }
}

impl Backend for DelayedBackend {
    fn name(&self) -> &'static str {
        "delayed"
    }

    /// Answered as a backend across the network would (later), though the answer is ready.
    fn publish(&self, topic: &str, data: Data) -> Answer<Result<Published, Unavailable>> {
        let published = self.publish_now(topic, data);
        Answer::Later(Box::pin(async move { Ok(published) }))
    }

    fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Answer<Result<Option<HistoryPage>, Unavailable>> {
        Answer::Now(Ok(self.history_now(topic, query)))
    }

    fn interest(&self, subject: &Subject, on: bool) {
        self.declare_interest(subject, on);
    }

    fn listening(&self, _subject: &Subject) -> Answer<Result<(), Unavailable>> {
        Answer::Now(Ok(()))
    }

    fn streams(&self, filter: StreamFilter) -> Answer<Result<Vec<StreamInfo>, Unavailable>> {
        Answer::Now(Ok(self.streams_now(&filter)))
    }

    fn sweep(&self, _now: Instant) {}

    fn stats(&self) -> BackendStats {
        self.history_stats()
    }
}

/// The integration tests' harness and scenarios.
#[cfg(test)]
#[path = "../../tests/common/mod.rs"]
mod common;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Broker, testing};
    use crate::config::Config;
    use crate::connection::Connection;
    use crate::model::{Encoding, Replay, SubscribeOptions, Subscribed};
    use crate::server::Server;

    const MAX_DELAY: Duration = Duration::from_millis(5);

    /// A server whose broker delivers every publication 0–5 ms late, from another thread.
    fn delayed_server(history_size: usize) -> common::TestServer {
        common::TestServer::spawn(
            |c| c.history_size = history_size,
            move |config| {
                Server::bind_broker(
                    Broker::with_backend(config, move |_, _, sink| {
                        Arc::new(DelayedBackend::new(
                            history_size,
                            Delay::Random(MAX_DELAY),
                            sink,
                        ))
                    })
                    .expect("a valid configuration"),
                )
            },
        )
    }

    #[tokio::test]
    async fn recovery_under_load_with_late_deliveries() {
        let server = delayed_server(100_000);
        common::scenarios::recovery_under_load(&server, 3).await;
    }

    #[tokio::test]
    async fn joining_while_publishing_with_late_deliveries() {
        let server = delayed_server(100_000);
        common::scenarios::join_while_publishing(&server, 3).await;
    }

    #[tokio::test]
    async fn rewind_with_late_deliveries() {
        let server = delayed_server(100);
        common::scenarios::rewind_and_history_agree(&server).await;
    }

    /// A broker with a held backend: nothing is delivered until the test releases it.
    fn held_broker() -> (Arc<Broker>, Arc<DelayedBackend>) {
        let mut backend = None;
        let broker = Broker::with_backend(Config::default(), |_, _, sink| {
            let held = Arc::new(DelayedBackend::new(1000, Delay::Held, sink));
            backend = Some(held.clone());
            held
        })
        .unwrap();
        (broker, backend.unwrap())
    }

    fn conn() -> Arc<Connection> {
        testing::conn(Encoding::Json)
    }

    fn publish(broker: &Broker, topic: &str, n: u64) {
        let data = testing::json(&n.to_string());
        assert_eq!(testing::publish(broker, topic, data).unwrap().seq, n);
    }

    fn subscribe(
        broker: &Broker,
        conn: &Arc<Connection>,
        topic: &str,
        replay: Replay,
    ) -> Subscribed {
        let options = SubscribeOptions {
            replay,
            ..Default::default()
        };
        testing::subscribe(broker, conn, topic, options)
    }

    /// (topic, seq) of the messages queued for `conn`.
    fn received(conn: &Connection) -> Vec<(String, u64)> {
        testing::received(conn)
            .iter()
            .filter(|f| f["op"] == "message")
            .map(|f| {
                (
                    f["topic"].as_str().unwrap().to_owned(),
                    f["seq"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn on(topic: &str, seqs: impl IntoIterator<Item = u64>) -> Vec<(String, u64)> {
        seqs.into_iter().map(|s| (topic.to_owned(), s)).collect()
    }

    #[test]
    fn deliveries_the_replay_had_are_dropped_however_late() {
        let (broker, backend) = held_broker();
        let watcher = conn();
        subscribe(&broker, &watcher, "t", Replay::None);
        for n in 1..=5 {
            publish(&broker, "t", n);
        }
        // 1..=5 are in history but not delivered yet.
        let a = conn();
        let ack = subscribe(
            &broker,
            &a,
            "t",
            Replay::Since {
                epoch: "nope".into(),
                seq: 0,
            },
        );
        let epoch = ack.stream.unwrap().epoch;
        let b = conn();
        let ack = subscribe(
            &broker,
            &b,
            "t",
            Replay::Since {
                epoch: epoch.to_string(),
                seq: 2,
            },
        );
        assert_eq!(ack.recovered, Some(true));
        let c = conn();
        let ack = subscribe(&broker, &c, "t", Replay::Rewind(2));
        assert_eq!(ack.stream.unwrap().seq, 5);
        assert_eq!(received(&b), on("t", [3, 4, 5]), "the replay");
        assert_eq!(received(&c), on("t", [4, 5]), "the rewind");
        backend.release();
        publish(&broker, "t", 6);
        backend.release();
        assert_eq!(
            received(&watcher),
            on("t", 1..=6),
            "subscribed before they were published"
        );
        assert_eq!(
            received(&a),
            on("t", [6]),
            "another epoch: live from its ack"
        );
        assert_eq!(received(&b), on("t", [6]), "the late 1..=5 were dropped");
        assert_eq!(received(&c), on("t", [6]));
    }

    #[test]
    fn what_arrives_during_the_replay_follows_it_once() {
        let (broker, backend) = held_broker();
        for n in 1..=3 {
            publish(&broker, "t", n);
        }
        // While the subscriber reads history: the held 1..=3 arrive, and 4 is published and
        // delivered before the replay is queued.
        backend.during_next_history(|backend| {
            backend.release();
            backend.publish("t", testing::json("4"));
            backend.release();
        });
        let a = conn();
        let ack = subscribe(&broker, &a, "t", Replay::Rewind(10));
        assert_eq!(ack.stream.unwrap().seq, 3);
        publish(&broker, "t", 5);
        backend.release();
        assert_eq!(received(&a), on("t", 1..=5));
    }

    #[test]
    fn a_pattern_rewind_joins_each_topic_by_seq() {
        let (broker, backend) = held_broker();
        for n in 1..=3 {
            publish(&broker, "m.a", n);
        }
        publish(&broker, "m.b", 1);
        publish(&broker, "other", 1);
        backend.during_next_history(|backend| {
            backend.publish("m.b", testing::json("2"));
            backend.publish("m.c", testing::json("1"));
            backend.release();
        });
        let dash = conn();
        subscribe(&broker, &dash, "m.*", Replay::Rewind(2));
        publish(&broker, "m.a", 4);
        backend.release();
        let mut got = received(&dash);
        got.sort();
        let mut expected = [on("m.a", [2, 3, 4]), on("m.b", [1, 2]), on("m.c", [1])].concat();
        expected.sort();
        assert_eq!(got, expected, "last two of each, then live, none twice");
    }

    #[test]
    fn a_connection_that_already_receives_a_topic_loses_nothing_when_it_subscribes_again() {
        let (broker, backend) = held_broker();
        // Through a pattern, then exactly: what was in flight still arrives, once.
        let a = conn();
        subscribe(&broker, &a, "t.*", Replay::None);
        publish(&broker, "t.x", 1);
        publish(&broker, "t.x", 2);
        let ack = subscribe(&broker, &a, "t.x", Replay::None);
        assert_eq!(ack.stream.unwrap().seq, 2);
        backend.release();
        assert_eq!(received(&a), on("t.x", [1, 2]));

        // Subscribed again with a rewind while 3 and 4, already in history, reach the hub during
        // the history read: the stream goes on (3, 4), then the replay asked for (4), then live.
        publish(&broker, "t.x", 3);
        publish(&broker, "t.x", 4);
        backend.during_next_history(|backend| backend.release());
        subscribe(&broker, &a, "t.x", Replay::Rewind(1));
        publish(&broker, "t.x", 5);
        backend.release();
        assert_eq!(received(&a), on("t.x", [3, 4, 4, 5]));

        // Again, with 6 and 7 arriving only after the switch: they still arrive.
        publish(&broker, "t.x", 6);
        publish(&broker, "t.x", 7);
        subscribe(&broker, &a, "t.x", Replay::Rewind(1));
        backend.release();
        assert_eq!(
            received(&a),
            on("t.x", [7, 6, 7]),
            "the replay, then the stream"
        );
    }

    #[test]
    fn the_backend_hears_of_interest_when_the_first_subscriber_comes_and_the_last_goes() {
        let (broker, backend) = held_broker();
        let (a, b) = (conn(), conn());
        subscribe(&broker, &a, "t", Replay::None);
        subscribe(&broker, &b, "t", Replay::None);
        subscribe(&broker, &a, "t", Replay::Rewind(1));
        subscribe(&broker, &a, "p.*", Replay::None);
        subscribe(&broker, &b, "p.*", Replay::Rewind(3));
        broker.unsubscribe(&a, "t").unwrap();
        broker.unsubscribe(&a, "p.*").unwrap();
        broker.unsubscribe(&a, "never").unwrap();
        assert_eq!(
            backend.interest_log(),
            vec![("t".to_owned(), true), ("p.*".to_owned(), true)],
            "nothing while another subscriber remains"
        );
        broker.disconnect(&b);
        let mut ended = backend.interest_log()[2..].to_vec();
        ended.sort();
        assert_eq!(ended, [("p.*".to_owned(), false), ("t".to_owned(), false)]);
        subscribe(&broker, &a, "t", Replay::None);
        assert_eq!(backend.interest_log().last(), Some(&("t".to_owned(), true)));
    }
}
