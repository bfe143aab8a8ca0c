//! The broker: the one door through which the HTTP API and the connection actors publish,
//! subscribe, read history and look at topics and connections.
//!
//! Behind it, the backend (`crate::backend`) assigns seqs and keeps history, and the hub
//! (`crate::hub`) delivers to this node's subscribers. What a request may do is decided here,
//! once for every protocol: topics are validated, grants checked (`crate::auth`), sizes,
//! publish rates, subscription and connection counts limited.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::admission::{Admission, AdmissionLimit, Admissions};
use crate::auth::{Authenticator, Identity};
use crate::backend::memory::MemoryBackend;
use crate::backend::{
    Answer, Backend, DeliverySink, HistoryPage, HistoryQuery, Published, StreamFilter, Unavailable,
};
use crate::config::Config;
use crate::connection::Connection;
use crate::connections::{ConnectionCollector, ConnectionSummary, ConnectionTable};
use crate::data::Data;
use crate::frame::CloseCode;
use crate::hub::Hub;
use crate::metrics::{ComputedGauges, Metrics, Refused};
use crate::model::{ErrorCode, Replay, Source, SubscribeOptions, Subscribed};
use crate::queue;
use crate::topic::{self, Subject};

pub(crate) struct Broker {
    config: Config,
    /// This process's id, unique per run: tells nodes apart (`welcome`, `/api/topics`, metrics).
    node: Arc<str>,
    auth: Authenticator,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    backend: Arc<dyn Backend>,
    /// Where the broker's own topics (`_crier.`) live when `backend` is shared with other nodes:
    /// they are about this node.
    system: Option<Arc<MemoryBackend>>,
    connections: Arc<ConnectionTable>,
    admissions: Admissions,
    shutting_down: AtomicBool,
}

/// A request the broker will not carry out, and why; each protocol words it its own way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl From<Unavailable> for Refusal {
    fn from(unavailable: Unavailable) -> Self {
        Refusal::new(
            ErrorCode::Unavailable,
            format!("the backend is unavailable: {unavailable}"),
        )
    }
}

/// A publish the broker accepted: answered now, or once the backend has stored it.
pub(crate) type Publishing = Answer<Result<Accepted, Refusal>>;

/// Who is publishing: an HTTP request's identity, or a connection (its identity and its rate).
#[derive(Clone, Copy)]
pub(crate) enum Publisher<'a> {
    Http(&'a Identity),
    Connection(&'a Connection),
}

impl Publisher<'_> {
    fn source(self) -> Source {
        match self {
            Publisher::Http(_) => Source::Http,
            Publisher::Connection(_) => Source::Ws,
        }
    }
}

/// A publish as the broker answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub seq: u64,
    /// Connections on this node the message was queued for.
    pub receivers: usize,
}

/// One topic as `GET /api/topics` shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TopicInfo {
    pub name: Arc<str>,
    pub subscribers: usize,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub history: usize,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NodeStats {
    pub topics_with_subscribers: usize,
    pub patterns: usize,
    pub history_messages: usize,
    pub history_bytes: usize,
}

impl Broker {
    /// A broker with the in-memory backend.
    pub(crate) fn new(config: Config) -> Result<Arc<Self>, String> {
        Broker::with_backend(config, |config, metrics, sink| {
            Arc::new(MemoryBackend::new(config, metrics, sink))
        })
    }

    /// A broker with the backend `make` builds around this node's delivery sink.
    pub(crate) fn with_backend(
        config: Config,
        make: impl FnOnce(&Config, Arc<Metrics>, Arc<dyn DeliverySink>) -> Arc<dyn Backend>,
    ) -> Result<Arc<Self>, String> {
        Broker::with_shared_backend(config, None, |config, metrics, sink| {
            Ok(make(config, metrics, sink))
        })
    }

