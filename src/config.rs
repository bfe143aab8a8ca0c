//! Every setting of the broker: a CLI flag with a `CRIER_*` environment twin and a default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Discard the oldest queued messages to make room for the new one.
    DropOldest,
    /// Discard the new message.
    DropNewest,
    /// Close the connection with code 4008 ("slow consumer").
    Disconnect,
}

impl SlowConsumerPolicy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SlowConsumerPolicy::DropOldest => "drop-oldest",
            SlowConsumerPolicy::DropNewest => "drop-newest",
            SlowConsumerPolicy::Disconnect => "disconnect",
        }
    }
}

/// Crier's configuration. `crier --help` lists every flag with its default.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "crier",
    version,
    about = "Crier: a publish/subscribe message broker over WebSocket"
)]
pub struct Config {
    /// Address to serve WebSocket and HTTP on (port 0 picks a free port; the actual address is logged).
    #[arg(long, env = "CRIER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Worker threads serving connections (default: one per CPU).
    #[arg(long, env = "CRIER_WORKERS")]
    pub workers: Option<usize>,

    /// Largest message `data` accepted, in its publisher's encoding (e.g. 64KiB).
    #[arg(long, env = "CRIER_MAX_MESSAGE_BYTES", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_message_bytes: usize,

    /// Largest HTTP batch body accepted by `POST /api/publish`.
    #[arg(long, env = "CRIER_MAX_BATCH_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_batch_bytes: usize,

    /// Per connection: bytes queued for the client and not yet taken by its socket before the slow-consumer policy applies.
    #[arg(long, env = "CRIER_MAX_BUFFERED_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_buffered_bytes: usize,

    /// What to do when a connection's buffer is full.
    #[arg(
        long,
        env = "CRIER_SLOW_CONSUMER",
        value_enum,
        default_value = "drop-oldest"
    )]
    pub slow_consumer: SlowConsumerPolicy,

    /// Per connection: most topics and patterns subscribed at once.
    #[arg(long, env = "CRIER_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    pub max_subscriptions: usize,

    /// How often the server pings each WebSocket client.
    #[arg(long, env = "CRIER_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A client that sends nothing (not even a pong) for this long is closed with 4001.
    #[arg(long, env = "CRIER_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// A socket that takes no bytes for this long while data is queued is closed as a slow consumer (4008).
    #[arg(long, env = "CRIER_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// How long a topic without subscribers keeps its sequence number after its last publish.
    #[arg(long, env = "CRIER_TOPIC_TTL", default_value = "5m", value_parser = parse_duration)]
    pub topic_ttl: Duration,

    /// Messages each topic keeps for recovery and rewind (0 turns history off).
    #[arg(long, env = "CRIER_HISTORY_SIZE", default_value_t = 100)]
    pub history_size: usize,

    /// How long a message stays in its topic's history (0 turns history off).
    #[arg(long, env = "CRIER_HISTORY_TTL", default_value = "5m", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// Cap on the bytes all histories hold together; the oldest messages go first.
    #[arg(long, env = "CRIER_HISTORY_MAX_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub history_max_bytes: usize,

    /// Per socket: how many bytes may wait unsent in the kernel (TCP_NOTSENT_LOWAT; 0 leaves the
    /// OS default). Bytes past this wait in Crier's queue instead, where they count in
    /// `buffered_bytes` and `latest` subscriptions can still replace them with fresher ones.
    #[arg(long, env = "CRIER_SOCKET_UNSENT_BYTES", default_value = "16KiB", value_parser = parse_bytes)]
    pub socket_unsent_bytes: usize,

    /// On SIGINT/SIGTERM: how long connections get to flush and close (1001) before the process exits.
    #[arg(long, env = "CRIER_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Topic namespaces (first segments) to label in publish, deliver and drop metrics; all others
    /// are counted as `other`, so the label set stays bounded whatever clients do.
    #[arg(long, env = "CRIER_METRICS_NAMESPACES", value_delimiter = ',')]
    pub metrics_namespaces: Vec<String>,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `crier=debug`).
    #[arg(long, env = "CRIER_LOG", default_value = "info")]
    pub log: String,
}

impl Default for Config {
    /// The defaults `crier` runs with when given no flags (environment variables still apply).
    fn default() -> Self {
        Config::parse_from(["crier"])
    }
}

impl Config {
    /// Checks relations between settings that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--max-message-bytes", self.max_message_bytes as u128),
            ("--max-batch-bytes", self.max_batch_bytes as u128),
            ("--max-buffered-bytes", self.max_buffered_bytes as u128),
            ("--max-subscriptions", self.max_subscriptions as u128),
            ("--ping-interval", self.ping_interval.as_millis()),
            ("--idle-timeout", self.idle_timeout.as_millis()),
            ("--write-timeout", self.write_timeout.as_millis()),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be greater than zero"));
            }
        }
        if self.idle_timeout <= self.ping_interval {
            return Err("--idle-timeout must be longer than --ping-interval".into());
        }
        for ns in &self.metrics_namespaces {
            crate::topic::validate_topic(ns)
                .ok()
                .filter(|_| !ns.contains('.'))
                .ok_or_else(|| {
                    format!("--metrics-namespaces: {ns:?} is not a topic's first segment")
                })?;
        }
        if self.workers == Some(0) {
            return Err("--workers must be at least 1".into());
        }
        Ok(())
    }

    /// Largest WebSocket message accepted from a client: the data limit plus room for the envelope.
    /// A frame above it closes the connection with 1009; data above `max_message_bytes` in a
    /// frame under it gets a `payload_too_large` error instead.
    /// Whether topics keep a history.
    pub(crate) fn history_enabled(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    pub(crate) fn max_frame_bytes(&self) -> usize {
        self.max_message_bytes.saturating_add(FRAME_ENVELOPE_BYTES)
    }
}

/// Room for a frame's envelope (op, topic, id and options) around its data.
const FRAME_ENVELOPE_BYTES: usize = 4096;

fn parse_bytes(s: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize = s.parse()?;
    usize::try_from(size.as_u64()).map_err(|_| format!("{s} is too large"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (examples: 500ms, 25s, 5m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let config = Config::try_parse_from(["crier"]).unwrap();
        assert_eq!(config.max_message_bytes, 64 * 1024);
        assert_eq!(config.max_buffered_bytes, 1024 * 1024);
        assert_eq!(config.max_subscriptions, 1000);
        assert_eq!(config.slow_consumer, SlowConsumerPolicy::DropOldest);
        assert_eq!(config.write_timeout, Duration::from_secs(10));
        config.validate().unwrap();
    }

    #[test]
    fn sizes_and_durations_accept_units() {
        let config = Config::try_parse_from([
            "crier",
            "--max-buffered-bytes",
            "256KiB",
            "--ping-interval",
            "500ms",
            "--slow-consumer",
            "disconnect",
        ])
        .unwrap();
        assert_eq!(config.max_buffered_bytes, 256 * 1024);
        assert_eq!(config.ping_interval, Duration::from_millis(500));
        assert_eq!(config.slow_consumer, SlowConsumerPolicy::Disconnect);
    }

    #[test]
    fn nonsense_is_refused() {
        assert!(Config::try_parse_from(["crier", "--max-message-bytes", "lots"]).is_err());
        let config =
            Config::try_parse_from(["crier", "--idle-timeout", "1s", "--ping-interval", "2s"])
                .unwrap();
        assert!(config.validate().is_err());
        let config = Config::try_parse_from(["crier", "--max-buffered-bytes", "0"]).unwrap();
        assert!(config.validate().is_err());
    }
}
