//! Several Crier nodes as one broker over Redis (issue 12): against the machine's shared Redis
//! on 127.0.0.1:6379, each test in its own key prefix; the outage test starts a Redis of its
//! own on a free port and never touches the shared one.

mod common;
#[path = "redis/mod.rs"]
mod redis_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Enc, eventually, eventually_within};
use futures_util::SinkExt;
use redis_support::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
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

/// A topic subscribed to but not yet published on has nothing delivered on this node; when the
/// node's pub/sub connection is lost, what is published meanwhile must still be fetched from
/// history once the subscription is back: the subscriber gets 1, 2 (missed) and 3 (live), in
/// order, and nothing else. Three rounds, each on a fresh topic, for timing to vary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_nothing_delivered_yet_catches_up_after_the_pubsub_connection_is_lost() {
    let redis = OwnRedis::start();
    let target = Target::own(&redis);
    let node = target.node(|_| {});
    for round in 0..3 {
        let topic = format!("lost.t{round}");
        let label = format!("round {round} ({topic})");
        let (mut client, _) = connect_welcomed(&node, Enc::Json).await;
        let ack = client.subscribe(&topic).await;
        let epoch = ack["epoch"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            ack,
            json!({"op": "ack", "id": "s", "epoch": epoch, "seq": 0}),
            "{label}"
        );
        assert_eq!(target.redis_listeners(&topic), 1, "{label}");

        // Only the node's pub/sub connection is a pub/sub client of this Redis.
        let killed = redis_cli(redis.port, &["client", "kill", "type", "pubsub"]);
        assert_eq!(killed.trim(), "1", "{label}: CLIENT KILL TYPE pubsub");
        // Published over the node's other connection while the subscription is gone.
        for k in 1..=2u64 {
            assert_eq!(
                node.publish(&topic, &json!(k)).await,
                json!({"topic": topic, "seq": k, "receivers": 1}),
                "{label}"
            );
        }

        eventually_within(
            &format!("{label}: the node to be ready and subscribed again"),
            Duration::from_secs(15),
            || async {
                (is_ready(&node).await && target.redis_listeners(&topic) == 1).then_some(())
            },
        )
        .await;
        assert_eq!(
            node.publish(&topic, &json!(3)).await,
            json!({"topic": topic, "seq": 3, "receivers": 1}),
            "{label}"
        );

        let frames = frames_through(&mut client, &topic, 3).await;
        let expected: Vec<Value> = (1..=3u64)
            .map(|k| json!({"op": "message", "topic": topic, "seq": k, "data": k}))
            .collect();
        assert_eq!(frames, expected, "{label}: what the subscriber received");
        let _ = client.ws.close(None).await;
    }
}

/// A pattern's Redis glob is broader than the pattern (`{a.*}` matches `a.b.c`, which `a.*`
/// does not): what the node saw of such a topic, owed to no one, must not be remembered, or a
/// later subscriber whose pattern does match it is sent the "missed" history first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_subscriber_gets_no_stale_history_of_topics_its_glob_brought() {
    let redis = OwnRedis::start();
    let target = Target::own(&redis);
    let node = target.node(|_| {});
    let topic = "a.b.c";
    let (mut a, _) = connect_welcomed(&node, Enc::Json).await;
    assert_eq!(a.subscribe("a.*").await, json!({"op": "ack", "id": "s"}));
    assert_eq!(target.redis_patterns(), 1);
    for k in 1..=5u64 {
        assert_eq!(
            node.publish(topic, &json!(k)).await,
            json!({"topic": topic, "seq": k, "receivers": 0}),
            "{topic} is not matched by a.*"
        );
    }
    // One pub/sub connection carries both in order: once A has this, the node has read the five.
    assert_eq!(
        node.publish("a.x", &json!("after")).await,
        json!({"topic": "a.x", "seq": 1, "receivers": 1})
    );
    assert_eq!(
        recv_frame(&mut a).await,
        json!({"op": "message", "topic": "a.x", "seq": 1, "data": "after"}),
        "A's first frame after its ack"
    );
    a.send(json!({"op": "unsubscribe", "topic": "a.*", "id": "u"}))
        .await;
    assert_eq!(recv_frame(&mut a).await, json!({"op": "ack", "id": "u"}));
    eventually_equals("PUBSUB NUMPAT after A left", 0, || async {
        target.redis_patterns()
    })
    .await;

    for k in 6..=20u64 {
        assert_eq!(
            node.publish(topic, &json!(k)).await,
            json!({"topic": topic, "seq": k, "receivers": 0})
        );
    }
    let (mut b, _) = connect_welcomed(&node, Enc::Json).await;
    assert_eq!(b.subscribe("a.>").await, json!({"op": "ack", "id": "s"}));
    assert_eq!(target.redis_patterns(), 1);
    assert_eq!(
        node.publish(topic, &json!(21)).await,
        json!({"topic": topic, "seq": 21, "receivers": 1})
    );
    assert_eq!(
        frames_through(&mut b, topic, 21).await,
        [json!({"op": "message", "topic": topic, "seq": 21, "data": 21})],
        "B subscribed (without rewind) before 21 only"
    );
    assert_eq!(
        drain(&mut a).await,
        Vec::<Value>::new(),
        "A (unsubscribed) got nothing more, and never anything of {topic}"
    );
}

