//! `/metrics` against a real server: every counter and gauge moves when its event happens,
//! promtool accepts the exposition and the example configuration, and every PromQL expression in
//! the Grafana dashboard returns data from a real Prometheus scraping a real Crier.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use crier::SlowConsumerPolicy;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs promtool with `args`, feeding `stdin`; returns (success, output).
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus); scripts/test.sh installs it");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Fills a client that never reads until the broker drops messages for it.
async fn stall(server: &TestServer, topic: &str) -> Client {
    let slow = Client::connect_slow(server, Enc::Json).await;
    let mut slow = slow;
    slow.subscribe(topic).await;
    let batch: Vec<Value> = (0..20)
        .map(|_| json!({"topic": topic, "data": "x".repeat(1000)}))
        .collect();
    loop {
        server.publish_batch(&batch).await;
        let info = server
            .connection(&slow.id)
            .await
            .expect("slow client listed");
        if info["dropped"].as_u64().unwrap() > 0 {
            return slow;
        }
    }
}

#[tokio::test]
async fn promtool_accepts_the_exposition_under_traffic_with_a_slow_consumer() {
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = 64 * 1024;
        c.metrics_namespaces = vec!["metrics".into(), "chat".into()];
    });
    let mut fast = Client::connect(&server, Enc::Msgpack).await;
    fast.subscribe("metrics.>").await;
    let _slow = stall(&server, "metrics.cpu").await;
    let scrape = server.scrape().await;
    assert!(scrape.get("crier_slow_connections") >= 1.0);
    assert!(
        scrape.get(
            r#"crier_messages_dropped_total{namespace="metrics",reason="buffer_full_oldest"}"#
        ) > 0.0
    );
    assert!(
        scrape.text.contains("process_resident_memory_bytes"),
        "process metrics"
    );
    let (ok, output) = promtool(&["check", "metrics"], &scrape.text);
    assert!(ok, "promtool check metrics: {output}");
}

#[tokio::test]
async fn promtool_accepts_the_example_prometheus_config() {
    let config = repo("grafana/prometheus.yml");
    let (ok, output) = promtool(&["check", "config", config.to_str().unwrap()], "");
    assert!(ok, "promtool check config: {output}");
}

