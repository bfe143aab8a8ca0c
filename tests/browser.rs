//! A real browser (headless Chromium driven by Playwright, tests/browser/*.mjs) against real
//! Crier servers: a plain `new WebSocket(url)`; the JavaScript client inside a page, in both
//! encodings; and the dashboard at `/` under traffic, with a stalled consumer and a broker
//! restart under the page.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser")
        .join(name)
}

/// Runs `node tests/browser/<name> args...` to the end; its stdout, parsed as JSON.
async fn run_node(name: &str, args: &[&str]) -> Value {
    let output = tokio::process::Command::new("node")
        .arg(script(name))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node is needed; scripts/test.sh installs what the tests need");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{name} failed: {stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{name} printed no JSON ({e}); stderr: {stderr}"))
}

#[tokio::test]
async fn a_browser_subscribes_and_receives_an_http_published_message() {
    let server = TestServer::start();
    let sessions = run_node(
        "subscribe.mjs",
        &[&server.ws_url("?subscribe=news"), &server.url("")],
    )
    .await;
    for (session, protocol, headline, seq) in
        [(0, "", "plain", 1), (1, "crier.json", "negotiated", 2)]
    {
        let s = &sessions[session];
        assert_eq!(s["protocol"], protocol);
        assert_eq!(s["frames"][0]["op"], "welcome");
        assert_eq!(
            s["frames"][1],
            json!({"op": "message", "topic": "news", "seq": seq, "data": {"headline": headline}})
        );
        assert_eq!(s["closeCode"], 1000);
    }
}

