//! Every scenario, small, against a real Crier: each must run to the end, print its JSON summary
//! and account for every message.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::TestServer;
use serde_json::Value;

/// Runs `crier-bench` against `server` and returns its one-line JSON summary.
fn bench(server: &TestServer, args: &[&str]) -> Value {
    bench_nodes(&[server], args)
}

/// Runs `crier-bench` against the nodes of one broker (one `--url` each).
fn bench_nodes(nodes: &[&TestServer], args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_crier-bench"))
        .args(
            nodes
                .iter()
                .flat_map(|n| ["--url".to_owned(), n.ws_url("")]),
        )
        .args(args)
        .output()
        .expect("crier-bench runs");
    assert!(
        output.status.success(),
        "crier-bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let line = stdout.lines().next().expect("a summary line");
    serde_json::from_str(line).expect("the summary is JSON")
}

#[test]
fn fanout_delivers_every_message_to_every_subscriber() {
    let server = TestServer::start();
    for encoding in ["json", "msgpack"] {
        let r = bench(
            &server,
            &[
                "--encoding",
                encoding,
                "fanout",
                "--subscribers",
                "5",
                "--payload",
                "100",
                "--duration",
                "0.5",
            ],
        );
        let published = r["published"].as_u64().unwrap();
        assert!(published > 0, "{r}");
        assert_eq!(r["delivered"].as_u64().unwrap(), published * 5, "{r}");
        assert_eq!(
            (r["lost"].as_u64(), r["duplicated"].as_u64()),
            (Some(0), Some(0)),
            "{r}"
        );
        assert_eq!(r["broker_dropped"], 0, "{r}");
        assert_eq!(
            (r["nodes"].as_u64(), r["out_of_order"].as_u64()),
            (Some(1), Some(0)),
            "{r}"
        );
        assert!(r["latency_us"]["p99"].as_u64().unwrap() > 0, "{r}");
    }
}

#[test]
fn fanout_spreads_subscribers_and_publishers_over_the_urls() {
    // One node named twice (independent memory nodes share nothing, so two of them would lose
    // each other's messages): the accounting is the same as with one URL, and exact.
    let server = TestServer::start();
    let r = bench_nodes(
        &[&server, &server],
        &[
            "fanout",
            "--subscribers",
            "5",
            "--publishers",
            "3",
            "--duration",
            "0.5",
        ],
    );
    assert_eq!(r["nodes"], 2, "{r}");
    let published = r["published"].as_u64().unwrap();
    assert!(published > 0, "{r}");
    assert_eq!(r["delivered"].as_u64().unwrap(), published * 5, "{r}");
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicated"].as_u64(),
            r["out_of_order"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    // Comma-separated URLs are the same as repeated ones.
    let url = server.ws_url("");
    let r = bench(
        &server,
        &[
            "--url",
            &format!("{url},{url}"),
            "fanout",
            "--subscribers",
            "2",
            "--duration",
            "0.2",
        ],
    );
    assert_eq!(r["nodes"], 3, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}

#[test]
fn fanout_over_two_nodes_sharing_redis_accounts_for_every_message() {
    // The local Redis, under a key prefix of this test's own.
    let prefix = format!("bench-test-{}", fastrand::u64(..));
    let node = || {
        TestServer::with(|c| {
            c.redis = vec!["redis://127.0.0.1:6379/0".to_owned()];
            c.redis_prefix = prefix.clone();
        })
    };
    let (a, b) = (node(), node());
    let r = bench_nodes(
        &[&a, &b],
        &[
            "fanout",
            "--subscribers",
            "6",
            "--publishers",
            "2",
            "--duration",
            "0.5",
        ],
    );
    assert_eq!(r["nodes"], 2, "{r}");
    let published = r["published"].as_u64().unwrap();
    assert!(published > 0, "{r}");
    // Each subscriber has both publishers' messages, whichever node it is on.
    assert_eq!(r["delivered"].as_u64().unwrap(), published * 6, "{r}");
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicated"].as_u64(),
            r["out_of_order"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
}

#[test]
fn fanout_at_a_fixed_rate_publishes_that_many() {
    let server = TestServer::start();
    let r = bench(
        &server,
        &[
            "fanout",
            "--subscribers",
            "3",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
    );
    // Never ahead of the rate; the lower bound only leaves room for a stalled machine.
    let published = r["published"].as_u64().unwrap();
    assert!((1000..=2000).contains(&published), "{r}");
    assert_eq!(r["delivered"].as_u64().unwrap(), published * 3, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}

#[test]
fn topics_delivers_what_each_subscription_expects() {
    let server = TestServer::start();
    let r = bench(
        &server,
        &[
            "topics",
            "--topics",
            "50",
            "--connections",
            "20",
            "--per-connection",
            "5",
            "--rate",
            "2000",
            "--duration",
            "1",
        ],
    );
    assert!(r["expected"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["delivered"], r["expected"], "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}

#[test]
fn connections_opens_them_all_and_reads_the_broker_memory() {
    let server = TestServer::start();
    // The broker runs inside this test process.
    let pid = std::process::id().to_string();
    let r = bench(
        &server,
        &[
            "connections",
            "--connections",
            "200",
            "--source-addresses",
            "2",
            "--hold",
            "0.2",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(
        (r["open"].as_u64(), r["failed"].as_u64()),
        (Some(200), Some(0)),
        "{r}"
    );
    assert!(
        r["broker_rss_kib"]["after_hold"].as_u64().unwrap() > 0,
        "{r}"
    );
}

#[test]
fn slow_keeps_the_fast_subscribers_whole() {
    let server = TestServer::start();
    let pid = std::process::id().to_string();
    let r = bench(
        &server,
        &[
            "slow",
            "--subscribers",
            "5",
            "--rate",
            "1000",
            "--duration",
            "1",
            "--broker-pid",
            &pid,
        ],
    );
    assert_eq!(r["fast_lost_with_slow"], 0, "{r}");
    assert!(
        r["latency_us_with_slow"]["p99"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert!(
        r["broker_rss_kib"]["max_with_slow"].as_u64().unwrap() > 0,
        "{r}"
    );
}
