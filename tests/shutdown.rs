//! Graceful shutdown: stop accepting, flush what is queued, close every WebSocket with 1001.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A `crier` process, and the address it logged.
struct Process {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

fn spawn_crier(args: &[&str]) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(rest) = line.split("ws://").nth(1) {
                let addr = rest.split("/ws").next().unwrap().to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(PATIENCE)
        .expect("crier did not log its address");
    Process {
        child,
        addr: addr.parse().unwrap(),
    }
}

/// One HTTP/1.1 request on an already open keep-alive connection; returns the status.
async fn get_status(conn: &mut TcpStream, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: crier\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(PATIENCE, conn.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn sigterm_flushes_queued_messages_then_closes_with_1001() {
    let mut process = spawn_crier(&["--shutdown-grace", "5s"]);
    let server_url = |path: &str| format!("http://{}{path}", process.addr);
    let (ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?subscribe=news", process.addr))
            .await
            .unwrap();
    let mut client = Client::welcomed(ws, Enc::Json).await;
    let http = reqwest::Client::new();
    for i in 1..=50 {
        let response = http
            .post(server_url("/api/topics/news"))
            .json(&json!(i))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut probe = TcpStream::connect(process.addr).await.unwrap();
    assert_eq!(get_status(&mut probe, "/readyz").await, 200);

    let started = Instant::now();
    // SAFETY: signalling a child process we own.
    assert_eq!(
        unsafe { libc::kill(process.child.id() as i32, libc::SIGTERM) },
        0
    );
    // Until the client answers the close, the server is draining: not ready, and no new
    // WebSocket is served (the listener is paused).
    let deadline = Instant::now() + PATIENCE;
    while get_status(&mut probe, "/readyz").await != 503 {
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let attempt = tokio::time::timeout(
        Duration::from_millis(500),
        tokio_tungstenite::connect_async(format!("ws://{}/ws", process.addr)),
    )
    .await;
    assert!(
        !matches!(attempt, Ok(Ok(_))),
        "a new WebSocket was served while shutting down"
    );

    let (frames, close) = client.recv_until_close().await;
    let data: Vec<i64> = frames.iter().map(|f| f["data"].as_i64().unwrap()).collect();
    assert_eq!(
        data,
        (1..=50).collect::<Vec<_>>(),
        "everything queued is delivered first"
    );
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (1001, "going away")
    );

    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited within the grace period"
    );
}

#[tokio::test]
async fn stuck_clients_do_not_hold_shutdown_past_the_grace_period() {
    let mut process = spawn_crier(&["--shutdown-grace", "1s"]);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", process.addr))
        .await
        .unwrap();
    // This client never reads again, so it never answers the close.
    let _stuck = ws;
    let started = Instant::now();
    // SAFETY: signalling a child process we own.
    assert_eq!(
        unsafe { libc::kill(process.child.id() as i32, libc::SIGINT) },
        0
    );
    let status = tokio::task::spawn_blocking(move || process.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "took {took:?}"
    );
}

#[tokio::test]
async fn shutdown_handle_closes_clients_with_1001() {
    let server = TestServer::start();
    let mut a = Client::connect(&server, Enc::Json).await;
    let mut b = Client::connect(&server, Enc::Msgpack).await;
    a.subscribe("t").await;
    server.publish("t", &json!("before")).await;
    let handle = server.shutdown_handle();
    let stopped = tokio::task::spawn_blocking(move || server.stop());
    handle.shutdown();
    let (frames, close) = a.recv_until_close().await;
    assert_eq!(
        frames,
        vec![json!({"op": "message", "topic": "t", "seq": 1, "data": "before"})]
    );
    assert_eq!(close_code(&close), 1001);
    let (_, close) = b.recv_until_close().await;
    assert_eq!(close_code(&close), 1001);
    stopped.await.unwrap().unwrap();
}
