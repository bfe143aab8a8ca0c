//! The client against a real Crier server.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{PATIENCE, TestServer};
use crier_client::{
    Backoff, Client, CloseInfo, Encoding, Error, Event, Mode, Since, SubscribeOptions,
};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, broadcast};

fn url(server: &TestServer) -> String {
    server.ws_url("")
}

async fn next_message(client: &mut Client) -> crier_client::Message {
    tokio::time::timeout(PATIENCE, client.next_message())
        .await
        .expect("a message in time")
        .expect("a message")
}

async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .expect("an event in time")
        .expect("an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_in_both_encodings() {
    let server = TestServer::start();
    for encoding in [Encoding::Json, Encoding::Msgpack] {
        let mut client = Client::builder(url(&server))
            .encoding(encoding)
            .connect()
            .await
            .unwrap();
        assert_eq!(
            client.welcome().encoding,
            if encoding == Encoding::Json {
                "json"
            } else {
                "msgpack"
            }
        );
        assert_eq!(
            client.welcome().node.as_ref().map(String::len),
            Some(16),
            "the node it landed on"
        );
        let topic = format!("orders.{encoding:?}");
        let subscribed = client.subscribe(&topic).await.unwrap();
        let (epoch, seq) = subscribed.stream.expect("a topic's stream");
        assert_eq!((epoch.len(), seq), (16, 0));

        let seq = client
            .publish(&topic, &json!({"id": 1, "items": ["a", "b"]}))
            .await
            .unwrap();
        assert_eq!(seq, 1);
        client.publish_nowait(&topic, &json!(2)).await.unwrap();
        // Frames of one connection are handled in order: after the pong, the publish is in.
        client.ping().await.unwrap();
        server.publish(&topic, &json!("from http")).await;

        let m = next_message(&mut client).await;
        assert_eq!((m.topic(), m.seq()), (topic.as_str(), 1));
        assert_eq!(
            m.decode::<Value>().unwrap(),
            json!({"id": 1, "items": ["a", "b"]})
        );
        assert_eq!(next_message(&mut client).await.decode::<u32>().unwrap(), 2);
        assert_eq!(
            next_message(&mut client).await.decode::<String>().unwrap(),
            "from http"
        );

        client.unsubscribe(&topic).await.unwrap();
        client.publish(&topic, &json!(4)).await.unwrap();
        assert!(client.ping().await.unwrap() < PATIENCE);
        client.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_patterns_rewind_and_latest() {
    let server = TestServer::start();
    for i in 1..=3 {
        server.publish(&format!("sensor.{i}"), &json!(i)).await;
    }
    let mut client = Client::builder(url(&server))
        .encoding(Encoding::Msgpack)
        .connect()
        .await
        .unwrap();
    let options = SubscribeOptions {
        rewind: Some(1),
        ..Default::default()
    };
    assert_eq!(
        client
            .subscribe_with("sensor.*", options)
            .await
            .unwrap()
            .stream,
        None,
        "patterns have no stream"
    );
    let mut topics: Vec<String> = Vec::new();
    for _ in 0..3 {
        topics.push(next_message(&mut client).await.topic().to_owned());
    }
    topics.sort();
    assert_eq!(topics, ["sensor.1", "sensor.2", "sensor.3"]);

    let blob = Bytes::from_static(&[0, 1, 2, 254, 255]);
    client
        .publish_bytes("sensor.1", blob.clone(), true)
        .await
        .unwrap();
    assert_eq!(next_message(&mut client).await.bytes().unwrap(), blob);

    let mut json_client = Client::connect(&url(&server)).await.unwrap();
    let latest = SubscribeOptions {
        mode: Mode::Latest {
            max_rate: Some(10.0),
        },
        ..Default::default()
    };
    json_client
        .subscribe_with("sensor.9", latest)
        .await
        .unwrap();
    json_client
        .publish_bytes("sensor.9", blob.clone(), false)
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut json_client).await.bytes().unwrap(),
        blob,
        "base64 on JSON connections"
    );
}

