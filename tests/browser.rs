//! A real browser (headless Chromium, driven by tests/browser/subscribe.mjs) subscribes with a
//! plain `new WebSocket(url)` and receives a message published over HTTP.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn a_browser_subscribes_and_receives_an_http_published_message() {
    let server = TestServer::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/subscribe.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&script)
        .arg(server.ws_url("?subscribe=news"))
        .arg(server.url(""))
        .output()
        .await
        .expect("node is needed; scripts/test.sh installs what the tests need");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser script failed: {stderr}"
    );
    let sessions: Value = serde_json::from_slice(&output.stdout).unwrap();
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