#[tokio::test]
async fn the_javascript_client_subscribes_publishes_and_receives_inside_a_page_in_both_encodings() {
    let server = TestServer::start();
    let out = run_node("client.mjs", &[&server.url("")]).await;
    for encoding in ["json", "msgpack"] {
        let s = &out["sessions"][encoding];
        assert_eq!(s["welcome"], json!({"op": "welcome", "encoding": encoding}));
        assert_eq!(s["clientEncoding"], encoding);
        let topic = format!("browser.{encoding}");
        assert_eq!(
            s["published"],
            json!({"seq": 1}),
            "{encoding}: the publish ack"
        );
        assert_eq!(s["http"]["seq"], 2, "{encoding}");
        assert_eq!(
            s["http"]["receivers"], 1,
            "{encoding}: one connection, both subscriptions"
        );
        let expected = json!([
            {"topic": topic, "seq": 1, "data": s["sent"]},
            {"topic": topic, "seq": 2, "data": {"from": "http"}},
        ]);
        assert_eq!(s["exact"], expected, "{encoding}: the topic's handler");
        assert_eq!(s["pattern"], expected, "{encoding}: browser.*'s handler");
        assert_eq!(s["sent"]["text"], "héllo ✓");
        assert_eq!(
            s["refused"],
            json!({"isCrierError": true, "name": "CrierError", "code": "forbidden"}),
            "{encoding}: publishing to the broker's own topic"
        );
        assert_eq!(s["position"]["seq"], 2, "{encoding}");
        assert!(
            s["position"]["epoch"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        );
        assert_eq!(s["readyState"], 3, "{encoding}: CLOSED after close()");
    }
    let sockets = out["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 2, "one WebSocket per session: {sockets:?}");
    assert!(
        sockets[0]["text"].as_u64() > Some(0) && sockets[0]["binary"] == 0,
        "JSON frames are text: {sockets:?}"
    );
    assert!(
        sockets[1]["binary"].as_u64() > Some(0) && sockets[1]["text"] == 0,
        "MessagePack frames are binary: {sockets:?}"
    );
    let modules = out["msgpackFiles"].as_array().unwrap();
    assert!(
        modules.contains(&json!("index.mjs")),
        "@msgpack/msgpack came through the page's import map: {modules:?}"
    );
    assert_eq!(out["errors"], json!([]), "no exception in the page");
}

#[tokio::test]
async fn the_dashboard_asks_for_a_credential_and_keeps_it_for_the_tab() {
    let server = TestServer::with(|config| config.api_keys = vec![OPERATOR_KEY.into()]);
    let out = run_node("auth.mjs", &[&server.url(""), OPERATOR_KEY]).await;
    assert_eq!(
        out["askedAtFirst"], true,
        "a 401 from the API opens the form"
    );
    assert_eq!(out["statusBeforeKey"], "offline");
    assert!(
        out["wrongKeyMessage"]
            .as_str()
            .is_some_and(|m| m.contains("Refused")),
        "a wrong key is refused and the form stays: {out}"
    );
    assert_eq!(out["stored"], OPERATOR_KEY, "kept in sessionStorage");
    assert_eq!(out["statusWithKey"], "connected");
    assert!(
        out["connectionsWithKey"].as_u64() >= Some(1),
        "the tables are filled with the key: {out}"
    );
    assert!(
        out["statsWithKey"].as_u64() > Some(0),
        "_crier.stats arrives over the authenticated WebSocket: {out}"
    );
    assert_eq!(
        out["askedAfterReload"], false,
        "a reload reuses the tab's key"
    );
    assert_eq!(out["statusAfterReload"], "connected");
    assert_eq!(out["pageErrors"], json!([]));
}

const OPERATOR_KEY: &str = "operator-key-for-the-dashboard";

/// A free port on the loopback interface, for a broker that must come back at the same address.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `crier` binary listening on a fixed port.
struct BrokerProcess {
    child: std::process::Child,
}

impl BrokerProcess {
    async fn start(port: u16) -> BrokerProcess {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            // The stalled consumer takes nothing for the whole test; it must stay to be seen.
            .args(["--write-timeout", "120s", "--workers", "2"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/healthz");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status() == 200
            {
                return BrokerProcess { child };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("crier exited with {status} instead of listening on {port}");
            }
            assert!(Instant::now() < deadline, "crier did not come up on {port}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the broker vanishes without closing anything.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes over HTTP to a few topics, at a varying pace, until `stop` (or 3 minutes). The
/// broker may be down meanwhile: failures are ignored.
async fn traffic(base: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(180) {
        n += 1;
        let mut batch = vec![
            json!({"topic": "demo.orders", "data": {"order": n, "total": (n % 97) as f64 * 1.25}}),
            json!({"topic": "sensors.temperature", "data": {"celsius": 20.0 + (n % 40) as f64 / 10.0}}),
        ];
        if n.is_multiple_of(2) {
            batch.push(json!({"topic": "demo.users", "data": {"user": format!("user{}", n % 13), "online": n.is_multiple_of(3)}}));
        }
        if n.is_multiple_of(7) {
            batch.push(
                json!({"topic": "news.headlines", "data": {"headline": format!("story {n}")}}),
            );
        }
        let _ = http
            .post(format!("{base}/api/publish"))
            .json(&batch)
            .send()
            .await;
        // Between about 8 and 25 batches a second, so that the rate charts have a shape.
        let pace = 40 + 40 * ((n / 25) % 3);
        tokio::time::sleep(Duration::from_millis(pace)).await;
    }
}

/// Subscribers that keep up, in both encodings, so that the charts have connections to show.
async fn readers(port: u16) -> Vec<tokio::task::JoinHandle<()>> {
    use futures_util::StreamExt;
    let mut tasks = Vec::new();
    for (i, protocol) in [
        "crier.json",
        "crier.json",
        "crier.json",
        "crier.msgpack",
        "crier.msgpack",
    ]
    .into_iter()
    .enumerate()
    {
        // `>` percent-encoded, as a URI needs it.
        let topics = if i % 2 == 0 {
            "demo.%3E,news.*"
        } else {
            "sensors.%3E"
        };
        let mut request = format!("ws://127.0.0.1:{port}/ws?subscribe={topics}")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    tasks
}

/// A consumer that subscribes to `bulk` and never reads, on a socket with a tiny receive
/// buffer, so that what is published for it piles up in the broker.
async fn stalled_consumer(port: u16) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let mut request = format!("ws://127.0.0.1:{port}/ws?subscribe=bulk")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("crier.json"),
    );
    let (ws, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream))
        .await
        .unwrap();
    Client::welcomed(ws, Enc::Json).await
}

/// 12 KB messages to `bulk`, ten a second, until `stop` (or 2 minutes): about 120 KB/s for the
/// stalled consumer, so that its buffered amount grows over several of the page's polls.
async fn bulk(base: String, stop: Arc<AtomicBool>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let blob = "x".repeat(12_000);
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
        n += 1;
        let _ = http
            .post(format!("{base}/api/topics/bulk"))
            .json(&json!({"n": n, "blob": blob}))
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_a_slow_consumer_and_survives_a_broker_restart() {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut broker = Some(BrokerProcess::start(port).await);
    let stop = Arc::new(AtomicBool::new(false));
    let bulk_stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(traffic(base.clone(), stop.clone()));
    let readers = readers(port).await;

    // target/dashboard-under-traffic.png; docs/dashboard.png too with CRIER_UPDATE_SCREENSHOT=1.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap();
    let picture = target.join("dashboard-under-traffic.png");
    let _ = std::fs::remove_file(&picture);
    let mut args = vec![base.clone(), picture.display().to_string()];
    if std::env::var_os("CRIER_UPDATE_SCREENSHOT").is_some() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
        args.push(docs.display().to_string());
    }
    let mut node = tokio::process::Command::new("node")
        .arg(script("dashboard.mjs"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node is needed; scripts/test.sh installs what the tests need");
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut stdin = node.stdin.take().unwrap();
    let mut stalled = None;
    let mut killed_at = None;
    let done = loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("dashboard.mjs went quiet for 2 minutes")
            .unwrap();
        let Some(line) = line else {
            panic!(
                "dashboard.mjs ended without a result ({}); its stderr says why",
                node.wait().await.unwrap()
            );
        };
        let message: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a step: {line}"));
        let answer = match message["step"].as_str() {
            Some("stall") => {
                let consumer = stalled_consumer(port).await;
                let id = consumer.id.clone();
                stalled = Some(consumer);
                tokio::spawn(bulk(base.clone(), bulk_stop.clone()));
                json!({ "stalled": id })
            }
            Some("kill") => {
                bulk_stop.store(true, Ordering::Relaxed);
                broker.take().unwrap().kill();
                killed_at = Some(Instant::now());
                drop(stalled.take());
                json!({ "killed": true })
            }
            // Once the page has shown the broker offline.
            Some("start") => {
                broker = Some(BrokerProcess::start(port).await);
                json!({ "restarted": true })
            }
            Some("done") => break message,
            other => panic!("unknown step {other:?}: {line}"),
        };
        stdin
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    };
    let status = node.wait().await.unwrap();
    assert!(status.success(), "dashboard.mjs: {status}");
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    for reader in readers {
        reader.abort();
    }
    let killed_at = killed_at.expect("the broker was restarted");

    // The console: a message published over HTTP, one published from the console's form.
    let http = &done["httpMessage"];
    assert_eq!(
        http["seq"].as_str(),
        Some(http["published"]["seq"].to_string().as_str()),
        "{http}"
    );
    assert!(
        http["text"]
            .as_str()
            .unwrap()
            .contains(r#"{"hello":"from HTTP","n":42}"#),
        "{http}"
    );
    let console = &done["consolePublish"];
    assert!(
        console["result"]
            .as_str()
            .unwrap()
            .starts_with("published to demo.console, seq"),
        "{console}"
    );
    assert!(
        console["received"]
            .as_str()
            .unwrap()
            .contains(r#"{"from":"the console","ok":true}"#),
        "{console}"
    );
    assert!(
        done["forbiddenPublish"]
            .as_str()
            .unwrap()
            .starts_with("forbidden:"),
        "{}",
        done["forbiddenPublish"]
    );

    // The figures and the charts move.
    let moving = &done["moving"];
    assert!(
        moving["connections"].as_u64() >= Some(6),
        "the page and the five readers: {moving}"
    );
    let pair = |name: &str| {
        (
            moving[name][0].as_f64().unwrap(),
            moving[name][1].as_f64().unwrap(),
        )
    };
    for series in ["published", "delivered", "points", "lastTime"] {
        let (before, after) = pair(series);
        assert!(after > before, "{series} moves: {moving}");
    }
    assert_eq!(moving["chartRedrawn"], true, "{moving}");
    assert!(moving["topic"]["rate"].as_f64() > Some(0.0), "{moving}");
    assert!(
        moving["topic"]["subscribers"].as_u64() >= Some(2),
        "{moving}"
    );

    // The stalled consumer: growing, then highlighted past half of --max-buffered-bytes (1 MiB).
    let stalled = &done["stalled"];
    let samples: Vec<u64> = stalled["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["buffered"].as_u64().unwrap())
        .collect();
    assert!(
        samples.len() >= 2 && samples.windows(2).all(|w| w[1] > w[0]),
        "the page saw its buffered amount grow: {stalled}"
    );
    let slow = &stalled["slow"];
    assert!(slow["buffered"].as_u64() > Some(512 * 1024), "{stalled}");
    assert_eq!(
        slow["first"], true,
        "the most backed-up comes first: {stalled}"
    );
    assert_eq!(stalled["maxBuffered"], "1.0 MiB", "{stalled}");
    assert_eq!(
        stalled["slowRows"],
        json!([stalled["id"]]),
        "only it is slow: {stalled}"
    );
    assert!(stalled["drops"]["reason"].as_u64() > Some(0), "{stalled}");
    assert!(stalled["drops"]["row"].as_u64() > Some(0), "{stalled}");

    // The restart: the badge went down and came back, subscriptions and tables resumed.
    let restart = &done["restart"];
    let log: Vec<&str> = restart["statusLog"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let down = log
        .iter()
        .rposition(|s| *s == "offline")
        .unwrap_or_else(|| panic!("the badge never went offline: {log:?}"));
    assert!(log[..down].contains(&"connected"), "{log:?}");
    assert_eq!(log.last(), Some(&"connected"), "{log:?}");
    assert!(
        restart["received"]
            .as_str()
            .unwrap()
            .contains(r#"{"after":"the restart"}"#),
        "the console's demo.> was renewed: {restart}"
    );
    assert_eq!(restart["published"]["seq"], 1, "a new broker: {restart}");
    assert!(
        restart["statsAfter"].as_f64() > restart["statsBefore"].as_f64(),
        "{restart}"
    );
    assert_ne!(
        restart["connectionAfter"], restart["connectionBefore"],
        "{restart}"
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "the page came back in time"
    );

    let problems = &done["problems"];
    assert_eq!(problems["pageErrors"], json!([]), "{problems}");
    assert_eq!(
        problems["console"],
        json!([]),
        "nothing refused or broken while the broker was up: {problems}"
    );
    let png = std::fs::read(&picture).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 50_000,
        "{} is a screenshot",
        picture.display()
    );
}
