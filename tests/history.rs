//! History, recovery after reconnect, rewind and latest-value conflation against a real server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Publishes `n` messages on `topic` over HTTP, `batch` per request; data is the message number.
async fn publish_numbers(server: &TestServer, topic: &str, from: u64, n: u64, batch: u64) {
    let mut next = from;
    while next < from + n {
        let end = (next + batch).min(from + n);
        let items: Vec<Value> = (next..end)
            .map(|i| json!({"topic": topic, "data": i}))
            .collect();
        let response = server
            .http
            .post(server.url("/api/publish"))
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        next = end;
    }
}

/// A subscriber that disconnects and recovers with `since` again and again, at random moments,
/// while a publisher keeps publishing; it must end with every seq exactly once, in order.
#[tokio::test]
async fn recovery_under_load_delivers_every_message_exactly_once() {
    let server = TestServer::with(|c| c.history_size = 100_000);
    for round in 0..5 {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let topic = format!("stress.{round}");
        const TOTAL: u64 = 3000;

        // The first subscription is made before anything is published: from then on, every
        // message must reach this subscriber, across all its reconnects.
        let mut client = Client::connect(&server, Enc::Json).await;
        let ack = client.subscribe(&topic).await;
        let epoch = ack["epoch"].as_str().unwrap().to_owned();
        assert_eq!(ack["seq"], 0);

        let publisher = {
            let (http, url, topic) = (
                server.http.clone(),
                server.url("/api/publish"),
                topic.clone(),
            );
            let mut rng = fastrand::Rng::with_seed(seed ^ 1);
            tokio::spawn(async move {
                let mut next = 1;
                while next <= TOTAL {
                    let n = rng.u64(1..=40).min(TOTAL - next + 1);
                    let items: Vec<Value> = (next..next + n)
                        .map(|i| json!({"topic": topic, "data": i}))
                        .collect();
                    let response = http.post(&url).json(&items).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    next += n;
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
                }
            })
        };

        let mut received: Vec<u64> = Vec::new();
        let mut cycles = 1;
        loop {
            let done = publisher.is_finished();
            // Read for a random while (until caught up, once publishing is over), then drop off.
            let until = tokio::time::Instant::now() + Duration::from_millis(rng.u64(0..40));
            while received.last() != Some(&TOTAL) && (done || tokio::time::Instant::now() < until) {
                let wait = Duration::from_millis(if done { 5000 } else { 20 });
                let Ok(frame) = tokio::time::timeout(wait, client.recv()).await else {
                    continue;
                };
                if frame["op"] == "message" {
                    let seq = frame["seq"].as_u64().unwrap();
                    assert_eq!(frame["data"], seq, "seed {seed}");
                    let expected = received.last().copied().unwrap_or(0) + 1;
                    assert_eq!(
                        seq, expected,
                        "seed {seed}, cycle {cycles}: a gap or a duplicate"
                    );
                    received.push(seq);
                }
            }
            if received.last() == Some(&TOTAL) {
                break;
            }
            if rng.bool() {
                let _ = client.ws.close(None).await;
            }
            drop(client);
            tokio::time::sleep(Duration::from_millis(rng.u64(0..20))).await;

            cycles += 1;
            let enc = if rng.bool() { Enc::Json } else { Enc::Msgpack };
            client = Client::connect(&server, enc).await;
            let last = received.last().copied().unwrap_or(0);
            let ack = client
                .subscribe_with(&topic, json!({"since": {"epoch": epoch, "seq": last}}))
                .await;
            assert_eq!(ack["recovered"], true, "seed {seed}, cycle {cycles}: {ack}");
            assert_eq!(ack["epoch"], epoch.as_str());
        }
        publisher.await.unwrap();
        assert!(received == (1..=TOTAL).collect::<Vec<_>>(), "seed {seed}");
        assert!(
            cycles > 3,
            "seed {seed}: the subscriber should have reconnected several times"
        );
    }
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
        let response = server
            .http
            .post(server.url("/api/publish"))
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
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
        let response = server
            .http
            .post(server.url("/api/publish"))
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
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
    publish_numbers(&server, "board.a", 1, 5, 5).await;
    publish_numbers(&server, "board.b", 1, 3, 3).await;
    let mut c = Client::connect(&server, Enc::Msgpack).await;
    let ack = c.subscribe_with("board.a", json!({"rewind": 2})).await;
    assert_eq!(ack["seq"], 5);
    assert_eq!(
        (c.recv().await["seq"].clone(), c.recv().await["seq"].clone()),
        (json!(4), json!(5))
    );
    let history = server.get("/api/topics/board.a/history?since=3").await;
    assert_eq!(
        history["messages"],
        json!([{"seq": 4, "data": 4}, {"seq": 5, "data": 5}])
    );
    assert_eq!(history["epoch"], ack["epoch"]);

    let mut dash = Client::connect(&server, Enc::Json).await;
    dash.subscribe_with("board.*", json!({"rewind": 100})).await;
    let mut by_topic: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for _ in 0..8 {
        let frame = dash.recv().await;
        by_topic
            .entry(frame["topic"].as_str().unwrap().to_owned())
            .or_default()
            .push(frame["seq"].as_u64().unwrap());
    }
    assert_eq!(by_topic["board.a"], vec![1, 2, 3, 4, 5]);
    assert_eq!(by_topic["board.b"], vec![1, 2, 3]);
    server.publish("board.b", &json!(4)).await;
    assert_eq!(dash.recv().await["seq"], 4);
    dash.expect_silence(Duration::from_millis(200)).await;

    let response = server
        .http
        .get(server.url("/api/topics/bad..topic/history"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = server
        .http
        .get(server.url("/api/topics/board.a/history?since=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
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
