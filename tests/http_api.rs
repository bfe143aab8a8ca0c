//! The HTTP API against a real server.

mod common;

use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn post(
    server: &TestServer,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(server.url(path)).body(body);
    if let Some(ct) = content_type {
        request = request.header("Content-Type", ct);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn msgpack(value: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(value).unwrap()
}

#[tokio::test]
async fn publish_one_in_json_and_msgpack() {
    let server = TestServer::start();
    let mut sub = Client::connect(&server, Enc::Json).await;
    sub.subscribe("orders.new").await;

    let (status, body) = post(
        &server,
        "/api/topics/orders.new",
        Some("application/json; charset=utf-8"),
        br#"{"id":7}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"topic": "orders.new", "seq": 1, "receivers": 1})
    );
    assert_eq!(
        sub.recv().await,
        json!({"op": "message", "topic": "orders.new", "seq": 1, "data": {"id": 7}})
    );

    let (status, body) = post(
        &server,
        "/api/topics/orders.new",
        Some("application/msgpack"),
        msgpack(&json!([1, "two"])),
    )
    .await;
    assert_eq!((status, body["seq"].clone()), (200, json!(2)));
    assert_eq!(sub.recv().await["data"], json!([1, "two"]));
}

#[tokio::test]
async fn publish_one_errors() {
    let server = TestServer::with(|c| c.max_message_bytes = 100);
    /// (path, content type, body, expected status, expected code)
    type Case = (
        &'static str,
        Option<&'static str>,
        Vec<u8>,
        u16,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "/api/topics/a",
            None,
            b"1".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "/api/topics/a",
            Some("text/plain"),
            b"1".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "/api/topics/a",
            Some("application/json"),
            b"{oops".to_vec(),
            400,
            "bad_request",
        ),
        (
            "/api/topics/a",
            Some("application/json"),
            b"".to_vec(),
            400,
            "bad_request",
        ),
        (
            "/api/topics/a",
            Some("application/msgpack"),
            vec![0x92, 0x01],
            400,
            "bad_request",
        ),
        (
            "/api/topics/a..b",
            Some("application/json"),
            b"1".to_vec(),
            400,
            "invalid_topic",
        ),
        (
            "/api/topics/a.*",
            Some("application/json"),
            b"1".to_vec(),
            400,
            "invalid_topic",
        ),
        (
            "/api/topics/a",
            Some("application/json"),
            format!("\"{}\"", "x".repeat(200)).into_bytes(),
            413,
            "payload_too_large",
        ),
    ];
    for (path, content_type, body, status, code) in cases {
        let (got_status, got) = post(&server, path, content_type, body).await;
        assert_eq!(
            (got_status, got["error"]["code"].as_str().unwrap()),
            (status, code),
            "{path} {content_type:?}: {got}"
        );
        assert!(!got["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        server.get("/api/topics").await["topics"],
        json!([]),
        "nothing was published"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let server = TestServer::start();
    let response = reqwest::get(server.url("/nope")).await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let response = reqwest::get(server.url("/api/publish")).await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );
    let response = reqwest::get(server.url("/api/topics?limit=many"))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "bad_request"
    );
}

#[tokio::test]
async fn batch_publish_in_json_and_msgpack() {
    let server = TestServer::start();
    let mut sub = Client::connect(&server, Enc::Msgpack).await;
    sub.subscribe("b.*").await;
    let batch = json!([
        {"topic": "b.one", "data": 1},
        {"topic": "b.two", "data": {"x": null}},
        {"topic": "b.one", "data": null},
    ]);
    let (status, body) = post(
        &server,
        "/api/publish",
        Some("application/json"),
        batch.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"results": [
            {"topic": "b.one", "seq": 1, "receivers": 1},
            {"topic": "b.two", "seq": 1, "receivers": 1},
            {"topic": "b.one", "seq": 2, "receivers": 1},
        ]})
    );
    for (topic, seq, data) in [
        ("b.one", 1, json!(1)),
        ("b.two", 1, json!({"x": null})),
        ("b.one", 2, json!(null)),
    ] {
        assert_eq!(
            sub.recv().await,
            json!({"op": "message", "topic": topic, "seq": seq, "data": data})
        );
    }
    let (status, body) = post(
        &server,
        "/api/publish",
        Some("application/msgpack"),
        msgpack(&batch),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][2]["seq"], 4);
}

