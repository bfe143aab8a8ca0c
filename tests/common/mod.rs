//! Test harness: a real Crier server on a free port, and a real WebSocket client over TCP.
//!
//! The crate's own tests include this file too (with `#[path]`), to run the same scenarios
//! against a broker built with a test-only backend.
#![allow(dead_code)]

pub mod scenarios;

use std::net::SocketAddr;
use std::time::Duration;

use crier::{Config, Server, ShutdownHandle};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A Crier server running in-process on its own actix system thread.
pub struct TestServer {
    pub addr: SocketAddr,
    /// A keep-alive HTTP client for this server.
    pub http: reqwest::Client,
    handle: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::with(|_| {})
    }

    /// Starts a server on a free port after `adjust` has changed the defaults.
    pub fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::spawn(adjust, Server::bind)
    }

    /// Starts the server `bind` makes of the defaults (changed by `adjust`), on a free port.
    pub fn spawn(
        adjust: impl FnOnce(&mut Config),
        bind: impl FnOnce(Config) -> std::io::Result<Server> + Send + 'static,
    ) -> TestServer {
        init_logging();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            workers: Some(2),
            ..Config::default()
        };
        adjust(&mut config);
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = bind(config)?.handle_signals(false);
                tx.send((server.local_addr(), server.shutdown_handle()))
                    .unwrap();
                server.run().await
            })
        });
        let (addr, handle) = rx.recv().expect("server failed to start");
        TestServer {
            addr,
            http: reqwest::Client::new(),
            handle,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.addr)
    }

    /// Shuts the server down gracefully and waits until it has stopped.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.handle.shutdown();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// GET a JSON document.
    pub async fn get(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST JSON to a topic; returns the response body.
    pub async fn publish(&self, topic: &str, data: &Value) -> Value {
        let response = self
            .http
            .post(self.url(&format!("/api/topics/{topic}")))
            .json(data)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// POSTs `[{"topic":...,"data":...}, ...]` to `/api/publish`; returns the response body.
    pub async fn publish_batch(&self, items: &[Value]) -> Value {
        let response = self
            .http
            .post(self.url("/api/publish"))
            .json(items)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Scrapes `/metrics` into series → value (series as printed, labels sorted by name).
    pub async fn scrape(&self) -> Scrape {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Scrape::parse(&text)
    }

    /// The connection entry with this id in `GET /api/connections`.
    pub async fn connection(&self, id: &str) -> Option<Value> {
        let all = self.get("/api/connections").await;
        all["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .cloned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.shutdown();
            let _ = thread.join();
        }
    }
}

/// Server logs on stderr when `CRIER_TEST_LOG` holds a filter (e.g. `crier=debug`).
fn init_logging() {
    if let Ok(filter) = std::env::var("CRIER_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub series: std::collections::HashMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("series and value");
                (name.to_owned(), value.parse().expect("a number"))
            })
            .collect();
        Scrape {
            text: text.to_owned(),
            series,
        }
    }

    /// The value of a series, e.g. `crier_connections{encoding="json"}`; fails if absent.
    pub fn get(&self, series: &str) -> f64 {
        *self
            .series
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in:\n{}", self.text))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enc {
    Json,
    Msgpack,
}

impl Enc {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Enc::Json => "crier.json",
            Enc::Msgpack => "crier.msgpack",
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking Crier's protocol in one encoding.
pub struct Client {
    pub ws: Ws,
    pub enc: Enc,
    /// The id from `welcome`.
    pub id: String,
}

impl Client {
    /// Connects with the encoding's subprotocol and reads `welcome`.
    pub async fn connect(server: &TestServer, enc: Enc) -> Client {
        Client::connect_with(server, enc, "").await
    }

    pub async fn connect_with(server: &TestServer, enc: Enc, query: &str) -> Client {
        let mut request = server.ws_url(query).into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(enc.subprotocol()),
        );
        let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            enc.subprotocol()
        );
        Client::welcomed(ws, enc).await
    }

    /// Connects with a tiny receive buffer, so that a client that stops reading fills the
    /// kernel's buffers quickly.
    pub async fn connect_slow(server: &TestServer, enc: Enc) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(server.addr).await.unwrap();
        let mut request = server.ws_url("").into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(enc.subprotocol()),
        );
        let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
        Client::welcomed(ws, enc).await
    }

    pub async fn welcomed(ws: Ws, enc: Enc) -> Client {
        Client::welcomed_with(ws, enc).await.0
    }

    /// [`Client::welcomed`], and the welcome itself.
    pub async fn welcomed_with(ws: Ws, enc: Enc) -> (Client, Value) {
        let mut client = Client {
            ws,
            enc,
            id: String::new(),
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        client.id = welcome["connection"].as_str().unwrap().to_owned();
        (client, welcome)
    }

    /// Sends a frame in this client's encoding.
    pub async fn send(&mut self, frame: Value) {
        let message = match self.enc {
            Enc::Json => Message::text(frame.to_string()),
            Enc::Msgpack => Message::binary(rmp_serde::to_vec_named(&frame).unwrap()),
        };
        self.ws.send(message).await.unwrap();
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next data frame, decoded; fails the test if none comes in time.
    pub async fn recv(&mut self) -> Value {
        let message = self.recv_message().await;
        decode(&message).unwrap_or_else(|| panic!("expected a data frame, got {message:?}"))
    }

    /// [`Client::recv`], keeping a pong's figures.
    pub async fn recv_exact(&mut self) -> Value {
        let message = self.recv_message().await;
        decode_exact(&message).unwrap_or_else(|| panic!("expected a data frame, got {message:?}"))
    }

    /// The next frame that is not a ping or pong.
    pub async fn recv_message(&mut self) -> Message {
        loop {
            let next = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return message,
                other => panic!("connection ended: {other:?}"),
            }
        }
    }

    /// Reads until the server's close frame; returns it (data frames before it are returned too).
    pub async fn recv_until_close(&mut self) -> (Vec<Value>, Option<CloseFrame>) {
        let mut frames = Vec::new();
        loop {
            let next = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match next {
                Some(Ok(Message::Close(close))) => {
                    // Keep reading so that the client's close reply goes out and the handshake
                    // completes; the server then closes the socket.
                    let rest = tokio::time::timeout(PATIENCE, async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    });
                    rest.await
                        .expect("the server did not close the socket after the close handshake");
                    return (frames, close);
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(message)) => frames.push(decode(&message).unwrap()),
                Some(Err(e)) => panic!("connection failed before a close frame: {e}"),
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Asserts that no data frame arrives for `wait` (pings are ignored).
    pub async fn expect_silence(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Sends `ping` with an id and waits for its pong: everything sent before has been handled.
    pub async fn sync(&mut self) {
        let id = fastrand_id();
        self.send(serde_json::json!({"op": "ping", "id": id})).await;
        let pong = self.recv().await;
        assert_eq!(pong, serde_json::json!({"op": "pong", "id": id}));
    }

    /// Subscribes and returns the ack (for a topic it carries the stream's `epoch` and `seq`).
    pub async fn subscribe(&mut self, topic: &str) -> Value {
        self.subscribe_with(topic, serde_json::json!({})).await
    }

    /// Subscribes with extra fields (`since`, `rewind`, `mode`, `max_rate`); returns the ack.
    pub async fn subscribe_with(&mut self, topic: &str, options: Value) -> Value {
        let mut frame = serde_json::json!({"op": "subscribe", "topic": topic, "id": "s"});
        for (k, v) in options.as_object().expect("options object") {
            frame[k] = v.clone();
        }
        self.send(frame).await;
        let ack = self.recv().await;
        assert!(
            ack["op"] == "ack" && ack["id"] == "s",
            "subscribe {topic}: {ack}"
        );
        ack
    }
}

fn fastrand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1_000_000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Decodes a data frame: JSON text, or MessagePack (read into JSON for comparison; `bin`
/// becomes an array of numbers, so tests that care about `bin` use [`decode_msgpack`]).
/// A pong's `buffered_bytes` and `dropped` depend on timing: they are checked to be there, then
/// left out, so that tests compare pongs exactly ([`decode_exact`] keeps them).
pub fn decode(message: &Message) -> Option<Value> {
    decode_exact(message).map(without_pong_figures)
}

pub fn decode_exact(message: &Message) -> Option<Value> {
    match message {
        Message::Text(text) => Some(serde_json::from_str(text).expect("server sent invalid JSON")),
        Message::Binary(bytes) => {
            let value = decode_msgpack(bytes);
            Some(serde_json::to_value(&value).expect("representable"))
        }
        _ => None,
    }
}

pub fn without_pong_figures(mut frame: Value) -> Value {
    if frame["op"] == "pong" {
        for field in ["buffered_bytes", "dropped"] {
            let value = frame.as_object_mut().and_then(|f| f.remove(field));
            assert!(
                value.as_ref().is_some_and(Value::is_u64),
                "a pong without {field}: {frame}"
            );
        }
    }
    frame
}

pub fn decode_msgpack(bytes: &[u8]) -> rmpv::Value {
    let mut rest = bytes;
    let value = rmpv::decode::read_value(&mut rest).expect("server sent invalid MessagePack");
    assert!(rest.is_empty(), "trailing bytes after a MessagePack frame");
    value
}

/// Seq numbers of the `message` frames among `frames`.
pub fn seqs(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["op"] == "message")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect()
}

/// Polls `check` until it returns `Some`, failing the test after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, PATIENCE, check).await
}

/// [`eventually`] with its own deadline, for waits set by another program's schedule.
pub async fn eventually_within<T, F, Fut>(what: &str, patience: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn close_code(close: &Option<CloseFrame>) -> u16 {
    close.as_ref().map(|c| u16::from(c.code)).unwrap_or(0)
}
