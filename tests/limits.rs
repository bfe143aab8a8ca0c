//! Abuse limits over real sockets: connection limits in all and per address (given back when
//! connections close), the per-connection publish rate, the bad-frame limit, and the teardown
//! of a closing connection whose socket takes nothing.

mod access;
mod common;

use std::time::{Duration, Instant};

use access::*;
use common::*;
use crier::SlowConsumerPolicy;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn refused_now(scrape: &Scrape, reason: &str) -> u64 {
    refused(scrape, reason) as u64
}

/// Retries a handshake from `source` until it opens, counting the refusals (each must be
/// `status` `too_many_connections`) on the way.
async fn open_eventually(server: &TestServer, source: &str, status: u16) -> (Handshake, u64) {
    let refusals = std::cell::Cell::new(0);
    let opened = eventually("a place to be given back", || async {
        let attempt = handshake_from(server, source, "", &[]).await;
        if attempt.answer.status == 101 {
            return Some(attempt);
        }
        attempt
            .answer
            .assert_error(status, "too_many_connections", "while waiting for a place");
        refusals.set(refusals.get() + 1);
        None
    })
    .await;
    (opened, refusals.get())
}

#[tokio::test]
async fn max_connections_refuses_with_503_and_gives_places_back() {
    let server = TestServer::with(|c| {
        c.max_connections = 2;
        c.max_connections_per_ip = 0;
    });
    let (first, _) = connect_from_ip(&server, "127.0.0.1", "").await;
    let (_second, _) = connect_from_ip(&server, "127.0.0.2", "").await;
    let refused_one = handshake_from(&server, "127.0.0.3", "", &[]).await;
    refused_one
        .answer
        .assert_error(503, "too_many_connections", "a third connection");
    let refused_two = handshake_from(&server, "127.0.0.1", "", &[]).await;
    refused_two.answer.assert_error(
        503,
        "too_many_connections",
        "a third connection from a known address",
    );
    assert_eq!(
        server.get("/api/connections").await["connections"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A closed connection gives its place back.
    let mut first = first;
    first.ws.close(None).await.unwrap();
    let (third, waited) = open_eventually(&server, "127.0.0.3", 503).await;
    let scrape = server.scrape().await;
    assert_eq!(refused_now(&scrape, "max_connections"), 2 + waited);
    assert_eq!(refused_now(&scrape, "max_connections_per_ip"), 0);

    // Full again; a refused handshake did not take a place.
    handshake_from(&server, "127.0.0.4", "", &[])
        .await
        .answer
        .assert_error(503, "too_many_connections", "full again");
    drop(third);
    let (_fourth, _) = open_eventually(&server, "127.0.0.4", 503).await;
}

#[tokio::test]
async fn max_connections_per_ip_refuses_with_429_and_gives_places_back() {
    let server = TestServer::with(|c| c.max_connections_per_ip = 2);
    let (first, _) = connect_from_ip(&server, "127.0.0.1", "").await;
    let (_second, _) = connect_from_ip(&server, "127.0.0.1", "").await;
    handshake_from(&server, "127.0.0.1", "", &[])
        .await
        .answer
        .assert_error(429, "too_many_connections", "a third from one address");
    // Other addresses have their own places.
    let (_other, _) = connect_from_ip(&server, "127.0.0.2", "").await;
    let (_other2, _) = connect_from_ip(&server, "127.0.0.2", "").await;
    handshake_from(&server, "127.0.0.2", "", &[])
        .await
        .answer
        .assert_error(
            429,
            "too_many_connections",
            "a third from the other address",
        );

    let mut first = first;
    first.ws.close(None).await.unwrap();
    let (_again, waited) = open_eventually(&server, "127.0.0.1", 429).await;
    let scrape = server.scrape().await;
    assert_eq!(refused_now(&scrape, "max_connections_per_ip"), 2 + waited);
    assert_eq!(refused_now(&scrape, "max_connections"), 0);
    handshake_from(&server, "127.0.0.1", "", &[])
        .await
        .answer
        .assert_error(429, "too_many_connections", "full again");
}

#[tokio::test]
async fn the_publish_rate_refuses_what_is_over_it_without_consuming_seqs() {
    let server = TestServer::with(|c| {
        c.publish_rate = 5;
        // Rate-limited publishes are not bad frames: 15 of them must not close the connection.
        c.max_bad_frames = 3;
    });
    let (mut client, welcome) = access::connect(&server, Enc::Json, "", &[]).await;
    assert_eq!(welcome["limits"]["publish_rate"], 5);
    let mut watcher = Client::connect(&server, Enc::Json).await;
    watcher.subscribe("rated").await;

    // All 20 in one write, so that they arrive (and are read) together.
    for i in 0..20 {
        let frame = json!({"op": "publish", "topic": "rated", "data": i, "id": i});
        client
            .ws
            .feed(Message::text(frame.to_string()))
            .await
            .unwrap();
    }
    client.ws.flush().await.unwrap();
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for i in 0..20 {
        let answer = client.recv().await;
        assert_eq!(answer["id"], i, "answers in order: {answer}");
        match answer["op"].as_str() {
            Some("ack") => acked.push((i, answer["seq"].as_u64().unwrap())),
            _ => {
                assert_error_frame(&answer, "rate_limited", "over the rate");
                limited.push(i);
            }
        }
    }
    // The burst of 5, and one more should reading them have taken over 200 ms.
    assert!(
        (5..=6).contains(&acked.len()),
        "{} of 20 acked: {acked:?}",
        acked.len()
    );
    let seqs: Vec<u64> = acked.iter().map(|&(_, seq)| seq).collect();
    assert_eq!(
        seqs,
        (1..=acked.len() as u64).collect::<Vec<_>>(),
        "consecutive seqs"
    );
    assert_eq!(
        acked.iter().take(5).map(|&(i, _)| i).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4],
        "the burst is the first five"
    );
    let delivered: Vec<Value> = {
        let mut frames = Vec::new();
        for _ in 0..acked.len() {
            frames.push(watcher.recv().await["data"].clone());
        }
        frames
    };
    assert_eq!(
        delivered,
        acked.iter().map(|&(i, _)| json!(i)).collect::<Vec<_>>(),
        "only the acked publishes were delivered"
    );
    watcher.expect_silence(Duration::from_millis(200)).await;

    // After a second the bucket has refilled: more are allowed, and the seqs go on from there.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut next = Vec::new();
    for i in 0..3 {
        let answer = ws_publish(&mut client, "rated", json!("later"), &format!("later{i}")).await;
        assert_eq!(answer["op"], "ack", "{answer}");
        next.push(answer["seq"].as_u64().unwrap());
    }
    let last = acked.len() as u64;
    assert_eq!(next, [last + 1, last + 2, last + 3]);

    // HTTP publishes are not under a connection's rate.
    let receipt = server.publish("rated", &json!("http")).await;
    assert_eq!(receipt["seq"], last + 4);
    let scrape = server.scrape().await;
    assert_eq!(refused_now(&scrape, "rate_limited"), limited.len() as u64);
    assert_eq!(refused_now(&scrape, "bad_frames"), 0);
}

#[tokio::test]
async fn the_nth_bad_frame_closes_the_connection_with_1008() {
    let server = TestServer::with(|c| c.max_bad_frames = 3);
    let (mut client, welcome) = access::connect(&server, Enc::Json, "", &[]).await;
    assert_eq!(welcome["limits"]["max_bad_frames"], 3);

    client.send_raw(Message::text("not json")).await;
    assert_error_frame(&client.recv().await, "bad_frame", "the first bad frame");
    let answer = request(&mut client, json!({"op": "nope", "id": 2})).await;
    assert_error_frame(&answer, "unknown_op", "the second bad frame");
    // Good frames do not reset the count.
    client.sync().await;
    let ack = ws_publish(&mut client, "fine", json!(1), "ok").await;
    assert_eq!(ack["op"], "ack", "{ack}");

    client
        .send(json!({"op": "subscribe", "topic": "a..b", "id": 3}))
        .await;
    let (frames, close) = client.recv_until_close().await;
    assert_eq!(
        frames.len(),
        1,
        "the third error, then the close: {frames:?}"
    );
    assert_error_frame(&frames[0], "invalid_topic", "the third bad frame");
    assert_eq!(frames[0]["id"], 3);
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1008, "too many bad frames")
    );
    let scrape = eventually("the close to be counted", || async {
        let s = server.scrape().await;
        (s.get("crier_connections_closed_total{reason=\"bad_frames\"}") == 1.0).then_some(s)
    })
    .await;
    assert_eq!(refused_now(&scrape, "bad_frames"), 1);

    // Under the limit, a connection stays.
    let mut patient = Client::connect(&server, Enc::Json).await;
    for i in 0..2 {
        patient.send_raw(Message::text(format!("bad {i}"))).await;
        assert_error_frame(&patient.recv().await, "bad_frame", "under the limit");
    }
    patient.sync().await;
}

