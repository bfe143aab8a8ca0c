//! The `_crier.stats` system topic: once a second while anyone subscribes to it, the broker
//! publishes the figures a live view of it needs (connections, rates, the buffered amount,
//! drops), so that a dashboard subscribes like any client instead of polling. Topics under `_crier.` are the broker's own: nobody else
//! may publish there, and with authentication only tokens granted them may subscribe.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use crate::broker::Broker;
use crate::data::Data;
use crate::metrics::Totals;
use crate::model::Encoding;

/// The topic the figures are published on.
pub(crate) const STATS_TOPIC: &str = "_crier.stats";

/// Publishes `_crier.stats`, keeping what the previous tick saw so as to give rates.
#[derive(Default)]
pub(crate) struct StatsPublisher {
    last: Option<(Instant, Totals)>,
}

/// One `_crier.stats` message.
#[derive(Debug, Serialize)]
struct Stats {
    /// Unix milliseconds.
    time: u64,
    server: &'static str,
    connections: Connections,
    subscriptions: u64,
    topics: usize,
    patterns: usize,
    /// Bytes queued for clients and not yet taken by their sockets, summed over connections.
    buffered_bytes: u64,
    /// The largest connection's buffered amount.
    buffered_bytes_max: u64,
    /// Connections above half of `max_buffered_bytes`.
    slow_connections: u64,
    max_buffered_bytes: usize,
    history_messages: usize,
    history_bytes: usize,
    /// Per second, over the last tick.
    rates: Rates,
    /// Since the start.
    totals: TotalsView,
}

#[derive(Debug, Serialize)]
struct Connections {
    json: u64,
    msgpack: u64,
    total: u64,
}

#[derive(Debug, Default, Serialize)]
struct Rates {
    published: f64,
    delivered: f64,
    dropped: f64,
    connections_accepted: f64,
    connections_closed: f64,
    refused: f64,
}

#[derive(Debug, Serialize)]
struct TotalsView {
    published: u64,
    delivered: u64,
    /// By reason: `buffer_full_oldest`, `buffer_full_newest`, `slow_consumer`, `closed`,
    /// `conflated`.
    dropped: serde_json::Map<String, serde_json::Value>,
    connections_accepted: u64,
    connections_closed: u64,
    refused: u64,
    errors: u64,
}

impl StatsPublisher {
    pub(crate) fn tick(&mut self, broker: &Broker, now: Instant) {
        let totals = broker.metrics().totals();
        let rates = match self.last {
            Some((at, last)) => rates(&last, &totals, now.saturating_duration_since(at)),
            None => Rates::default(),
        };
        self.last = Some((now, totals));
        if broker.receivers(STATS_TOPIC) == 0 {
            return;
        }
        let summary = broker.connection_summary();
        let node = broker.stats();
        let stats = Stats {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            server: crate::frame::SERVER,
            connections: Connections {
                json: summary.by_encoding[Encoding::Json as usize],
                msgpack: summary.by_encoding[Encoding::Msgpack as usize],
                total: summary.by_encoding.iter().sum(),
            },
            subscriptions: summary.subscriptions,
            topics: node.topics_with_subscribers,
            patterns: node.patterns,
            buffered_bytes: summary.buffered_sum,
            buffered_bytes_max: summary.buffered_max,
            slow_connections: summary.slow,
            max_buffered_bytes: broker.config().max_buffered_bytes,
            history_messages: node.history_messages,
            history_bytes: node.history_bytes,
            rates,
            totals: TotalsView {
                published: totals.published,
                delivered: totals.delivered,
                dropped: totals
                    .dropped
                    .iter()
                    .map(|(reason, n)| ((*reason).to_owned(), (*n).into()))
                    .collect(),
                connections_accepted: totals.connections_accepted,
                connections_closed: totals.connections_closed,
                refused: totals.refused,
                errors: totals.errors,
            },
        };
        match serde_json::to_vec(&stats) {
            Ok(json) => broker.publish_system(STATS_TOPIC, Data::Json(Bytes::from(json))),
            // Our own plain types always serialize.
            Err(e) => tracing::error!(error = %e, "could not encode {STATS_TOPIC}"),
        }
    }
}

fn rates(last: &Totals, now: &Totals, elapsed: Duration) -> Rates {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return Rates::default();
    }
    let per_second = |before: u64, after: u64| after.saturating_sub(before) as f64 / secs;
    let dropped = |t: &Totals| t.dropped.iter().map(|(_, n)| n).sum::<u64>();
    Rates {
        published: per_second(last.published, now.published),
        delivered: per_second(last.delivered, now.delivered),
        dropped: per_second(dropped(last), dropped(now)),
        connections_accepted: per_second(last.connections_accepted, now.connections_accepted),
        connections_closed: per_second(last.connections_closed, now.connections_closed),
        refused: per_second(last.refused, now.refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::{conn, now, publish, received, subscribe};
    use crate::config::Config;
    use crate::model::SubscribeOptions;

    #[test]
    fn a_tick_publishes_the_figures_and_rates_from_the_last_one() {
        let broker = Broker::new(Config::default()).unwrap();
        let mut publisher = StatsPublisher::default();
        let start = Instant::now();
        publisher.tick(&broker, start - Duration::from_secs(1));
        assert!(
            now(broker.topics()).unwrap().is_empty(),
            "nothing is published without a subscriber"
        );
        let watcher = conn(Encoding::Json);
        broker.connect(watcher.clone());
        subscribe(&broker, &watcher, STATS_TOPIC, SubscribeOptions::default());
        let everything = conn(Encoding::Json);
        subscribe(&broker, &everything, ">", SubscribeOptions::default());
        publisher.tick(&broker, start);
        for _ in 0..10 {
            publish(&broker, "t", crate::broker::testing::json("1")).unwrap();
        }
        publisher.tick(&broker, start + Duration::from_secs(2));
        let frames = received(&watcher);
        assert_eq!(frames.len(), 2, "{frames:?}");
        let first = &frames[0]["data"];
        assert_eq!(first["connections"]["json"], 1);
        assert_eq!(first["subscriptions"], 1);
        assert_eq!(first["rates"]["published"], 0.0);
        let second = &frames[1]["data"];
        assert_eq!(second["totals"]["published"], 10);
        assert_eq!(second["rates"]["published"], 5.0, "10 in 2 s");
        assert_eq!(
            second["rates"]["delivered"], 5.5,
            "the first tick's message to the watcher and ten on t to `>`, in 2 s"
        );
        assert_eq!(frames[1]["seq"], 2);
        assert_eq!(
            crate::broker::testing::seqs(&received(&everything)),
            (1..=10).collect::<Vec<u64>>(),
            "`>` gets the ten messages on t, not the broker's own topic"
        );
    }
}
