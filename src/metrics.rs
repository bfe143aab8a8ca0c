//! Prometheus metrics for `/metrics`.
//!
//! Events (publishes, deliveries, drops, closes, errors) are counted as they happen, once per
//! publish rather than once per subscriber where possible. Figures that belong to connections
//! (how many are open, their buffered amount, bytes sent, queue wait) are kept by each connection
//! in atomics it alone writes and are summed when Prometheus scrapes: a scrape takes no lock that
//! publishing needs, and the hot path never touches a counter shared with other threads per frame.
//!
//! No label grows with connections or topics: topic namespaces are labelled only when named in
//! `--metrics-namespaces`, everything else is `other`.

use std::collections::HashMap;
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::broker::Broker;
use crate::frame::{Encoding, ErrorCode};
use crate::topic;

/// Where a publish came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Ws,
    Http,
}

/// Why a message queued (or about to be queued) for a connection never reached its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Evicted by `drop-oldest` to make room.
    BufferFullOldest,
    /// Refused by `drop-newest`, or too large for the buffer at all.
    BufferFullNewest,
    /// Discarded when a slow consumer was disconnected.
    SlowConsumer,
    /// Still queued when the connection ended.
    Closed,
    /// Replaced by a newer message of the same topic (`latest` mode).
    Conflated,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::BufferFullOldest,
        DropReason::BufferFullNewest,
        DropReason::SlowConsumer,
        DropReason::Closed,
        DropReason::Conflated,
    ];

    fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFullOldest => "buffer_full_oldest",
            DropReason::BufferFullNewest => "buffer_full_newest",
            DropReason::SlowConsumer => "slow_consumer",
            DropReason::Closed => "closed",
            DropReason::Conflated => "conflated",
        }
    }
}

/// Why a message left a topic's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvictReason {
    /// The topic's history was full (`--history-size`).
    Size,
    /// Older than `--history-ttl`.
    Ttl,
    /// All histories together were over `--history-max-bytes`.
    Memory,
}

impl EvictReason {
    const ALL: [EvictReason; 3] = [EvictReason::Size, EvictReason::Ttl, EvictReason::Memory];

    fn as_str(self) -> &'static str {
        match self {
            EvictReason::Size => "size",
            EvictReason::Ttl => "ttl",
            EvictReason::Memory => "memory",
        }
    }
}

/// Reasons a connection closes, as counted in `crier_connections_closed_total`.
pub(crate) const CLOSE_REASONS: [&str; 6] = [
    "client",
    "abnormal",
    "slow_consumer",
    "idle_timeout",
    "protocol_error",
    "shutdown",
];

/// A topic namespace's index in the counters: one per `--metrics-namespaces` entry, then `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ns(u16);