#[tokio::test]
async fn a_batch_is_validated_whole_before_anything_is_published() {
    let server = TestServer::with(|c| {
        c.max_message_bytes = 100;
        c.max_batch_bytes = 2000;
    });
    let big = "x".repeat(200);
    let cases = [
        (
            json!([{"topic": "ok", "data": 1}, {"topic": "bad topic", "data": 2}]).to_string(),
            400,
            "invalid_topic",
        ),
        (
            json!([{"topic": "ok", "data": 1}, {"topic": "ok", "data": big}]).to_string(),
            413,
            "payload_too_large",
        ),
        (
            json!([{"topic": "ok", "data": 1}, {"data": 2}]).to_string(),
            400,
            "bad_request",
        ),
        (
            json!({"topic": "ok", "data": 1}).to_string(),
            400,
            "bad_request",
        ),
        (
            json!([{"topic": "ok", "data": "y".repeat(3000)}]).to_string(),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (got_status, got) = post(
            &server,
            "/api/publish",
            Some("application/json"),
            body.into_bytes(),
        )
        .await;
        assert_eq!(
            (got_status, got["error"]["code"].as_str().unwrap()),
            (status, code),
            "{got}"
        );
    }
    let (status, _) = post(&server, "/api/publish", Some("text/csv"), b"ok,1".to_vec()).await;
    assert_eq!(status, 415);
    assert_eq!(
        server.get("/api/topics").await["topics"],
        json!([]),
        "nothing was published"
    );
}

#[tokio::test]
async fn topics_connections_and_health() {
    let server = TestServer::start();
    let mut a = Client::connect(&server, Enc::Json).await;
    let mut b = Client::connect(&server, Enc::Msgpack).await;
    a.subscribe("t.1").await;
    a.subscribe("t.*").await;
    b.subscribe("t.1").await;
    server.publish("t.1", &json!(1)).await;
    server.publish("t.2", &json!(1)).await;
    server.publish("t.2", &json!(2)).await;

    let mut topics = server.get("/api/topics").await;
    for topic in topics["topics"].as_array_mut().unwrap() {
        let epoch = topic.as_object_mut().unwrap().remove("epoch").unwrap();
        assert_eq!(epoch.as_str().unwrap().len(), 16);
    }
    assert_eq!(
        topics,
        json!({"backend": "memory", "node": topics["node"].clone(), "topics": [
            {"name": "t.1", "subscribers": 2, "seq": 1, "history": 1},
            {"name": "t.2", "subscribers": 1, "seq": 2, "history": 2},
        ]})
    );
    assert_eq!(
        server.get("/api/topics?limit=1").await["topics"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let connections = server.get("/api/connections").await["connections"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(connections.len(), 2);
    let info = connections.iter().find(|c| c["id"] == a.id).unwrap();
    assert_eq!(info["encoding"], "json");
    assert_eq!(info["subscriptions"], 2);
    assert!(info["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(info["buffered_high_water"].as_u64().unwrap() > 0);
    assert_eq!(info["dropped"], 0);
    assert!(info["connected_since"].as_str().unwrap().ends_with('Z'));
    assert!(info["buffered_bytes"].is_u64());
    assert_eq!(
        server.get("/api/connections?limit=1").await["connections"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(b.recv().await["topic"], "t.1");
    b.sync().await;

    assert_eq!(server.get("/healthz").await, json!({"status": "ok"}));
    assert_eq!(server.get("/readyz").await, json!({"status": "ready"}));
}

#[tokio::test]
async fn json_data_keeps_everything_but_its_line_breaks() {
    let server = TestServer::start();
    let mut sub = Client::connect(&server, Enc::Json).await;
    sub.subscribe("t").await;
    let body = b"{\n  \"text\": \"two\\nlines\",\r\n  \"n\": 1.50\n}".to_vec();
    let (status, _) = post(&server, "/api/topics/t", Some("application/json"), body).await;
    assert_eq!(status, 200);
    let Message::Text(text) = sub.recv_message().await else {
        panic!("a text frame expected")
    };
    assert!(!text.contains('\n'), "one line: {text}");
    assert!(
        text.ends_with(r#""data":{  "text": "two\nlines",  "n": 1.50}}"#),
        "{text}"
    );
}