    /// A broker whose backend `make` builds (and may fail to), shared with other nodes when
    /// `node` is given: then the broker's own topics stay in this process.
    pub(crate) fn with_shared_backend(
        config: Config,
        node: Option<Arc<str>>,
        make: impl FnOnce(
            &Config,
            Arc<Metrics>,
            Arc<dyn DeliverySink>,
        ) -> Result<Arc<dyn Backend>, String>,
    ) -> Result<Arc<Self>, String> {
        let auth = Authenticator::from_config(&config)?;
        let metrics = Arc::new(Metrics::new(&config.metrics_namespaces));
        let hub = Arc::new(Hub::new(&config, metrics.clone()));
        let backend = make(&config, metrics.clone(), hub.clone())?;
        let system = node
            .is_some()
            .then(|| Arc::new(MemoryBackend::new(&config, metrics.clone(), hub.clone())));
        let node = node.unwrap_or_else(new_node_id);
        metrics.backend_info(backend.name(), &node);
        let connections = Arc::new(ConnectionTable::default());
        metrics.register(Box::new(ConnectionCollector::new(
            Arc::downgrade(&connections),
            config.max_buffered_bytes,
        )));
        Ok(Arc::new_cyclic(|broker: &std::sync::Weak<Broker>| {
            let stat = |read: fn(NodeStats) -> usize| {
                let broker = broker.clone();
                move || broker.upgrade().map_or(0.0, |b| read(b.stats()) as f64)
            };
            metrics.register(Box::new(
                ComputedGauges::new()
                    .gauge(
                        "crier_topics",
                        "Topics with at least one exact subscription now.",
                        stat(|s| s.topics_with_subscribers),
                    )
                    .gauge(
                        "crier_patterns",
                        "Pattern subscriptions now.",
                        stat(|s| s.patterns),
                    )
                    .gauge(
                        "crier_history_messages",
                        "Messages held in topic histories.",
                        stat(|s| s.history_messages),
                    )
                    .gauge(
                        "crier_history_bytes",
                        "Bytes held in topic histories (data, encoded frames, bookkeeping).",
                        stat(|s| s.history_bytes),
                    ),
            ));
            Broker {
                config,
                node,
                auth,
                metrics,
                hub,
                backend,
                system,
                connections,
                admissions: Admissions::default(),
                shutting_down: AtomicBool::new(false),
            }
        }))
    }

    pub(crate) fn auth(&self) -> &Authenticator {
        &self.auth
    }

    /// Counts a refusal and words it.
    fn refuse(&self, reason: Refused, code: ErrorCode, message: impl Into<String>) -> Refusal {
        self.metrics.refused(reason);
        Refusal::new(code, message)
    }