#[tokio::test]
async fn connection_figures_follow_connections() {
    let server = TestServer::start();
    let before = server.scrape().await;
    assert_eq!(before.get(r#"crier_connections{encoding="json"}"#), 0.0);
    let mut a = Client::connect(&server, Enc::Json).await;
    let mut b = Client::connect(&server, Enc::Msgpack).await;
    a.subscribe("t.1").await;
    a.subscribe("t.*").await;
    b.subscribe("t.1").await;
    b.subscribe("u").await;
    let s = server.scrape().await;
    assert_eq!(s.get(r#"crier_connections{encoding="json"}"#), 1.0);
    assert_eq!(s.get(r#"crier_connections{encoding="msgpack"}"#), 1.0);
    assert_eq!(s.get("crier_connections_accepted_total"), 2.0);
    assert_eq!(s.get("crier_subscriptions"), 4.0);
    assert_eq!(s.get("crier_topics"), 2.0);
    assert_eq!(s.get("crier_patterns"), 1.0);
    assert_eq!(s.get("crier_connection_buffered_bytes_count"), 2.0);

    // Received bytes: the exact size of a frame.
    let frame = r#"{"op":"ping","id":"bytes"}"#;
    let received = server.scrape().await.get("crier_received_bytes_total");
    a.send_raw(Message::text(frame)).await;
    a.recv().await;
    let now = server.scrape().await;
    assert_eq!(
        now.get("crier_received_bytes_total") - received,
        frame.len() as f64
    );
    assert!(
        now.get("crier_sent_bytes_total") > s.get("crier_sent_bytes_total"),
        "the pong was sent"
    );
    assert!(now.get("crier_queue_wait_seconds_count") > s.get("crier_queue_wait_seconds_count"));

    // A closed connection's totals stay in the counters.
    let sent = now.get("crier_sent_bytes_total");
    a.ws.close(None).await.unwrap();
    let _ = a.recv_until_close().await;
    let after = eventually("the connection to be retired", || async {
        let s = server.scrape().await;
        (s.get(r#"crier_connections{encoding="json"}"#) == 0.0).then_some(s)
    })
    .await;
    assert!(after.get("crier_sent_bytes_total") >= sent);
    assert_eq!(after.get("crier_subscriptions"), 2.0);
    assert_eq!(after.get("crier_topics"), 2.0, "b still has t.1 and u");
    assert_eq!(after.get("crier_patterns"), 0.0);
    b.sync().await;
}

#[tokio::test]
async fn publish_delivery_and_error_counters_move() {
    let server = TestServer::with(|c| c.metrics_namespaces = vec!["chat".into()]);
    let mut sub = Client::connect(&server, Enc::Json).await;
    sub.subscribe("chat.>").await;
    let mut other = Client::connect(&server, Enc::Json).await;
    other.subscribe("chat.room").await;

    server.publish("chat.room", &json!("via http")).await;
    sub.send(json!({"op": "publish", "topic": "chat.room", "data": "via ws", "id": 1}))
        .await;
    sub.send(json!({"op": "publish", "topic": "news", "data": 1, "id": 2}))
        .await;
    // Two messages and two acks.
    for _ in 0..4 {
        sub.recv().await;
    }
    assert_eq!(other.recv().await["data"], "via http");
    assert_eq!(other.recv().await["data"], "via ws");
    let s = server.scrape().await;
    assert_eq!(
        s.get(r#"crier_messages_published_total{namespace="chat",source="http"}"#),
        1.0
    );
    assert_eq!(
        s.get(r#"crier_messages_published_total{namespace="chat",source="ws"}"#),
        1.0
    );
    assert_eq!(
        s.get(r#"crier_messages_published_total{namespace="other",source="ws"}"#),
        1.0
    );
    assert_eq!(
        s.get(r#"crier_messages_delivered_total{namespace="chat"}"#),
        4.0,
        "two messages, two receivers each"
    );
    assert_eq!(
        s.get(r#"crier_messages_delivered_total{namespace="other"}"#),
        0.0
    );
    assert_eq!(s.get("crier_publish_fanout_seconds_count"), 3.0);

    for (frame, code) in [
        ("nonsense", "bad_frame"),
        (r#"{"op":"dance"}"#, "unknown_op"),
        (r#"{"op":"subscribe","topic":"a..b"}"#, "invalid_topic"),
    ] {
        sub.send_raw(Message::text(frame)).await;
        assert_eq!(sub.recv().await["code"], code);
        assert_eq!(
            server
                .scrape()
                .await
                .get(&format!(r#"crier_errors_total{{code="{code}"}}"#)),
            1.0
        );
    }
    let response = server
        .http
        .post(server.url("/api/topics/a..b"))
        .json(&1)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let s = server.scrape().await;
    assert_eq!(
        s.get(r#"crier_http_requests_total{route="/api/topics/{topic}",status="200"}"#),
        1.0
    );
    assert_eq!(
        s.get(r#"crier_http_requests_total{route="/api/topics/{topic}",status="400"}"#),
        1.0
    );
    other.sync().await;
}

#[tokio::test]
async fn drops_are_counted_by_reason() {
    for (policy, reason) in [
        (SlowConsumerPolicy::DropOldest, "buffer_full_oldest"),
        (SlowConsumerPolicy::DropNewest, "buffer_full_newest"),
        (SlowConsumerPolicy::Disconnect, "slow_consumer"),
    ] {
        let server = TestServer::with(|c| {
            c.max_buffered_bytes = 64 * 1024;
            c.slow_consumer = policy;
        });
        let slow = stall(&server, "feed").await;
        let s = server.scrape().await;
        let dropped = s.get(&format!(
            r#"crier_messages_dropped_total{{namespace="other",reason="{reason}"}}"#
        ));
        assert!(dropped > 0.0, "{reason}");
        let info = server.connection(&slow.id).await;
        if let Some(info) = info {
            assert_eq!(
                info["dropped"].as_f64().unwrap(),
                dropped,
                "per-connection and global counts agree"
            );
        }
        assert!(s.get("crier_buffered_bytes_max") <= 64.0 * 1024.0);
        if policy != SlowConsumerPolicy::Disconnect {
            assert!(s.get("crier_buffered_bytes_max") > 60.0 * 1024.0);
            assert_eq!(s.get("crier_slow_connections"), 1.0);
            assert_eq!(
                s.get(r#"crier_connection_buffered_bytes_bucket{le="65536"}"#),
                1.0
            );
            assert_eq!(
                s.get(r#"crier_connection_buffered_bytes_bucket{le="32768"}"#),
                0.0
            );
        }
    }
}

#[tokio::test]
async fn messages_left_queued_at_close_are_counted() {
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = 64 * 1024;
        c.write_timeout = Duration::from_millis(300);
    });
    let slow = stall(&server, "feed").await;
    eventually("the stalled connection to be closed", || async {
        server.connection(&slow.id).await.is_none().then_some(())
    })
    .await;
    let s = server.scrape().await;
    assert!(
        s.get(r#"crier_messages_dropped_total{namespace="other",reason="slow_consumer"}"#) > 0.0
    );
    assert_eq!(
        s.get(r#"crier_connections_closed_total{reason="slow_consumer"}"#),
        1.0
    );
}

#[tokio::test]
async fn closes_are_counted_by_reason() {
    let server = TestServer::with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.idle_timeout = Duration::from_millis(400);
        c.max_message_bytes = 1024;
    });
    let closed = |reason: &str| format!(r#"crier_connections_closed_total{{reason="{reason}"}}"#);
    let wait_for = |reason: &'static str| {
        let server = &server;
        async move {
            eventually(reason, || async {
                (server.scrape().await.get(&format!(
                    r#"crier_connections_closed_total{{reason="{reason}"}}"#
                )) == 1.0)
                    .then_some(())
            })
            .await
        }
    };

    let mut c = Client::connect(&server, Enc::Json).await;
    c.ws.close(None).await.unwrap();
    c.recv_until_close().await;
    wait_for("client").await;

    let c = Client::connect(&server, Enc::Json).await;
    drop(c);
    wait_for("abnormal").await;

    let mut c = Client::connect(&server, Enc::Json).await;
    c.send_raw(Message::text("x".repeat(10_000))).await;
    c.recv_until_close().await;
    wait_for("protocol_error").await;

    let mut c = Client::connect(&server, Enc::Json).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.recv_until_close().await;
    wait_for("idle_timeout").await;
    assert_eq!(server.scrape().await.get(&closed("shutdown")), 0.0);
}

#[tokio::test]
async fn shutdown_closes_are_counted() {
    let server = TestServer::with(|c| c.shutdown_grace = Duration::from_secs(5));
    let mut leaving = Client::connect(&server, Enc::Json).await;
    // A client that never answers the close keeps the server draining while we look.
    let _stuck = Client::connect(&server, Enc::Json).await;
    // Opened before shutdown: the listener stops accepting, open connections are still served.
    server.scrape().await;
    server.shutdown_handle().shutdown();
    leaving.recv_until_close().await;
    let s = eventually("the shutdown close to be counted", || async {
        let s = server.scrape().await;
        (s.get(r#"crier_connections_closed_total{reason="shutdown"}"#) == 1.0).then_some(s)
    })
    .await;
    assert_eq!(s.get(r#"crier_connections{encoding="json"}"#), 1.0);
}

/// A Prometheus server scraping one target, on a free port, removed on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Prometheus {
    async fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = std::env::temp_dir().join(format!(
            "crier-prometheus-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: crier\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "prometheus is needed (Debian package prometheus); scripts/test.sh installs it",
            );
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: TempDir(dir),
        };
        let http = reqwest::Client::new();
        eventually("prometheus to be ready", || async {
            let ready = http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await
                .ok()?;
            ready.status().is_success().then_some(())
        })
        .await;
        prometheus
    }

    async fn query(&self, expr: &str) -> Value {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v1/query", self.url),
            &[("query", expr)],
        )
        .unwrap();
        let response = reqwest::get(url).await.unwrap();
        response.json().await.unwrap()
    }
}

/// Every `expr` in the dashboard, panels nested in rows included.
fn dashboard_exprs(node: &Value, out: &mut Vec<String>) {
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => out.push(expr.clone()),
                    _ => dashboard_exprs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_exprs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    // Over the machine's Redis (a prefix of its own), so that the backend's panels have data too.
    let server = TestServer::with(|c| {
        c.max_buffered_bytes = 64 * 1024;
        c.metrics_namespaces = vec!["metrics".into()];
        c.redis = vec!["redis://127.0.0.1:6379/0".into()];
        c.redis_prefix = format!("test-metrics-{:016x}", fastrand::u64(..));
        c.topic_ttl = Duration::from_secs(60);
        c.history_ttl = Duration::from_secs(60);
    });
    let prometheus = Prometheus::start(server.addr).await;

    // Traffic: subscribers in both encodings, a client that stops reading, errors, closes.
    let mut json_sub = Client::connect(&server, Enc::Json).await;
    json_sub.subscribe("metrics.*").await;
    let mut mp_sub = Client::connect(&server, Enc::Msgpack).await;
    mp_sub.subscribe("metrics.cpu").await;
    let _slow = stall(&server, "metrics.cpu").await;
    json_sub.send_raw(Message::text("nonsense")).await;
    let mut leaving = Client::connect(&server, Enc::Json).await;
    leaving.ws.close(None).await.unwrap();
    leaving.recv_until_close().await;
    let publisher = {
        let http = server.http.clone();
        let url = server.url("/api/topics/metrics.mem");
        tokio::spawn(async move {
            loop {
                let _ = http.post(&url).json(&json!({"used": 0.5})).send().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let readers = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = json_sub.recv_message() => {}
                _ = mp_sub.recv_message() => {}
            }
        }
    });

    // Enough scrapes for rate() over the dashboard's window. Six scrapes at 1 s take Prometheus
    // six seconds at best, and longer while a loaded machine slows its start.
    let scrapes = Duration::from_secs(30);
    eventually_within(
        "prometheus to have scraped crier a few times",
        scrapes,
        || async {
            let result = prometheus
                .query("count_over_time(crier_build_info[1m])")
                .await;
            let samples = result["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()?;
            (samples >= 6.0).then_some(())
        },
    )
    .await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("grafana/dashboards/crier.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard["panels"], &mut exprs);
    assert!(
        exprs.len() >= 20,
        "the dashboard lost its queries: {exprs:?}"
    );
    let mut failures = Vec::new();
    for expr in &exprs {
        // What Grafana would substitute: all instances, a rate window of several scrapes.
        let query = expr
            .replace("$instance", ".*")
            .replace("$__rate_interval", "15s");
        let answer = prometheus.query(&query).await;
        let empty = answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        if answer["status"] != "success" || empty {
            failures.push(format!("{expr}\n  -> {answer}"));
        }
    }
    publisher.abort();
    readers.abort();
    assert!(
        failures.is_empty(),
        "dashboard queries without data:\n{}",
        failures.join("\n")
    );
}
