//! The scenarios. Each builds its subscribers and publishers through [`Target`], so Crier and
//! NATS run exactly the same code.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::stats::{self, Received};
use crate::target::{Error, Kind, Subscriber, Target};

/// A counter written by one task, padded so that neighbours do not share a cache line.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

/// Message framing overhead assumed when turning the in-flight byte window into messages.
const FRAME_OVERHEAD: usize = 48;

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Subscriber connections, all on one topic.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Payload size in bytes (at least 16: a timestamp and a counter).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second, all publishers together; without it, as fast as the subscribers
    /// keep up (publishers hold at most --window bytes per subscriber in flight).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Unlimited rate: bytes per subscriber published and not yet received.
    #[arg(long, default_value_t = 256 * 1024)]
    pub window: usize,
    #[arg(long, default_value = "bench.fanout")]
    pub topic: String,
}

/// Connects `n` subscribers, spread round robin over the target's nodes, a bounded number at
/// a time.
async fn connect_subscribers(
    target: &Target,
    topic: &str,
    n: usize,
) -> Result<Vec<Subscriber>, Error> {
    let mut subscribers = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let (target, topic) = (target.clone(), topic.to_owned());
        pending.push(tokio::spawn(async move {
            target.subscriber(i, &topic, None).await
        }));
        if pending.len() == 64 {
            for p in pending.drain(..) {
                subscribers.push(p.await??);
            }
        }
    }
    for p in pending {
        subscribers.push(p.await??);
    }
    Ok(subscribers)
}

/// Reads a subscriber until `stop` turns true and nothing more arrives.
fn spawn_reader(
    mut subscriber: Subscriber,
    epoch: Instant,
    count: Arc<Counter>,
    mut stop: watch::Receiver<bool>,
    numbered: bool,
) -> JoinHandle<Received> {
    tokio::spawn(async move {
        let mut received = Received::default();
        loop {
            tokio::select! {
                biased;
                delivery = subscriber.recv() => match delivery {
                    Some(delivery) => {
                        received.record(epoch, delivery.seq, &delivery.payload, numbered);
                        count.0.fetch_add(1, Ordering::Relaxed);
                    }
                    None => break,
                },
                _ = stop.wait_for(|&stop| stop) => break,
            }
        }
        received
    })
}

/// Unlimited-rate publishers pause while the slowest subscriber is more than `window` messages
/// behind, so a run measures delivery rather than queue growth, and no subscriber is pushed
/// past the broker's buffer cap (which would make its drop policy fire).
#[derive(Clone)]
struct FlowControl {
    published: Arc<AtomicU64>,
    delivered: Arc<Vec<Arc<Counter>>>,
    window: u64,
}

impl FlowControl {
    fn window_full(&self) -> bool {
        let slowest = self
            .delivered
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        self.published
            .load(Ordering::Relaxed)
            .saturating_sub(slowest)
            > self.window
    }
}

