//! Slow consumers: a client that stops reading fills its buffer up to `--max-buffered-bytes`,
//! the slow-consumer policy applies, and a fast subscriber on the same topic is unaffected.

mod common;

use std::time::Duration;

use common::*;
use crier::SlowConsumerPolicy;
use serde_json::{Value, json};

const CAP: u64 = 64 * 1024;
/// A `message` frame carrying `padding()`, header included, is a little over 1 KiB.
const FRAME: u64 = 1100;

fn padding() -> String {
    "x".repeat(1000)
}

/// A subscriber that reads as fast as it can, collecting every seq on "feed".
struct FastReader {
    progress: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl FastReader {
    /// Reads until the message marked last.
    fn start(mut client: Client) -> FastReader {
        let (tx, progress) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(async move {
            let mut seqs = Vec::new();
            loop {
                let frame = client.recv().await;
                if frame["op"] == "message" {
                    let seq = frame["seq"].as_u64().unwrap();
                    seqs.push(seq);
                    tx.send_replace(seq);
                    if frame["data"]["last"] == true {
                        return seqs;
                    }
                }
            }
        });
        FastReader { progress, task }
    }

    async fn caught_up(&mut self, seq: u64) {
        let wait = self.progress.wait_for(|&got| got >= seq);
        tokio::time::timeout(PATIENCE, wait)
            .await
            .expect("the fast subscriber fell behind")
            .unwrap();
    }

    /// Everything it received, once the last message has arrived.
    async fn finish(self) -> Vec<u64> {
        self.task.await.unwrap()
    }
}

struct Scenario {
    server: TestServer,
    slow: Client,
    fast: FastReader,
    published: u64,
    /// How many had been published when the first drop was seen.
    published_at_first_drop: u64,
}

/// Publishes 20 padded messages on "feed" in one HTTP batch (well under the fast reader's
/// buffer), waits until the fast reader has them, and returns the last seq.
async fn publish_padded(server: &TestServer, fast: &mut FastReader) -> u64 {
    let batch: Vec<Value> = (0..20)
        .map(|_| json!({"topic": "feed", "data": {"pad": padding()}}))
        .collect();
    let body = server.publish_batch(&batch).await;
    let last = body["results"][19]["seq"].as_u64().unwrap();
    fast.caught_up(last).await;
    last
}

/// Publishes 1 KiB messages until the slow client's queue has dropped something, then 200
/// more; checks that its buffer reached the cap and stayed there.
async fn fill(policy: SlowConsumerPolicy) -> (Scenario, Value) {
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = CAP as usize;
        c.slow_consumer = policy;
        c.write_timeout = Duration::from_secs(60);
    });
    let mut slow = Client::connect_slow(&server, Enc::Json).await;
    slow.subscribe("feed").await;
    let mut fast = Client::connect(&server, Enc::Msgpack).await;
    fast.subscribe("feed").await;
    let mut fast = FastReader::start(fast);

    // The kernel's buffers take a few megabytes before anything stays queued in the broker.
    let mut published;
    let first_drop = loop {
        published = publish_padded(&server, &mut fast).await;
        let info = server
            .connection(&slow.id)
            .await
            .expect("slow client listed");
        if info["dropped"].as_u64().unwrap() > 0 {
            break info;
        }
        assert!(
            published < 50_000,
            "the slow client's buffer never filled: {info}"
        );
    };
    let high_water = first_drop["buffered_high_water"].as_u64().unwrap();
    assert!(
        high_water > CAP - FRAME && high_water <= CAP,
        "high water {high_water}"
    );

    let published_at_first_drop = published;
    let mut last = first_drop.clone();
    if policy != SlowConsumerPolicy::Disconnect {
        for _ in 0..10 {
            published = publish_padded(&server, &mut fast).await;
        }
        last = server.connection(&slow.id).await.unwrap();
        let buffered = last["buffered_bytes"].as_u64().unwrap();
        assert!(
            buffered > CAP - FRAME && buffered <= CAP,
            "buffer should stay at the cap: {last}"
        );
        assert!(last["dropped"].as_u64().unwrap() >= 200, "{last}");
    }
    published += 1;
    let receipt = server.publish("feed", &json!({"last": true})).await;
    assert_eq!(receipt["seq"], published);
    (
        Scenario {
            server,
            slow,
            fast,
            published,
            published_at_first_drop,
        },
        last,
    )
}

async fn assert_got_everything(fast: FastReader, published: u64) {
    let seqs = fast.finish().await;
    assert!(
        seqs == (1..=published).collect::<Vec<_>>(),
        "the fast subscriber lost messages"
    );
}

