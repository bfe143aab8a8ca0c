//! Replays every transcript in `proto/examples/` against a real server, once with JSON and once
//! with MessagePack clients, and checks every frame against `proto/crier-v1.schema.json`.
//!
//! Steps: `connect` (query string; optional, clients connect when first named) with an optional
//! expected `welcome`; `send` (a valid client frame); `send_invalid` (a frame the schema must
//! reject); `send_text` (raw text); `recv` (the next frame, where the string "*" matches any
//! value); `silent` (nothing arrives); `http` (a request and its expected answer).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn schema(definition: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/crier-v1.schema.json"),
    )
    .unwrap();
    let mut schema: Value = serde_json::from_str(&text).unwrap();
    // Validate against one definition: the root's $defs stay reachable.
    schema["$ref"] = Value::String(format!("#/$defs/{definition}"));
    schema.as_object_mut().unwrap().remove("oneOf");
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

fn assert_valid(validator: &jsonschema::Validator, frame: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(frame)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{what} {frame} breaks the schema: {errors:?}"
    );
}

/// `expected` matches `actual` where equal, where `expected` is "*", and object by object with
/// exactly the same keys.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(s), _) if s == "*" => true,
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|av| matches(v, av)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(e, a)| matches(e, a))
        }
        (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
        _ => expected == actual,
    }
}

/// Fields drop in order: clients go before the server, which then shuts down at once.
struct Run {
    clients: HashMap<String, Client>,
    server: TestServer,
    encodings: HashMap<String, Enc>,
    default: Enc,
    client_frames: jsonschema::Validator,
    server_frames: jsonschema::Validator,
}

impl Run {
    fn encoding_of(&self, name: &str) -> Enc {
        self.encodings.get(name).copied().unwrap_or(self.default)
    }

    async fn connect(&mut self, name: &str, query: &str) -> Value {
        let enc = self.encoding_of(name);
        let mut request = self.server.ws_url(query).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", enc.subprotocol().parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut client = Client {
            ws,
            enc,
            id: String::new(),
        };
        let welcome = client.recv().await;
        assert_valid(&self.server_frames, &welcome, "welcome");
        self.clients.insert(name.to_owned(), client);
        welcome
    }

    async fn client(&mut self, name: &str) -> &mut Client {
        if !self.clients.contains_key(name) {
            self.connect(name, "").await;
        }
        self.clients.get_mut(name).unwrap()
    }

    async fn step(&mut self, step: &Value, at: &str) {
        if let Some(http) = step.get("http") {
            return self.http(http, at).await;
        }
        let name = step["client"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: no client"));
        if let Some(query) = step.get("connect") {
            let welcome = self.connect(name, query.as_str().unwrap()).await;
            if let Some(expected) = step.get("welcome") {
                assert!(
                    matches(expected, &welcome),
                    "{at}: expected {expected}, got {welcome}"
                );
            }
        } else if let Some(frame) = step.get("send") {
            assert_valid(&self.client_frames, frame, &format!("{at}: sent frame"));
            self.client(name).await.send(frame.clone()).await;
        } else if let Some(frame) = step.get("send_invalid") {
            assert!(
                !self.client_frames.is_valid(frame),
                "{at}: the schema accepts {frame}, the server does not"
            );
            self.client(name).await.send(frame.clone()).await;
        } else if let Some(text) = step.get("send_text") {
            self.client(name)
                .await
                .send_raw(Message::text(text.as_str().unwrap().to_owned()))
                .await;
        } else if let Some(expected) = step.get("recv") {
            let frame = self.client(name).await.recv().await;
            assert_valid(
                &self.server_frames,
                &frame,
                &format!("{at}: received frame"),
            );
            assert!(
                matches(expected, &frame),
                "{at}: expected {expected}, got {frame}"
            );
        } else if step.get("silent").is_some() {
            self.client(name)
                .await
                .expect_silence(Duration::from_millis(200))
                .await;
        } else {
            panic!("{at}: unknown step {step}");
        }
    }

    async fn http(&mut self, http: &Value, at: &str) {
        let method = http["method"].as_str().unwrap().parse().unwrap();
        let mut request = self
            .server
            .http
            .request(method, self.server.url(http["path"].as_str().unwrap()));
        if let Some(body) = http.get("body") {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            http["status"].as_u64().unwrap() as u16,
            "{at}"
        );
        let body: Value = response.json().await.unwrap();
        if let Some(expected) = http.get("response") {
            assert!(
                matches(expected, &body),
                "{at}: expected {expected}, got {body}"
            );
        }
    }
}

#[tokio::test]
async fn every_example_holds_in_both_encodings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples missing");
    for file in files {
        let example: Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let title = example["title"].as_str().unwrap();
        for default in [Enc::Json, Enc::Msgpack] {
            let encodings = example
                .get("encodings")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                if v == "json" { Enc::Json } else { Enc::Msgpack },
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut run = Run {
                clients: HashMap::new(),
                server: TestServer::start(),
                encodings,
                default,
                client_frames: schema("ClientFrame"),
                server_frames: schema("ServerFrame"),
            };
            for (i, step) in example["steps"].as_array().unwrap().iter().enumerate() {
                let at = format!(
                    "{} ({title}), {default:?}, step {i}",
                    file.file_name().unwrap().to_string_lossy()
                );
                run.step(step, &at).await;
            }
        }
    }
}
