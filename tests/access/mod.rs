//! Helpers for the access-control tests: connection tokens, HTTP requests with credentials,
//! WebSocket handshakes whose refusals can be read (status, headers, JSON body), and metrics
//! scraped with a token.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::common::{Client, Enc, PATIENCE, Scrape, TestServer, decode};

/// The HS256 secret the tests' servers trust.
pub const SECRET: &str = "a test secret that is long enough for HS256";

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Unix seconds now, with the fraction.
pub fn now_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Claims for `sub`, valid for an hour, granting these subscribe and publish patterns.
pub fn claims(sub: &str, subscribe: &[&str], publish: &[&str]) -> Value {
    json!({
        "sub": sub,
        "exp": now() + 3600,
        "crier": {"subscribe": subscribe, "publish": publish},
    })
}

/// `claims` signed with HS256 and `secret`.
pub fn hs256_with(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

/// `claims` signed with HS256 and [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    hs256_with(SECRET.as_bytes(), claims)
}

/// A token for `sub` with these grants, signed with [`SECRET`].
pub fn token(sub: &str, subscribe: &[&str], publish: &[&str]) -> String {
    hs256(&claims(sub, subscribe, publish))
}

/// An unsigned token (`alg: none`) carrying `claims`.
pub fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// A file under the system's temporary directory, unique to this test process and name,
/// removed when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl TempFile {
    pub fn new(name: &str, contents: &[u8]) -> TempFile {
        let dir = std::env::temp_dir().join(format!("crier-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!(
            "{}-{name}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An HTTP answer: status, headers (names in lower case) and the JSON body (Null when the body
/// is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }

    /// Asserts a JSON error answer: status, code, a message, and `WWW-Authenticate: Bearer` on
    /// every 401.
    pub fn assert_error(&self, status: u16, code: &str, what: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "{what}: {} {}",
            self.status,
            self.text
        );
        assert!(
            !self.body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{what}: an error message: {}",
            self.text
        );
        if status == 401 {
            assert_eq!(
                self.headers.get("www-authenticate").map(String::as_str),
                Some("Bearer"),
                "{what}: a 401 names its scheme"
            );
        }
    }
}

/// Reads a response into an [`Answer`].
pub async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

/// GET `path` with `Authorization: Bearer <bearer>` when given.
pub async fn get(server: &TestServer, path: &str, bearer: Option<&str>) -> Answer {
    let mut request = server.http.get(server.url(path));
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    answer(request.send().await.unwrap()).await
}

/// GET `path` with this exact `Authorization` header.
pub async fn get_authorized(server: &TestServer, path: &str, authorization: &str) -> Answer {
    let request = server
        .http
        .get(server.url(path))
        .header("Authorization", authorization);
    answer(request.send().await.unwrap()).await
}

/// POSTs JSON to `path` with `Authorization: Bearer <bearer>` when given.
pub async fn post(server: &TestServer, path: &str, bearer: Option<&str>, body: &Value) -> Answer {
    let mut request = server.http.post(server.url(path)).json(body);
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    answer(request.send().await.unwrap()).await
}

/// Publishes `data` on `topic` over HTTP with `bearer`; returns the answer.
pub async fn publish(
    server: &TestServer,
    bearer: Option<&str>,
    topic: &str,
    data: Value,
) -> Answer {
    post(server, &format!("/api/topics/{topic}"), bearer, &data).await
}

/// Scrapes `/metrics`, presenting `bearer` when given.
pub async fn scrape(server: &TestServer, bearer: Option<&str>) -> Scrape {
    let answer = get(server, "/metrics", bearer).await;
    assert_eq!(answer.status, 200, "/metrics: {}", answer.text);
    Scrape::parse(&answer.text)
}

/// `crier_refused_total{reason="<reason>"}`.
pub fn refused(scrape: &Scrape, reason: &str) -> f64 {
    scrape.get(&format!("crier_refused_total{{reason=\"{reason}\"}}"))
}

/// A WebSocket upgrade request sent by hand over TCP, so that a refusal's status, headers and
/// body can be read; a 101 keeps the socket open in `stream`.
pub struct Handshake {
    pub answer: Answer,
    pub stream: TcpStream,
}

/// Sends `GET /ws<query>` asking for a WebSocket (JSON subprotocol) with `headers` added, from
/// 127.0.0.1, and reads the answer's head (and body, unless it is a 101).
pub async fn handshake(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> Handshake {
    handshake_from(server, "127.0.0.1", query, headers).await
}

/// [`handshake`] from the loopback address `source` (any of 127.0.0.0/8).
pub async fn handshake_from(
    server: &TestServer,
    source: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> Handshake {
    let stream = connect_from(source, server.addr).await;
    // A `Host` among `headers` replaces the server's address.
    let host = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map_or_else(|| server.addr.to_string(), |(_, value)| (*value).to_owned());
    let mut request = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: crier.json\r\n"
    );
    for (name, value) in headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tokio::time::timeout(PATIENCE, read_answer(stream, request.as_bytes()))
        .await
        .expect("no answer to the handshake")
}

/// A TCP connection from `source` (a loopback address) to `addr`.
pub async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

async fn read_answer(mut stream: TcpStream, request: &[u8]) -> Handshake {
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the server closed before answering: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    if status != 101 {
        let length: usize = headers
            .get("content-length")
            .map(|l| l.parse().unwrap())
            .unwrap_or(0);
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the body ended early");
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    Handshake {
        answer: Answer {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        },
        stream,
    }
}

/// Connects over WebSocket with `headers` added to the upgrade request; returns the client and
/// its `welcome`.
pub async fn connect(
    server: &TestServer,
    enc: Enc,
    query: &str,
    headers: &[(&str, &str)],
) -> (Client, Value) {
    connect_stream(server, enc, query, headers, None).await
}

/// [`connect`] from the loopback address `source`.
pub async fn connect_from_ip(server: &TestServer, source: &str, query: &str) -> (Client, Value) {
    let stream = connect_from(source, server.addr).await;
    connect_stream(server, Enc::Json, query, &[], Some(stream)).await
}

async fn connect_stream(
    server: &TestServer,
    enc: Enc,
    query: &str,
    headers: &[(&str, &str)],
    stream: Option<TcpStream>,
) -> (Client, Value) {
    let mut request = server.ws_url(query).into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(enc.subprotocol()),
    );
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let stream = match stream {
        Some(stream) => stream,
        None => TcpStream::connect(server.addr).await.unwrap(),
    };
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap_or_else(|e| panic!("connecting with {query:?} {headers:?}: {e}"));
    Client::welcomed_with(ws, enc).await
}

/// Connects with `?token=<token>`; returns the client and its `welcome`.
pub async fn connect_with_token(server: &TestServer, token: &str) -> (Client, Value) {
    connect(server, Enc::Json, &format!("?token={token}"), &[]).await
}

/// Sends `frame` and returns the answer with the same id (an `ack` or an `error`).
pub async fn request(client: &mut Client, frame: Value) -> Value {
    let id = frame["id"].clone();
    assert!(!id.is_null(), "requests carry an id");
    client.send(frame).await;
    let answer = client.recv().await;
    assert_eq!(answer["id"], id, "the answer to {id}: {answer}");
    answer
}

/// Asserts an `error` frame with this code (and id, when the frame had one).
pub fn assert_error_frame(frame: &Value, code: &str, what: &str) {
    assert_eq!(
        (frame["op"].as_str(), frame["code"].as_str()),
        (Some("error"), Some(code)),
        "{what}: {frame}"
    );
    assert!(
        !frame["message"].as_str().unwrap_or_default().is_empty(),
        "{what}: an error has a message: {frame}"
    );
}

/// Publishes over the connection with an id; returns the answer.
pub async fn ws_publish(client: &mut Client, topic: &str, data: Value, id: &str) -> Value {
    request(
        client,
        json!({"op": "publish", "topic": topic, "data": data, "id": id}),
    )
    .await
}

/// Subscribes with an id; returns the answer (ack or error).
pub async fn ws_subscribe(client: &mut Client, topic: &str, id: &str) -> Value {
    request(client, json!({"op": "subscribe", "topic": topic, "id": id})).await
}

/// The next data frame, or None if none comes within `wait`.
pub async fn recv_within(client: &mut Client, wait: Duration) -> Option<Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, client.ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(message))) => return decode(&message),
            Ok(other) => panic!("connection ended: {other:?}"),
        }
    }
}

/// Publishes over a connection subscribed to `topic` itself: returns (the message, the ack), in
/// whichever order they come (the message is queued before the ack).
pub async fn ws_publish_to_self(
    client: &mut Client,
    topic: &str,
    data: Value,
    id: &str,
) -> (Value, Value) {
    client
        .send(json!({"op": "publish", "topic": topic, "data": data, "id": id}))
        .await;
    let (a, b) = (client.recv().await, client.recv().await);
    if a["op"] == "message" { (a, b) } else { (b, a) }
}
