//! This node's live connections: the table the broker keeps them in, and the figures summed
//! over them when Prometheus scrapes (how many are open, their buffered amount, bytes sent,
//! queue waits), including what closed connections left behind.
//!
//! Each connection keeps its own figures in atomics only it writes; a scrape reads them all and
//! takes no lock that publishing needs.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, MetricFamily, MetricType};

use crate::connection::Connection;
use crate::metrics::{WAIT_BUCKETS, WaitTotals, counter, family, gauge, histogram};
use crate::model::{ConnectionId, Encoding};

#[derive(Default)]
pub(crate) struct ConnectionTable {
    live: DashMap<ConnectionId, Arc<Connection>>,
    /// Also held by a scrape while it sums live connections, so that a connection is counted
    /// either live or retired, never both or neither.
    retired: Mutex<Retired>,
}

/// What connections that have closed contributed to the scrape-time counters.
#[derive(Debug, Default)]
struct Retired {
    sent_bytes: u64,
    wait: WaitTotals,
}

impl ConnectionTable {
    pub(crate) fn insert(&self, conn: Arc<Connection>) {
        self.live.insert(conn.id, conn);
    }

    /// Forgets a connection that has ended, moving its totals to the retired ones in one step as
    /// far as a scrape can tell.
    pub(crate) fn retire(&self, conn: &Connection) {
        let mut retired = self.retired.lock();
        let stats = conn.queue.stats();
        retired.sent_bytes += stats.sent_bytes();
        stats.wait().add_to(&mut retired.wait);
        self.live.remove(&conn.id);
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// A snapshot of the open connections (never hold a map reference while using them).
    pub(crate) fn snapshot(&self) -> Vec<Arc<Connection>> {
        self.live.iter().map(|c| c.value().clone()).collect()
    }
}

/// Figures over the open connections (and what closed ones left behind), read without a lock
/// that publishing needs.
#[derive(Debug, Default, Clone)]
pub(crate) struct ConnectionSummary {
    /// Open connections, by [`Encoding`] index.
    pub by_encoding: [u64; 2],
    pub subscriptions: u64,
    /// Bytes queued for clients and not yet taken by their sockets, summed and at most.
    pub buffered_sum: u64,
    pub buffered_max: u64,
    /// Connections above `half_cap` buffered bytes.
    pub slow: u64,
    /// Connections per bucket of buffered bytes.
    pub buffered_counts: Vec<u64>,
    pub sent_bytes: u64,
    pub wait: WaitTotals,
}

impl ConnectionTable {
    /// Sums the connections' figures; `buckets` are the upper bounds to count buffered amounts in.
    pub(crate) fn summary(&self, half_cap: usize, buckets: &[f64]) -> ConnectionSummary {
        let mut summary = ConnectionSummary {
            buffered_counts: vec![0; buckets.len()],
            ..Default::default()
        };
        let retired = self.retired.lock();
        summary.wait = retired.wait.clone();
        summary.sent_bytes = retired.sent_bytes;
        for entry in self.live.iter() {
            let conn = entry.value();
            let stats = conn.queue.stats();
            summary.by_encoding[conn.encoding as usize] += 1;
            summary.subscriptions += conn.subscription_count() as u64;
            let (buffered, _) = conn.queue.buffered();
            summary.buffered_sum += buffered as u64;
            summary.buffered_max = summary.buffered_max.max(buffered as u64);
            if buffered > half_cap {
                summary.slow += 1;
            }
            if let Some(i) = buckets.iter().position(|&b| buffered as f64 <= b) {
                summary.buffered_counts[i] += 1;
            }
            summary.sent_bytes += stats.sent_bytes();
            stats.wait().add_to(&mut summary.wait);
        }
        summary
    }
}

/// The figures computed from live connections at scrape time.
pub(crate) struct ConnectionCollector {
    table: Weak<ConnectionTable>,
    descs: Vec<Desc>,
    buffered_buckets: Vec<f64>,
    half_cap: usize,
}

const FAMILIES: [(&str, &str); 8] = [
    (
        "crier_connections",
        "WebSocket connections open now, by encoding.",
    ),
    (
        "crier_subscriptions",
        "Subscriptions (topics and patterns) open now.",
    ),
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
];

impl ConnectionCollector {
    pub(crate) fn new(table: Weak<ConnectionTable>, max_buffered_bytes: usize) -> Self {
        let descs = FAMILIES
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
            table,
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

impl Collector for ConnectionCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(table) = self.table.upgrade() else {
            return Vec::new();
        };
        let ConnectionSummary {
            by_encoding,
            subscriptions,
            buffered_sum,
            buffered_max,
            slow,
            buffered_counts,
            sent_bytes,
            wait,
        } = table.summary(self.half_cap, &self.buffered_buckets);
        let connections = by_encoding.iter().sum::<u64>();
        let help = |i: usize| FAMILIES[i].1;
        let name = |i: usize| FAMILIES[i].0;

        let mut open = Vec::new();
        for encoding in Encoding::ALL {
            let mut metric = gauge(by_encoding[encoding as usize] as f64);
            let mut label = LabelPair::default();
            label.set_name("encoding".to_owned());
            label.set_value(encoding.name().to_owned());
            metric.set_label(vec![label]);
            open.push(metric);
        }
        let single = |i: usize, value: u64| {
            family(
                name(i),
                help(i),
                MetricType::GAUGE,
                vec![gauge(value as f64)],
            )
        };
        vec![
            family(name(0), help(0), MetricType::GAUGE, open),
            single(1, subscriptions),
            single(2, buffered_sum),
            single(3, buffered_max),
            single(4, slow),
            family(
                name(5),
                help(5),
                MetricType::HISTOGRAM,
                vec![histogram(
                    &self.buffered_buckets,
                    &buffered_counts,
                    connections,
                    buffered_sum as f64,
                )],
            ),
            family(
                name(6),
                help(6),
                MetricType::COUNTER,
                vec![counter(sent_bytes as f64)],
            ),
            family(
                name(7),
                help(7),
                MetricType::HISTOGRAM,
                vec![histogram(
                    &WAIT_BUCKETS,
                    &wait.buckets,
                    wait.count,
                    wait.sum_nanos as f64 / 1e9,
                )],
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::metrics::Metrics;
    use crate::queue::{Moment, OutboundQueue};
    use bytes::Bytes;

    #[test]
    fn buffered_buckets_run_from_a_kibibyte_to_the_cap() {
        assert_eq!(buffered_buckets(4096), vec![1024.0, 2048.0, 4096.0]);
        assert_eq!(buffered_buckets(5000), vec![1024.0, 2048.0, 4096.0, 5000.0]);
        assert_eq!(buffered_buckets(512), vec![512.0]);
        assert_eq!(buffered_buckets(1 << 20).len(), 11);
    }

    /// Connections with known buffered amounts, summed at scrape time.
    #[test]
    fn scrape_time_figures_come_from_the_connections() {
        let metrics = Arc::new(Metrics::new(&[]));
        let table = Arc::new(ConnectionTable::default());
        let ns = metrics.namespace("t");
        for (buffered, encoding) in [
            (0, Encoding::Json),
            (500, Encoding::Json),
            (3000, Encoding::Msgpack),
            (5000, Encoding::Json),
        ] {
            let queue = OutboundQueue::new(8192, SlowConsumerPolicy::DropOldest, metrics.clone());
            if buffered > 0 {
                queue.push_message(Bytes::from(vec![0u8; buffered]), ns, Moment::now());
            }
            table.insert(Arc::new(Connection::new(
                None,
                encoding,
                queue,
                None,
                crate::broker::testing::open(),
            )));
        }
        let families = ConnectionCollector::new(Arc::downgrade(&table), 8192).collect();
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
        let conn = table.snapshot().remove(0);
        table.retire(&conn);
        let families = ConnectionCollector::new(Arc::downgrade(&table), 8192).collect();
        let histogram = families
            .iter()
            .find(|f| f.name() == "crier_connection_buffered_bytes")
            .unwrap();
        assert_eq!(
            histogram.get_metric()[0].get_histogram().get_sample_count(),
            3
        );
        assert_eq!(table.len(), 3);
    }
}
