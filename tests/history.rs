//! History, recovery after reconnect, rewind and latest-value conflation against a real server.

mod common;

use std::time::{Duration, Instant};

use common::scenarios::{self, publish_numbers};
use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A subscriber that disconnects and recovers with `since` again and again, at random moments,
/// while a publisher keeps publishing; it must end with every seq exactly once, in order.
#[tokio::test]
async fn recovery_under_load_delivers_every_message_exactly_once() {
    let server = TestServer::with(|c| c.history_size = 100_000);
    scenarios::recovery_under_load(&server, 5).await;
}

/// Subscribers joining topics and patterns, with and without rewind, while publishing goes on.
#[tokio::test]
async fn joining_while_publishing_leaves_no_gap_and_no_duplicate() {
    let server = TestServer::with(|c| c.history_size = 100_000);
    scenarios::join_while_publishing(&server, 3).await;
}

#[tokio::test]
async fn a_restart_changes_the_epoch_and_recovery_says_so() {
    let first = TestServer::start();
    let mut client = Client::connect(&first, Enc::Json).await;
    let ack = client.subscribe("orders").await;
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    first.publish("orders", &json!(1)).await;
    client.recv().await;
    drop(client);
    first.stop().unwrap();

    let second = TestServer::start();
    second.publish("orders", &json!("after the restart")).await;
    let mut client = Client::connect(&second, Enc::Json).await;
    let ack = client
        .subscribe_with("orders", json!({"since": {"epoch": epoch, "seq": 1}}))
        .await;
    assert_eq!(ack["recovered"], false);
    assert_ne!(ack["epoch"], epoch.as_str());
    assert_eq!(ack["seq"], 1);
    client.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn history_is_bounded_by_size_ttl_and_total_bytes() {
    // By size.
    let server = TestServer::with(|c| c.history_size = 10);
    publish_numbers(&server, "sized", 1, 25, 25).await;
    let history = server.get("/api/topics/sized/history").await;
    assert_eq!(
        (history["oldest"].clone(), history["seq"].clone()),
        (json!(16), json!(25))
    );
    assert_eq!(history["messages"].as_array().unwrap().len(), 10);
    let partial = server
        .get("/api/topics/sized/history?since=3&limit=2")
        .await;
    assert_eq!(partial["complete"], false);
    assert_eq!(
        partial["messages"],
        json!([{"seq": 16, "data": 16}, {"seq": 17, "data": 17}])
    );
    assert_eq!(
        server
            .scrape()
            .await
            .get(r#"crier_history_evicted_total{reason="size"}"#),
        15.0
    );

    // By age.
    let server = TestServer::with(|c| c.history_ttl = Duration::from_millis(300));
    publish_numbers(&server, "aged", 1, 5, 5).await;
    assert_eq!(server.scrape().await.get("crier_history_messages"), 5.0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let history = server.get("/api/topics/aged/history").await;
    assert_eq!(
        (history["messages"].clone(), history["oldest"].clone()),
        (json!([]), Value::Null)
    );
    let scrape = eventually("the sweeper to expire the history", || async {
        let s = server.scrape().await;
        (s.get("crier_history_messages") == 0.0).then_some(s)
    })
    .await;
    assert_eq!(
        scrape.get(r#"crier_history_evicted_total{reason="ttl"}"#),
        5.0
    );
    assert_eq!(scrape.get("crier_history_bytes"), 0.0);

    // By total bytes: the oldest messages of all topics go first.
    let cap = 64 * 1024;
    let server = TestServer::with(|c| c.history_max_bytes = cap);
    let padding = "x".repeat(1000);
    for topic in ["first", "second", "third"] {
        let items: Vec<Value> = (0..40)
            .map(|i| json!({"topic": topic, "data": {"i": i, "pad": padding}}))
            .collect();
        server.publish_batch(&items).await;
    }
    let scrape = server.scrape().await;
    assert!(scrape.get("crier_history_bytes") <= cap as f64);
    assert!(scrape.get("crier_history_bytes") > cap as f64 * 0.9);
    assert!(scrape.get(r#"crier_history_evicted_total{reason="memory"}"#) > 0.0);
    let held = |h: &Value| h["messages"].as_array().unwrap().len();
    let first = server.get("/api/topics/first/history").await;
    let third = server.get("/api/topics/third/history").await;
    assert_eq!(held(&first), 0, "the oldest topic's messages went first");
    assert_eq!(held(&third), 40, "the newest are all kept");
}

#[tokio::test]
async fn max_rate_caps_frames_per_second_and_the_last_value_arrives() {
    let server = TestServer::start();
    let mut dash = Client::connect(&server, Enc::Json).await;
    dash.subscribe_with("ticker", json!({"mode": "latest", "max_rate": 5}))
        .await;
    let mut all = Client::connect(&server, Enc::Msgpack).await;
    all.subscribe("ticker").await;

    // 1,000 updates a second for 3 seconds.
    let publisher = {
        let mut client = Client::connect(&server, Enc::Json).await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 1..=3000u64 {
                tick.tick().await;
                client
                    .send(json!({"op": "publish", "topic": "ticker", "data": i}))
                    .await;
            }
            client.sync().await;
        })
    };
    let reader = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            let frame = dash.recv().await;
            frames.push((Instant::now(), frame["data"].as_u64().unwrap()));
            if frame["data"] == 3000 {
                return (frames, dash);
            }
        }
    });
    publisher.await.unwrap();
    let mut everything = 0;
    while everything < 3000 {
        all.recv().await;
        everything += 1;
    }
    let (frames, mut dash) = tokio::time::timeout(PATIENCE, reader)
        .await
        .unwrap()
        .unwrap();
    dash.expect_silence(Duration::from_millis(400)).await;

    assert!(
        (13..=17).contains(&frames.len()),
        "about 15 frames, got {}",
        frames.len()
    );
    assert_eq!(frames.last().unwrap().1, 3000, "the final value arrives");
    assert!(
        frames.windows(2).all(|w| w[0].1 < w[1].1),
        "fresher every time"
    );
    // No second holds more than 5 frames. Arrival times carry this client's scheduling jitter,
    // so a window is 950 ms; the server spaces frames 200 ms apart.
    for (i, (start, _)) in frames.iter().enumerate() {
        let in_window = frames[i..]
            .iter()
            .take_while(|(t, _)| *t < *start + Duration::from_millis(950))
            .count();
        assert!(in_window <= 5, "{in_window} frames within a second");
    }
}

#[tokio::test]
async fn a_latest_subscriber_that_falls_behind_gets_the_freshest_value_not_a_backlog() {
    let server = TestServer::start();
    let mut slow = Client::connect_slow(&server, Enc::Json).await;
    slow.subscribe_with("gauge", json!({"mode": "latest"}))
        .await;
    let mut all = Client::connect(&server, Enc::Json).await;
    all.subscribe("gauge").await;
    let all_reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&10_000) {
            let frame = all.recv().await;
            seqs.push(frame["seq"].as_u64().unwrap());
        }
        (seqs, all)
    });

    // 10,000 updates of about 1 KiB while the slow client reads nothing.
    let padding = "x".repeat(1000);
    for start in (1..=10_000).step_by(100) {
        let items: Vec<Value> = (start..start + 100)
            .map(|i| json!({"topic": "gauge", "data": {"v": i, "pad": padding}}))
            .collect();
        server.publish_batch(&items).await;
    }
    let (all_seqs, all) = tokio::time::timeout(PATIENCE, all_reader)
        .await
        .unwrap()
        .unwrap();
    let all_info = server.connection(&all.id).await.unwrap();
    assert_eq!(
        all_seqs.len() as u64 + all_info["dropped"].as_u64().unwrap(),
        10_000,
        "the all-mode subscriber gets everything its buffer policy allows"
    );
    assert!(all_seqs.windows(2).all(|w| w[0] < w[1]));

    let info = server.connection(&slow.id).await.unwrap();
    assert!(info["conflated"].as_u64().unwrap() > 9_000, "{info}");
    assert!(
        info["buffered_bytes"].as_u64().unwrap() < 2_000,
        "one frame waits, not a backlog: {info}"
    );

    // Reading again: what the network already held, then the final value.
    let mut frames = Vec::new();
    loop {
        let frame = slow.recv().await;
        frames.push(frame["data"]["v"].as_u64().unwrap());
        if frames.last() == Some(&10_000) {
            break;
        }
    }
    slow.expect_silence(Duration::from_millis(200)).await;
    // What the network already held (16 KiB unsent in the kernel, 8 KiB in the HTTP layer, the
    // client's small receive buffer: about 30 frames of 1 KiB), then the final value.
    assert!(
        frames.len() < 50,
        "a handful of frames, not 10,000: {}",
        frames.len()
    );
    assert!(frames.windows(2).all(|w| w[0] < w[1]));
    let s = server.scrape().await;
    assert!(
        s.get(r#"crier_messages_dropped_total{namespace="other",reason="conflated"}"#) > 9_000.0
    );
}