/// Publishes on `topics` (round robin) until the deadline, at `rate` per second (this
/// publisher's share) or, without a rate, whenever fewer than `window` messages per subscriber
/// are in flight. Publisher `stream` connects to node `stream` (round robin). Returns how many
/// it published.
#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    target: Target,
    stream: u64,
    topics: Vec<String>,
    payload: usize,
    rate: Option<f64>,
    deadline: Instant,
    epoch: Instant,
    flow: Option<FlowControl>,
) -> Result<u64, Error> {
    let mut publisher = target.publisher(stream as usize).await?;
    let started = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < deadline {
        let burst = match rate {
            Some(rate) => {
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                if due <= sent {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    continue;
                }
                (due - sent).min(1000)
            }
            None => {
                if flow.as_ref().ok_or("no flow control")?.window_full() {
                    tokio::time::sleep(Duration::from_micros(50)).await;
                    continue;
                }
                64
            }
        };
        for _ in 0..burst {
            let topic = &topics[(sent % topics.len() as u64) as usize];
            publisher
                .publish(topic, stats::payload(epoch, stream, sent, payload))
                .await?;
            sent += 1;
            if let Some(flow) = &flow {
                flow.published.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::task::yield_now().await;
    }
    publisher.sync().await?;
    Ok(sent)
}

/// Waits until the counters reach `expected` in total, or nothing moves for `patience`.
async fn drain(counters: &[Arc<Counter>], expected: u64, patience: Duration) {
    let mut last = 0;
    let mut still_since = Instant::now();
    loop {
        let delivered: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        if delivered >= expected {
            return;
        }
        if delivered != last {
            last = delivered;
            still_since = Instant::now();
        } else if still_since.elapsed() > patience {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn fanout(target: &Target, args: &FanoutArgs) -> Result<Value, Error> {
    let epoch = Instant::now();
    let subscribers = connect_subscribers(target, &args.topic, args.subscribers).await?;
    let counters: Arc<Vec<Arc<Counter>>> = Arc::new(
        (0..args.subscribers)
            .map(|_| Arc::new(Counter::default()))
            .collect(),
    );
    let (stop_tx, stop) = watch::channel(false);
    let readers: Vec<JoinHandle<Received>> = subscribers
        .into_iter()
        .zip(counters.iter())
        .map(|(s, c)| spawn_reader(s, epoch, c.clone(), stop.clone(), true))
        .collect();

    let dropped_before = target.broker_dropped().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let published = Arc::new(AtomicU64::new(0));
    let window = (args.window / (args.payload + FRAME_OVERHEAD)).max(16) as u64;
    let publishers: Vec<JoinHandle<Result<u64, Error>>> = (0..args.publishers as u64)
        .map(|stream| {
            let flow = args.rate.is_none().then(|| FlowControl {
                published: published.clone(),
                delivered: counters.clone(),
                window,
            });
            tokio::spawn(publish_loop(
                target.clone(),
                stream,
                vec![args.topic.clone()],
                args.payload,
                args.rate.map(|r| r / args.publishers as f64),
                deadline,
                epoch,
                flow,
            ))
        })
        .collect();
    let mut per_stream = HashMap::new();
    for (stream, p) in publishers.into_iter().enumerate() {
        per_stream.insert(stream as u64, p.await??);
    }
    let total_published: u64 = per_stream.values().sum();
    drain(
        &counters,
        total_published * args.subscribers as u64,
        Duration::from_secs(2),
    )
    .await;
    let _ = stop_tx.send(true);

    let dropped = dropped_before.zip(target.broker_dropped().await);
    let mut all = Received::default();
    let mut lost = 0;
    for reader in readers {
        let received = reader.await?;
        lost += received.lost + received.expected_lost_at_end(&per_stream);
        all.merge(&received);
    }
    let active = all
        .last_at
        .map_or(Duration::ZERO, |last| last.duration_since(started));
    Ok(json!({
        "scenario": "fanout",
        "target": target.kind,
        "encoding": format!("{:?}", target.encoding).to_lowercase(),
        "subscribers": args.subscribers,
        "publishers": args.publishers,
        "nodes": target.nodes(),
        "payload": args.payload,
        "rate": args.rate,
        "duration_s": args.duration,
        "published": total_published,
        "delivered": all.messages,
        "published_per_s": stats::per_second(total_published, Duration::from_secs_f64(args.duration)),
        "delivered_per_s": stats::per_second(all.messages, active),
        "latency_us": stats::latency_json(&all.latency),
        "lost": lost,
        "duplicated": all.duplicated,
        "out_of_order": (target.kind == Kind::Crier).then_some(all.out_of_order),
        "broker_dropped": dropped.map(|(before, after)| after.saturating_sub(before)),
    }))
}

#[derive(Debug, Clone, clap::Args)]
pub struct TopicsArgs {
    /// Distinct topics.
    #[arg(long, default_value_t = 1000)]
    pub topics: usize,
    /// Subscriber connections.
    #[arg(long, default_value_t = 200)]
    pub connections: usize,
    /// Topics each connection subscribes to (chosen at random).
    #[arg(long, default_value_t = 10)]
    pub per_connection: usize,
    #[arg(long, default_value_t = 2)]
    pub publishers: usize,
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
    /// Messages per second, all publishers together.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
}

/// A dashboard farm: many topics, each with a few subscribers.
pub async fn topics(target: &Target, args: &TopicsArgs) -> Result<Value, Error> {
    let epoch = Instant::now();
    let names: Vec<String> = (0..args.topics).map(|i| format!("farm.{i}")).collect();
    let mut subscribers_of = vec![0u64; args.topics];
    let mut readers = Vec::new();
    let mut counters = Vec::new();
    let (stop_tx, stop) = watch::channel(false);
    for i in 0..args.connections {
        let mut chosen: Vec<usize> = Vec::new();
        while chosen.len() < args.per_connection.min(args.topics) {
            let t = fastrand::usize(..args.topics);
            if !chosen.contains(&t) {
                chosen.push(t);
            }
        }
        for &t in &chosen {
            subscribers_of[t] += 1;
        }
        let topics: Vec<String> = chosen.iter().map(|&t| names[t].clone()).collect();
        let subscriber = target.subscriber_to_all(i, &topics).await?;
        let counter = Arc::new(Counter::default());
        readers.push(spawn_reader(
            subscriber,
            epoch,
            counter.clone(),
            stop.clone(),
            false,
        ));
        counters.push(counter);
    }

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    // Publisher i publishes the topics i, i + P, i + 2P, ... in turn.
    let publishers: Vec<_> = (0..args.publishers)
        .map(|i| {
            let topics: Vec<String> = names
                .iter()
                .skip(i)
                .step_by(args.publishers)
                .cloned()
                .collect();
            tokio::spawn(publish_loop(
                target.clone(),
                i as u64,
                topics,
                args.payload,
                Some(args.rate / args.publishers as f64),
                deadline,
                epoch,
                None,
            ))
        })
        .collect();
    let mut expected = 0u64;
    let mut total_published = 0;
    for (i, p) in publishers.into_iter().enumerate() {
        let sent = p.await??;
        total_published += sent;
        let owned: Vec<usize> = (i..args.topics).step_by(args.publishers).collect();
        for n in 0..sent {
            expected += subscribers_of[owned[(n % owned.len() as u64) as usize]];
        }
    }
    drain(&counters, expected, Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut all = Received::default();
    for reader in readers {
        all.merge(&reader.await?);
    }
    let active = all
        .last_at
        .map_or(Duration::ZERO, |last| last.duration_since(started));
    Ok(json!({
        "scenario": "topics",
        "target": target.kind,
        "topics": args.topics,
        "connections": args.connections,
        "per_connection": args.per_connection,
        "nodes": target.nodes(),
        "payload": args.payload,
        "rate": args.rate,
        "published": total_published,
        "expected": expected,
        "delivered": all.messages,
        "delivered_per_s": stats::per_second(all.messages, active),
        "latency_us": stats::latency_json(&all.latency),
        "lost": expected.saturating_sub(all.messages),
    }))
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    /// Idle connections to open.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Local addresses to connect from (127.0.0.1, 127.0.0.2, ...), past one address's
    /// ephemeral ports.
    #[arg(long, default_value_t = 4)]
    pub source_addresses: u8,
    /// The broker's pid, to report its resident memory per connection.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Seconds to hold the connections open before measuring memory again.
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
}

/// `--broker-pid` reads one process: with several nodes its figures would mean nothing.
fn one_node_for_pid(target: &Target, broker_pid: Option<u32>) -> Result<(), Error> {
    if broker_pid.is_some() && target.nodes() > 1 {
        return Err("--broker-pid reads one node: give one --url".into());
    }
    Ok(())
}

pub async fn connections(target: &Target, args: &ConnectionsArgs) -> Result<Value, Error> {
    one_node_for_pid(target, args.broker_pid)?;
    let before = args.broker_pid.and_then(stats::rss_kib);
    let started = Instant::now();
    let mut open = Vec::with_capacity(args.connections);
    let mut pending = Vec::new();
    let mut failed = 0u64;
    for i in 0..args.connections {
        let local = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % args.source_addresses.max(1) as usize) as u8,
        ));
        let target = target.clone();
        pending.push(tokio::spawn(
            async move { target.idle(i, Some(local)).await },
        ));
        if pending.len() == 256 {
            for p in pending.drain(..) {
                match p.await? {
                    Ok(c) => open.push(c),
                    Err(_) => failed += 1,
                }
            }
        }
    }
    for p in pending {
        match p.await? {
            Ok(c) => open.push(c),
            Err(_) => failed += 1,
        }
    }
    let took = started.elapsed();
    let right_after = args.broker_pid.and_then(stats::rss_kib);
    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    let held = args.broker_pid.and_then(stats::rss_kib);
    let per_connection = match (before, held) {
        (Some(b), Some(h)) if !open.is_empty() => {
            Some(((h.saturating_sub(b)) as f64 / open.len() as f64 * 100.0).round() / 100.0)
        }
        _ => None,
    };
    let summary = json!({
        "scenario": "connections",
        "target": target.kind,
        "requested": args.connections,
        "open": open.len(),
        "failed": failed,
        "connect_seconds": took.as_secs_f64(),
        "connects_per_s": stats::per_second(open.len() as u64, took),
        "broker_rss_kib": {"before": before, "after_connect": right_after, "after_hold": held},
        "broker_rss_kib_per_connection": per_connection,
    });
    drop(open);
    Ok(summary)
}

#[derive(Debug, Clone, clap::Args)]
pub struct SlowArgs {
    /// Fast subscribers.
    #[arg(long, default_value_t = 50)]
    pub subscribers: usize,
    #[arg(long, default_value_t = 1024)]
    pub payload: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Seconds per phase (without, then with the slow subscriber).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long)]
    pub broker_pid: Option<u32>,
    #[arg(long, default_value = "bench.slow")]
    pub topic: String,
}

/// One subscriber stops reading among fast ones: the fast ones' latency should not move and
/// the broker's memory should stay bounded.
/// One phase of `slow`: publishes at the asked rate for the asked time as stream `stream`, then
/// waits for the fast subscribers to have it all.
async fn publish_phase(
    target: &Target,
    args: &SlowArgs,
    stream: u64,
    epoch: Instant,
    counters: &[Arc<Counter>],
) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let sent = publish_loop(
        target.clone(),
        stream,
        vec![args.topic.clone()],
        args.payload,
        Some(args.rate),
        deadline,
        epoch,
        None,
    )
    .await?;
    drain(
        counters,
        sent * args.subscribers as u64,
        Duration::from_secs(2),
    )
    .await;
    Ok(())
}

