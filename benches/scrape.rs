//! How long a `/metrics` scrape takes with many connections open, and whether scraping delays
//! publishing. Run with `cargo bench --bench scrape` (optionally `-- --connections N`).
//!
//! Starts the release `crier` binary, opens N WebSocket connections from this process (each
//! subscribed to one of 100 topics), keeps a publisher going, then times 100 scrapes and the
//! publish round trips made while scrapes run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let connections: usize = args
        .iter()
        .position(|a| a == "--connections")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["--listen", "127.0.0.1:0", "--log", "warn,crier=info"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("crier binary");
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines.next().expect("crier exited").unwrap();
        if let Some(rest) = line.split("ws://").nth(1) {
            break rest.split("/ws").next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    // Open the connections, a few hundred at a time; keep reading them so nothing backs up.
    let opened = Instant::now();
    let mut handles = Vec::with_capacity(connections);
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..connections {
        let url = format!("ws://{addr}/ws?subscribe=load.{}", i % 100);
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let ready = ready_tx.clone();
        handles.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            let _ = ws.next().await; // welcome
            drop(permit);
            let _ = ready.send(());
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    for _ in 0..connections {
        ready_rx.recv().await.unwrap();
    }
    let open_time = opened.elapsed();

    let http = reqwest::Client::new();
    let publish_url = format!("http://{addr}/api/topics/load.7");
    let metrics_url = format!("http://{addr}/metrics");

    // Publish round trips with no scrape running.
    let mut quiet = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        http.post(&publish_url)
            .json(&serde_json::json!({"v": 1}))
            .send()
            .await
            .unwrap();
        quiet.push(t.elapsed());
    }

    // Scrapes, with a publisher running beside them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (http, url, stop) = (http.clone(), publish_url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut during = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                http.post(&url)
                    .json(&serde_json::json!({"v": 2}))
                    .send()
                    .await
                    .unwrap();
                during.push(t.elapsed());
            }
            during
        })
    };
    let mut scrapes = Vec::new();
    let mut size = 0;
    for _ in 0..100 {
        let t = Instant::now();
        let body = http
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scrapes.push(t.elapsed());
        size = body.len();
        assert!(body.contains(&format!(
            "crier_connections{{encoding=\"json\"}} {connections}"
        )));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut during = publisher.await.unwrap();

    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.to_owned())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0);

    scrapes.sort();
    quiet.sort();
    during.sort();
    let summary = serde_json::json!({
        "bench": "scrape",
        "connections": connections,
        "open_seconds": open_time.as_secs_f64(),
        "scrape_ms": {"p50": ms(percentile(&scrapes, 0.5)), "p99": ms(percentile(&scrapes, 0.99)), "max": ms(*scrapes.last().unwrap())},
        "exposition_bytes": size,
        "publish_rtt_ms_quiet": {"p50": ms(percentile(&quiet, 0.5)), "p99": ms(percentile(&quiet, 0.99))},
        "publish_rtt_ms_while_scraping": {"p50": ms(percentile(&during, 0.5)), "p99": ms(percentile(&during, 0.99)), "samples": during.len()},
        "broker_rss_mib": rss_kib as f64 / 1024.0,
    });
    println!("{summary}");
    println!();
    println!(
        "| connections | scrape p50 | scrape p99 | scrape max | publish RTT p99 quiet | publish RTT p99 while scraping |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {connections} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
        ms(percentile(&scrapes, 0.5)),
        ms(percentile(&scrapes, 0.99)),
        ms(*scrapes.last().unwrap()),
        ms(percentile(&quiet, 0.99)),
        ms(percentile(&during, 0.99)),
    );
    // SAFETY: stopping the child we started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = child.wait();
    for h in handles {
        h.abort();
    }
}