    fn forbidden(&self, what: &str, topic: &str) -> Refusal {
        self.refuse(
            Refused::Forbidden,
            ErrorCode::Forbidden,
            format!("not granted: {what} {topic:?}"),
        )
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Makes this thread one of the workers publications are handed to, if it can be one
    /// (`crate::workers`); a connection opened here records the answer.
    pub(crate) fn join_worker(&self) -> Option<crate::workers::WorkerId> {
        Hub::join_worker(&self.hub)
    }

    /// This process's node id.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// What the backend is called (`memory`), for logs, `/api/topics` and metrics.
    pub(crate) fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Refuses topics that messages cannot be published to.
    pub(crate) fn check_topic(&self, topic: &str) -> Result<(), Refusal> {
        topic::validate_topic(topic).map_err(|e| Refusal::new(ErrorCode::InvalidTopic, e.0))
    }

    fn check_size(&self, data: &Data) -> Result<(), Refusal> {
        let limit = self.config.max_message_bytes;
        if data.len() > limit {
            return Err(Refusal::new(
                ErrorCode::PayloadTooLarge,
                format!("data is {} bytes; the limit is {limit}", data.len()),
            ));
        }
        Ok(())
    }

    /// Refuses what cannot be subscribed to (topics and patterns).
    pub(crate) fn check_subject(&self, topic: &str) -> Result<(), Refusal> {
        self.subject(topic).map(|_| ())
    }

    fn subject(&self, topic: &str) -> Result<Subject, Refusal> {
        Subject::parse(topic).map_err(|e| Refusal::new(ErrorCode::InvalidTopic, e.0))
    }

    fn check_publish_grant(&self, identity: &Identity, topic: &str) -> Result<(), Refusal> {
        if !identity.is_authenticated() {
            return Err(self.unauthorized());
        }
        if topic::is_system(topic) {
            return Err(self.refuse(
                Refused::Forbidden,
                ErrorCode::Forbidden,
                format!(
                    "topics under {}. are the broker's own",
                    topic::SYSTEM_NAMESPACE
                ),
            ));
        }
        if !identity.grants.may_publish(topic) {
            return Err(self.forbidden("publish to", topic));
        }
        Ok(())
    }

    fn unauthorized(&self) -> Refusal {
        self.refuse(
            Refused::Unauthorized,
            ErrorCode::Unauthorized,
            "authenticate first: send {\"op\":\"auth\",\"token\":...}",
        )
    }

    /// Publishes `data` on `topic`. A refused publish consumes no seq. The answer comes once the
    /// backend has stored the message: at once in memory, after a round trip to Redis.
    pub(crate) fn publish(
        &self,
        from: Publisher<'_>,
        topic: &str,
        data: Data,
    ) -> Result<Publishing, Refusal> {
        self.check_topic(topic)?;
        match from {
            Publisher::Http(identity) => self.check_publish_grant(identity, topic)?,
            Publisher::Connection(conn) => {
                conn.with_identity(|identity| self.check_publish_grant(identity, topic))?
            }
        }
        self.check_size(&data)?;
        if let Publisher::Connection(conn) = from
            && !conn.may_publish_now()
        {
            return Err(self.refuse(
                Refused::RateLimited,
                ErrorCode::RateLimited,
                format!(
                    "over this connection's publish rate of {} messages a second",
                    self.config.publish_rate
                ),
            ));
        }
        Ok(self.publish_checked(topic, data, from.source()))
    }

    /// Publishes every item, or none if any is refused. If the backend fails part way, the
    /// answer is `unavailable` and the items before the failure may have been published.
    pub(crate) async fn publish_batch(
        &self,
        identity: &Identity,
        items: Vec<(String, Data)>,
    ) -> Result<Vec<(String, Accepted)>, Refusal> {
        let source = Source::Http;
        for (i, (topic, data)) in items.iter().enumerate() {
            self.check_topic(topic)
                .and_then(|()| self.check_publish_grant(identity, topic))
                .and_then(|()| self.check_size(data))
                .map_err(|e| Refusal::new(e.code, format!("item {i}: {}", e.message)))?;
        }
        // Each subscriber's writer is woken once for the whole batch.
        let publishing: Vec<(String, Publishing)> = queue::coalescing_wakes(|| {
            items
                .into_iter()
                .map(|(topic, data)| {
                    let publishing = self.publish_checked(&topic, data, source);
                    (topic, publishing)
                })
                .collect()
        });
        let mut accepted = Vec::with_capacity(publishing.len());
        for (topic, publishing) in publishing {
            accepted.push((topic, publishing.get().await?));
        }
        Ok(accepted)
    }

    /// Publishes on one of the broker's own topics (`_crier.`); not counted as a client's publish.
    pub(crate) fn publish_system(&self, topic: &str, data: Data) {
        match &self.system {
            Some(system) => {
                system.publish_now(topic, data);
            }
            None => drop(self.backend.publish(topic, data)),
        }
    }

    /// Where `subject` lives: the broker's own topics stay on this node.
    fn backend_for(&self, subject: &str) -> &dyn Backend {
        match &self.system {
            Some(system) if topic::is_system(subject) => &**system,
            _ => &*self.backend,
        }
    }

    /// How many of this node's connections a message on `topic` would be queued for.
    pub(crate) fn receivers(&self, topic: &str) -> usize {
        self.hub.receivers(topic)
    }

    /// Figures over this node's connections.
    pub(crate) fn connection_summary(&self) -> ConnectionSummary {
        self.connections
            .summary(self.config.max_buffered_bytes / 2, &[])
    }

    fn publish_checked(&self, topic: &str, data: Data, source: Source) -> Publishing {
        match self.backend_for(topic).publish(topic, data) {
            Answer::Now(published) => Answer::Now(
                published
                    .map(|published| accept(&self.hub, &self.metrics, topic, published, source))
                    .map_err(Refusal::from),
            ),
            Answer::Later(published) => {
                let (hub, metrics) = (self.hub.clone(), self.metrics.clone());
                let topic: Arc<str> = topic.into();
                Answer::Later(Box::pin(async move {
                    let published = published.await?;
                    Ok(accept(&hub, &metrics, &topic, published, source))
                }))
            }
        }
    }

    /// Subscribes `conn` to `topic` (a topic or a pattern), or changes how an existing
    /// subscription delivers. `acknowledge` runs before any message of the subscription is
    /// queued, so the acknowledgement comes first on the wire.
    pub(crate) async fn subscribe(
        &self,
        conn: &Arc<Connection>,
        topic: &str,
        options: &SubscribeOptions,
        acknowledge: &mut dyn FnMut(&Subscribed),
    ) -> Result<(), Refusal> {
        let subject = self.subject(topic)?;
        conn.with_identity(|identity| self.check_subscribe_grant(identity, &subject, topic))?;
        if matches!(subject, Subject::Pattern(_)) && matches!(options.replay, Replay::Since { .. })
        {
            return Err(Refusal::new(
                ErrorCode::BadFrame,
                "since needs an exact topic: a pattern spans several streams",
            ));
        }
        let limit = self.config.max_subscriptions;
        if !conn.with_subscriptions(|s| s.contains(&subject) || s.len() < limit) {
            return Err(Refusal::new(
                ErrorCode::TooManySubscriptions,
                format!("this connection already has {limit} subscriptions, the limit"),
            ));
        }
        self.hub
            .subscribe(
                self.backend_for(topic),
                conn,
                &subject,
                options,
                acknowledge,
            )
            .await?;
        conn.with_subscriptions(|s| s.insert(subject.clone()));
        if conn.queue.is_finished() {
            // The connection closed while the backend was answering, after its subscriptions
            // were ended: end this one too.
            self.end_subscription(conn, &subject);
        }
        Ok(())
    }

    /// Ends one of `conn`'s subscriptions in the hub (and forgets it).
    fn end_subscription(&self, conn: &Connection, subject: &Subject) {
        conn.with_subscriptions(|s| s.remove(subject));
        self.hub
            .unsubscribe(self.backend_for(subject.as_str()), conn.id, subject);
    }

    fn check_subscribe_grant(
        &self,
        identity: &Identity,
        subject: &Subject,
        topic: &str,
    ) -> Result<(), Refusal> {
        if !identity.is_authenticated() {
            return Err(self.unauthorized());
        }
        if !identity.grants.may_subscribe(subject) {
            return Err(self.forbidden("subscribe to", topic));
        }
        Ok(())
    }

    /// Gives `conn` a fresh identity (a new token): its grants replace the old ones, and the
    /// subscriptions they no longer grant end. Returns those, for the client to be told.
    pub(crate) fn reauthorize(&self, conn: &Connection, identity: Arc<Identity>) -> Vec<Subject> {
        let ended: Vec<Subject> = conn.with_subscriptions(|subscriptions| {
            let ended: Vec<Subject> = subscriptions
                .iter()
                .filter(|s| !identity.grants.may_subscribe(s))
                .cloned()
                .collect();
            for subject in &ended {
                subscriptions.remove(subject);
            }
            ended
        });
        conn.set_identity(identity);
        for subject in &ended {
            self.metrics.refused(Refused::Forbidden);
            self.hub
                .unsubscribe(self.backend_for(subject.as_str()), conn.id, subject);
        }
        ended
    }

    /// Ends `conn`'s subscription to `topic`; one it does not have is ignored.
    pub(crate) fn unsubscribe(&self, conn: &Connection, topic: &str) -> Result<(), Refusal> {
        let subject = self.subject(topic)?;
        if conn.with_subscriptions(|s| s.remove(&subject)) {
            self.hub
                .unsubscribe(self.backend_for(topic), conn.id, &subject);
        }
        Ok(())
    }

    /// Checks the subscriptions a connection asks for in its upgrade request (`?subscribe=`,
    /// comma-separated) before it is accepted; returns them without repeats.
    pub(crate) fn check_subscriptions(
        &self,
        identity: &Identity,
        list: &str,
    ) -> Result<Vec<String>, Refusal> {
        let mut topics: Vec<String> = Vec::new();
        for topic in list.split(',').filter(|t| !t.is_empty()) {
            let subject = self.subject(topic)?;
            self.check_subscribe_grant(identity, &subject, topic)?;
            // A subject is its text: equal texts are the same subscription.
            if !topics.iter().any(|t| t == topic) {
                topics.push(topic.to_owned());
            }
        }
        let limit = self.config.max_subscriptions;
        if topics.len() > limit {
            return Err(Refusal::new(
                ErrorCode::TooManySubscriptions,
                format!("{} subscriptions asked; the limit is {limit}", topics.len()),
            ));
        }
        Ok(topics)
    }

    /// The messages after `since` that `topic`'s history holds, at most `limit`; None for a
    /// topic that does not exist.
    pub(crate) async fn history(
        &self,
        identity: &Identity,
        topic: &str,
        since: u64,
        limit: usize,
    ) -> Result<Option<HistoryPage>, Refusal> {
        self.check_topic(topic)?;
        if !identity.grants.may_read(topic) {
            return Err(self.forbidden("read the history of", topic));
        }
        let query = HistoryQuery::After { seq: since, limit };
        Ok(self.backend_for(topic).history(topic, query).get().await?)
    }

    /// Every topic with subscribers on this node or a seq, by name.
    pub(crate) async fn topics(&self) -> Result<Vec<TopicInfo>, Refusal> {
        let mut streams = self.backend.streams(StreamFilter::All).get().await?;
        if let Some(system) = &self.system {
            streams.extend(system.streams_now(&StreamFilter::All));
        }
        let mut topics: Vec<TopicInfo> = streams
            .into_iter()
            .filter_map(|stream| {
                let subscribers = self.hub.receivers(&stream.name);
                (subscribers > 0 || stream.position.seq > 0).then_some(TopicInfo {
                    subscribers,
                    seq: stream.position.seq,
                    epoch: stream.position.epoch,
                    history: stream.history,
                    name: stream.name,
                })
            })
            .collect();
        topics.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    /// Whether the backend can serve requests now (`/readyz`).
    pub(crate) fn backend_ready(&self) -> bool {
        self.backend.ready()
    }

    pub(crate) fn stats(&self) -> NodeStats {
        let hub = self.hub.stats();
        let mut backend = self.backend.stats();
        if let Some(system) = &self.system {
            let system = system.stats();
            backend.history_messages += system.history_messages;
            backend.history_bytes += system.history_bytes;
        }
        NodeStats {
            topics_with_subscribers: hub.topics,
            patterns: hub.patterns,
            history_messages: backend.history_messages,
            history_bytes: backend.history_bytes,
        }
    }

    /// Periodic housekeeping: expires history and forgets idle topics.
    pub(crate) fn sweep(&self, now: Instant) {
        self.backend.sweep(now);
        if let Some(system) = &self.system {
            system.sweep(now);
        }
        self.hub.sweep(now);
    }

    /// Takes a place for a new connection from `ip` under `--max-connections` and
    /// `--max-connections-per-ip`.
    pub(crate) fn admit(&self, ip: Option<IpAddr>) -> Result<Admission, AdmissionLimit> {
        let config = &self.config;
        self.admissions
            .admit(ip, config.max_connections, config.max_connections_per_ip)
            .inspect_err(|limit| {
                self.metrics.refused(match limit {
                    AdmissionLimit::Total(_) => Refused::MaxConnections,
                    AdmissionLimit::PerIp(_) => Refused::MaxConnectionsPerIp,
                })
            })
    }

    /// Takes a new connection in.
    pub(crate) fn connect(&self, conn: Arc<Connection>) {
        self.connections.insert(conn);
        self.metrics.connection_accepted();
    }

    /// Ends every subscription of a connection that has closed, discards what is still queued
    /// for it and forgets it, keeping its totals in the metrics.
    pub(crate) fn disconnect(&self, conn: &Connection) {
        let subjects: Vec<Subject> = conn.with_subscriptions(|s| s.drain().collect());
        for subject in subjects {
            self.hub
                .unsubscribe(self.backend_for(subject.as_str()), conn.id, &subject);
        }
        conn.queue.finish();
        self.connections.retire(conn);
        conn.release_admission();
    }

    /// A snapshot of the open connections.
    pub(crate) fn connections(&self) -> Vec<Arc<Connection>> {
        self.connections.snapshot()
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.connections.len()
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Refuses new WebSockets from now on and closes every open one with 1001 once what is
    /// already queued for it has been sent.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        for conn in self.connections() {
            conn.queue.close(CloseCode::GOING_AWAY, false);
        }
    }
}

/// A new node id: random, so that two processes never share one.
pub(crate) fn new_node_id() -> Arc<str> {
    format!("{:016x}", fastrand::u64(..)).into()
}

/// Counts a publish the backend stored, and answers it.
fn accept(
    hub: &Hub,
    metrics: &Metrics,
    topic: &str,
    published: Published,
    source: Source,
) -> Accepted {
    metrics.published(metrics.namespace(topic), source);
    Accepted {
        seq: published.seq,
        receivers: published.receivers.unwrap_or_else(|| hub.receivers(topic)),
    }
}

/// What the crate's tests use to drive a broker without sockets.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::frame::decode_for_test;
    use crate::model::Encoding;
    use crate::queue::OutboundQueue;
    use bytes::Bytes;
    use serde_json::Value;