pub async fn slow(target: &Target, args: &SlowArgs) -> Result<Value, Error> {
    one_node_for_pid(target, args.broker_pid)?;
    let epoch = Instant::now();
    let subscribers = connect_subscribers(target, &args.topic, args.subscribers).await?;
    let counters: Vec<Arc<Counter>> = (0..args.subscribers)
        .map(|_| Arc::new(Counter::default()))
        .collect();
    let (stop_tx, stop) = watch::channel(false);
    let readers: Vec<_> = subscribers
        .into_iter()
        .zip(&counters)
        .map(|(s, c)| spawn_reader(s, epoch, c.clone(), stop.clone(), true))
        .collect();

    let phase = |readers: Vec<JoinHandle<Received>>| async move {
        let mut all = Received::default();
        for r in readers {
            all.merge(&r.await?);
        }
        Ok::<_, Error>(all)
    };

    // Phase one: everyone reads.
    publish_phase(target, args, 0, epoch, &counters).await?;
    let _ = stop_tx.send(true);
    let baseline = phase(readers).await?;

    // Phase two: a new set of readers (fresh histograms) and one subscriber that never reads.
    let subscribers = connect_subscribers(target, &args.topic, args.subscribers).await?;
    let _slow = target.subscriber(0, &args.topic, None).await?;
    let counters: Vec<Arc<Counter>> = (0..args.subscribers)
        .map(|_| Arc::new(Counter::default()))
        .collect();
    let (stop_tx, stop) = watch::channel(false);
    let readers: Vec<_> = subscribers
        .into_iter()
        .zip(&counters)
        .map(|(s, c)| spawn_reader(s, epoch, c.clone(), stop.clone(), true))
        .collect();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sampling, pid) = (sampling.clone(), args.broker_pid);
        tokio::spawn(async move {
            let mut max = 0;
            while sampling.load(Ordering::Relaxed) {
                if let Some(rss) = pid.and_then(stats::rss_kib) {
                    max = max.max(rss);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            max
        })
    };
    let rss_before = args.broker_pid.and_then(stats::rss_kib);
    publish_phase(target, args, 1, epoch, &counters).await?;
    let _ = stop_tx.send(true);
    let with_slow = phase(readers).await?;
    sampling.store(false, Ordering::Relaxed);
    let rss_max = sampler.await?;

    Ok(json!({
        "scenario": "slow",
        "target": target.kind,
        "fast_subscribers": args.subscribers,
        "payload": args.payload,
        "rate": args.rate,
        "latency_us_without_slow": stats::latency_json(&baseline.latency),
        "latency_us_with_slow": stats::latency_json(&with_slow.latency),
        "fast_lost_with_slow": with_slow.lost,
        "broker_rss_kib": {"before_slow": rss_before, "max_with_slow": (rss_max > 0).then_some(rss_max)},
    }))
}
