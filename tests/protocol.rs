//! The WebSocket protocol against a real server: handshake, ops, errors, routing, close codes.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

#[tokio::test]
async fn welcome_comes_first_in_either_encoding() {
    let server = TestServer::start();
    for enc in [Enc::Json, Enc::Msgpack] {
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                server.ws_url(""),
            )
            .unwrap();
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("chat, {}", enc.subprotocol()).parse().unwrap(),
        );
        let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            enc.subprotocol()
        );
        let first = ws.next().await.unwrap().unwrap();
        match enc {
            Enc::Json => assert!(first.is_text()),
            Enc::Msgpack => assert!(first.is_binary()),
        }
        let welcome = decode(&first).unwrap();
        assert_eq!(welcome["op"], "welcome");
        assert_eq!(
            welcome["encoding"],
            if enc == Enc::Json { "json" } else { "msgpack" }
        );
        assert!(welcome["server"].as_str().unwrap().starts_with("crier/"));
        assert_eq!(welcome["limits"]["max_message_bytes"], 65536);
        assert_eq!(welcome["limits"]["max_buffered_bytes"], 1048576);
        assert_eq!(welcome["connection"].as_str().unwrap().len(), 16);
    }
}

#[tokio::test]
async fn encoding_from_the_query_without_a_subprotocol() {
    let server = TestServer::start();
    for (query, binary) in [
        ("", false),
        ("?encoding=json", false),
        ("?encoding=msgpack", true),
    ] {
        let (mut ws, response) = tokio_tungstenite::connect_async(server.ws_url(query))
            .await
            .unwrap();
        assert!(response.headers().get("sec-websocket-protocol").is_none());
        let first = ws.next().await.unwrap().unwrap();
        assert_eq!(first.is_binary(), binary, "{query}");
    }
}

