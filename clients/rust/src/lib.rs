//! An async Rust client for [Crier](https://github.com/crier), a publish/subscribe broker over
//! WebSocket.
//!
//! ```no_run
//! # async fn run() -> Result<(), crier_client::Error> {
//! use crier_client::{Client, Encoding, Event};
//!
//! let mut client = Client::builder("ws://127.0.0.1:8080/ws")
//!     .encoding(Encoding::Msgpack)
//!     .reconnect(true)
//!     .connect()
//!     .await?;
//! client.subscribe("metrics.cpu").await?;
//! let seq = client.publish("metrics.cpu", &serde_json::json!({"load": 0.42})).await?;
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Message(message) => println!("{} #{}: {:?}", message.topic(), message.seq(), message.decode::<serde_json::Value>()?),
//!         Event::Reconnected { recovered } => println!("reconnected; recovered: {recovered:?}"),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # let _ = seq;
//! # Ok(())
//! # }
//! ```
//!
//! On a Crier that requires authentication, [`ClientBuilder::token`] and
//! [`ClientBuilder::token_provider`] give the connection its token (sent as `Authorization:
//! Bearer`), refreshed before it expires; `wss://` URLs use rustls (ring), with
//! [`ClientBuilder::root_certificate`] for self-signed servers.
//!
//! One background task owns the WebSocket. Messages wait in a bounded channel for
//! [`Client::next_event`]: an application that stops reading stops the task reading the socket,
//! and the server's slow-consumer policy then applies to it.

mod frame;
mod task;
mod token;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use frame::{Limits, Message, Welcome};
pub use task::ws_config;

/// How frames are encoded on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `crier.json`: text frames.
    Json,
    /// `crier.msgpack`: binary frames.
    Msgpack,
}

impl Encoding {
    fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => "crier.json",
            Encoding::Msgpack => "crier.msgpack",
        }
    }
}

/// Where to resume a topic after a reconnect: the stream's epoch and the last seq handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Since {
    pub epoch: String,
    pub seq: u64,
}

/// How a subscription's messages are delivered.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Mode {
    /// Every message.
    #[default]
    All,
    /// The freshest message of each topic when the client falls behind, at most `max_rate`
    /// frames per second per topic if given.
    Latest { max_rate: Option<f64> },
}

/// Options of a subscription.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscribeOptions {
    /// Recover after a reconnect (exact topics only).
    pub since: Option<Since>,
    /// Replay the last N messages first.
    pub rewind: Option<u64>,
    pub mode: Mode,
}

/// The server's acknowledgement of a subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    /// For a topic: its stream's epoch and latest seq.
    pub stream: Option<(String, u64)>,
    /// For `since`: whether nothing was missed.
    pub recovered: Option<bool>,
}

/// What the client hands the application.
#[derive(Debug)]
pub enum Event {
    Message(Message),
    /// The connection was lost and is back; subscriptions were renewed. For each exact topic it
    /// could recover with `since`, whether nothing was missed (false: reload that topic's state).
    Reconnected {
        recovered: Vec<(String, bool)>,
    },
    /// An error the server sent without a request id.
    ServerError {
        code: ErrorCode,
        message: String,
    },
    /// The server ended a subscription: a fresh token (sent with [`Client::auth`] or by the
    /// token provider) no longer grants it (`code` is [`ErrorCode::Forbidden`]), or it could not
    /// be renewed after a reconnect. The client has forgotten it: it is not renewed again.
    SubscriptionEnded {
        topic: String,
        code: ErrorCode,
        message: String,
    },
    /// The token provider failed, or the server refused its token, when refreshing the token
    /// before it expires. The connection keeps its current token; the refresh is tried again
    /// while there is time, and at expiry (4002) the client reconnects with a fresh token.
    TokenRefreshFailed(Error),
    /// The connection is gone for good (closed, or lost without reconnecting).
    Closed(Error),
}

/// A WebSocket close frame's code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

impl CloseInfo {
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (reconnecting may reach another instance).
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame of a kind the server does not take.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Invalid UTF-8 in a text frame.
    pub const INVALID_DATA: u16 = 1007;
    /// Too many bad frames.
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client sent nothing (not even a pong) for too long.
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The connection's token expired.
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// The connection opened without a token and sent no valid `auth` in time.
    pub const AUTHENTICATION_REQUIRED: u16 = 4003;
    /// The client did not keep up with its messages.
    pub const SLOW_CONSUMER: u16 = 4008;
}

