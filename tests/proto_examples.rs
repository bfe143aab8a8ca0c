//! Replays every transcript in `proto/examples/` against a real server, once with JSON and once
//! with MessagePack clients, and checks every frame against `proto/crier-v1.schema.json`.
//!
//! Steps name a client (connected when first named, or by `connect` with a query string and an
//! optional expected `welcome`) or make an `http` request. Client steps: `send` (a valid client
//! frame), `send_invalid` (a frame the schema must reject), `send_text` (raw text), `recv` (the
//! next frame), `recv_unordered` (the next frames, in any order), `silent` (nothing arrives),
//! `close` (the client goes away). In expected values the string "*" matches anything and
//! "$name" matches anything the first time and the same value afterwards; "$name" in a frame to
//! send stands for that value.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn schema(definition: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/crier-v1.schema.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
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

/// Values captured by "$name" placeholders.
#[derive(Default)]
struct Vars(HashMap<String, Value>);

impl Vars {
    /// `expected` matches `actual` where equal, where `expected` is "*" or a "$name" (see the
    /// module docs), and object by object with exactly the same keys.
    fn matches(&mut self, expected: &Value, actual: &Value) -> bool {
        match (expected, actual) {
            (Value::String(s), _) if s == "*" => true,
            (Value::String(s), _) if s.starts_with('$') => match self.0.get(s) {
                Some(known) => known == actual,
                None => {
                    self.0.insert(s.clone(), actual.clone());
                    true
                }
            },
            (Value::Object(e), Value::Object(a)) => {
                e.len() == a.len()
                    && e.iter()
                        .all(|(k, v)| a.get(k).is_some_and(|av| self.matches(v, av)))
            }
            (Value::Array(e), Value::Array(a)) => {
                e.len() == a.len() && e.iter().zip(a).all(|(e, a)| self.matches(e, a))
            }
            (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
            _ => expected == actual,
        }
    }

    /// `frame` with every "$name" string replaced by its captured value.
    fn substitute(&self, frame: &Value) -> Value {
        match frame {
            Value::String(s) if s.starts_with('$') => self
                .0
                .get(s)
                .cloned()
                .unwrap_or_else(|| panic!("{s} used before it was captured")),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.substitute(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.substitute(v)).collect()),
            other => other.clone(),
        }
    }
}

/// Fields drop in order: clients go before the server, which then shuts down at once.
struct Run {
    clients: HashMap<String, Client>,
    server: TestServer,
    encodings: HashMap<String, Enc>,
    default: Enc,
    vars: Vars,
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

    async fn received(&mut self, name: &str, at: &str) -> Value {
        let frame = self.client(name).await.recv_exact().await;
        assert_valid(
            &self.server_frames,
            &frame,
            &format!("{at}: received frame"),
        );
        frame
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
                    self.vars.matches(expected, &welcome),
                    "{at}: expected {expected}, got {welcome}"
                );
            }
        } else if let Some(frame) = step.get("send") {
            let frame = self.vars.substitute(frame);
            assert_valid(&self.client_frames, &frame, &format!("{at}: sent frame"));
            self.client(name).await.send(frame).await;
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
            let frame = self.received(name, at).await;
            assert!(
                self.vars.matches(expected, &frame),
                "{at}: expected {expected}, got {frame}"
            );
        } else if let Some(expected) = step.get("recv_unordered") {
            let mut wanted = expected.as_array().unwrap().clone();
            while !wanted.is_empty() {
                let frame = self.received(name, at).await;
                let position = wanted.iter().position(|w| self.vars.matches(w, &frame));
                let position = position.unwrap_or_else(|| {
                    panic!("{at}: unexpected {frame}, wanted one of {wanted:?}")
                });
                wanted.remove(position);
            }
        } else if step.get("silent").is_some() {
            self.client(name)
                .await
                .expect_silence(Duration::from_millis(200))
                .await;
        } else if step.get("close").is_some() {
            let mut client = self
                .clients
                .remove(name)
                .unwrap_or_else(|| panic!("{at}: {name} is not connected"));
            client.ws.close(None).await.unwrap();
            while let Some(Ok(_)) = client.ws.next().await {}
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
                self.vars.matches(expected, &body),
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
    assert!(files.len() >= 12, "examples missing");
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
                vars: Vars::default(),
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