#[tokio::test]
async fn bad_handshakes_get_json_errors() {
    let server = TestServer::start();
    let http = reqwest::Client::new();
    let upgrade = |protocol: Option<&'static str>, query: &str| {
        let mut request = http
            .get(server.url(&format!("/ws{query}")))
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
        if let Some(p) = protocol {
            request = request.header("Sec-WebSocket-Protocol", p);
        }
        request.send()
    };
    let cases = [
        (
            upgrade(Some("chat, superchat"), "").await.unwrap(),
            400,
            "bad_request",
        ),
        (
            upgrade(None, "?encoding=xml").await.unwrap(),
            400,
            "bad_request",
        ),
        (
            upgrade(None, "?subscribe=a..b").await.unwrap(),
            400,
            "invalid_topic",
        ),
        (
            http.get(server.url("/ws")).send().await.unwrap(),
            426,
            "upgrade_required",
        ),
    ];
    for (response, status, code) in cases {
        assert_eq!(response.status(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().len() > 5);
    }
    let limited = TestServer::with(|c| c.max_subscriptions = 2);
    let response = reqwest::Client::new()
        .get(limited.url("/ws?subscribe=a,b,c"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_subscriptions");
}

#[tokio::test]
async fn ops_with_and_without_ids() {
    let server = TestServer::start();
    for enc in [Enc::Json, Enc::Msgpack] {
        let mut c = Client::connect(&server, enc).await;
        // With ids: every frame is answered.
        c.send(json!({"op": "subscribe", "topic": "t.1", "id": 1}))
            .await;
        let ack = c.recv().await;
        assert_eq!((&ack["op"], &ack["id"]), (&json!("ack"), &json!(1)));
        assert!(
            ack["epoch"].is_string() && ack["seq"].is_u64(),
            "a topic's stream: {ack}"
        );
        c.send(json!({"op": "publish", "topic": "t.1", "data": {"n": 1}, "id": "p"}))
            .await;
        let (a, b) = (c.recv().await, c.recv().await);
        let (ack, message) = if a["op"] == "ack" { (a, b) } else { (b, a) };
        assert_eq!(ack["id"], "p");
        let seq = ack["seq"].as_u64().unwrap();
        assert_eq!(
            message,
            json!({"op": "message", "topic": "t.1", "seq": seq, "data": {"n": 1}})
        );
        c.send(json!({"op": "ping", "id": 4})).await;
        assert_eq!(c.recv().await, json!({"op": "pong", "id": 4}));
        c.send(json!({"op": "unsubscribe", "topic": "t.1", "id": 2}))
            .await;
        assert_eq!(c.recv().await, json!({"op": "ack", "id": 2}));
        // Unsubscribing what is not subscribed is still an ack.
        c.send(json!({"op": "unsubscribe", "topic": "never.subscribed", "id": 3}))
            .await;
        assert_eq!(c.recv().await, json!({"op": "ack", "id": 3}));
        c.send(json!({"op": "publish", "topic": "t.1", "data": 2, "id": 5}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"op": "ack", "id": 5, "seq": seq + 1})
        );

        // Without ids: nothing but the messages themselves (and a pong for a ping).
        c.send(json!({"op": "subscribe", "topic": "t.2"})).await;
        c.send(json!({"op": "publish", "topic": "t.2", "data": "x"}))
            .await;
        let message = c.recv().await;
        assert_eq!(message["op"], "message");
        assert_eq!(message["data"], "x");
        c.send(json!({"op": "unsubscribe", "topic": "t.2"})).await;
        c.send(json!({"op": "publish", "topic": "t.2", "data": "y"}))
            .await;
        c.send(json!({"op": "ping"})).await;
        assert_eq!(c.recv().await, json!({"op": "pong"}));
        c.sync().await;
    }
}

#[tokio::test]
async fn every_error_code_and_the_connection_stays_open() {
    let server = TestServer::with(|c| {
        c.max_subscriptions = 2;
        c.max_message_bytes = 1024;
    });
    let mut c = Client::connect(&server, Enc::Json).await;
    let expect_error =
        async |client: &mut Client, frame: Message, code: &str, id: serde_json::Value| {
            client.send_raw(frame).await;
            let error = client.recv().await;
            assert_eq!(error["op"], "error", "{error}");
            assert_eq!(error["code"], code, "{error}");
            assert_eq!(
                error.get("id").cloned().unwrap_or(json!(null)),
                id,
                "{error}"
            );
            assert!(!error["message"].as_str().unwrap().is_empty());
            client.sync().await;
        };
    let text = |v: &str| Message::text(v.to_owned());
    expect_error(&mut c, text("not json"), "bad_frame", json!(null)).await;
    expect_error(&mut c, text("[1,2,3]"), "bad_frame", json!(null)).await;
    expect_error(
        &mut c,
        text(r#"{"op":"subscribe","topic":7,"id":9}"#),
        "bad_frame",
        json!(9),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"publish","topic":"a","id":"no-data"}"#),
        "bad_frame",
        json!("no-data"),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"ping","id":-3}"#),
        "bad_frame",
        json!(null),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"yell","id":1}"#),
        "unknown_op",
        json!(1),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"subscribe","topic":"a..b","id":2}"#),
        "invalid_topic",
        json!(2),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"publish","topic":"a.*","data":1,"id":3}"#),
        "invalid_topic",
        json!(3),
    )
    .await;
    expect_error(
        &mut c,
        text(r#"{"op":"subscribe","topic":"a.>.b"}"#),
        "invalid_topic",
        json!(null),
    )
    .await;
    // A bad topic is reported before anything else wrong with the frame.
    for (frame, code, id) in [
        (
            r#"{"op":"subscribe","topic":"a..b","mode":"soon","id":5}"#,
            "invalid_topic",
            5,
        ),
        (
            r#"{"op":"publish","topic":"a.*","id":6}"#,
            "invalid_topic",
            6,
        ),
        (r#"{"op":"publish","topic":"a","id":7}"#, "bad_frame", 7),
    ] {
        expect_error(&mut c, text(frame), code, json!(id)).await;
    }
    let big = format!(
        r#"{{"op":"publish","topic":"a","data":"{}","id":4}}"#,
        "x".repeat(2000)
    );
    expect_error(&mut c, text(&big), "payload_too_large", json!(4)).await;
    c.subscribe("one").await;
    c.subscribe("two.*").await;
    expect_error(
        &mut c,
        text(r#"{"op":"subscribe","topic":"three","id":5}"#),
        "too_many_subscriptions",
        json!(5),
    )
    .await;
    // Re-subscribing to what is already subscribed does not count against the limit.
    c.subscribe("one").await;
    // A MessagePack frame that is not a map, on a JSON connection: answered in JSON.
    expect_error(
        &mut c,
        Message::binary(vec![0x93, 1, 2, 3]),
        "bad_frame",
        json!(null),
    )
    .await;
}

#[tokio::test]
async fn data_crosses_encodings() {
    let server = TestServer::start();
    let mut json_sub = Client::connect(&server, Enc::Json).await;
    let mut mp_sub = Client::connect(&server, Enc::Msgpack).await;
    json_sub.subscribe("x").await;
    mp_sub.subscribe("x").await;

    let value =
        json!({"a": [1, -2, 2.5, true, null], "s": "héllo", "big": 18446744073709551615u64});
    let mut json_pub = Client::connect(&server, Enc::Json).await;
    json_pub
        .send(json!({"op": "publish", "topic": "x", "data": value}))
        .await;
    assert_eq!(json_sub.recv().await["data"], value);
    assert_eq!(mp_sub.recv().await["data"], value);

    // MessagePack bin: bin for MessagePack subscribers, base64 text for JSON subscribers.
    let frame = rmpv::Value::Map(vec![
        ("op".into(), "publish".into()),
        ("topic".into(), "x".into()),
        (
            "data".into(),
            rmpv::Value::Map(vec![(
                "blob".into(),
                rmpv::Value::Binary(vec![0, 1, 254, 255]),
            )]),
        ),
    ]);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &frame).unwrap();
    let mut mp_pub = Client::connect(&server, Enc::Msgpack).await;
    mp_pub.send_raw(Message::binary(bytes)).await;
    assert_eq!(json_sub.recv().await["data"], json!({"blob": "AAH+/w=="}));
    let Message::Binary(raw) = mp_sub.recv_message().await else {
        panic!("binary frame expected")
    };
    let received = decode_msgpack(&raw);
    let data = received
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_str() == Some("data"))
        .unwrap();
    assert_eq!(
        data.1,
        rmpv::Value::Map(vec![(
            "blob".into(),
            rmpv::Value::Binary(vec![0, 1, 254, 255])
        )])
    );
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once() {
    let server = TestServer::start();
    let mut c = Client::connect(&server, Enc::Json).await;
    for topic in ["a.b", "a.*", "a.>", ">", "*.b"] {
        c.subscribe(topic).await;
    }
    server.publish("a.b", &json!(1)).await;
    server.publish("a.b", &json!(2)).await;
    assert_eq!(c.recv().await["data"], 1);
    assert_eq!(c.recv().await["data"], 2);
    c.expect_silence(Duration::from_millis(200)).await;
    let topics = server.get("/api/topics").await;
    let topic = &topics["topics"][0];
    assert_eq!(
        (&topic["name"], &topic["subscribers"], &topic["seq"]),
        (&json!("a.b"), &json!(1), &json!(2))
    );
}

#[tokio::test]
async fn wildcards_match_as_in_nats() {
    let server = TestServer::start();
    let mut star = Client::connect(&server, Enc::Json).await;
    let mut tail = Client::connect(&server, Enc::Msgpack).await;
    star.subscribe("metrics.*").await;
    tail.subscribe("metrics.>").await;
    for topic in ["metrics", "metrics.cpu", "metrics.cpu.0", "other.cpu"] {
        server.publish(topic, &json!(topic)).await;
    }
    assert_eq!(star.recv().await["topic"], "metrics.cpu");
    star.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(tail.recv().await["topic"], "metrics.cpu");
    assert_eq!(tail.recv().await["topic"], "metrics.cpu.0");
    tail.expect_silence(Duration::from_millis(200)).await;
    // After unsubscribing a pattern, nothing more arrives on it.
    tail.send(json!({"op": "unsubscribe", "topic": "metrics.>", "id": 1}))
        .await;
    assert_eq!(tail.recv().await["op"], "ack");
    server.publish("metrics.cpu", &json!(0)).await;
    assert_eq!(star.recv().await["topic"], "metrics.cpu");
    tail.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn subscribe_on_connect_needs_no_protocol_code() {
    let server = TestServer::start();
    let mut c = Client::connect_with(&server, Enc::Json, "?subscribe=news,prices.*").await;
    let published = server.publish("prices.eur", &json!(1.08)).await;
    assert_eq!(published["receivers"], 1);
    server.publish("news", &json!("hello")).await;
    assert_eq!(
        c.recv().await,
        json!({"op": "message", "topic": "prices.eur", "seq": 1, "data": 1.08})
    );
    assert_eq!(
        c.recv().await,
        json!({"op": "message", "topic": "news", "seq": 1, "data": "hello"})
    );
    let info = server.connection(&c.id).await.unwrap();
    assert_eq!(info["subscriptions"], 2);

    // The subscriptions are in place by the time `welcome` arrives, every time.
    for i in 0..20 {
        let topic = format!("fresh.{i}");
        let mut c =
            Client::connect_with(&server, Enc::Msgpack, &format!("?subscribe={topic}")).await;
        assert_eq!(
            server.publish(&topic, &json!(i)).await["receivers"],
            1,
            "{topic}"
        );
        assert_eq!(c.recv().await["data"], i);
    }
}

#[tokio::test]
async fn oversized_and_invalid_frames_close_with_the_right_code() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024);
    // Limit: 1024 bytes of data plus 4096 of envelope.
    let mut c = Client::connect(&server, Enc::Json).await;
    c.send_raw(Message::text("x".repeat(6000))).await;
    let (_, close) = c.recv_until_close().await;
    assert_eq!(close_code(&close), 1009);

    let mut c = Client::connect(&server, Enc::Msgpack).await;
    c.send_raw(Message::binary(vec![0u8; 1 << 20])).await;
    let (_, close) = c.recv_until_close().await;
    assert_eq!(close_code(&close), 1009);

    let mut c = Client::connect(&server, Enc::Json).await;
    let invalid_utf8 = Frame::message(
        vec![b'{', 0xff, 0xfe, b'}'],
        OpCode::Data(OpData::Text),
        true,
    );
    c.send_raw(Message::Frame(invalid_utf8)).await;
    let (_, close) = c.recv_until_close().await;
    assert_eq!(close_code(&close), 1007);

    // Others are unaffected.
    let mut c = Client::connect(&server, Enc::Json).await;
    c.sync().await;
}