/// Upper bounds of the queue-wait histogram, in seconds.
const WAIT_BUCKETS: [f64; 14] = [
    0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// How long frames waited in one connection's queue. Written only by the thread that hands the
/// connection's frames to its socket.
#[derive(Debug, Default)]
pub(crate) struct WaitHistogram {
    buckets: [AtomicU64; WAIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl WaitHistogram {
    #[cfg(test)]
    pub(crate) fn observe(&self, wait: Duration) {
        let mut batch = WaitBatch::default();
        batch.observe(wait);
        self.add(&batch);
    }

    /// Adds a batch of observations: a few atomic adds per batch, not three per frame.
    pub(crate) fn add(&self, batch: &WaitBatch) {
        for (bucket, &n) in self.buckets.iter().zip(&batch.buckets) {
            if n > 0 {
                bucket.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(batch.count, Ordering::Relaxed);
        self.sum_nanos.fetch_add(batch.sum_nanos, Ordering::Relaxed);
    }

    fn add_to(&self, totals: &mut WaitTotals) {
        for (total, bucket) in totals.buckets.iter_mut().zip(&self.buckets) {
            *total += bucket.load(Ordering::Relaxed);
        }
        totals.count += self.count.load(Ordering::Relaxed);
        totals.sum_nanos += self.sum_nanos.load(Ordering::Relaxed);
    }
}

/// Queue waits observed while taking one batch of frames, before they are added to a
/// connection's [`WaitHistogram`].
#[derive(Debug, Default)]
pub(crate) struct WaitBatch {
    buckets: [u64; WAIT_BUCKETS.len()],
    count: u64,
    sum_nanos: u64,
}

impl WaitBatch {
    pub(crate) fn observe(&mut self, wait: Duration) {
        let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = WAIT_BUCKET_NANOS.iter().position(|&bound| nanos <= bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_nanos = self.sum_nanos.saturating_add(nanos);
    }
}

/// [`WAIT_BUCKETS`] in nanoseconds.
const WAIT_BUCKET_NANOS: [u64; WAIT_BUCKETS.len()] = {
    let mut nanos = [0; WAIT_BUCKETS.len()];
    let mut i = 0;
    while i < WAIT_BUCKETS.len() {
        nanos[i] = (WAIT_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    nanos
};

#[derive(Debug, Default, Clone)]
struct WaitTotals {
    buckets: [u64; WAIT_BUCKETS.len()],
    count: u64,
    sum_nanos: u64,
}

/// What connections that have closed contributed to the scrape-time counters.
#[derive(Debug, Default)]
struct Retired {
    sent_bytes: u64,
    wait: WaitTotals,
}

pub(crate) struct Metrics {
    registry: Registry,
    namespaces: HashMap<Box<str>, Ns>,
    other: Ns,
    connections_accepted: IntCounter,
    connections_closed: IntCounterVec,
    published: Vec<[IntCounter; 2]>,
    delivered: Vec<IntCounter>,
    dropped: Vec<[IntCounter; DropReason::ALL.len()]>,
    received_bytes: IntCounter,
    errors: [IntCounter; ErrorCode::ALL.len()],
    http_requests: IntCounterVec,
    fanout_seconds: Histogram,
    history_evicted: [IntCounter; EvictReason::ALL.len()],
    /// Also held by a scrape while it sums live connections, so that a connection is counted
    /// either live or retired, never both or neither.
    retired: Mutex<Retired>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// `namespaces` are the topic namespaces (first segments) to label; `broker` is read at
    /// scrape time for the per-connection figures.
    pub(crate) fn new(
        namespaces: &[String],
        max_buffered_bytes: usize,
        broker: Weak<Broker>,
    ) -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| {
            // Names are fixed and distinct, so registration cannot collide.
            if let Err(e) = registry.register(c) {
                tracing::error!(error = %e, "metric registration failed");
            }
        };

        let mut names: Vec<&str> = Vec::new();
        for ns in namespaces {
            if !names.contains(&ns.as_str()) && ns != "other" {
                names.push(ns);
            }
        }
        let other = Ns(names.len() as u16);
        let label_of = |i: usize| names.get(i).copied().unwrap_or("other");
        let ns_count = names.len() + 1;

        let build_info = prometheus::IntGaugeVec::new(
            opts("crier_build_info", "Crier's version; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        reg(Box::new(build_info));

        let connections_accepted = IntCounter::with_opts(opts(
            "crier_connections_accepted_total",
            "WebSocket connections accepted.",
        ))
        .expect("valid metric");
        reg(Box::new(connections_accepted.clone()));
        let connections_closed = IntCounterVec::new(
            opts(
                "crier_connections_closed_total",
                "WebSocket connections closed, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in CLOSE_REASONS {
            connections_closed.with_label_values(&[reason]);
        }
        reg(Box::new(connections_closed.clone()));

        let published_vec = IntCounterVec::new(
            opts(
                "crier_messages_published_total",
                "Messages published, by source and topic namespace.",
            ),
            &["source", "namespace"],
        )
        .expect("valid metric");
        let published = (0..ns_count)
            .map(|i| {
                [
                    published_vec.with_label_values(&["ws", label_of(i)]),
                    published_vec.with_label_values(&["http", label_of(i)]),
                ]
            })
            .collect();
        reg(Box::new(published_vec));

        let delivered_vec = IntCounterVec::new(
            opts(
                "crier_messages_delivered_total",
                "Message frames handed to a connection's outbound queue, by topic namespace.",
            ),
            &["namespace"],
        )
        .expect("valid metric");
        let delivered = (0..ns_count)
            .map(|i| delivered_vec.with_label_values(&[label_of(i)]))
            .collect();
        reg(Box::new(delivered_vec));

        let dropped_vec = IntCounterVec::new(
            opts(
                "crier_messages_dropped_total",
                "Message frames for a connection that never reached its socket, by reason and topic namespace.",
            ),
            &["reason", "namespace"],
        )
        .expect("valid metric");
        let dropped = (0..ns_count)
            .map(|i| {
                DropReason::ALL.map(|r| dropped_vec.with_label_values(&[r.as_str(), label_of(i)]))
            })
            .collect();
        reg(Box::new(dropped_vec));

        let received_bytes = IntCounter::with_opts(opts(
            "crier_received_bytes_total",
            "Bytes of WebSocket messages received from clients.",
        ))
        .expect("valid metric");
        reg(Box::new(received_bytes.clone()));

        let errors_vec = IntCounterVec::new(
            opts(
                "crier_errors_total",
                "Error frames sent to WebSocket clients, by code.",
            ),
            &["code"],
        )
        .expect("valid metric");
        let errors = ErrorCode::ALL.map(|code| errors_vec.with_label_values(&[code.as_str()]));
        reg(Box::new(errors_vec));

        let http_requests = IntCounterVec::new(
            opts(
                "crier_http_requests_total",
                "HTTP requests, by route and status.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        reg(Box::new(http_requests.clone()));

        let fanout_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "crier_publish_fanout_seconds",
                "Time from accepting a publish to its frame being queued for every local subscriber.",
            )
            .buckets(vec![0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.0001, 0.000_25, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1]),
        )
        .expect("valid metric");
        reg(Box::new(fanout_seconds.clone()));

        let evicted_vec = IntCounterVec::new(
            opts(
                "crier_history_evicted_total",
                "Messages that left topic histories, by reason (size, ttl, memory).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let history_evicted =
            EvictReason::ALL.map(|r| evicted_vec.with_label_values(&[r.as_str()]));
        reg(Box::new(evicted_vec));

        reg(Box::new(ConnectionCollector::new(
            broker,
            max_buffered_bytes,
        )));
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));

        Metrics {
            registry,
            namespaces: names
                .iter()
                .enumerate()
                .map(|(i, n)| (Box::from(*n), Ns(i as u16)))
                .collect(),
            other,
            connections_accepted,
            connections_closed,
            published,
            delivered,
            dropped,
            received_bytes,
            errors,
            http_requests,
            fanout_seconds,
            history_evicted,
            retired: Mutex::new(Retired::default()),
        }
    }

    /// The namespace label a topic's messages are counted under.
    pub(crate) fn namespace(&self, topic: &str) -> Ns {
        if self.namespaces.is_empty() {
            return self.other;
        }
        self.namespaces
            .get(topic::namespace(topic))
            .copied()
            .unwrap_or(self.other)
    }

    pub(crate) fn connection_accepted(&self) {
        self.connections_accepted.inc();
    }

    pub(crate) fn connection_closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    /// One publish: its source, its fan-out time and how many connections it was queued for.
    pub(crate) fn published(&self, ns: Ns, source: Source, fanout: Duration, receivers: usize) {
        let by_ns = &self.published[usize::from(ns.0)];
        by_ns[source as usize].inc();
        self.delivered[usize::from(ns.0)].inc_by(receivers as u64);
        self.fanout_seconds.observe(fanout.as_secs_f64());
    }

    pub(crate) fn dropped(&self, ns: Ns, reason: DropReason, count: u64) {
        if count > 0 {
            self.dropped[usize::from(ns.0)][reason as usize].inc_by(count);
        }
    }

    pub(crate) fn history_evicted(&self, reason: EvictReason) {
        self.history_evicted[reason as usize].inc();
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.received_bytes.inc_by(bytes as u64);
    }

    pub(crate) fn error_sent(&self, code: ErrorCode) {
        self.errors[code as usize].inc();
    }

    pub(crate) fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// Moves a closing connection's contributions to the retired totals and removes it from the
    /// live table, in one step as far as a scrape can tell.
    pub(crate) fn retire(&self, stats: &crate::queue::QueueStats, remove: impl FnOnce()) {
        let mut retired = self.retired.lock();
        retired.sent_bytes += stats.sent_bytes();
        stats.wait().add_to(&mut retired.wait);
        remove();
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "could not encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The figures computed from live connections at scrape time.
struct ConnectionCollector {
    broker: Weak<Broker>,
    descs: Vec<Desc>,
    buffered_buckets: Vec<f64>,
    half_cap: usize,
}

const CONNECTION_FAMILIES: [(&str, &str); 12] = [
    (
        "crier_connections",
        "WebSocket connections open now, by encoding.",
    ),
    (
        "crier_subscriptions",
        "Subscriptions (topics and patterns) open now.",
    ),
    (
        "crier_topics",
        "Topics with at least one exact subscription now.",
    ),
    ("crier_patterns", "Pattern subscriptions now."),
    (
        "crier_buffered_bytes",
        "Sum over connections of bytes queued and not yet taken by the socket.",
    ),
    (
        "crier_buffered_bytes_max",
        "The largest single connection's buffered bytes.",
    ),
    (
        "crier_slow_connections",
        "Connections whose buffered bytes exceed half of --max-buffered-bytes.",
    ),
    (
        "crier_connection_buffered_bytes",
        "Connections by buffered bytes, at scrape time.",
    ),
    (
        "crier_sent_bytes_total",
        "Bytes of WebSocket frames taken by sockets.",
    ),
    (
        "crier_queue_wait_seconds",
        "Time frames waited in a connection's queue before its socket took them.",
    ),
    (
        "crier_history_messages",
        "Messages held in topic histories.",
    ),
    (
        "crier_history_bytes",
        "Bytes held in topic histories (data, encoded frames, bookkeeping).",
    ),
];

impl ConnectionCollector {
    fn new(broker: Weak<Broker>, max_buffered_bytes: usize) -> Self {
        let descs = CONNECTION_FAMILIES
            .iter()
            .map(|(name, help)| {
                let labels = if *name == "crier_connections" {
                    vec!["encoding".to_owned()]
                } else {
                    vec![]
                };
                Desc::new(
                    (*name).to_owned(),
                    (*help).to_owned(),
                    labels,
                    HashMap::new(),
                )
                .expect("valid desc")
            })
            .collect();
        ConnectionCollector {
            broker,
            descs,
            buffered_buckets: buffered_buckets(max_buffered_bytes),
            half_cap: max_buffered_bytes / 2,
        }
    }
}

/// Powers of two from 1 KiB up to the cap, and the cap itself.
fn buffered_buckets(cap: usize) -> Vec<f64> {
    let mut bounds = Vec::new();
    let mut bound = 1024usize;
    while bound < cap {
        bounds.push(bound as f64);
        bound *= 2;
    }
    bounds.push(cap as f64);
    bounds
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

fn gauge(value: f64) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    Metric::from_gauge(gauge)
}

fn counter(value: f64) -> Metric {
    let mut counter = Counter::default();
    counter.set_value(value);
    let mut metric = Metric::default();
    metric.set_counter(counter);
    metric
}

fn histogram(bounds: &[f64], counts: &[u64], count: u64, sum: f64) -> Metric {
    let mut cumulative = 0;
    let buckets = bounds
        .iter()
        .zip(counts)
        .map(|(&bound, &n)| {
            cumulative += n;
            let mut bucket = Bucket::default();
            bucket.set_upper_bound(bound);
            bucket.set_cumulative_count(cumulative);
            bucket
        })
        .collect();
    let mut histogram = prometheus::proto::Histogram::default();
    histogram.set_bucket(buckets);
    histogram.set_sample_count(count);
    histogram.set_sample_sum(sum);
    let mut metric = Metric::default();
    metric.set_histogram(histogram);
    metric
}

impl Collector for ConnectionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(broker) = self.broker.upgrade() else {
            return Vec::new();
        };
        let mut by_encoding = [0u64; 2];
        let (mut subscriptions, mut buffered_sum, mut buffered_max, mut slow) =
            (0u64, 0u64, 0u64, 0u64);
        let mut buffered_counts = vec![0u64; self.buffered_buckets.len()];
        let (sent_bytes, wait) = {
            let retired = broker.metrics.retired.lock();
            let mut wait = retired.wait.clone();
            let mut sent = retired.sent_bytes;
            for entry in broker.connections.iter() {
                let conn = entry.value();
                let stats = conn.queue.stats();
                by_encoding[conn.encoding as usize] += 1;
                subscriptions += conn.subscription_count() as u64;
                let (buffered, _) = conn.queue.buffered();
                buffered_sum += buffered as u64;
                buffered_max = buffered_max.max(buffered as u64);
                if buffered > self.half_cap {
                    slow += 1;
                }
                if let Some(i) = self
                    .buffered_buckets
                    .iter()
                    .position(|&b| buffered as f64 <= b)
                {
                    buffered_counts[i] += 1;
                }
                sent += stats.sent_bytes();
                stats.wait().add_to(&mut wait);
            }
            (sent, wait)
        };
        let engine = broker.engine.stats();
        let connections = by_encoding.iter().sum::<u64>();
        let help = |i: usize| CONNECTION_FAMILIES[i].1;
        let name = |i: usize| CONNECTION_FAMILIES[i].0;

        let mut open = Vec::new();
        for encoding in Encoding::ALL {
            let mut metric = gauge(by_encoding[encoding as usize] as f64);
            let mut label = LabelPair::default();
            label.set_name("encoding".to_owned());
            label.set_value(encoding.name().to_owned());
            metric.set_label(vec![label]);
            open.push(metric);
        }
        vec![
            family(name(0), help(0), MetricType::GAUGE, open),
            family(
                name(1),
                help(1),
                MetricType::GAUGE,
                vec![gauge(subscriptions as f64)],
            ),
            family(
                name(2),
                help(2),
                MetricType::GAUGE,
                vec![gauge(engine.topics_with_subscribers as f64)],
            ),
            family(
                name(3),
                help(3),
                MetricType::GAUGE,
                vec![gauge(engine.patterns as f64)],
            ),
            family(
                name(4),
                help(4),
                MetricType::GAUGE,
                vec![gauge(buffered_sum as f64)],
            ),
            family(
                name(5),
                help(5),
                MetricType::GAUGE,
                vec![gauge(buffered_max as f64)],
            ),
            family(
                name(6),
                help(6),
                MetricType::GAUGE,
                vec![gauge(slow as f64)],
            ),
            family(
                name(7),
                help(7),
                MetricType::HISTOGRAM,
                vec![histogram(
                    &self.buffered_buckets,
                    &buffered_counts,
                    connections,
                    buffered_sum as f64,
                )],
            ),
            family(
                name(8),
                help(8),
                MetricType::COUNTER,
                vec![counter(sent_bytes as f64)],
            ),
            family(
                name(9),
                help(9),
                MetricType::HISTOGRAM,
                vec![histogram(
                    &WAIT_BUCKETS,
                    &wait.buckets,
                    wait.count,
                    wait.sum_nanos as f64 / 1e9,
                )],
            ),
            family(
                name(10),
                help(10),
                MetricType::GAUGE,
                vec![gauge(engine.history_messages as f64)],
            ),
            family(
                name(11),
                help(11),
                MetricType::GAUGE,
                vec![gauge(engine.history_bytes as f64)],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_buckets_run_from_a_kibibyte_to_the_cap() {
        assert_eq!(buffered_buckets(4096), vec![1024.0, 2048.0, 4096.0]);
        assert_eq!(buffered_buckets(5000), vec![1024.0, 2048.0, 4096.0, 5000.0]);
        assert_eq!(buffered_buckets(512), vec![512.0]);
        assert_eq!(buffered_buckets(1 << 20).len(), 11);
    }

    #[test]
    fn wait_histogram_buckets_and_sums() {
        let h = WaitHistogram::default();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut totals = WaitTotals::default();
        h.add_to(&mut totals);
        assert_eq!(totals.count, 3);
        assert_eq!(totals.buckets[0], 1);
        assert_eq!(totals.buckets[6], 1, "3 ms falls in the 5 ms bucket");
        assert_eq!(
            totals.buckets.iter().sum::<u64>(),
            2,
            "60 s is only in +Inf"
        );
        assert_eq!(totals.sum_nanos, 60_003_030_000);
    }

    #[test]
    fn namespaces_are_bounded() {
        let m = Metrics::new(
            &["metrics".into(), "chat".into(), "metrics".into()],
            1024,
            Weak::new(),
        );
        assert_eq!(m.namespace("metrics.cpu"), Ns(0));
        assert_eq!(m.namespace("chat"), Ns(1));
        assert_eq!(m.namespace("anything.else"), Ns(2));
        let none = Metrics::new(&[], 1024, Weak::new());
        assert_eq!(none.namespace("metrics.cpu"), Ns(0));
        let text = m.render();
        assert!(
            text.contains(r#"crier_messages_published_total{namespace="chat",source="http"} 0"#),
            "{text}"
        );
        assert!(text.contains(
            r#"crier_messages_dropped_total{namespace="other",reason="buffer_full_oldest"} 0"#
        ));
        assert!(text.contains(r#"crier_build_info{version=""#));
    }

    /// Connections with known buffered amounts, summed at scrape time.
    #[test]
    fn scrape_time_figures_come_from_the_connections() {
        use crate::config::{Config, SlowConsumerPolicy};
        use crate::connection::Connection;
        use crate::queue::OutboundQueue;
        use bytes::Bytes;
        use std::sync::Arc;
        use std::time::Instant;

        let config = Config {
            max_buffered_bytes: 8192,
            ..Config::default()
        };
        let broker = Broker::new(config);
        let ns = broker.metrics.namespace("t");
        for (buffered, encoding) in [
            (0, Encoding::Json),
            (500, Encoding::Json),
            (3000, Encoding::Msgpack),
            (5000, Encoding::Json),
        ] {
            let queue =
                OutboundQueue::new(8192, SlowConsumerPolicy::DropOldest, broker.metrics.clone());
            if buffered > 0 {
                queue.push_message(Bytes::from(vec![0u8; buffered]), ns, Instant::now());
            }
            let conn = Arc::new(Connection::new(None, encoding, queue, None));
            broker.connections.insert(conn.id, conn);
        }
        let families = ConnectionCollector::new(Arc::downgrade(&broker), 8192).collect();
        let find = |name: &str| families.iter().find(|f| f.name() == name).unwrap();
        let value = |name: &str| find(name).get_metric()[0].get_gauge().get_value();

        assert_eq!(value("crier_buffered_bytes"), 8500.0);
        assert_eq!(value("crier_buffered_bytes_max"), 5000.0);
        assert_eq!(
            value("crier_slow_connections"),
            1.0,
            "only 5000 exceeds half of 8192"
        );
        let by_encoding: Vec<f64> = find("crier_connections")
            .get_metric()
            .iter()
            .map(|m| m.get_gauge().get_value())
            .collect();
        assert_eq!(by_encoding, vec![3.0, 1.0]);

        let histogram = find("crier_connection_buffered_bytes").get_metric()[0].get_histogram();
        let buckets: Vec<(f64, u64)> = histogram
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        assert_eq!(
            buckets,
            vec![(1024.0, 2), (2048.0, 2), (4096.0, 3), (8192.0, 4)]
        );
        assert_eq!(histogram.get_sample_count(), 4);
        assert_eq!(histogram.get_sample_sum(), 8500.0);

        // Retiring a connection keeps its bytes sent and leaves the live figures.
        let conn = broker
            .connections
            .iter()
            .next()
            .map(|c| c.value().clone())
            .unwrap();
        broker.retire(&conn);
        let families = ConnectionCollector::new(Arc::downgrade(&broker), 8192).collect();
        let histogram = families
            .iter()
            .find(|f| f.name() == "crier_connection_buffered_bytes")
            .unwrap();
        assert_eq!(
            histogram.get_metric()[0].get_histogram().get_sample_count(),
            3
        );
    }
}