/// An error code from the server: in an `error` frame, or in the JSON body of a refused upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame the server could not read.
    BadFrame,
    UnknownOp,
    InvalidTopic,
    PayloadTooLarge,
    TooManySubscriptions,
    /// The connection must authenticate first (`auth`), or the upgrade carried no token.
    Unauthorized,
    /// The token does not grant this topic (subscribe or publish), or the upgrade's `?subscribe=`.
    Forbidden,
    /// The token is malformed, wrongly signed, expired, not yet valid or for someone else.
    InvalidToken,
    /// Over the server's publish rate: the message was not published.
    RateLimited,
    /// The server's shared backend (Redis) cannot be reached now: try again later.
    Unavailable,
    /// Upgrade refused: the server (503) or this address (429) is at its connection limit.
    TooManyConnections,
    /// Upgrade refused: the `Origin` header is not allowed.
    OriginNotAllowed,
    /// Upgrade refused: the server is shutting down.
    ShuttingDown,
    /// Any other code, as sent.
    Other(String),
}

impl ErrorCode {
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Other(code) => code,
        }
    }
}

impl From<&str> for ErrorCode {
    fn from(code: &str) -> Self {
        match code {
            "bad_frame" => ErrorCode::BadFrame,
            "unknown_op" => ErrorCode::UnknownOp,
            "invalid_topic" => ErrorCode::InvalidTopic,
            "payload_too_large" => ErrorCode::PayloadTooLarge,
            "too_many_subscriptions" => ErrorCode::TooManySubscriptions,
            "unauthorized" => ErrorCode::Unauthorized,
            "forbidden" => ErrorCode::Forbidden,
            "invalid_token" => ErrorCode::InvalidToken,
            "rate_limited" => ErrorCode::RateLimited,
            "unavailable" => ErrorCode::Unavailable,
            "too_many_connections" => ErrorCode::TooManyConnections,
            "origin_not_allowed" => ErrorCode::OriginNotAllowed,
            "shutting_down" => ErrorCode::ShuttingDown,
            other => ErrorCode::Other(other.to_owned()),
        }
    }
}

impl From<String> for ErrorCode {
    fn from(code: String) -> Self {
        match ErrorCode::from(code.as_str()) {
            ErrorCode::Other(_) => ErrorCode::Other(code),
            known => known,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No connection: DNS, TCP or TLS failed (an unknown certificate among them), or the URL,
    /// token or root certificate given is unusable.
    #[error("could not connect: {0}")]
    Connect(String),
    /// The server refused the WebSocket upgrade with an HTTP error. `code` is the one in the
    /// server's JSON body (`invalid_token`, `forbidden`, `origin_not_allowed`,
    /// `too_many_connections`, ...) when there is one; `message` is its message, or the body.
    #[error("upgrade refused with HTTP {status}{}: {message}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    /// The server answered a request with an `error` frame.
    #[error("{code}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The token provider failed.
    #[error("the token provider failed: {0}")]
    Token(String),
    /// The server closed the connection.
    #[error("closed by the server: {0:?}")]
    Closed(Option<CloseInfo>),
    /// The connection was lost (and a request in flight with it).
    #[error("connection lost: {0}")]
    Disconnected(String),
    #[error("the client is closed")]
    ClientClosed,
    #[error("timed out")]
    Timeout,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("could not encode: {0}")]
    Encode(String),
    #[error("could not decode: {0}")]
    Decode(String),
}

impl Error {
    /// The error code of a [`Error::Server`] (`bad_frame`, `invalid_topic`, ...).
    pub fn server_code(&self) -> Option<&str> {
        match self {
            Error::Server { code, .. } => Some(code.as_str()),
            _ => None,
        }
    }

    /// The server's error code: of an `error` frame ([`Error::Server`]) or of a refused
    /// upgrade ([`Error::Refused`]).
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(code),
            Error::Refused { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    /// The close code of a connection the server closed ([`Error::Closed`]).
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Error::Closed(Some(close)) => Some(close.code),
            _ => None,
        }
    }
}

/// Reconnect timing: exponential backoff with jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

pub struct ClientBuilder {
    url: String,
    encoding: Encoding,
    local: Option<std::net::IpAddr>,
    reconnect: Option<Backoff>,
    batch: bool,
    buffer: usize,
    request_timeout: Duration,
    token: Option<String>,
    token_provider: Option<token::TokenProvider>,
    token_refresh: Option<Duration>,
    roots: Vec<Vec<u8>>,
}