/// A subscribe that fails (Redis does not answer) leaves no route, topic or Redis subscription
/// behind, even when the connection already receives the topic through a pattern: once the
/// client leaves, the node holds nothing and listens to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscribe_leaves_nothing_behind() {
    let redis = OwnRedis::start();
    let target = Target::own(&redis);
    let node = target.node(|_| {});
    let (mut client, _) = connect_welcomed(&node, Enc::Json).await;
    assert_eq!(
        client.subscribe("a.*").await,
        json!({"op": "ack", "id": "s"})
    );

    let paused = redis.pause();
    let asked = Instant::now();
    client
        .send(json!({"op": "subscribe", "topic": "a.b", "id": 7}))
        .await;
    let answer = recv_frame(&mut client).await;
    let waited = asked.elapsed();
    let message = answer["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{answer}");
    assert_eq!(
        answer,
        json!({"op": "error", "id": 7, "code": "unavailable", "message": message}),
        "the answer to a subscribe while Redis does not answer"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the refusal took {waited:?}"
    );
    paused.resume();
    eventually_within(
        "the node to be ready again",
        Duration::from_secs(15),
        || async { is_ready(&node).await.then_some(()) },
    )
    .await;
    // The client keeps its pattern and nothing else: no topic, no channel in Redis.
    let channels = format!("{}:*", target.prefix);
    eventually_equals(
        "while the client stays: (crier_topics, crier_patterns, PUBSUB CHANNELS, PUBSUB NUMPAT)",
        (0.0, 1.0, BTreeSet::new(), 1),
        || async {
            let scrape = node.scrape().await;
            (
                scrape.get("crier_topics"),
                scrape.get("crier_patterns"),
                pubsub_channels(redis.port, &channels),
                target.redis_patterns(),
            )
        },
    )
    .await;
    let _ = client.ws.close(None).await;
    drop(client);
    eventually_equals(
        "(crier_topics, crier_patterns, /api/connections, PUBSUB CHANNELS, PUBSUB NUMPAT)",
        (0.0, 0.0, json!({"connections": []}), BTreeSet::new(), 0),
        || async {
            let scrape = node.scrape().await;
            (
                scrape.get("crier_topics"),
                scrape.get("crier_patterns"),
                node.get("/api/connections").await,
                pubsub_channels(redis.port, &channels),
                target.redis_patterns(),
            )
        },
    )
    .await;
}

/// A client that goes away while its `?subscribe=` subscriptions wait on Redis (paused) is
/// forgotten: once Redis answers again the node lists no connection and holds no topic, and
/// serves new clients as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_its_initial_subscriptions_is_forgotten() {
    let redis = OwnRedis::start();
    let target = Target::own(&redis);
    let node = target.node(|_| {});
    assert!(is_ready(&node).await);

    const PAUSE: Duration = Duration::from_millis(3000);
    redis_cli(
        redis.port,
        &["client", "pause", &PAUSE.as_millis().to_string(), "all"],
    );
    let paused_at = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "GET /ws?subscribe=up1,up2 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: crier.json\r\n\r\n",
        node.addr
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The node took the connection in; its subscriptions wait on Redis, so no answer yet.
    let listed = node.get("/api/connections").await;
    assert_eq!(
        listed["connections"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let mut nothing = [0u8; 1];
    assert!(
        matches!(socket.try_read(&mut nothing), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the upgrade was answered before its subscriptions were made"
    );
    // Gone abruptly: a reset, not a close handshake.
    socket.set_zero_linger().unwrap();
    drop(socket);

    tokio::time::sleep(PAUSE.saturating_sub(paused_at.elapsed())).await;
    eventually("Redis to answer after its pause", || async {
        ping(redis.port).then_some(())
    })
    .await;
    eventually_equals(
        "(/api/connections, crier_topics) after the pause",
        (json!({"connections": []}), 0.0),
        || async {
            (
                node.get("/api/connections").await,
                node.scrape().await.get("crier_topics"),
            )
        },
    )
    .await;

    eventually_within(
        "the node to be ready again",
        Duration::from_secs(15),
        || async { is_ready(&node).await.then_some(()) },
    )
    .await;
    let channels = format!("{}:*", target.prefix);
    eventually_equals(
        "PUBSUB CHANNELS after the pause",
        BTreeSet::new(),
        || async { pubsub_channels(redis.port, &channels) },
    )
    .await;
    let (mut client, _) = connect_welcomed(&node, Enc::Json).await;
    let ack = client.subscribe("up1").await;
    assert_eq!(ack["seq"], 0, "{ack}");
    assert_eq!(
        node.publish("up1", &json!("hello")).await,
        json!({"topic": "up1", "seq": 1, "receivers": 1})
    );
    assert_eq!(
        frames_through(&mut client, "up1", 1).await,
        [json!({"op": "message", "topic": "up1", "seq": 1, "data": "hello"})]
    );
}