#[tokio::test]
async fn client_close_is_answered_and_the_connection_forgotten() {
    let server = TestServer::start();
    let mut c = Client::connect(&server, Enc::Json).await;
    c.subscribe("t").await;
    c.ws.close(None).await.unwrap();
    let (_, close) = c.recv_until_close().await;
    assert_eq!(close_code(&close), 1000);
    eventually("the connection to be forgotten", || async {
        server.get("/api/connections").await["connections"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    assert_eq!(server.publish("t", &json!(1)).await["receivers"], 0);
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_for_idleness() {
    let server = TestServer::with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(400);
    });
    // This one reads (and so answers pings) and stays.
    let mut lively = Client::connect(&server, Enc::Json).await;
    // This one reads nothing for a while, so it never answers.
    let mut silent = Client::connect(&server, Enc::Json).await;
    lively.expect_silence(Duration::from_millis(1000)).await;
    lively.sync().await;
    let (_, close) = silent.recv_until_close().await;
    assert_eq!(close_code(&close), 4001);
    assert_eq!(close.unwrap().reason.as_str(), "idle timeout");
}

/// Every frame of a WebSocket message from a batching connection.
fn frames_of(message: &Message) -> Vec<serde_json::Value> {
    match message {
        Message::Text(text) => text
            .split('\n')
            .map(|line| serde_json::from_str(line).expect("one JSON frame per line"))
            .map(without_pong_figures)
            .collect(),
        Message::Binary(bytes) => {
            let mut rest: &[u8] = bytes;
            let mut frames = Vec::new();
            while !rest.is_empty() {
                let value =
                    rmpv::decode::read_value(&mut rest).expect("MessagePack frames back to back");
                frames.push(without_pong_figures(serde_json::to_value(&value).unwrap()));
            }
            frames
        }
        other => panic!("a data message expected, got {other:?}"),
    }
}

#[tokio::test]
async fn batching_connections_get_several_frames_per_message() {
    let server = TestServer::start();
    for enc in [Enc::Json, Enc::Msgpack] {
        let mut batching = Client::connect_with(&server, enc, "?batch=1&subscribe=feed").await;
        let mut plain = Client::connect_with(&server, enc, "?subscribe=feed").await;
        // Published in one request: the writers are woken once, with every frame waiting.
        let items: Vec<serde_json::Value> = (0..50)
            .map(|i| json!({"topic": "feed", "data": {"i": i, "text": "line\nbreak"}}))
            .collect();
        server.publish_batch(&items).await;

        let mut received = Vec::new();
        let mut messages = 0;
        while received.len() < 50 {
            let message = batching.recv_message().await;
            messages += 1;
            received.extend(
                frames_of(&message)
                    .into_iter()
                    .map(|f| f["data"]["i"].as_u64().unwrap()),
            );
        }
        assert_eq!(
            received,
            (0..50).collect::<Vec<_>>(),
            "{enc:?}: every frame, in order"
        );
        assert!(
            messages < 50,
            "{enc:?}: frames were joined ({messages} messages for 50 frames)"
        );

        for i in 0..50 {
            let frame = plain.recv().await;
            assert_eq!(
                frame["data"]["i"], i,
                "without batching, one frame per message"
            );
        }
        // Answers still come, inside batches or not.
        batching.send(json!({"op": "ping", "id": 9})).await;
        let pong = frames_of(&batching.recv_message().await);
        assert_eq!(pong, vec![json!({"op": "pong", "id": 9})]);
    }
}

#[tokio::test]
async fn the_welcome_says_whether_a_connection_batches() {
    let server = TestServer::start();
    for (query, expected) in [
        ("", false),
        ("?batch=0", false),
        ("?batch=1", true),
        ("?batch=true", true),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(server.ws_url(query))
            .await
            .unwrap();
        let welcome = decode(&ws.next().await.unwrap().unwrap()).unwrap();
        assert_eq!(welcome["batch"], expected, "{query}");
    }
    let refused = tokio_tungstenite::connect_async(server.ws_url("?batch=sometimes")).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn welcome_names_the_node_the_api_and_metrics_name_it_and_the_backend() {
    let (one, other) = (TestServer::start(), TestServer::start());
    let welcome = |server: &TestServer| {
        let url = server.ws_url("");
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            decode(&ws.next().await.unwrap().unwrap()).unwrap()
        }
    };
    let (w1, w2, w3) = (
        welcome(&one).await,
        welcome(&one).await,
        welcome(&other).await,
    );
    let node = w1["node"].as_str().unwrap().to_owned();
    assert_eq!(node.len(), 16, "{w1}");
    assert_eq!(w2["node"], node.as_str(), "one process, one node");
    assert_ne!(w3["node"], node.as_str(), "another process, another node");
    assert_ne!(w1["connection"], w2["connection"]);
    let topics = one.get("/api/topics").await;
    assert_eq!(
        (topics["backend"].clone(), topics["node"].clone()),
        (json!("memory"), json!(node))
    );
    let scrape = one.scrape().await;
    assert_eq!(
        scrape.get(&format!(
            "crier_backend_info{{backend=\"memory\",node=\"{node}\"}}"
        )),
        1.0
    );
}

/// Publishers on every worker thread, subscribers on every worker (both encodings, exact and
/// pattern): each subscriber gets the topic's every message once, in seq order, whichever thread
/// queued it (the publisher's own, or the subscriber's worker it was handed to).
#[tokio::test]
async fn publications_from_every_worker_reach_every_subscriber_in_order() {
    let server = TestServer::start();
    let mut subscribers = Vec::new();
    for i in 0..12 {
        let enc = if i % 2 == 0 { Enc::Json } else { Enc::Msgpack };
        let mut c = Client::connect(&server, enc).await;
        c.subscribe(if i % 3 == 0 { "fan.*" } else { "fan.x" })
            .await;
        subscribers.push(c);
    }
    let mut publishers = Vec::new();
    for i in 0..4 {
        let enc = if i % 2 == 0 { Enc::Msgpack } else { Enc::Json };
        publishers.push(Client::connect(&server, enc).await);
    }
    let per_publisher = 300;
    let http_publishes = 50;
    let sends = publishers.iter_mut().enumerate().map(|(p, c)| async move {
        for n in 0..per_publisher {
            c.send(json!({"op": "publish", "topic": "fan.x", "data": [p, n]}))
                .await;
        }
        c.sync().await;
    });
    let http = async {
        for n in 0..http_publishes {
            server.publish("fan.x", &json!(["http", n])).await;
        }
    };
    tokio::join!(futures_util::future::join_all(sends), http);

    let total = 4 * per_publisher + http_publishes;
    for (i, c) in subscribers.iter_mut().enumerate() {
        let mut seqs = Vec::new();
        let mut last = [None; 4];
        for _ in 0..total {
            let frame = c.recv().await;
            assert_eq!(frame["op"], "message", "subscriber {i}: {frame}");
            seqs.push(frame["seq"].as_u64().unwrap());
            // Each publisher's messages keep the order it sent them in.
            if let Some(p) = frame["data"][0].as_u64() {
                let n = frame["data"][1].as_u64();
                assert!(
                    last[p as usize] < n,
                    "subscriber {i}: publisher {p} out of order"
                );
                last[p as usize] = n;
            }
        }
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "subscriber {i}");
        c.expect_silence(Duration::from_millis(50)).await;
    }
}

/// A connection that already receives a topic subscribes to it again with a rewind, while a
/// publisher on another worker publishes: each time, after the ack at position P, the live
/// messages up to P come first, then the rewind (P-2..=P), then only newer live messages, with
/// nothing lost or repeated in the live stream.
#[tokio::test]
async fn a_rewind_on_a_running_subscription_comes_where_its_stream_was() {
    let server = TestServer::start();
    // More subscribers than a publication is queued for directly, so that it is handed over.
    let mut others = Vec::new();
    for _ in 0..10 {
        let mut c = Client::connect(&server, Enc::Msgpack).await;
        c.subscribe("flow").await;
        others.push(c);
    }
    let mut c = Client::connect(&server, Enc::Json).await;
    c.subscribe("flow").await;
    let mut publisher = Client::connect(&server, Enc::Msgpack).await;
    let (mut last_live, mut published) = (0, 0);
    for round in 0..30 {
        for _ in 0..200 {
            publisher
                .send(json!({"op": "publish", "topic": "flow", "data": published}))
                .await;
            published += 1;
        }
        c.send(json!({"op": "subscribe", "topic": "flow", "rewind": 3, "id": round}))
            .await;
        let position = loop {
            let frame = c.recv().await;
            if frame["op"] == "ack" {
                break frame["seq"].as_u64().unwrap();
            }
            let seq = frame["seq"].as_u64().unwrap();
            assert_eq!(seq, last_live + 1, "round {round}: the live stream");
            last_live = seq;
        };
        let expected: Vec<u64> = (last_live + 1..=position)
            .chain(position.saturating_sub(2).max(1)..=position)
            .collect();
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(c.recv().await["seq"].as_u64().unwrap());
        }
        assert_eq!(
            got, expected,
            "round {round}: held live messages, then the rewind"
        );
        last_live = position;
        while last_live < published {
            let seq = c.recv().await["seq"].as_u64().unwrap();
            assert_eq!(
                seq,
                last_live + 1,
                "round {round}: live after the rewind to {position}"
            );
            last_live = seq;
        }
        // Whatever else the others hold, they are not read: only their queues grow.
        publisher.sync().await;
    }
    drop(others);
}
