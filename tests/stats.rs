//! `_crier.stats`: the broker's own topic, published once a second while subscribed, that a
//! dashboard reads like any client; nobody else may publish under `_crier.`, wildcards that do
//! not name the namespace do not reach it, and with authentication only grants that name it do.

mod access;
mod common;

use std::time::Duration;

use access::*;
use common::*;
use serde_json::json;

#[tokio::test]
async fn stats_arrive_once_a_second_while_subscribed() {
    let server = TestServer::start();
    let mut everything = Client::connect(&server, Enc::Msgpack).await;
    everything.subscribe(">").await;
    let mut dashboard = Client::connect(&server, Enc::Json).await;
    dashboard.subscribe("_crier.stats").await;
    server.publish("feed", &json!(1)).await;
    assert_eq!(everything.recv().await["topic"], "feed");

    let first = dashboard.recv().await;
    let second = dashboard.recv().await;
    for frame in [&first, &second] {
        assert_eq!(frame["topic"], "_crier.stats", "{frame}");
        let stats = &frame["data"];
        assert_eq!(stats["connections"]["json"], 1, "{stats}");
        assert_eq!(stats["connections"]["msgpack"], 1, "{stats}");
        assert_eq!(stats["connections"]["total"], 2, "{stats}");
        assert_eq!(stats["subscriptions"], 2, "{stats}");
        assert_eq!(stats["totals"]["published"], 1, "{stats}");
        assert!(stats["rates"]["published"].is_number(), "{stats}");
        assert!(stats["buffered_bytes"].is_u64(), "{stats}");
        assert_eq!(stats["max_buffered_bytes"], 1 << 20);
    }
    assert_eq!(second["seq"].as_u64(), first["seq"].as_u64().map(|s| s + 1));
    let apart = second["data"]["time"].as_u64().unwrap() - first["data"]["time"].as_u64().unwrap();
    assert!(
        (500..=2500).contains(&apart),
        "{apart} ms between two ticks"
    );
    assert!(
        recv_within(&mut everything, Duration::from_millis(1500))
            .await
            .is_none(),
        "`>` does not reach the broker's own topics"
    );
}

#[tokio::test]
async fn only_the_broker_publishes_under_its_namespace() {
    let server = TestServer::with(|c| c.api_keys = vec!["operator-key-1234".into()]);
    let answer = publish(&server, Some("operator-key-1234"), "_crier.stats", json!(1)).await;
    answer.assert_error(403, "forbidden", "even an API key");
    let (mut client, _) = connect_with_token(&server, "operator-key-1234").await;
    let refused = ws_publish(&mut client, "_crier.x", json!(1), "p").await;
    assert_error_frame(&refused, "forbidden", "over WebSocket");
    let batch = post(
        &server,
        "/api/publish",
        Some("operator-key-1234"),
        &json!([{"topic": "ok", "data": 1}, {"topic": "_crier.stats", "data": 2}]),
    )
    .await;
    batch.assert_error(403, "forbidden", "a batch with a system topic");
}

#[tokio::test]
async fn only_grants_that_name_the_namespace_see_the_stats() {
    let server = TestServer::with(|c| c.jwt_secret = Some(SECRET.into()));
    let (mut everything, _) = connect_with_token(&server, &token("u", &[">"], &[])).await;
    for topic in ["_crier.stats", "_crier.>"] {
        let refused = ws_subscribe(&mut everything, topic, "s").await;
        assert_error_frame(&refused, "forbidden", topic);
    }
    let (mut operator, _) = connect_with_token(&server, &token("ops", &["_crier.>"], &[])).await;
    let ack = ws_subscribe(&mut operator, "_crier.stats", "s").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let frame = operator.recv().await;
    assert_eq!(
        (
            frame["topic"].clone(),
            frame["data"]["connections"]["total"].clone()
        ),
        (json!("_crier.stats"), json!(2))
    );
}