    /// A connection with a 1 MiB queue, not registered anywhere, on an open broker.
    pub(crate) fn conn(encoding: Encoding) -> Arc<Connection> {
        conn_as(encoding, open())
    }

    pub(crate) fn conn_as(encoding: Encoding, identity: Arc<Identity>) -> Arc<Connection> {
        let metrics = Arc::new(Metrics::new(&[]));
        Arc::new(Connection::new(
            None,
            encoding,
            OutboundQueue::new(1 << 20, SlowConsumerPolicy::DropOldest, metrics),
            None,
            identity,
        ))
    }

    /// Everyone's identity on a broker without authentication.
    pub(crate) fn open() -> Arc<Identity> {
        Authenticator::from_config(&Config::default())
            .expect("the default configuration")
            .unauthenticated()
    }

    /// The output of a future that is ready at once, as everything is with the memory backend.
    pub(crate) fn now<T>(future: impl Future<Output = T>) -> T {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(output) => output,
            std::task::Poll::Pending => panic!("this should have been ready at once"),
        }
    }

    /// Publishes as an HTTP client would.
    pub(crate) fn publish(broker: &Broker, topic: &str, data: Data) -> Result<Accepted, Refusal> {
        let identity = broker.auth.unauthenticated();
        now(broker
            .publish(Publisher::Http(&identity), topic, data)?
            .get())
    }

    pub(crate) fn json(s: &str) -> Data {
        Data::Json(Bytes::copy_from_slice(s.as_bytes()))
    }

    /// Frames waiting for the connection, decoded.
    pub(crate) fn received(conn: &Connection) -> Vec<Value> {
        conn.queue
            .drain_ready()
            .iter()
            .map(decode_for_test)
            .collect()
    }

    /// Publishes each number in `numbers` on `topic`, the number as its data.
    pub(crate) fn publish_numbers(
        broker: &Broker,
        topic: &str,
        numbers: std::ops::RangeInclusive<u64>,
    ) {
        for i in numbers {
            publish(broker, topic, json(&i.to_string())).unwrap();
        }
    }

    pub(crate) fn seqs(frames: &[Value]) -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f["op"] == "message")
            .map(|f| f["seq"].as_u64().unwrap())
            .collect()
    }

    /// Subscribes; returns what the acknowledgement reported.
    pub(crate) fn subscribe(
        broker: &Broker,
        conn: &Arc<Connection>,
        topic: &str,
        options: SubscribeOptions,
    ) -> Subscribed {
        let mut ack = None;
        now(broker.subscribe(conn, topic, &options, &mut |s| ack = Some(s.clone()))).unwrap();
        ack.expect("acknowledged")
    }

    pub(crate) fn since(epoch: &str, seq: u64) -> SubscribeOptions {
        SubscribeOptions {
            replay: Replay::Since {
                epoch: epoch.into(),
                seq,
            },
            ..Default::default()
        }
    }

    pub(crate) fn rewind(n: usize) -> SubscribeOptions {
        SubscribeOptions {
            replay: Replay::Rewind(n),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::model::{DeliveryMode, Encoding, StreamPosition};
    use serde_json::json;
    use std::time::Duration;

    fn broker_with(adjust: impl FnOnce(&mut Config)) -> Arc<Broker> {
        let mut config = Config::default();
        adjust(&mut config);
        Broker::new(config).unwrap()
    }

    fn broker() -> Arc<Broker> {
        broker_with(|_| {})
    }

    fn refusal(result: Result<(), Refusal>) -> ErrorCode {
        result.unwrap_err().code
    }

    #[test]
    fn topics_are_validated_once_here_for_every_request() {
        let broker = broker_with(|c| {
            c.max_message_bytes = 10;
            c.max_subscriptions = 2;
        });
        let a = conn(Encoding::Json);
        let ack = &mut |_: &Subscribed| {};
        let default = SubscribeOptions::default();
        assert_eq!(
            refusal(now(broker.subscribe(&a, "a..b", &default, ack))),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            refusal(broker.unsubscribe(&a, "a.>.b")),
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            publish(&broker, "a.*", json("1")).unwrap_err().code,
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            publish(&broker, "a", json(&"1".repeat(11))).unwrap_err(),
            Refusal::new(
                ErrorCode::PayloadTooLarge,
                "data is 11 bytes; the limit is 10"
            )
        );
        assert_eq!(
            now(broker.history(&open(), "a..b", 0, 1)).unwrap_err().code,
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            refusal(now(broker.subscribe(&a, "t.*", &since("e", 1), ack))),
            ErrorCode::BadFrame,
            "since needs an exact topic"
        );
        let batch = vec![("ok".into(), json("1")), ("not ok.".into(), json("2"))];
        let refused = now(broker.publish_batch(&open(), batch)).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidTopic);
        assert!(
            refused.message.starts_with("item 1: "),
            "{}",
            refused.message
        );
        assert!(
            now(broker.topics()).unwrap().is_empty(),
            "a refused batch publishes nothing"
        );

        // The subscription limit counts distinct subscriptions; changing one is not another.
        now(broker.subscribe(&a, "x", &default, ack)).unwrap();
        now(broker.subscribe(&a, "y.*", &default, ack)).unwrap();
        now(broker.subscribe(&a, "x", &rewind(1), ack)).unwrap();
        assert_eq!(
            refusal(now(broker.subscribe(&a, "z", &default, ack))),
            ErrorCode::TooManySubscriptions
        );
        assert_eq!(a.subscription_count(), 2);
        assert_eq!(
            broker.check_subscriptions(&open(), "a,b.*,a").unwrap(),
            vec!["a".to_owned(), "b.*".to_owned()]
        );
        assert_eq!(
            broker
                .check_subscriptions(&open(), "a,b,c")
                .unwrap_err()
                .code,
            ErrorCode::TooManySubscriptions
        );
        assert_eq!(
            broker
                .check_subscriptions(&open(), "a,b..c")
                .unwrap_err()
                .code,
            ErrorCode::InvalidTopic
        );
    }

    #[test]
    fn disconnecting_ends_every_subscription() {
        let broker = broker();
        let a = conn(Encoding::Json);
        broker.connect(a.clone());
        subscribe(&broker, &a, "t", SubscribeOptions::default());
        subscribe(&broker, &a, "p.*", SubscribeOptions::default());
        assert_eq!((broker.connection_count(), broker.stats().patterns), (1, 1));
        broker.disconnect(&a);
        assert_eq!(broker.connection_count(), 0);
        assert_eq!(publish(&broker, "t", json("1")).unwrap().receivers, 0);
        assert_eq!(publish(&broker, "p.q", json("1")).unwrap().receivers, 0);
        let stats = broker.stats();
        assert_eq!((stats.topics_with_subscribers, stats.patterns), (0, 0));
        assert_eq!(a.subscription_count(), 0);
    }

    #[test]
    fn sequences_count_per_topic_and_receivers_are_counted_once() {
        let broker = broker();
        let (a, b) = (conn(Encoding::Json), conn(Encoding::Msgpack));
        subscribe(&broker, &a, "x.y", SubscribeOptions::default());
        subscribe(&broker, &a, "x.*", SubscribeOptions::default());
        subscribe(&broker, &b, "x.>", SubscribeOptions::default());
        for (topic, data, expected) in [
            ("x.y", "1", (1, 2)),
            ("x.y", "2", (2, 2)),
            ("x.z", "3", (1, 2)),
            ("q", "4", (1, 0)),
        ] {
            let accepted = publish(&broker, topic, json(data)).unwrap();
            assert_eq!(
                (accepted.seq, accepted.receivers),
                expected,
                "{topic} {data}"
            );
        }
        assert_eq!(seqs(&received(&a)), vec![1, 2, 1]);
        assert_eq!(seqs(&received(&b)), vec![1, 2, 1]);
        let names: Vec<_> = now(broker.topics())
            .unwrap()
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
        let stats = broker.stats();
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
        let broker = broker_with(|c| c.history_size = 0);
        let a = conn(Encoding::Json);
        let first = subscribe(&broker, &a, "t", SubscribeOptions::default());
        publish(&broker, "t", json("1")).unwrap();
        broker.unsubscribe(&a, "t").unwrap();
        broker.sweep(Instant::now());
        assert_eq!(
            now(broker.topics()).unwrap().len(),
            1,
            "keeps its sequence for the topic ttl"
        );
        broker.sweep(Instant::now() + Duration::from_secs(301));
        assert!(now(broker.topics()).unwrap().is_empty());
        assert_eq!(publish(&broker, "t", json("1")).unwrap().seq, 1);
        let again = subscribe(&broker, &a, "t", SubscribeOptions::default());
        assert_ne!(
            first.stream.unwrap().epoch,
            again.stream.unwrap().epoch,
            "a new stream, a new epoch"
        );
    }

    #[test]
    fn history_keeps_the_last_n_messages() {
        let broker = broker_with(|c| c.history_size = 3);
        publish_numbers(&broker, "t", 1..=5);
        let page = now(broker.history(&open(), "t", 0, 100)).unwrap().unwrap();
        assert_eq!((page.position.seq, page.oldest), (5, Some(3)));
        assert_eq!(
            page.publications.iter().map(|p| p.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let page = now(broker.history(&open(), "t", 3, 1)).unwrap().unwrap();
        assert_eq!(
            page.publications
                .iter()
                .map(|p| (p.seq, p.data.clone()))
                .collect::<Vec<_>>(),
            vec![(4, json("4"))]
        );
        assert!(
            now(broker.history(&open(), "nope", 0, 10))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn history_expires_after_its_ttl() {
        let broker = broker_with(|c| c.history_ttl = Duration::from_millis(50));
        publish(&broker, "t", json("1")).unwrap();
        assert_eq!(broker.stats().history_messages, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            now(broker.history(&open(), "t", 0, 10))
                .unwrap()
                .unwrap()
                .publications
                .is_empty(),
            "readers never see expired messages"
        );
        broker.sweep(Instant::now());
        assert_eq!(
            (
                broker.stats().history_messages,
                broker.stats().history_bytes
            ),
            (0, 0)
        );
    }

    #[test]
    fn the_global_cap_evicts_the_oldest_messages_of_all_topics_first() {
        let data = format!("\"{}\"", "x".repeat(98));
        let publish_all = |broker: &Broker, topics: &[&str]| {
            let a = conn(Encoding::Json);
            subscribe(broker, &a, ">", SubscribeOptions::default());
            for topic in topics {
                publish(broker, topic, json(&data)).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        // What one retained message counts for: its data, its encoded frame, bookkeeping.
        let probe = broker();
        publish_all(&probe, &["one"]);
        let each = probe.stats().history_bytes;
        assert!(each > data.len(), "{each}");

        let cap = each * 7 / 2;
        let broker = broker_with(|c| c.history_max_bytes = cap);
        publish_all(&broker, &["old", "mid", "new", "old", "new"]);
        let held = |t: &str| {
            now(broker.history(&open(), t, 0, 100))
                .unwrap()
                .unwrap()
                .publications
                .iter()
                .map(|p| p.seq)
                .collect::<Vec<_>>()
        };
        // Publish order: old#1, mid#1, new#1, old#2, new#2; three fit, the two oldest went.
        assert_eq!(held("old"), vec![2]);
        assert_eq!(held("mid"), Vec::<u64>::new());
        assert_eq!(held("new"), vec![1, 2]);
        assert_eq!(
            (
                broker.stats().history_messages,
                broker.stats().history_bytes
            ),
            (3, 3 * each)
        );
    }

    #[test]
    fn recovery_replays_what_was_missed_after_the_ack() {
        let broker = broker();
        let a = conn(Encoding::Json);
        let ack = subscribe(&broker, &a, "t", SubscribeOptions::default());
        let StreamPosition { epoch, seq } = ack.stream.unwrap();
        assert_eq!(seq, 0);
        publish_numbers(&broker, "t", 1..=5);
        broker.unsubscribe(&a, "t").unwrap();
        let _ = received(&a);
        publish_numbers(&broker, "t", 6..=8);

        let b = conn(Encoding::Msgpack);
        let ack = subscribe(&broker, &b, "t", since(&epoch, 5));
        assert_eq!((ack.stream.unwrap().seq, ack.recovered), (8, Some(true)));
        publish(&broker, "t", json("9")).unwrap();
        assert_eq!(
            seqs(&received(&b)),
            vec![6, 7, 8, 9],
            "replay, then live, nothing twice"
        );

        let c = conn(Encoding::Json);
        assert_eq!(
            subscribe(&broker, &c, "t", since(&epoch, 9)).recovered,
            Some(true),
            "up to date"
        );
        assert!(received(&c).is_empty());
        assert_eq!(
            subscribe(&broker, &c, "t", since("another", 3)).recovered,
            Some(false),
            "epoch changed"
        );
        assert!(
            received(&c).is_empty(),
            "another stream's seqs mean nothing"
        );
        assert_eq!(
            subscribe(&broker, &c, "t", since(&epoch, 99)).recovered,
            Some(false),
            "from the future"
        );
    }

    #[test]
    fn recovery_past_what_history_holds_is_partial() {
        let broker = broker_with(|c| c.history_size = 2);
        let a = conn(Encoding::Json);
        let epoch = subscribe(&broker, &a, "t", SubscribeOptions::default())
            .stream
            .unwrap()
            .epoch;
        publish_numbers(&broker, "t", 1..=5);
        let b = conn(Encoding::Json);
        let ack = subscribe(&broker, &b, "t", since(&epoch, 1));
        assert_eq!(ack.recovered, Some(false));
        assert_eq!(seqs(&received(&b)), vec![4, 5], "what history still holds");
        let c = conn(Encoding::Json);
        assert_eq!(
            subscribe(&broker, &c, "t", since(&epoch, 3)).recovered,
            Some(true)
        );
        assert_eq!(seqs(&received(&c)), vec![4, 5]);
    }

    #[test]
    fn rewind_replays_the_last_messages_of_a_topic_or_of_every_matching_topic() {
        let broker = broker();
        for (topic, n) in [("metrics.cpu", 3), ("metrics.mem", 2), ("other", 2)] {
            publish_numbers(&broker, topic, 1..=n);
        }
        let a = conn(Encoding::Json);
        subscribe(&broker, &a, "metrics.cpu", rewind(2));
        assert_eq!(seqs(&received(&a)), vec![2, 3]);

        let dash = conn(Encoding::Json);
        let ack = subscribe(&broker, &dash, "metrics.*", rewind(1));
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
        // The replay is over, the pattern delivers, and only once.
        publish(&broker, "metrics.cpu", json("4")).unwrap();
        assert_eq!(seqs(&received(&dash)), vec![4]);
        assert_eq!(
            broker.stats().topics_with_subscribers,
            1,
            "a pattern is not a topic subscriber"
        );
    }

    #[test]
    fn latest_mode_delivers_the_freshest_value() {
        let broker = broker();
        let dash = conn(Encoding::Json);
        let latest = SubscribeOptions {
            mode: DeliveryMode::Latest { min_interval: None },
            ..Default::default()
        };
        subscribe(&broker, &dash, "gauge", latest);
        publish_numbers(&broker, "gauge", 1..=100);
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
