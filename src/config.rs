//! Every setting of the broker: a CLI flag with a `CRIER_*` environment twin and a default.

use std::net::SocketAddr;
use std::path::PathBuf;
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

    /// Secret for HS256 connection tokens (JWT). Prefer `--jwt-secret-file`: arguments are
    /// visible to other users of the machine.
    #[arg(long, env = "CRIER_JWT_SECRET", hide_env_values = true, conflicts_with_all = ["jwt_secret_file", "jwt_public_key"])]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret for connection tokens (surrounding whitespace ignored).
    #[arg(long, env = "CRIER_JWT_SECRET_FILE", conflicts_with = "jwt_public_key")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key for connection tokens: RS256 for an RSA key, ES256 for a P-256 key.
    #[arg(long, env = "CRIER_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// When set, a token's `aud` must include this.
    #[arg(long, env = "CRIER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, a token's `iss` must be this.
    #[arg(long, env = "CRIER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew tolerated on a token's `exp` and `nbf`: a token is valid until `exp` plus this.
    #[arg(long, env = "CRIER_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// A connection that opened without a token is closed with 4003 unless a valid `auth` frame
    /// arrives within this.
    #[arg(long, env = "CRIER_AUTH_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub auth_timeout: Duration,

    /// Key that HTTP API clients (and backends over WebSocket) present as
    /// `Authorization: Bearer <key>`; repeat the flag (or comma-separate the variable) for several.
    #[arg(
        long = "api-key",
        env = "CRIER_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,

    /// When set, `/metrics` needs `Authorization: Bearer <token>`.
    #[arg(long, env = "CRIER_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,

    /// Origins (`scheme://host[:port]`) whose pages may open WebSockets, comma-separated; `*` for
    /// any. The server's own origin is allowed when addressed by IP or `localhost` (list it when
    /// reached under a host name); clients that send no `Origin` (non-browsers) are not affected.
    #[arg(long, env = "CRIER_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// PEM certificate chain: with `--tls-key`, serves `wss://` and `https://` only.
    #[arg(long, env = "CRIER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "CRIER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Most WebSocket connections open at once; more are refused with 503 (0: no limit).
    #[arg(long, env = "CRIER_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most WebSocket connections open at once from one IP address; more are refused with 429
    /// (0: no limit).
    #[arg(long, env = "CRIER_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: usize,

    /// A client must finish its TLS handshake and send its request head within this, or it is dropped.
    #[arg(long, env = "CRIER_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Per connection: messages a client may publish per second, in bursts of as many (0: no limit).
    /// Past it, publishes are refused with `rate_limited`.
    #[arg(long, env = "CRIER_PUBLISH_RATE", default_value_t = 0)]
    pub publish_rate: u32,

    /// A connection that sends this many bad frames within a minute is closed with 1008 (0: never).
    #[arg(long, env = "CRIER_MAX_BAD_FRAMES", default_value_t = 100)]
    pub max_bad_frames: usize,

    /// Scale out over Redis: `redis://host:port/db` (`rediss://` for TLS). Without it topics live
    /// in this process (the memory backend) and nothing connects to Redis. With
    /// `--redis-cluster`, the seed nodes of a Redis Cluster (repeat the flag, or comma-separate
    /// the variable, for several).
    #[arg(
        long = "redis",
        env = "CRIER_REDIS_URL",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub redis: Vec<String>,

    /// Namespaces every Redis key and channel Crier uses, so that several deployments can share
    /// one Redis.
    #[arg(long, env = "CRIER_REDIS_PREFIX", default_value = "crier")]
    pub redis_prefix: String,

    /// `--redis` names seed nodes of a Redis Cluster (Redis 7+): each topic lives on one shard,
    /// with sharded pub/sub.
    #[arg(long, env = "CRIER_REDIS_CLUSTER", requires = "redis")]
    pub redis_cluster: bool,

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
            ("--auth-timeout", self.auth_timeout.as_millis()),
            ("--handshake-timeout", self.handshake_timeout.as_millis()),
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
        // The HTTP layer measures it with a clock that advances every half second.
        if self.handshake_timeout < Duration::from_secs(1) {
            return Err("--handshake-timeout must be at least 1s".into());
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        if self.metrics_token.as_deref() == Some("") {
            return Err("--metrics-token must not be empty".into());
        }
        for origin in &self.allowed_origins {
            if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return Err(format!(
                    "--allowed-origins: {origin:?} is not an origin (scheme://host[:port]) or *"
                ));
            }
        }
        if self.redis.len() > 1 && !self.redis_cluster {
            return Err(
                "several --redis URLs need --redis-cluster (they are its seed nodes)".into(),
            );
        }
        for url in &self.redis {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(format!(
                    "--redis: {url:?} is not a redis:// or rediss:// URL"
                ));
            }
        }
        if self.redis_prefix.is_empty()
            || self
                .redis_prefix
                .contains(['{', '}', '*', '?', '[', ']', '\\'])
        {
            return Err(format!(
                "--redis-prefix {:?} must be non-empty, without braces or glob characters",
                self.redis_prefix
            ));
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
    fn security_flags_parse_as_documented() {
        let config = Config::try_parse_from([
            "crier",
            "--api-key",
            "one",
            "--api-key",
            "two,three",
            "--allowed-origins",
            "https://a.example,https://b.example",
            "--jwt-secret-file",
            "/run/secret",
            "--jwt-leeway",
            "0s",
            "--publish-rate",
            "50",
        ])
        .unwrap();
        assert_eq!(config.api_keys, ["one", "two", "three"]);
        assert_eq!(
            config.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        assert_eq!(
            config.jwt_secret_file.as_deref(),
            Some(std::path::Path::new("/run/secret"))
        );
        assert_eq!(
            (config.jwt_leeway, config.publish_rate),
            (Duration::ZERO, 50)
        );
        config.validate().unwrap();
        let defaults = Config::try_parse_from(["crier"]).unwrap();
        assert_eq!(
            (
                defaults.auth_timeout,
                defaults.jwt_leeway,
                defaults.handshake_timeout
            ),
            (
                Duration::from_secs(10),
                Duration::from_secs(5),
                Duration::from_secs(5)
            )
        );
        assert_eq!(
            (
                defaults.max_connections,
                defaults.max_connections_per_ip,
                defaults.max_bad_frames,
                defaults.publish_rate
            ),
            (100_000, 1000, 100, 0)
        );
        // One kind of JWT key at a time; TLS needs both files.
        for refused in [
            &["crier", "--jwt-secret", "s", "--jwt-public-key", "k.pem"][..],
            &["crier", "--jwt-secret", "s", "--jwt-secret-file", "f"],
            &["crier", "--tls-cert", "c.pem"],
        ] {
            assert!(Config::try_parse_from(refused).is_err(), "{refused:?}");
        }
        for invalid in [
            &["crier", "--allowed-origins", "app.example"][..],
            &["crier", "--handshake-timeout", "500ms"],
            &["crier", "--api-key", ""],
        ] {
            let config = Config::try_parse_from(invalid).unwrap();
            assert!(config.validate().is_err(), "{invalid:?}");
        }
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
