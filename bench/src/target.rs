//! The brokers a scenario can run against, behind one interface: Crier (through `crier-client`)
//! and NATS over WebSocket (the NATS text protocol: `CONNECT`, `SUB`, `PUB`, `PING`/`PONG`).
//! Scenarios only see [`Subscriber`] and [`Publisher`], so both run the same code.
//!
//! A target may be several nodes of one broker (Crier nodes sharing a Redis): connections are
//! spread round robin, the i-th subscriber (or publisher) on node i mod the number of nodes.

use std::net::IpAddr;

use bytes::{Buf, Bytes, BytesMut};
use crier_client::{Client, Encoding, Event};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Crier,
    NatsWs,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub kind: Kind,
    /// One WebSocket URL per node (at least one).
    pub urls: Vec<String>,
    pub encoding: Encoding,
    /// Presented by every Crier connection.
    pub token: Option<String>,
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

// Boxed: a NATS connection holds its socket and read buffer inline, several times the size of
// a Crier client's handle.
pub enum Subscriber {
    Crier(Client),
    Nats(Box<Nats>),
}

pub enum Publisher {
    Crier(Client),
    Nats(Box<Nats>),
}

impl Target {
    pub fn nodes(&self) -> usize {
        self.urls.len()
    }

    /// The URL of node `i` (round robin).
    fn url(&self, i: usize) -> &str {
        &self.urls[i % self.urls.len()]
    }