#[tokio::test]
async fn a_closing_connection_whose_socket_takes_nothing_is_torn_down_within_a_second() {
    const CAP: usize = 16 * 1024;
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = CAP;
        c.slow_consumer = SlowConsumerPolicy::Disconnect;
        // Long enough that only the teardown of a stalled close can explain a quick exit.
        c.write_timeout = Duration::from_secs(30);
    });
    let mut slow = Client::connect_slow(&server, Enc::Json).await;
    slow.subscribe("feed").await;
    let pad = "x".repeat(1000);

    // Publish until the slow client's buffer overflows: that starts its close (4008), and
    // the close frame waits behind bytes the socket will not take.
    let batch: Vec<Value> = (0..20)
        .map(|_| json!({"topic": "feed", "data": pad}))
        .collect();
    let mut published = 0;
    let close_started = loop {
        server.publish_batch(&batch).await;
        published += 20;
        match server.connection(&slow.id).await {
            Some(row) if row["dropped"].as_u64().unwrap() == 0 => {}
            // Overflowed (or already gone): the close has begun.
            _ => break Instant::now(),
        }
        assert!(published < 100_000, "the slow client's buffer never filled");
    };
    let gone = eventually("the closing connection to be torn down", || async {
        server
            .connection(&slow.id)
            .await
            .is_none()
            .then(Instant::now)
    })
    .await;
    let took = gone.duration_since(close_started);
    assert!(
        took <= Duration::from_millis(1500),
        "the stalled connection lingered {took:?} after its close began (limit: 1 s, and slack)"
    );
    eventually("the close to be counted", || async {
        let s = server.scrape().await;
        (s.get("crier_connections_closed_total{reason=\"slow_consumer\"}") == 1.0).then_some(())
    })
    .await;
}
