//! Scenarios run against more than one server: the broker with its default backend (from the
//! integration tests) and with test-only backends (from the crate's own tests).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

/// Publishes `n` messages on `topic` over HTTP, `batch` per request; data is the message number.
pub async fn publish_numbers(server: &TestServer, topic: &str, from: u64, n: u64, batch: u64) {
    let mut next = from;
    while next < from + n {
        let end = (next + batch).min(from + n);
        let items: Vec<Value> = (next..end)
            .map(|i| json!({"topic": topic, "data": i}))
            .collect();
        server.publish_batch(&items).await;
        next = end;
    }
}

/// Publishes the numbers 1..=`total` on every topic over HTTP (the data is the number, so it
/// equals the seq on a fresh topic), in random batches of up to `max_batch` numbers with pauses
/// of up to 2 ms, as a task.
fn paced_publisher(
    server: &TestServer,
    topics: Vec<String>,
    total: u64,
    max_batch: u64,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let (http, url) = (server.http.clone(), server.url("/api/publish"));
    let mut rng = fastrand::Rng::with_seed(seed);
    tokio::spawn(async move {
        let mut next = 1;
        while next <= total {
            let n = rng.u64(1..=max_batch).min(total - next + 1);
            let items: Vec<Value> = (next..next + n)
                .flat_map(|i| topics.iter().map(move |t| json!({"topic": t, "data": i})))
                .collect();
            let response = http.post(&url).json(&items).send().await.unwrap();
            assert_eq!(response.status(), 200);
            next += n;
            tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
        }
    })
}

/// A subscriber that disconnects and recovers with `since` again and again, at random moments,
/// while a publisher keeps publishing; it must end with every seq exactly once, in order. The
/// server's history must hold every message (`--history-size` of 3000 or more).
pub async fn recovery_under_load(server: &TestServer, rounds: u32) {
    for round in 0..rounds {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let topic = format!("stress.{round}");
        const TOTAL: u64 = 3000;

        // The first subscription is made before anything is published: from then on, every
        // message must reach this subscriber, across all its reconnects.
        let mut client = Client::connect(server, Enc::Json).await;
        let ack = client.subscribe(&topic).await;
        let epoch = ack["epoch"].as_str().unwrap().to_owned();
        assert_eq!(ack["seq"], 0);

        let publisher = paced_publisher(server, vec![topic.clone()], TOTAL, 40, seed ^ 1);

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
            client = Client::connect(server, enc).await;
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

/// Rewind of a topic and of a pattern, and history over HTTP, on a server with default limits.
pub async fn rewind_and_history_agree(server: &TestServer) {
    publish_numbers(server, "board.a", 1, 5, 5).await;
    publish_numbers(server, "board.b", 1, 3, 3).await;
    let mut c = Client::connect(server, Enc::Msgpack).await;
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

    let mut dash = Client::connect(server, Enc::Json).await;
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

/// What one subscriber that joins while publishing goes on asks for, and what it must get.
#[derive(Debug, Clone, Copy)]
enum Join {
    /// `rewind` covering all of history: every seq of the topic, from 1.
    ExactRewind,
    /// A pattern with `rewind` covering all of history: every seq of every matching topic.
    PatternRewind,
    /// A plain subscribe: every seq after the one its ack names.
    ExactPlain,
    /// A plain pattern subscribe: for each topic, every seq from the first one received.
    PatternPlain,
}

/// Subscribers join, at random moments, topics a publisher keeps publishing to, asking for
/// history (`rewind`) or not, on exact topics and on patterns. Each must get, for each topic,
/// consecutive seqs to the last one published: no gap at the join, no duplicate. The server's
/// history must hold every message (`--history-size` of 2000 or more).
pub async fn join_while_publishing(server: &TestServer, rounds: u32) {
    const TOTAL: u64 = 2000;
    for round in 0..rounds {
        let seed = fastrand::u64(..);
        let mut rng = fastrand::Rng::with_seed(seed);
        let prefix = format!("join.r{round}x{seed:x}");
        let topics: Vec<String> = ["a", "b", "c"]
            .iter()
            .map(|t| format!("{prefix}.{t}"))
            .collect();

        let publisher = paced_publisher(server, topics.clone(), TOTAL, 20, seed ^ 1);

        let mut readers = Vec::new();
        for (i, join) in [
            Join::ExactRewind,
            Join::PatternRewind,
            Join::ExactPlain,
            Join::PatternPlain,
        ]
        .into_iter()
        .cycle()
        .take(8)
        .enumerate()
        {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..60))).await;
            let enc = if rng.bool() { Enc::Json } else { Enc::Msgpack };
            let mut client = Client::connect(server, enc).await;
            let (subject, options) = match join {
                Join::ExactRewind | Join::ExactPlain => (topics[i % 3].clone(), json!({})),
                Join::PatternRewind | Join::PatternPlain => (format!("{prefix}.*"), json!({})),
            };
            let options = match join {
                Join::ExactRewind | Join::PatternRewind => json!({"rewind": 100_000}),
                _ => options,
            };
            let ack = client.subscribe_with(&subject, options).await;
            let first_expected = match join {
                Join::ExactPlain => Some(ack["seq"].as_u64().unwrap() + 1),
                Join::ExactRewind | Join::PatternRewind => Some(1),
                Join::PatternPlain => None,
            };
            let expected_topics = match join {
                Join::ExactRewind | Join::ExactPlain => 1,
                Join::PatternRewind | Join::PatternPlain => 3,
            };
            readers.push(tokio::spawn(async move {
                let mut last: BTreeMap<String, u64> = BTreeMap::new();
                let done = |last: &BTreeMap<String, u64>| {
                    last.len() == expected_topics && last.values().all(|&s| s == TOTAL)
                };
                while !done(&last) {
                    let frame = client.recv().await;
                    assert_eq!(frame["op"], "message", "seed {seed}, {join:?}: {frame}");
                    let topic = frame["topic"].as_str().unwrap().to_owned();
                    let seq = frame["seq"].as_u64().unwrap();
                    assert_eq!(frame["data"], seq, "seed {seed}");
                    let expected = match last.get(&topic) {
                        Some(previous) => Some(previous + 1),
                        None => first_expected,
                    };
                    if let Some(expected) = expected {
                        assert_eq!(
                            seq, expected,
                            "seed {seed}, {join:?} on {topic}: a gap or a duplicate at the join"
                        );
                    }
                    last.insert(topic, seq);
                }
                client.expect_silence(Duration::from_millis(100)).await;
            }));
        }
        publisher.await.unwrap();
        for reader in readers {
            reader.await.unwrap();
        }
    }
}
