//! The broker's shared state: configuration, the engine, and the live connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dashmap::DashMap;

use crate::config::Config;
use crate::connection::{Connection, ConnectionId};
use crate::engine::Engine;
use crate::frame::{CloseCode, Limits};
use crate::metrics::Metrics;
use crate::registry::TopicRegistry;

pub(crate) struct Broker {
    pub config: Config,
    pub engine: Box<dyn Engine>,
    pub metrics: Arc<Metrics>,
    pub connections: DashMap<ConnectionId, Arc<Connection>>,
    /// Sent to every client in `welcome`.
    pub limits: Limits,
    shutting_down: AtomicBool,
}

impl Broker {
    pub(crate) fn new(config: Config) -> Arc<Self> {
        let limits = Limits {
            max_message_bytes: config.max_message_bytes,
            max_frame_bytes: config.max_frame_bytes(),
            max_buffered_bytes: config.max_buffered_bytes,
            max_subscriptions: config.max_subscriptions,
            slow_consumer: config.slow_consumer.as_str(),
            ping_interval_ms: millis(config.ping_interval),
            idle_timeout_ms: millis(config.idle_timeout),
        };
        Arc::new_cyclic(|broker| {
            let metrics = Arc::new(Metrics::new(
                &config.metrics_namespaces,
                config.max_buffered_bytes,
                broker.clone(),
            ));
            Broker {
                engine: Box::new(TopicRegistry::new(&config, metrics.clone())),
                metrics,
                connections: DashMap::new(),
                limits,
                shutting_down: AtomicBool::new(false),
                config,
            }
        })
    }

    /// Forgets a connection that has ended, keeping its totals in the metrics.
    pub(crate) fn retire(&self, conn: &Connection) {
        self.metrics.retire(conn.queue.stats(), || {
            self.connections.remove(&conn.id);
        });
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Refuses new WebSockets from now on and closes every open one with 1001 once what is
    /// already queued for it has been sent.
    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        for conn in self.live_connections() {
            conn.queue.close(CloseCode::GOING_AWAY, false);
        }
    }

    /// A snapshot of the open connections (never hold a map reference while using them).
    pub(crate) fn live_connections(&self) -> Vec<Arc<Connection>> {
        self.connections.iter().map(|c| c.value().clone()).collect()
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