/// A subscriber that is not reading while a burst is published gets it from a batching server
/// as WebSocket messages of hundreds of frames each, handed to the application in batches cut
/// in the middle of those messages: every message arrives once, in order, with its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_arrives_whole_and_in_order_through_batches() {
    const BURST: u64 = 3000;
    let server = TestServer::start();
    let mut subscriber = Client::builder(url(&server))
        .encoding(Encoding::Msgpack)
        .connect()
        .await
        .unwrap();
    assert!(subscriber.welcome().batch, "the server batches frames");
    subscriber.subscribe("burst").await.unwrap();
    let publisher = Client::builder(url(&server))
        .encoding(Encoding::Msgpack)
        .connect()
        .await
        .unwrap();
    for i in 1..=BURST {
        let payload = Bytes::copy_from_slice(&i.to_be_bytes());
        publisher
            .publish_bytes("burst", payload, false)
            .await
            .unwrap();
    }
    publisher.ping().await.unwrap();
    for i in 1..=BURST {
        let m = next_message(&mut subscriber).await;
        assert_eq!((m.topic(), m.seq()), ("burst", i));
        assert_eq!(&m.bytes().unwrap()[..], &i.to_be_bytes()[..]);
    }
    subscriber.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_typed() {
    let server = TestServer::with(|c| c.max_message_bytes = 100);
    let client = Client::connect(&url(&server)).await.unwrap();
    let error = client.subscribe("bad..topic").await.unwrap_err();
    assert_eq!(error.server_code(), Some("invalid_topic"));
    assert_eq!(
        client.publish("a.*", &1).await.unwrap_err().server_code(),
        Some("invalid_topic")
    );
    let big = "x".repeat(200);
    assert_eq!(
        client.publish("a", &big).await.unwrap_err().server_code(),
        Some("payload_too_large")
    );
    let options = SubscribeOptions {
        since: Some(Since {
            epoch: "e".into(),
            seq: 1,
        }),
        ..Default::default()
    };
    assert_eq!(
        client
            .subscribe_with("a.*", options)
            .await
            .unwrap_err()
            .server_code(),
        Some("bad_frame")
    );

    let refused = Client::connect(&server.ws_url("?subscribe=a..b"))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(refused, Error::Refused { status: 400, .. }),
        "{refused:?}"
    );
    let refused = Client::connect(&format!("ws://{}/nowhere", server.addr))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(refused, Error::Refused { status: 404, .. }),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_that_cannot_be_dialled_are_connect_errors() {
    let server = TestServer::start();
    // Not a WebSocket URL: refused before any connection is made.
    let error = Client::connect(&format!("http://{}/ws", server.addr))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&error, Error::Connect(why) if why.contains("not a ws:// or wss:// URL")),
        "{error:?}"
    );
    // Nobody listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let error = Client::connect(&format!("ws://{addr}/ws"))
        .await
        .err()
        .unwrap();
    assert!(matches!(&error, Error::Connect(_)), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutdown_ends_a_client_that_does_not_reconnect() {
    let server = TestServer::start();
    let mut client = Client::connect(&url(&server)).await.unwrap();
    client.subscribe("t").await.unwrap();
    let stopped = tokio::task::spawn_blocking(move || server.stop());
    match next_event(&mut client).await {
        Event::Closed(Error::Closed(Some(CloseInfo { code, reason }))) => {
            assert_eq!((code, reason.as_str()), (1001, "going away"))
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(client.next_event().await.is_none());
    assert!(matches!(
        client.publish("t", &1).await,
        Err(Error::ClientClosed)
    ));
    stopped.await.unwrap().unwrap();
}

/// A TCP proxy in front of a server: it can cut every connection and change its target.
struct Proxy {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    cut: broadcast::Sender<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let (cut, _) = broadcast::channel(4);
        let (to, cut_tx) = (target.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = *to.lock().await;
                let mut cut = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Proxy { addr, target, cut }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    fn cut(&self) {
        let _ = self.cut.send(());
    }
}

fn reconnecting(url: String) -> crier_client::ClientBuilder {
    Client::builder(url).backoff(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_renewed_and_recovers_what_was_missed() {
    let server = TestServer::start();
    let proxy = Proxy::start(server.addr).await;
    for encoding in [Encoding::Json, Encoding::Msgpack] {
        let topic = format!("notify.{encoding:?}");
        let mut client = reconnecting(proxy.url())
            .encoding(encoding)
            .connect()
            .await
            .unwrap();
        client.subscribe(&topic).await.unwrap();
        let live = SubscribeOptions {
            mode: Mode::Latest { max_rate: None },
            ..Default::default()
        };
        let gauge = format!("gauge.{encoding:?}");
        client.subscribe_with(&gauge, live).await.unwrap();
        server.publish(&topic, &json!(1)).await;
        assert_eq!(next_message(&mut client).await.seq(), 1);

        proxy.cut();
        // Published while the client is away.
        server.publish(&topic, &json!(2)).await;
        server.publish(&topic, &json!(3)).await;
        server.publish(&gauge, &json!("current")).await;

        match next_event(&mut client).await {
            Event::Reconnected { recovered } => assert_eq!(recovered, vec![(topic.clone(), true)]),
            other => panic!("expected a reconnection, got {other:?}"),
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = next_message(&mut client).await;
            got.push((m.topic().to_owned(), m.seq()));
        }
        let missed: Vec<_> = got
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, seq)| *seq)
            .collect();
        assert_eq!(missed, vec![2, 3], "what was missed, in order");
        assert!(
            got.contains(&(gauge.clone(), 1)),
            "the gauge's current value: {got:?}"
        );
        server.publish(&topic, &json!(4)).await;
        assert_eq!(next_message(&mut client).await.seq(), 4);
        // Requests work on the new connection.
        assert_eq!(client.publish(&topic, &json!(5)).await.unwrap(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_recovery_says_state_must_be_reloaded() {
    let first = TestServer::start();
    let proxy = Proxy::start(first.addr).await;
    let mut client = reconnecting(proxy.url()).connect().await.unwrap();
    client.subscribe("orders").await.unwrap();
    first.publish("orders", &json!(1)).await;
    next_message(&mut client).await;

    let second = TestServer::start();
    *proxy.target.lock().await = second.addr;
    proxy.cut();
    drop(first);
    match next_event(&mut client).await {
        Event::Reconnected { recovered } => {
            assert_eq!(recovered, vec![("orders".to_owned(), false)])
        }
        other => panic!("expected a reconnection, got {other:?}"),
    }
    second.publish("orders", &json!("new stream")).await;
    let m = next_message(&mut client).await;
    assert_eq!(
        (m.seq(), m.decode::<String>().unwrap()),
        (1, "new stream".to_owned())
    );
    client.close().await.unwrap();
}