/// Reads whatever the slow client has waiting, until it goes quiet.
async fn drain(client: &mut Client) -> Vec<u64> {
    let mut seqs = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), client.recv()).await {
            Ok(frame) => seqs.push(frame["seq"].as_u64().unwrap()),
            Err(_) => return seqs,
        }
    }
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest() {
    let (s, _) = fill(SlowConsumerPolicy::DropOldest).await;
    let Scenario {
        mut slow,
        fast,
        published,
        ..
    } = s;
    assert_got_everything(fast, published).await;
    let seqs = drain(&mut slow).await;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(seqs.last(), Some(&published), "the newest message arrives");
    assert!(
        seqs.windows(2).any(|w| w[1] - w[0] > 1),
        "older messages were dropped"
    );
    assert_eq!(seqs[0], 1, "what the socket had already taken is delivered");
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest() {
    let (s, _) = fill(SlowConsumerPolicy::DropNewest).await;
    let Scenario {
        server,
        mut slow,
        fast,
        published,
        published_at_first_drop,
    } = s;
    assert_got_everything(fast, published).await;
    let seqs = drain(&mut slow).await;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    // Everything queued before the first drop arrives (the first drop happened within the last
    // batch of 20 before it was seen); most of what came after does not.
    let kept = published_at_first_drop - 20;
    assert!(
        seqs[..kept as usize] == (1..=kept).collect::<Vec<_>>(),
        "the oldest are kept"
    );
    assert!(
        (seqs.len() as u64) < published - 150,
        "newer messages were dropped"
    );
    // Once the client reads again, new messages are accepted again.
    let receipt = server.publish("feed", &json!("again")).await;
    assert_eq!(
        receipt["receivers"], 1,
        "only the slow client is still subscribed"
    );
    let frame = slow.recv().await;
    assert_eq!(
        (frame["seq"].as_u64(), frame["data"].clone()),
        (Some(published + 1), json!("again"))
    );
}

#[tokio::test]
async fn disconnect_closes_with_4008() {
    let (s, _) = fill(SlowConsumerPolicy::Disconnect).await;
    let Scenario {
        server,
        mut slow,
        fast,
        published,
        ..
    } = s;
    assert_got_everything(fast, published).await;
    let (frames, close) = slow.recv_until_close().await;
    let seqs = seqs(&frames);
    assert!(
        seqs == (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "what the socket had taken, in order"
    );
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4008, "slow consumer")
    );
    eventually("the slow connection to be gone", || async {
        server.connection(&slow.id).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_socket_that_takes_nothing_is_closed_after_the_write_timeout() {
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = CAP as usize;
        c.write_timeout = Duration::from_millis(300);
    });
    let mut slow = Client::connect_slow(&server, Enc::Json).await;
    slow.subscribe("feed").await;
    let mut fast = Client::connect(&server, Enc::Json).await;
    fast.subscribe("feed").await;
    let mut fast = FastReader::start(fast);
    // Until the kernel's buffers are full and frames stay queued in the broker.
    loop {
        let published = publish_padded(&server, &mut fast).await;
        let info = server
            .connection(&slow.id)
            .await
            .expect("slow client listed");
        if info["buffered_bytes"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            published < 50_000,
            "the slow client's socket never filled: {info}"
        );
    }
    eventually("the stalled connection to be closed", || async {
        server.connection(&slow.id).await.is_none().then_some(())
    })
    .await;
    let receipt = server.publish("feed", &json!({"last": true})).await;
    assert_eq!(receipt["receivers"], 1);
    let seqs = fast.finish().await;
    assert!(
        seqs == (1..=receipt["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        "the fast subscriber lost messages"
    );
}

#[tokio::test]
async fn a_pong_tells_the_client_its_buffered_amount_and_drops() {
    let (s, last) = fill(SlowConsumerPolicy::DropOldest).await;
    let Scenario {
        server,
        mut slow,
        fast,
        published,
        ..
    } = s;
    assert_got_everything(fast, published).await;
    // Queued behind a full buffer: the figures are those of the moment it was queued.
    let before = server.connection(&slow.id).await.unwrap()["buffered_bytes"]
        .as_u64()
        .unwrap();
    slow.send(json!({"op": "ping", "id": "p"})).await;
    let pong = loop {
        let message = slow.recv_message().await;
        let frame = decode_exact(&message).unwrap();
        if frame["op"] == "pong" {
            break frame;
        }
    };
    let buffered = pong["buffered_bytes"].as_u64().unwrap();
    // The socket may take a little more meanwhile; the client reads nothing, so not much.
    assert!(
        buffered > CAP / 2 && buffered <= before + 256,
        "the pong's buffered amount {buffered}, the listing's {before}: {pong}"
    );
    let dropped = pong["dropped"].as_u64().unwrap();
    assert!(
        dropped >= last["dropped"].as_u64().unwrap() && dropped > 0,
        "{pong} against {last}"
    );
    // Once everything is read, an idle connection's pong says so.
    slow.sync().await;
    slow.send(json!({"op": "ping", "id": "q"})).await;
    let pong = decode_exact(&slow.recv_message().await).unwrap();
    assert_eq!(
        (pong["id"].clone(), pong["buffered_bytes"].clone()),
        (json!("q"), json!(0)),
        "{pong}"
    );
    assert_eq!(
        pong["dropped"].as_u64(),
        server.connection(&slow.id).await.unwrap()["dropped"].as_u64()
    );
}