#[tokio::test]
async fn rewind_and_history_over_http_and_websocket_agree() {
    let server = TestServer::start();
    scenarios::rewind_and_history_agree(&server).await;
}

#[tokio::test]
async fn subscribe_options_that_do_not_go_together_are_refused() {
    let server = TestServer::start();
    let mut c = Client::connect(&server, Enc::Json).await;
    for frame in [
        json!({"op": "subscribe", "topic": "a.*", "since": {"epoch": "e", "seq": 1}, "id": 1}),
        json!({"op": "subscribe", "topic": "a", "since": {"epoch": "e", "seq": 1}, "rewind": 1, "id": 1}),
        json!({"op": "subscribe", "topic": "a", "max_rate": 2, "id": 1}),
        json!({"op": "subscribe", "topic": "a", "mode": "latest", "max_rate": 0, "id": 1}),
        json!({"op": "subscribe", "topic": "a", "mode": "sometimes", "id": 1}),
    ] {
        c.send(frame.clone()).await;
        let error = c.recv().await;
        assert_eq!(
            (error["op"].clone(), error["code"].clone()),
            (json!("error"), json!("bad_frame")),
            "{frame}"
        );
    }
    assert_eq!(server.connection(&c.id).await.unwrap()["subscriptions"], 0);
    c.send_raw(Message::text(
        r#"{"op":"subscribe","topic":"a","mode":"latest","max_rate":0.5,"id":2}"#,
    ))
    .await;
    assert_eq!(c.recv().await["op"], "ack");
    c.sync().await;
    assert_eq!(server.connection(&c.id).await.unwrap()["subscriptions"], 1);
}
