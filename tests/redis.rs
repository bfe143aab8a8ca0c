//! Several Crier nodes as one broker over Redis (issue 12): against the machine's shared Redis
//! on 127.0.0.1:6379, each test in its own key prefix; the outage test starts a Redis of its
//! own on a free port and never touches the shared one.

mod common;
#[path = "redis/mod.rs"]
mod redis_support;

use common::Enc;
use futures_util::SinkExt;
use redis_support::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Three nodes, a JSON and a MessagePack subscriber on each, publishers over WebSocket and
/// HTTP (both encodings) on each: every subscriber gets every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_message_once_in_order() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    fanout_exact(&target).await;
}

/// The same with `news.*` and `news.>` subscribers (and an exact one) over several topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_to_patterns_once_in_order() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    fanout_patterns(&target).await;
}

/// A subscriber moves from node to node mid-stream and recovers with `since`, without a gap or
/// a duplicate, while a publisher on another node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_moves_to_another_node_recovers_without_gap_or_duplicate() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    subscriber_moves(&target).await;
}

/// `/api/topics`, history over HTTP and `/metrics` on each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_cluster_topics_and_names_itself_and_the_backend() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    topics_and_metrics(&target).await;
}

/// A node listens in Redis only for what its own clients subscribe to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listens_only_for_what_its_clients_subscribe_to() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    interest(&target).await;
}

/// History is bounded in Redis, as every node sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_in_redis_for_every_node() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    history_is_bounded(&target).await;
}

/// Redis killed and restarted, empty, while traffic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_refused_clearly_and_survived() {
    let mut redis = OwnRedis::start();
    outage(&mut redis).await;
}

/// The harness itself: a Redis of the test's own is killed and restarts on its port, empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tests_own_redis_is_killed_and_restarts_empty_on_its_port() {
    let mut redis = OwnRedis::start();
    assert_ne!(redis.port, SHARED_PORT);
    redis_cli(redis.port, &["set", "k", "v"]);
    redis.kill();
    assert!(!ping(redis.port));
    redis.restart();
    assert!(ping(redis.port));
    assert_eq!(redis_cli(redis.port, &["get", "k"]).trim(), "");
}

/// Frames a client sends right behind a subscribe wait for it (it waits on Redis): the
/// publishes sent after it, in the same breath, reach the new subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_behind_a_subscribe_are_served_after_it() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    let node = target.node(|_| {});
    for round in 0..20 {
        let topic = format!("behind.{round}");
        let (mut client, _) = connect_welcomed(&node, Enc::Json).await;
        // One write: the node reads the four frames at once.
        let mut frames = vec![json!({"op": "subscribe", "topic": topic, "id": "s"})];
        frames.extend(
            (1..=3).map(
                |k| json!({"op": "publish", "topic": topic, "data": k, "id": format!("p{k}")}),
            ),
        );
        for frame in frames {
            client
                .ws
                .feed(Message::text(frame.to_string()))
                .await
                .unwrap();
        }
        client.ws.flush().await.unwrap();
        let first = recv_frame(&mut client).await;
        assert_eq!(
            (&first["op"], &first["id"]),
            (&json!("ack"), &json!("s")),
            "{first}"
        );
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        while messages.len() < 3 || acks.len() < 3 {
            let frame = recv_frame(&mut client).await;
            match frame["op"].as_str() {
                Some("message") => messages.push((frame["seq"].clone(), frame["data"].clone())),
                Some("ack") => acks.push(frame["id"].as_str().unwrap_or_default().to_owned()),
                _ => panic!("unexpected {frame}"),
            }
        }
        assert_eq!(
            messages,
            (1..=3).map(|k| (json!(k), json!(k))).collect::<Vec<_>>(),
            "round {round}"
        );
        acks.sort();
        assert_eq!(acks, ["p1", "p2", "p3"], "round {round}");
    }
}

/// A publish is acknowledged only once Redis holds it: a node that dies right after its acks
/// loses none of them, and another node replays them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_loses_nothing_it_acknowledged() {
    let target = Target::shared();
    let _cleanup = target.cleanup();
    let doomed = target.node(|c| c.history_size = 1000);
    let survivor = target.node(|c| c.history_size = 1000);
    let topic = "acked.t";
    let (mut publisher, _) = connect_welcomed(&doomed, Enc::Msgpack).await;
    const N: u64 = 300;
    for k in 1..=N {
        publisher
            .send(json!({"op": "publish", "topic": topic, "data": k, "id": k}))
            .await;
    }
    let mut acked = Vec::new();
    while acked.len() < N as usize {
        let frame = recv_frame(&mut publisher).await;
        assert_eq!(frame["op"], "ack", "{frame}");
        acked.push(frame["seq"].as_u64().expect("an acked seq"));
    }
    doomed.stop().expect("the node stops");
    acked.sort_unstable();
    assert_eq!(acked, (1..=N).collect::<Vec<_>>());

    let topics = survivor.get("/api/topics").await;
    let listed = topics["topics"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == topic))
        .cloned()
        .unwrap_or_else(|| panic!("{topic} listed: {topics}"));
    assert_eq!(listed["seq"], N, "{listed}");
    let (mut late, _) = connect_welcomed(&survivor, Enc::Json).await;
    let ack = late
        .subscribe_with(
            topic,
            json!({"since": {"epoch": listed["epoch"], "seq": 0}}),
        )
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let mut replayed = Vec::new();
    while replayed.len() < N as usize {
        let frame = recv_frame(&mut late).await;
        assert_eq!(frame["op"], "message", "{frame}");
        assert_eq!(frame["data"], frame["seq"], "{frame}");
        replayed.push(frame["seq"].as_u64().unwrap_or_default());
    }
    assert_eq!(replayed, (1..=N).collect::<Vec<_>>());
}