impl ClientBuilder {
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Reconnect with the default backoff when the connection is lost.
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on.then(Backoff::default);
        self
    }

    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.reconnect = Some(backoff);
        self
    }

    /// About how many events may wait for the application before the client stops reading.
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }

    /// Whether the server may put several frames in one WebSocket message (`?batch=1`; on by
    /// default: fewer, larger messages cost less on both sides).
    pub fn batch(mut self, on: bool) -> Self {
        self.batch = on;
        self
    }

    /// Connects from this local address (e.g. one of several 127.0.0.x, to open more connections
    /// than one address has ephemeral ports).
    pub fn local_address(mut self, address: std::net::IpAddr) -> Self {
        self.local = Some(address);
        self
    }

    /// How long a request waits for its answer.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// A connection token (JWT or API key), sent as `Authorization: Bearer` in the upgrade
    /// request. With a [`token_provider`](Self::token_provider) too, it is the first
    /// connection's token and the provider makes every later one.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Where fresh tokens come from (e.g. your login service). Called for every connection,
    /// the first (unless [`token`](Self::token) gave one) and each reconnection, and ahead of
    /// the token's expiry to refresh it with `auth` (see [`token_refresh`](Self::token_refresh)).
    /// With a provider, a connection closed because its token expired (4002) reconnects with a
    /// fresh one (when [`reconnect`](Self::reconnect) is on). A provider error fails the first
    /// connect with [`Error::Token`]; on a reconnection it counts as a failed attempt.
    pub fn token_provider<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        self.token_provider = Some(Arc::new(move || {
            let token = provider();
            Box::pin(async move { token.await.map_err(|e| e.to_string()) })
        }));
        self
    }

    /// How long before the token expires (the welcome's `expires_at`) the token provider is
    /// asked for a fresh token, sent with `auth` so the connection stays up; at most half the
    /// time the token has left. Default 30 s. None: never; the server then closes the
    /// connection at expiry (4002) and the client reconnects with a fresh token.
    pub fn token_refresh(mut self, ahead: Option<Duration>) -> Self {
        self.token_refresh = ahead;
        self
    }

    /// Trusts the certificate(s) in this PEM for `wss://`, besides the system's roots: for a
    /// server with a self-signed certificate or one from a private CA. May be called again to
    /// add more.
    pub fn root_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.roots.push(pem.as_ref().to_vec());
        self
    }

    pub async fn connect(self) -> Result<Client, Error> {
        let (commands, command_rx) = mpsc::channel(256);
        let (event_tx, events) = mpsc::channel(self.buffer.div_ceil(task::BATCH));
        let url = if self.batch {
            let separator = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{separator}batch=1", self.url)
        } else {
            self.url
        };
        let dial = task::Dial::new(url, self.encoding, self.local, &self.roots)?;
        let mut tokens = token::Tokens::new(self.token, self.token_provider, self.token_refresh);
        let token = tokens.for_connection(true).await?;
        let (ws, welcome) = dial.open(token.as_deref()).await?;
        tokens.connected(token, &welcome);
        let task = task::Task::new(dial, tokens, self.reconnect, command_rx, event_tx);
        tokio::spawn(task.run(ws));
        Ok(Client {
            commands,
            events,
            ready: Vec::new().into_iter(),
            welcome: Box::new(welcome),
            encoding: self.encoding,
            timeout: self.request_timeout,
        })
    }
}

/// A connection to Crier.
pub struct Client {
    commands: mpsc::Sender<task::Command>,
    /// Events come in batches (one channel operation per burst of frames, not per message).
    events: mpsc::Receiver<Vec<Event>>,
    /// The rest of the batch being taken, read in place.
    ready: std::vec::IntoIter<Event>,
    /// Boxed: it is read rarely, and keeps the handle small enough to move around cheaply.
    welcome: Box<Welcome>,
    encoding: Encoding,
    timeout: Duration,
}