    /// Messages the broker dropped by policy so far (Crier's `crier_messages_dropped_total`,
    /// all reasons, summed over the nodes), so a run can tell messages lost to a firing drop
    /// policy from messages lost in error. `None` for NATS, which drops nothing without closing
    /// the connection, or when a node's metrics cannot be read.
    pub async fn broker_dropped(&self) -> Option<u64> {
        if self.kind != Kind::Crier {
            return None;
        }
        // A node given twice (the same URL) is counted once.
        let mut bases: Vec<String> = self
            .urls
            .iter()
            .filter_map(|url| {
                let url = url.replacen("ws", "http", 1);
                Some(url.split("/ws").next()?.to_owned())
            })
            .collect();
        bases.sort();
        bases.dedup();
        let mut dropped = 0;
        for base in bases {
            let text = reqwest::get(format!("{base}/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            dropped += text
                .lines()
                .filter(|line| line.starts_with("crier_messages_dropped_total"))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64;
        }
        Some(dropped)
    }

    /// A subscriber to `topic` on node `node`.
    pub async fn subscriber(
        &self,
        node: usize,
        topic: &str,
        local: Option<IpAddr>,
    ) -> Result<Subscriber, Error> {
        match self.kind {
            Kind::Crier => {
                let client = self.crier(node, local).await?;
                client.subscribe(topic).await?;
                Ok(Subscriber::Crier(client))
            }
            Kind::NatsWs => {
                let mut nats = Nats::connect(self.url(node), local).await?;
                nats.subscribe(topic).await?;
                Ok(Subscriber::Nats(Box::new(nats)))
            }
        }
    }

    /// A subscriber to several topics, on node `node`.
    pub async fn subscriber_to_all(
        &self,
        node: usize,
        topics: &[String],
    ) -> Result<Subscriber, Error> {
        let mut subscriber = self.subscriber(node, &topics[0], None).await?;
        for topic in &topics[1..] {
            match &mut subscriber {
                Subscriber::Crier(client) => {
                    client.subscribe(topic).await?;
                }
                Subscriber::Nats(nats) => nats.subscribe(topic).await?,
            }
        }
        Ok(subscriber)
    }

    /// A publisher on node `node`.
    pub async fn publisher(&self, node: usize) -> Result<Publisher, Error> {
        match self.kind {
            Kind::Crier => Ok(Publisher::Crier(self.crier(node, None).await?)),
            Kind::NatsWs => Ok(Publisher::Nats(Box::new(
                Nats::connect(self.url(node), None).await?,
            ))),
        }
    }

    /// A connection doing nothing (for the connections scenario), on node `node`.
    pub async fn idle(&self, node: usize, local: Option<IpAddr>) -> Result<Subscriber, Error> {
        match self.kind {
            Kind::Crier => Ok(Subscriber::Crier(self.crier(node, local).await?)),
            Kind::NatsWs => Ok(Subscriber::Nats(Box::new(
                Nats::connect(self.url(node), local).await?,
            ))),
        }
    }

    async fn crier(&self, node: usize, local: Option<IpAddr>) -> Result<Client, Error> {
        let mut builder = Client::builder(self.url(node))
            .encoding(self.encoding)
            .buffer(4096);
        if let Some(local) = local {
            builder = builder.local_address(local);
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder.connect().await?)
    }
}

/// A message as a subscriber received it.
pub struct Delivery {
    /// Its sequence number on its topic (Crier's `seq`; NATS has none).
    pub seq: Option<u64>,
    pub payload: Bytes,
}

impl Subscriber {
    /// The next message; None when the connection is gone.
    pub async fn recv(&mut self) -> Option<Delivery> {
        match self {
            Subscriber::Crier(client) => loop {
                match client.next_event().await? {
                    Event::Message(message) => {
                        return Some(Delivery {
                            seq: Some(message.seq()),
                            payload: message.bytes().ok()?,
                        });
                    }
                    Event::Closed(_) => return None,
                    _ => {}
                }
            },
            Subscriber::Nats(nats) => Some(Delivery {
                seq: None,
                payload: nats.next_msg().await?,
            }),
        }
    }
}

impl Publisher {
    /// Publishes without waiting for an acknowledgement.
    pub async fn publish(&mut self, topic: &str, payload: Bytes) -> Result<(), Error> {
        match self {
            Publisher::Crier(client) => {
                client.publish_bytes(topic, payload, false).await?;
            }
            Publisher::Nats(nats) => nats.publish(topic, &payload).await?,
        }
        Ok(())
    }

    /// Waits until everything published so far has reached the broker.
    pub async fn sync(&mut self) -> Result<(), Error> {
        match self {
            Publisher::Crier(client) => {
                client.ping().await?;
            }
            Publisher::Nats(nats) => nats.ping().await?,
        }
        Ok(())
    }
}

/// A NATS connection over WebSocket, speaking just what the scenarios need.
pub struct Nats {
    ws: Ws,
    /// Bytes received and not yet parsed: NATS splits and merges its operations freely
    /// across WebSocket frames.
    buf: BytesMut,
    next_sid: u64,
    /// Writes queued since the last flush.
    unflushed: usize,
}

impl Nats {
    pub async fn connect(url: &str, local: Option<IpAddr>) -> Result<Nats, Error> {
        let request = url.into_client_request()?;
        // The same WebSocket settings as Crier's client, so both targets read alike.
        let config = Some(crier_client::ws_config());
        let ws = match local {
            None => {
                tokio_tungstenite::connect_async_with_config(request, config, false)
                    .await?
                    .0
            }
            Some(local) => {
                let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
                let port = request.uri().port_u16().unwrap_or(80);
                let remote = tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .next()
                    .ok_or("no address")?;
                let socket = TcpSocket::new_v4()?;
                socket.bind((local, 0).into())?;
                let tcp = socket.connect(remote).await?;
                tokio_tungstenite::client_async_with_config(
                    request,
                    MaybeTlsStream::Plain(tcp),
                    config,
                )
                .await?
                .0
            }
        };
        let mut nats = Nats {
            ws,
            buf: BytesMut::new(),
            next_sid: 1,
            unflushed: 0,
        };
        // INFO first, then our CONNECT.
        let info = nats.read_line().await.ok_or("no INFO from the server")?;
        if !info.starts_with(b"INFO ") {
            return Err("the server did not start with INFO".into());
        }
        let connect = r#"CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":true,"headers":false,"no_responders":false,"name":"crier-bench"}"#;
        nats.write(format!("{connect}\r\n").into_bytes()).await?;
        nats.ping().await?;
        Ok(nats)
    }

    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Error> {
        self.ws.send(WsMessage::binary(bytes)).await?;
        Ok(())
    }

    pub async fn subscribe(&mut self, subject: &str) -> Result<(), Error> {
        let sid = self.next_sid;
        self.next_sid += 1;
        self.write(format!("SUB {subject} {sid}\r\n").into_bytes())
            .await?;
        self.ping().await
    }

    pub async fn publish(&mut self, subject: &str, payload: &[u8]) -> Result<(), Error> {
        let mut frame = Vec::with_capacity(payload.len() + subject.len() + 24);
        frame.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.ws.feed(WsMessage::binary(frame)).await?;
        self.unflushed += 1;
        if self.unflushed >= 64 {
            self.ws.flush().await?;
            self.unflushed = 0;
        }
        Ok(())
    }

    /// Round trip: everything sent before has been processed.
    pub async fn ping(&mut self) -> Result<(), Error> {
        self.ws
            .send(WsMessage::binary(b"PING\r\n".to_vec()))
            .await?;
        self.unflushed = 0;
        loop {
            let line = self
                .read_line()
                .await
                .ok_or("connection closed before PONG")?;
            if line.starts_with(b"PONG") {
                return Ok(());
            }
            if line.starts_with(b"-ERR") {
                return Err(String::from_utf8_lossy(&line).into_owned().into());
            }
            if line.starts_with(b"MSG ") {
                // A message that came in meanwhile: skip its payload (scenarios ping before traffic).
                let size = msg_size(&line).ok_or("bad MSG")?;
                self.fill(size + 2).await.ok_or("closed mid-message")?;
                self.buf.advance(size + 2);
            }
        }
    }

    /// Reads more from the socket into `buf`; false when the connection is gone.
    async fn read_more(&mut self) -> bool {
        loop {
            match self.ws.next().await {
                Some(Ok(message @ (WsMessage::Binary(_) | WsMessage::Text(_)))) => {
                    self.buf.extend_from_slice(&message.into_data());
                    return true;
                }
                Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => return false,
                Some(Ok(_)) => {}
            }
        }
    }

    async fn fill(&mut self, len: usize) -> Option<()> {
        while self.buf.len() < len {
            if !self.read_more().await {
                return None;
            }
        }
        Some(())
    }

    /// The next protocol line, without its CRLF, answering server PINGs on the way.
    async fn read_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end).freeze();
                self.buf.advance(2);
                if &line[..] == b"PING" {
                    self.ws
                        .send(WsMessage::binary(b"PONG\r\n".to_vec()))
                        .await
                        .ok()?;
                    continue;
                }
                return Some(line);
            }
            if !self.read_more().await {
                return None;
            }
        }
    }

    /// The next MSG's payload.
    pub async fn next_msg(&mut self) -> Option<Bytes> {
        loop {
            if self.unflushed > 0 {
                self.ws.flush().await.ok()?;
                self.unflushed = 0;
            }
            let line = self.read_line().await?;
            if line.starts_with(b"MSG ") {
                let size = msg_size(&line)?;
                self.fill(size + 2).await?;
                let payload = self.buf.split_to(size).freeze();
                self.buf.advance(2);
                return Some(payload);
            }
            // +OK, PONG, INFO updates: nothing to do.
        }
    }
}

/// The payload size at the end of `MSG <subject> <sid> [reply-to] <size>`.
fn msg_size(line: &[u8]) -> Option<usize> {
    let last = line.rsplit(|&b| b == b' ').next()?;
    std::str::from_utf8(last).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::msg_size;

    #[test]
    fn msg_sizes() {
        assert_eq!(msg_size(b"MSG bench.fanout 1 64"), Some(64));
        assert_eq!(msg_size(b"MSG a 1 reply.to 4096"), Some(4096));
        assert_eq!(msg_size(b"MSG a 1 x"), None);
    }
}
