//! Prometheus metrics for `/metrics`.
//!
//! Events (publishes, deliveries, drops, closes, errors) are counted here as they happen, once
//! per publish rather than once per subscriber where possible. Figures that belong to connections
//! or to the hub and backend are computed when Prometheus scrapes, by collectors their owners register
//! (`crate::connections`, `crate::broker`): a scrape takes no lock that publishing needs, and
//! the hot path never touches a counter shared with other threads per frame.
//!
//! No label grows with connections or topics: topic namespaces are labelled only when named in
//! `--metrics-namespaces`, everything else is `other`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Gauge, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::model::{ErrorCode, Source};
use crate::topic;

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

/// Why the broker turned something away at a limit or a permission check, as counted in
/// `crier_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A handshake past `--max-connections` (503).
    MaxConnections,
    /// A handshake past `--max-connections-per-ip` (429).
    MaxConnectionsPerIp,
    /// A handshake from an origin not in `--allowed-origins` (403).
    Origin,
    /// A token or key that does not verify, at the handshake, in `auth` or over HTTP.
    InvalidToken,
    /// A request without the credentials it needs.
    Unauthorized,
    /// A subscribe, publish or read the credentials do not grant.
    Forbidden,
    /// A publish over `--publish-rate`.
    RateLimited,
    /// A connection closed for sending `--max-bad-frames` bad frames in a minute.
    BadFrames,
    /// A connection closed for not authenticating within `--auth-timeout`.
    AuthTimeout,
}

impl Refused {
    const ALL: [Refused; 9] = [
        Refused::MaxConnections,
        Refused::MaxConnectionsPerIp,
        Refused::Origin,
        Refused::InvalidToken,
        Refused::Unauthorized,
        Refused::Forbidden,
        Refused::RateLimited,
        Refused::BadFrames,
        Refused::AuthTimeout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerIp => "max_connections_per_ip",
            Refused::Origin => "origin",
            Refused::InvalidToken => "invalid_token",
            Refused::Unauthorized => "unauthorized",
            Refused::Forbidden => "forbidden",
            Refused::RateLimited => "rate_limited",
            Refused::BadFrames => "bad_frames",
            Refused::AuthTimeout => "auth_timeout",
        }
    }
}