impl Client {
    /// Connects with JSON, without reconnecting.
    pub async fn connect(url: &str) -> Result<Client, Error> {
        Client::builder(url).connect().await
    }

    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            encoding: Encoding::Json,
            local: None,
            reconnect: None,
            batch: true,
            buffer: 1024,
            request_timeout: Duration::from_secs(10),
            token: None,
            token_provider: None,
            token_refresh: Some(Duration::from_secs(30)),
            roots: Vec::new(),
        }
    }

    /// The server's welcome on the first connection.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    async fn request(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<task::Reply, Error>>) -> task::Command,
    ) -> Result<task::Reply, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| Error::ClientClosed)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(Error::ClientClosed),
            Err(_) => Err(Error::Timeout),
        }
    }

    pub async fn subscribe(&self, topic: &str) -> Result<Subscribed, Error> {
        self.subscribe_with(topic, SubscribeOptions::default())
            .await
    }

    pub async fn subscribe_with(
        &self,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Subscribed, Error> {
        let topic = topic.to_owned();
        let reply = self
            .request(|reply| task::Command::Subscribe {
                topic,
                options,
                reply,
            })
            .await?;
        Ok(Subscribed {
            stream: reply.epoch.zip(reply.seq),
            recovered: reply.recovered,
        })
    }

    pub async fn unsubscribe(&self, topic: &str) -> Result<(), Error> {
        let topic = topic.to_owned();
        self.request(|reply| task::Command::Unsubscribe { topic, reply })
            .await
            .map(|_| ())
    }

    /// Publishes and waits for the server's ack; returns the message's seq.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        data: &T,
    ) -> Result<u64, Error> {
        let payload = frame::data(self.encoding, data)?;
        self.publish_payload(topic, payload).await
    }

    /// Publishes without waiting for (or asking for) an ack.
    pub async fn publish_nowait<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        data: &T,
    ) -> Result<(), Error> {
        let payload = frame::data(self.encoding, data)?;
        self.send_publish(topic, payload, None).await
    }

    /// Publishes bytes (a MessagePack `bin`; base64 text on a JSON connection), with or without
    /// an ack; returns the seq when acknowledged.
    pub async fn publish_bytes(
        &self,
        topic: &str,
        bytes: Bytes,
        ack: bool,
    ) -> Result<Option<u64>, Error> {
        let payload = frame::Payload::Bytes(bytes);
        if ack {
            self.publish_payload(topic, payload).await.map(Some)
        } else {
            self.send_publish(topic, payload, None).await.map(|_| None)
        }
    }

    async fn publish_payload(&self, topic: &str, payload: frame::Payload) -> Result<u64, Error> {
        let topic = topic.to_owned();
        let reply = self
            .request(|reply| task::Command::Publish {
                topic,
                payload,
                reply: Some(reply),
            })
            .await?;
        reply
            .seq
            .ok_or_else(|| Error::Protocol("publish ack without seq".into()))
    }

    async fn send_publish(
        &self,
        topic: &str,
        payload: frame::Payload,
        reply: Option<oneshot::Sender<Result<task::Reply, Error>>>,
    ) -> Result<(), Error> {
        let command = task::Command::Publish {
            topic: topic.to_owned(),
            payload,
            reply,
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::ClientClosed)
    }

    /// Sends a token (`{"op":"auth"}`) and waits for the server's ack: to authenticate a
    /// connection that opened without one, or to replace the connection's token before it
    /// expires. The new token's grants replace the old; subscriptions it no longer grants end
    /// with [`Event::SubscriptionEnded`]. An invalid token is refused with
    /// [`ErrorCode::InvalidToken`] and the connection keeps its token. Without a token
    /// provider, reconnections present the last token acknowledged.
    pub async fn auth(&self, token: &str) -> Result<(), Error> {
        let token = token.to_owned();
        self.request(|reply| task::Command::Auth { token, reply })
            .await
            .map(|_| ())
    }

    /// Round trip to the server and back.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let started = tokio::time::Instant::now();
        self.request(|reply| task::Command::Ping { reply }).await?;
        Ok(started.elapsed())
    }

    /// The next event; None once the client is closed and every event has been taken.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.ready.next() {
                return Some(event);
            }
            self.ready = self.events.recv().await?.into_iter();
        }
    }

    /// The next message, skipping other events; None once the connection is gone for good.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            match self.next_event().await? {
                Event::Message(message) => return Some(message),
                Event::Closed(_) => return None,
                _ => {}
            }
        }
    }

    /// Closes the connection (with a close handshake) and stops the client.
    pub async fn close(self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(task::Command::Close { reply: tx })
            .await
            .map_err(|_| Error::ClientClosed)?;
        rx.await.map_err(|_| Error::ClientClosed)
    }
}
