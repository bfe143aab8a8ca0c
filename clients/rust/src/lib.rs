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
//! One background task owns the WebSocket. Messages wait in a bounded channel for
//! [`Client::next_event`]: an application that stops reading stops the task reading the socket,
//! and the server's slow-consumer policy then applies to it.

mod frame;
mod task;

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
        code: String,
        message: String,
    },
    /// The connection is gone for good (closed, or lost without reconnecting).
    Closed(Error),
}

/// A WebSocket close frame's code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("could not connect: {0}")]
    Connect(String),
    /// The server refused the WebSocket upgrade.
    #[error("upgrade refused with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    /// The server answered a request with an `error` frame.
    #[error("{code}: {message}")]
    Server { code: String, message: String },
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
            Error::Server { code, .. } => Some(code),
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

    pub async fn connect(self) -> Result<Client, Error> {
        let (commands, command_rx) = mpsc::channel(256);
        let (event_tx, events) = mpsc::channel(self.buffer.div_ceil(task::BATCH));
        let url = if self.batch {
            let separator = if self.url.contains('?') { '&' } else { '?' };
            format!("{}{separator}batch=1", self.url)
        } else {
            self.url
        };
        let (ws, welcome) = task::connect(&url, self.encoding, self.local).await?;
        let task = task::Task::new(
            url,
            self.encoding,
            self.local,
            self.reconnect,
            command_rx,
            event_tx,
        );
        tokio::spawn(task.run(ws));
        Ok(Client {
            commands,
            events,
            ready: Vec::new().into_iter(),
            welcome,
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
    welcome: Welcome,
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