/// Event counts since the start, summed over their labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub published: u64,
    pub delivered: u64,
    pub dropped: [(&'static str, u64); DropReason::ALL.len()],
    pub connections_accepted: u64,
    pub connections_closed: u64,
    pub refused: u64,
    pub errors: u64,
}

/// Reasons a connection closes, as counted in `crier_connections_closed_total`.
pub(crate) const CLOSE_REASONS: [&str; 9] = [
    "client",
    "abnormal",
    "slow_consumer",
    "idle_timeout",
    "protocol_error",
    "shutdown",
    "bad_frames",
    "token_expired",
    "auth_timeout",
];

/// A topic namespace's index in the counters: one per `--metrics-namespaces` entry, then `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ns(u16);

/// Upper bounds of the queue-wait histogram, in seconds.
pub(crate) const WAIT_BUCKETS: [f64; 14] = [
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
        batch.observe(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
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

    pub(crate) fn add_to(&self, totals: &mut WaitTotals) {
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
    /// One frame's wait, in nanoseconds.
    pub(crate) fn observe(&mut self, nanos: u64) {
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

/// Queue waits summed over connections.
#[derive(Debug, Default, Clone)]
pub(crate) struct WaitTotals {
    pub buckets: [u64; WAIT_BUCKETS.len()],
    pub count: u64,
    pub sum_nanos: u64,
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
    refused: [IntCounter; Refused::ALL.len()],
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    /// `namespaces` are the topic namespaces (first segments) to label.
    pub(crate) fn new(namespaces: &[String]) -> Metrics {
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

        let refused_vec = IntCounterVec::new(
            opts(
                "crier_refused_total",
                "Requests and connections turned away at a limit or a permission check, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let refused = Refused::ALL.map(|r| refused_vec.with_label_values(&[r.as_str()]));
        reg(Box::new(refused_vec));

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
            refused,
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

    /// One publish accepted on this node.
    pub(crate) fn published(&self, ns: Ns, source: Source) {
        self.published[usize::from(ns.0)][source as usize].inc();
    }

    /// Frames of a publication queued for `queued` of this node's connections (by one thread:
    /// the publisher's or a worker's).
    pub(crate) fn delivered(&self, ns: Ns, queued: usize) {
        self.delivered[usize::from(ns.0)].inc_by(queued as u64);
    }

    /// A publication is queued for every local subscriber, `fanout` after it was accepted.
    pub(crate) fn fanned_out(&self, fanout: Duration) {
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

    /// Totals since the start, for the `_crier.stats` topic.
    pub(crate) fn totals(&self) -> Totals {
        let sum = |counters: &mut dyn Iterator<Item = &IntCounter>| counters.map(|c| c.get()).sum();
        Totals {
            published: sum(&mut self.published.iter().flatten()),
            delivered: sum(&mut self.delivered.iter()),
            dropped: DropReason::ALL.map(|reason| {
                (
                    reason.as_str(),
                    sum(&mut self.dropped.iter().map(|ns| &ns[reason as usize])),
                )
            }),
            connections_accepted: self.connections_accepted.get(),
            connections_closed: CLOSE_REASONS
                .iter()
                .map(|r| self.connections_closed.with_label_values(&[*r]).get())
                .sum(),
            refused: sum(&mut self.refused.iter()),
            errors: sum(&mut self.errors.iter()),
        }
    }

    pub(crate) fn refused(&self, reason: Refused) {
        self.refused[reason as usize].inc();
    }

    pub(crate) fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
    }

    /// `crier_backend_info{backend, node}`: which backend this node uses, and the node's id.
    pub(crate) fn backend_info(&self, backend: &str, node: &str) {
        let info = prometheus::IntGaugeVec::new(
            opts(
                "crier_backend_info",
                "The backend this node uses and the node's id (unique per process); always 1.",
            ),
            &["backend", "node"],
        )
        .expect("valid metric");
        info.with_label_values(&[backend, node]).set(1);
        self.register(Box::new(info));
    }

    /// Adds a collector whose figures are computed at scrape time.
    pub(crate) fn register(&self, collector: Box<dyn Collector>) {
        // Each owner registers its own, distinct families once.
        if let Err(e) = self.registry.register(collector) {
            tracing::error!(error = %e, "metric registration failed");
        }
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

/// Gauges whose values are read when Prometheus scrapes, each from its own function.
pub(crate) struct ComputedGauges {
    gauges: Vec<(Desc, Box<dyn Fn() -> f64 + Send + Sync>)>,
}

impl ComputedGauges {
    pub(crate) fn new() -> Self {
        ComputedGauges { gauges: Vec::new() }
    }

    pub(crate) fn gauge(
        mut self,
        name: &str,
        help: &str,
        value: impl Fn() -> f64 + Send + Sync + 'static,
    ) -> Self {
        let desc = Desc::new(name.to_owned(), help.to_owned(), vec![], HashMap::new())
            .expect("valid desc");
        self.gauges.push((desc, Box::new(value)));
        self
    }
}

impl Collector for ComputedGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges.iter().map(|(desc, _)| desc).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauges
            .iter()
            .map(|(desc, value)| {
                family(
                    &desc.fq_name,
                    &desc.help,
                    MetricType::GAUGE,
                    vec![gauge(value())],
                )
            })
            .collect()
    }
}

pub(crate) fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<Metric>,
) -> MetricFamily {
    let mut family = MetricFamily::default();
    family.set_name(name.to_owned());
    family.set_help(help.to_owned());
    family.set_field_type(kind);
    family.set_metric(metrics);
    family
}

pub(crate) fn gauge(value: f64) -> Metric {
    let mut gauge = Gauge::default();
    gauge.set_value(value);
    Metric::from_gauge(gauge)
}

pub(crate) fn counter(value: f64) -> Metric {
    let mut counter = Counter::default();
    counter.set_value(value);
    let mut metric = Metric::default();
    metric.set_counter(counter);
    metric
}

/// A histogram metric from per-bucket (not cumulative) counts.
pub(crate) fn histogram(bounds: &[f64], counts: &[u64], count: u64, sum: f64) -> Metric {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let m = Metrics::new(&["metrics".into(), "chat".into(), "metrics".into()]);
        assert_eq!(m.namespace("metrics.cpu"), Ns(0));
        assert_eq!(m.namespace("chat"), Ns(1));
        assert_eq!(m.namespace("anything.else"), Ns(2));
        let none = Metrics::new(&[]);
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
}
