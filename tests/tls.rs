//! TLS: with `--tls-cert`/`--tls-key`, the listen address serves `wss://` and `https://` with a
//! certificate made at test time, and plain HTTP gets no HTTP answer.

mod access;
mod common;

use std::sync::Arc;
use std::time::Duration;

use access::TempFile;
use common::*;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A server on TLS with a fresh self-signed certificate for 127.0.0.1 and localhost, and a
/// client configuration that trusts exactly that certificate.
struct TlsServer {
    server: TestServer,
    connector: TlsConnector,
    _files: [TempFile; 2],
}

fn tls_server() -> TlsServer {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = TempFile::new("cert.pem", certified.cert.pem().as_bytes());
    let key = TempFile::new("key.pem", certified.signing_key.serialize_pem().as_bytes());
    let (cert_path, key_path) = (cert.0.clone(), key.0.clone());
    let server = TestServer::with(move |c| {
        c.tls_cert = Some(cert_path);
        c.tls_key = Some(key_path);
        c.handshake_timeout = Duration::from_secs(2);
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsServer {
        server,
        connector: TlsConnector::from(Arc::new(config)),
        _files: [cert, key],
    }
}

impl TlsServer {
    async fn tls(&self, name: &str) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.server.addr).await.unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        tokio::time::timeout(PATIENCE, self.connector.connect(name, tcp))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake failed")
    }

    /// A `wss://` connection, through `name`, after its `welcome`.
    async fn wss(&self, name: &str) -> (WebSocketStream<TlsStream<TcpStream>>, Value) {
        let url = format!("wss://{name}:{}/ws", self.server.addr.port());
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("crier.json"),
        );
        let (mut ws, response) = tokio_tungstenite::client_async(request, self.tls(name).await)
            .await
            .unwrap();
        assert_eq!(response.headers()["sec-websocket-protocol"], "crier.json");
        let welcome = recv(&mut ws).await;
        (ws, welcome)
    }

    /// A raw HTTP/1.1 GET over TLS; returns the whole response.
    async fn https_get(&self, path: &str) -> String {
        let mut tls = self.tls("localhost").await;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tokio::time::timeout(PATIENCE, tls.read_to_end(&mut response))
            .await
            .expect("no HTTPS response")
            .unwrap();
        String::from_utf8(response).unwrap()
    }
}

async fn recv(ws: &mut WebSocketStream<TlsStream<TcpStream>>) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("the connection ended")
            .unwrap();
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn send(ws: &mut WebSocketStream<TlsStream<TcpStream>>, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

#[tokio::test]
async fn websockets_over_tls_subscribe_and_publish() {
    let tls = tls_server();
    let (mut subscriber, welcome) = tls.wss("127.0.0.1").await;
    assert_eq!(
        (welcome["op"].clone(), welcome["encoding"].clone()),
        (json!("welcome"), json!("json")),
        "{welcome}"
    );
    send(
        &mut subscriber,
        json!({"op": "subscribe", "topic": "secure.news", "id": "s"}),
    )
    .await;
    let ack = recv(&mut subscriber).await;
    assert_eq!(
        (ack["op"].clone(), ack["id"].clone()),
        (json!("ack"), json!("s")),
        "{ack}"
    );

    let (mut publisher, _) = tls.wss("localhost").await;
    send(
        &mut publisher,
        json!({"op": "publish", "topic": "secure.news", "data": {"over": "tls"}, "id": 1}),
    )
    .await;
    assert_eq!(
        recv(&mut publisher).await,
        json!({"op": "ack", "id": 1, "seq": 1})
    );
    assert_eq!(
        recv(&mut subscriber).await,
        json!({"op": "message", "topic": "secure.news", "seq": 1, "data": {"over": "tls"}})
    );
}

#[tokio::test]
async fn https_serves_the_http_api() {
    let tls = tls_server();
    let response = tls.https_get("/healthz").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"status":"ok"}"#), "{response}");
}

#[tokio::test]
async fn plain_http_on_the_tls_port_gets_no_http_answer() {
    let tls = tls_server();
    let mut plain = TcpStream::connect(tls.server.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Whatever comes back (a TLS alert, or nothing) until the server drops the connection or the
    // handshake timeout has long passed.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "an HTTP answer over plain TCP: {:?}",
        String::from_utf8_lossy(&got)
    );
    // A plain WebSocket handshake gets none either.
    let mut plain = TcpStream::connect(tls.server.addr).await.unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        tls.server.addr
    );
    plain.write_all(upgrade.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "a WebSocket answer over plain TCP: {:?}",
        String::from_utf8_lossy(&got)
    );
    // The TLS side is unaffected.
    let response = tls.https_get("/readyz").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}
