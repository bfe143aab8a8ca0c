//! `crier_backend_*`: what the node asks of Redis, how long each round trip takes, what fails,
//! and what Redis brings this node.

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use redis::RedisResult;

use super::link::{RESPONSE_TIMEOUT, error_kind};
use crate::backend::Unavailable;
use crate::metrics::Metrics;

/// How a round trip fails, as `crier_backend_errors_total` labels it.
const ERROR_KINDS: [&str; 4] = ["connection", "timeout", "server", "malformed"];

/// What the backend does with Redis, as metrics label it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Publish,
    History,
    Subscribe,
    Unsubscribe,
    Streams,
    Ping,
    Refresh,
    Fill,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Publish,
        Op::History,
        Op::Subscribe,
        Op::Unsubscribe,
        Op::Streams,
        Op::Ping,
        Op::Refresh,
        Op::Fill,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Publish => "publish",
            Op::History => "history",
            Op::Subscribe => "subscribe",
            Op::Unsubscribe => "unsubscribe",
            Op::Streams => "streams",
            Op::Ping => "ping",
            Op::Refresh => "refresh",
            Op::Fill => "fill",
        }
    }
}

/// `crier_backend_*`: what the node asks of Redis, how long it takes, what fails.
pub(crate) struct RedisMetrics {
    operations: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    pub reconnects: IntCounter,
    pub received: IntCounter,
    pub connected: IntGauge,
}

impl RedisMetrics {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        let operations = IntCounterVec::new(
            Opts::new(
                "crier_backend_operations_total",
                "Requests made to Redis, by operation (each publish in a pipeline counts).",
            ),
            &["op"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "crier_backend_errors_total",
                "Redis round trips that failed, by operation and kind (connection, timeout, server).",
            ),
            &["op", "kind"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "crier_backend_latency_seconds",
                "Redis round-trip time, by operation (a pipeline is one round trip).",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let reconnects = IntCounter::new(
            "crier_backend_reconnects_total",
            "Times the node re-established its Redis subscriptions after losing them.",
        )
        .expect("valid metric");
        let received = IntCounter::new(
            "crier_backend_received_total",
            "Publications received from Redis and handed to this node's subscribers.",
        )
        .expect("valid metric");
        let connected = IntGauge::new(
            "crier_backend_connected",
            "1 while Redis answers this node, 0 while it does not.",
        )
        .expect("valid metric");
        connected.set(1);
        // Every series exists from the start, at zero: a dashboard shows "no errors", not "no data".
        for op in Op::ALL {
            operations.with_label_values(&[op.name()]);
            for kind in ERROR_KINDS {
                errors.with_label_values(&[op.name(), kind]);
            }
        }
        metrics.register(Box::new(operations.clone()));
        metrics.register(Box::new(errors.clone()));
        metrics.register(Box::new(latency.clone()));
        metrics.register(Box::new(reconnects.clone()));
        metrics.register(Box::new(received.clone()));
        metrics.register(Box::new(connected.clone()));
        RedisMetrics {
            operations,
            errors,
            latency,
            reconnects,
            received,
            connected,
        }
    }

    pub(crate) fn operations(&self, op: Op, n: usize) {
        self.operations
            .with_label_values(&[op.name()])
            .inc_by(n as u64);
    }

    pub(crate) fn operation(&self, op: Op) {
        self.operations(op, 1);
    }

    pub(crate) fn error(&self, op: Op, kind: &str) {
        self.errors.with_label_values(&[op.name(), kind]).inc();
    }

    /// Awaits one Redis round trip, timing it and counting its failure.
    pub(crate) async fn timed<T>(
        &self,
        op: Op,
        work: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(RESPONSE_TIMEOUT + Duration::from_millis(500), work).await;
        self.latency
            .with_label_values(&[op.name()])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                self.error(op, error_kind(&e));
                Err(Unavailable(format!("Redis: {e}")))
            }
            Err(_) => {
                self.error(op, "timeout");
                Err(Unavailable("Redis did not answer in time".into()))
            }
        }
    }
}
