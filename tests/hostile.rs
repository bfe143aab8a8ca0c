//! Hostile input, table-driven: every row sends one kind of bad input over a real socket and
//! asserts its exact outcome (the `error` frame's code and id, the close code, or the HTTP status
//! and error code). Meanwhile, on each server, a bystander subscribed to another topic must
//! receive every message of a steady publisher exactly once and in order, and after every row the
//! broker must still be up (healthz, a fresh client connects and is answered), back to its
//! baseline of connections, and bounded (`crier_buffered_bytes`).

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use crier::SlowConsumerPolicy;
use futures_util::{FutureExt, SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data as OpData, OpCode};

/// The open server's limits, small so that floods reach them quickly.
const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The largest WebSocket message the open server accepts (data limit plus the envelope).
const MAX_FRAME_BYTES: usize = MAX_MESSAGE_BYTES + 4096;
const MAX_BUFFERED_BYTES: usize = 64 * 1024;
const MAX_SUBSCRIPTIONS: usize = 10_000;
const MAX_BAD_FRAMES: usize = 5;
/// actix-http measures it from a clock it updates every 500 ms, so a connection gets between
/// this minus 500 ms and this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Short, so that the connections' heartbeat (a quarter of it) notices a finished close
/// quickly: a closed connection stays listed until its next heartbeat.
const PING_INTERVAL: Duration = Duration::from_millis(100);
const AUTH_TIMEOUT: Duration = Duration::from_millis(1000);

const SECRET: &str = "the hostile suite's HS256 secret, long enough";
const API_KEY: &str = "hostile-suite-api-key";

/// A 2048-bit RSA key made for this test only (`openssl genpkey -algorithm RSA`): the server
/// trusts its public half with `--jwt-public-key`.
const RSA_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQC4vq4UVXVeizFk
hmGzW8F7UxFykQQXW38MqGfrnDD0IrIrdlNmxTYLskAtK6cXBCshy/Tx+xXpwkah
jKYMbtfnxI1xH76BE53ZAyo/LTJ2kYUkytDPVeZWWD+pzUpP9zmxzM8+vUFJ2KJ8
Qs2Z1muNkkR8wsFYi9KZHUFwtoMDLoOTrVs9LjaQSxk9eq9G1kaNb7RuFhx110xm
ueEcyuOkp+dBfurh4wmSQ+YB+zlcAM8urEezPQHSnr2y0DQKeEUy/IZPY3IbqyxX
QnKTrgsSSvcu2OXlDjmbhBNvCWOP6vQmYIjqLDktBBoCoWHv01ovlx0P0j2uYsJ0
kSDBv7RLAgMBAAECggEALlJ9UpLk9XpAPbzmJXNFzbbT4p6S4IpsDk/xkqWcrrI+
a2BlZBjhxsgAiHLwF/jPGc/KkJwM8Apq7FnYTrjCQRZLAsjbWwEArKe7AZFDHHC7
ajDCb6JRuWeyOtDDJ87M9BRvCIOqqan8f9y+MasOV7aLnp60nQ+eFA8+V9Ujf3nO
HGaH+zeNu85Ahg5Z6Bg5V3ESIG83SPhG6jjuQ8LVZAD75nbfPO1lE6+OZc+YQ+Qx
IeJ2pQSCHQ0jb+s5/Hdk795qkHg1hcise3S1WVUq2zv5L7DVhQY3EcedF5gBrmML
YTSQHk2tcqq7AKi9E9KITLFJDVUVBgrVE0+6DyDIIQKBgQDwrl+DKTwiOj4rRTni
tQvuqB6598ckKEyo5rR4u7P+06q6dmKMhGwuzYY2H2XhsqMxrqvMGO/gOdFdOqH6
rtkCCSVIp1CAjULhgiZxr096CV7ynAF1VXuDPvsOEoujH53hSyKB4qE8fI4Z4Xff
EM01GUuOrilBxue1VQZzud3sawKBgQDEgONfPIcvif+evRAnlQlcZT5iR5z8TcQ4
Uz31k1JvFtq7R1cjBT0udP+VnQYV6z3ddzjA1+fV1foCsQR/W82abqet92u4T9Dw
dxKA3zhnMwTMHPiuhy4iNNRgxGSeYoiarVEPT80Ln8PwY4hAIVtv9qcx9TqeHg5F
Fo5G0etPoQKBgQDbtiMlBhiKGmc0cw6jwaix5jGejO3zOQK6UVlAugFXyHybmYTf
R+fGVgKGF+WWws+thAn62GzqYX2ZwPOrd8BM1nJ9v5eCsvHyETDtKR/BhRpzGS1P
ooiNSIpAz3c/o5Yp28AVmACeygmi4KvgK2NZbM0H5D9vd5eAdqzcKjnIHwKBgQCC
sgsIe9SaLNnEdZE6EmlQd9I/QcxLD1oz8EGkhWDtnDDNIQz2sPRZYt3fX7n9eCIE
m9g2gyOiWRhZE+2e26trTK/gCFEwHH4mgbvf1RfJo+hL7fUE98oaXDLpTZZytayP
3Diuy2/gjFmhGEI2DTmoxU+87ZMYOXtaPj9RISu2IQKBgAJy7/NMO2MfeAT2xVKh
CucuzSV6Jzfq6BVdgWHLY9sHqfe/a7xbnElTST8vfrmnaKitN9ao+eavk4NmY+e0
t/RBKpZoFaIbCHlrRmwS1Bo1lx5tgUUwU1b/+K/3wQw1E7NzOa/RJDGhDRtbKwDL
zzXiNlkHV229oePRCLm2JqHa
-----END PRIVATE KEY-----
";

const RSA_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAuL6uFFV1XosxZIZhs1vB
e1MRcpEEF1t/DKhn65ww9CKyK3ZTZsU2C7JALSunFwQrIcv08fsV6cJGoYymDG7X
58SNcR++gROd2QMqPy0ydpGFJMrQz1XmVlg/qc1KT/c5sczPPr1BSdiifELNmdZr
jZJEfMLBWIvSmR1BcLaDAy6Dk61bPS42kEsZPXqvRtZGjW+0bhYcdddMZrnhHMrj
pKfnQX7q4eMJkkPmAfs5XADPLqxHsz0B0p69stA0CnhFMvyGT2NyG6ssV0Jyk64L
Ekr3Ltjl5Q45m4QTbwljj+r0JmCI6iw5LQQaAqFh79NaL5cdD9I9rmLCdJEgwb+0
SwIDAQAB
-----END PUBLIC KEY-----
";

/// The topic the bystander reads and the steady publisher writes; no row touches it.
const FEED: &str = "bystander.feed";
/// How often the steady publisher publishes.
const PACE: Duration = Duration::from_millis(3);

// ---------------------------------------------------------------------------------------------
// The table's vocabulary.

/// Which server a row runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No credentials configured; small limits (see the constants above), `--slow-consumer
    /// disconnect`.
    Open,
    /// `--jwt-secret` (HS256) and an API key.
    Secret,
    /// `--jwt-public-key` (RS256) and an API key.
    PublicKey,
}

enum Input {
    /// A fresh WebSocket connection (opened with this query string), then these messages.
    Ws {
        query: String,
        messages: Vec<Message>,
    },
    /// A fresh connection whose handshake is done by hand, then these raw bytes: frames a
    /// WebSocket library would refuse to send.
    RawFrames(Vec<Vec<u8>>),
    /// A WebSocket upgrade request that should be refused.
    Upgrade {
        query: String,
        headers: Vec<(&'static str, String)>,
    },
    /// An HTTP request.
    Http {
        method: &'static str,
        path: String,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// A plain TCP connection that sends these bytes (perhaps none) and then waits.
    Tcp(Vec<u8>),
    /// WebSocket pings sent as fast as possible, each with a payload of this many bytes; the
    /// client reads the answers, or reads nothing at all (with a tiny receive buffer).
    PingFlood {
        pings: usize,
        payload: usize,
        reads: bool,
    },
    /// Connections opened and closed (half with a close handshake, half by dropping the socket),
    /// `parallel` at a time.
    ConnectionChurn { connections: usize, parallel: usize },
    /// A subscriber (with a tiny receive buffer) that never reads while its topic is flooded.
    NeverReads,
}

enum Outcome {
    /// These frames come back in order (each compared on the fields given; `"id": null` means no
    /// id), answered in the connection's encoding, and then the connection is still open.
    Replies(Vec<Value>),
    /// These error frames (by code) come back, then the close frame with this code.
    ErrorsThenClose {
        codes: Vec<&'static str>,
        close: u16,
    },
    /// The connection is closed with this code, nothing sent before it.
    Close(u16),
    /// The HTTP answer: status and `error.code` of the JSON body.
    Http { status: u16, code: &'static str },
    /// A publish accepted over HTTP: status 200 and this seq.
    Published { seq: u64 },
    /// A batch accepted over HTTP: status 200 and these seqs.
    PublishedBatch { seqs: Vec<u64> },
    /// The server answers with this HTTP status and closes the socket, no sooner than `after`
    /// and no later than `within` after the bytes were sent.
    AnswersThenCloses {
        status: u16,
        after: Duration,
        within: Duration,
    },
    /// Every ping is answered with its pong, in order.
    Pongs,
    /// Closed as a slow consumer (counted under `slow_consumer`), and gone from
    /// `/api/connections` within this long of the close.
    SlowConsumer { gone_within: Duration },
    /// Every connection was accepted and is gone again.
    Churned,
}

/// What else must hold after the outcome.
enum Check {
    /// The row's connection has this many subscriptions.
    Subscriptions(usize),
    /// `/api/topics` lists no topic starting with this.
    NoTopicsStartingWith(&'static str),
    /// A publish with an API key to this topic now gets this seq (a refused one consumed none).
    NextSeq(&'static str, u64),
    /// The topic's history, read over HTTP (in JSON), ends with this data.
    LastInHistory(String, Value),
}

struct Case {
    name: &'static str,
    kind: Kind,
    enc: Enc,
    input: Input,
    expect: Outcome,
    then: Vec<Check>,
}

fn case(name: &'static str, kind: Kind, enc: Enc, input: Input, expect: Outcome) -> Case {
    Case {
        name,
        kind,
        enc,
        input,
        expect,
        then: Vec::new(),
    }
}

impl Case {
    fn then(mut self, check: Check) -> Case {
        self.then.push(check);
        self
    }
}

fn ws(messages: Vec<Message>) -> Input {
    ws_with("", messages)
}

fn ws_with(query: &str, messages: Vec<Message>) -> Input {
    Input::Ws {
        query: query.to_owned(),
        messages,
    }
}

fn text(s: impl Into<String>) -> Message {
    Message::text(s.into())
}

fn bin(bytes: impl AsRef<[u8]>) -> Message {
    Message::binary(bytes.as_ref().to_vec())
}

/// A MessagePack frame built from JSON (maps with string keys, as the protocol has them).
fn mp(frame: Value) -> Message {
    bin(rmp_serde::to_vec_named(&frame).unwrap())
}

/// A MessagePack frame with these fields and `data` given as raw bytes.
fn mp_with_raw_data(fields: &[(&str, Value)], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_map_len(&mut out, fields.len() as u32 + 1).unwrap();
    for (key, value) in fields {
        rmp::encode::write_str(&mut out, key).unwrap();
        out.extend(rmp_serde::to_vec_named(value).unwrap());
    }
    rmp::encode::write_str(&mut out, "data").unwrap();
    out.extend_from_slice(data);
    out
}

fn error(code: &str, id: Value) -> Value {
    json!({"op": "error", "code": code, "id": id})
}

fn errors(code: &str, id: Value) -> Outcome {
    Outcome::Replies(vec![error(code, id)])
}

fn reply(frame: Value) -> Outcome {
    Outcome::Replies(vec![frame])
}

fn upgrade(query: &str) -> Input {
    Input::Upgrade {
        query: query.to_owned(),
        headers: Vec::new(),
    }
}

fn upgrade_with(query: &str, headers: Vec<(&'static str, String)>) -> Input {
    Input::Upgrade {
        query: query.to_owned(),
        headers,
    }
}

fn http(
    method: &'static str,
    path: &str,
    content_type: &str,
    bearer: Option<&str>,
    body: impl Into<Vec<u8>>,
) -> Input {
    let mut headers = vec![("content-type", content_type.to_owned())];
    if let Some(token) = bearer {
        headers.push(("authorization", format!("Bearer {token}")));
    }
    Input::Http {
        method,
        path: path.to_owned(),
        headers,
        body: body.into(),
    }
}

fn http_status(status: u16, code: &'static str) -> Outcome {
    Outcome::Http { status, code }
}

/// JSON arrays nested `depth` deep around `0`.
fn json_nested(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

/// MessagePack arrays nested `depth` deep around `0`.
fn msgpack_nested(depth: usize) -> Vec<u8> {
    let mut bytes = vec![0x91; depth];
    bytes.push(0x00);
    bytes
}

/// MessagePack maps nested `depth` deep (`{"k": {"k": ...}}`) around the string `"leaf"`.
fn msgpack_nested_maps(depth: usize) -> Vec<u8> {
    let mut bytes = [0x81, 0xa1, b'k'].repeat(depth);
    bytes.extend([0xa4, b'l', b'e', b'a', b'f']);
    bytes
}

fn json_nested_maps_value(depth: usize) -> Value {
    (0..depth).fold(json!("leaf"), |inner, _| json!({"k": inner}))
}

fn json_nested_value(depth: usize) -> Value {
    (0..depth).fold(json!(0), |inner, _| json!([inner]))
}

/// A client frame as it goes on the wire: `first` is the FIN/RSV/opcode byte.
fn client_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        out.extend(key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend(payload);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tokens.

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(subscribe: &[&str], publish: &[&str], exp: u64) -> Value {
    json!({
        "sub": "mallory",
        "exp": exp,
        "crier": {"subscribe": subscribe, "publish": publish},
    })
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

fn rs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// An unsigned token: `alg: none` and an empty signature.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// The grants of the tokens rows use: chat.* to read, chat.room1 to write.
fn chat_claims(exp: u64) -> Value {
    claims(&["chat.*"], &["chat.room1"], exp)
}

fn hour() -> u64 {
    now() + 3600
}

// ---------------------------------------------------------------------------------------------
// The table.

fn cases() -> Vec<Case> {
    use Enc::{Json, Msgpack};
    use Kind::{Open, PublicKey, Secret};
    let null = Value::Null;
    let long_id = "i".repeat(16 * 1024);
    let topic_255 = "t".repeat(255);
    let topic_256 = "t".repeat(256);

    let chat = hs256(SECRET.as_bytes(), &chat_claims(hour()));
    let expired = hs256(SECRET.as_bytes(), &chat_claims(now() - 3600));
    let wrong_signature = hs256(
        b"not the server's secret, but long enough",
        &chat_claims(hour()),
    );
    let alg_none = unsigned(&chat_claims(hour()));
    let not_yet_valid = {
        let mut c = chat_claims(hour());
        c["nbf"] = json!(now() + 600);
        hs256(SECRET.as_bytes(), &c)
    };
    let bad_grant = hs256(SECRET.as_bytes(), &claims(&["chat..x"], &[], hour()));
    let rs_chat = rs256(&chat_claims(hour()));
    let rs_expired = rs256(&chat_claims(now() - 3600));
    // The classic confusion: HS256 with the server's public key as the shared secret.
    let hs_with_public_key = hs256(RSA_PUBLIC_PEM.as_bytes(), &chat_claims(hour()));
    let rs_alg_none = unsigned(&chat_claims(hour()));

    let q = |token: &str| format!("?token={token}");
    let auth =
        |token: &str, id: &str| text(json!({"op": "auth", "token": token, "id": id}).to_string());

    let mut churn = Vec::new();
    for i in 0..1000 {
        for frame in [
            json!({"op": "subscribe", "topic": format!("churn.{i}")}),
            json!({"op": "subscribe", "topic": "churn.same"}),
            json!({"op": "subscribe", "topic": format!("churn.{i}.*")}),
            json!({"op": "unsubscribe", "topic": format!("churn.{i}")}),
            json!({"op": "unsubscribe", "topic": "churn.same"}),
            json!({"op": "unsubscribe", "topic": format!("churn.{i}.*")}),
        ] {
            churn.push(text(frame.to_string()));
        }
    }
    churn.push(text(r#"{"op":"ping","id":"churned"}"#));

    let mut many: Vec<Message> = (0..MAX_SUBSCRIPTIONS)
        .map(|i| text(json!({"op": "subscribe", "topic": format!("many.{i}")}).to_string()))
        .collect();
    many.push(text(
        r#"{"op":"subscribe","topic":"many.over","id":"over"}"#,
    ));

    vec![
        // --- Malformed and wrongly typed JSON frames.
        case("malformed JSON", Open, Json, ws(vec![text(r#"{"op":"ping","id":1"#)]), errors("bad_frame", null.clone())),
        case("a JSON array as the frame", Open, Json, ws(vec![text("[1,2,3]")]), errors("bad_frame", null.clone())),
        case("a JSON string as the frame", Open, Json, ws(vec![text(r#""ping""#)]), errors("bad_frame", null.clone())),
        case("an empty text frame", Open, Json, ws(vec![text("")]), errors("bad_frame", null.clone())),
        case("JSON nested 100,000 deep as the frame", Open, Json, ws(vec![text(json_nested(100_000))]), errors("bad_frame", null.clone())),
        case(
            "JSON nested 100,000 deep in a field Crier ignores",
            Open, Json,
            ws(vec![text(format!(r#"{{"op":"ping","id":"deep","x":{}}}"#, json_nested(100_000)))]),
            reply(json!({"op": "pong", "id": "deep"})),
        ),
        case(
            "JSON nested 100,000 deep inside data",
            Open, Json,
            ws(vec![text(format!(r#"{{"op":"publish","topic":"case.deep","data":{},"id":"p"}}"#, json_nested(100_000)))]),
            errors("bad_frame", json!("p")),
        ).then(Check::NextSeq("case.deep", 1)),
        case(
            "JSON data nested 101 deep",
            Open, Json,
            ws(vec![text(format!(r#"{{"op":"publish","topic":"case.deep101","data":{},"id":"p"}}"#, json_nested(101)))]),
            errors("bad_frame", json!("p")),
        ),
        case(
            "JSON data nested 100 deep (the limit) is accepted",
            Open, Json,
            ws(vec![text(format!(r#"{{"op":"publish","topic":"case.deep100","data":{},"id":"p"}}"#, json_nested(100)))]),
            reply(json!({"op": "ack", "id": "p", "seq": 1})),
        ).then(Check::LastInHistory("case.deep100".into(), json_nested_value(100))),
        case("wrong type: topic is a number", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":7,"id":9}"#)]), errors("bad_frame", json!(9))),
        case("wrong type: op is a number", Open, Json, ws(vec![text(r#"{"op":7,"id":3}"#)]), errors("bad_frame", json!(3))),
        case("wrong type: id is an object", Open, Json, ws(vec![text(r#"{"op":"ping","id":{"n":1}}"#)]), errors("bad_frame", null.clone())),
        case("wrong type: rewind is a string", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"t","rewind":"ten","id":4}"#)]), errors("bad_frame", json!(4))),
        case("wrong type: since is a number", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"t","since":5,"id":5}"#)]), errors("bad_frame", json!(5))),
        case("wrong type: token is a number", Open, Json, ws(vec![text(r#"{"op":"auth","token":5,"id":6}"#)]), errors("bad_frame", json!(6))),
        case("publish without data", Open, Json, ws(vec![text(r#"{"op":"publish","topic":"t","id":7}"#)]), errors("bad_frame", json!(7))),
        // --- Ids.
        case("id past u64", Open, Json, ws(vec![text(r#"{"op":"ping","id":18446744073709551616}"#)]), errors("bad_frame", null.clone())),
        case("id 1e300", Open, Json, ws(vec![text(r#"{"op":"ping","id":1e300}"#)]), errors("bad_frame", null.clone())),
        case("negative id", Open, Json, ws(vec![text(r#"{"op":"ping","id":-1}"#)]), errors("bad_frame", null.clone())),
        case("the largest u64 id", Open, Json, ws(vec![text(r#"{"op":"ping","id":18446744073709551615}"#)]), reply(json!({"op": "pong", "id": u64::MAX}))),
        case("a 16 KiB string id", Open, Json, ws(vec![text(json!({"op": "ping", "id": long_id}).to_string())]), reply(json!({"op": "pong", "id": long_id}))),
        case("a 16 KiB string id on an unknown op", Open, Json, ws(vec![text(json!({"op": "shout", "id": long_id}).to_string())]), errors("unknown_op", json!(long_id))),
        // --- Ops.
        case("unknown op", Open, Json, ws(vec![text(r#"{"op":"yell","id":1}"#)]), errors("unknown_op", json!(1))),
        case("empty op", Open, Json, ws(vec![text(r#"{"op":"","id":2}"#)]), errors("unknown_op", json!(2))),
        case("a 10,000-byte op", Open, Json, ws(vec![text(json!({"op": "x".repeat(10_000), "id": 3}).to_string())]), errors("unknown_op", json!(3))),
        // --- Topics.
        case("topic with a space", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"a b","id":1}"#)]), errors("invalid_topic", json!(1))),
        case("topic with non-ASCII letters", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"naïve.topic","id":1}"#)]), errors("invalid_topic", json!(1))),
        case("topic with a NUL", Open, Json, ws(vec![text(r#"{"op":"publish","topic":"a\u0000b","data":1,"id":1}"#)]), errors("invalid_topic", json!(1))),
        case("topic with a slash", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"a/b","id":1}"#)]), errors("invalid_topic", json!(1))),
        case("topic with an empty segment", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"a..b","id":1}"#)]), errors("invalid_topic", json!(1))),
        case("empty topic", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"","id":1}"#)]), errors("invalid_topic", json!(1))),
        case("256-byte topic, subscribe", Open, Json, ws(vec![text(json!({"op": "subscribe", "topic": topic_256, "id": 1}).to_string())]), errors("invalid_topic", json!(1))),
        case("256-byte topic, publish", Open, Json, ws(vec![text(json!({"op": "publish", "topic": topic_256, "data": 1, "id": 1}).to_string())]), errors("invalid_topic", json!(1))),
        case("255-byte topic (the limit) is accepted", Open, Json, ws(vec![text(json!({"op": "subscribe", "topic": topic_255, "id": 1}).to_string())]), reply(json!({"op": "ack", "id": 1, "seq": 0}))),
        case("a 200 KiB topic", Open, Json, ws(vec![text(json!({"op": "subscribe", "topic": "t".repeat(200 * 1024), "id": 1}).to_string())]), errors("invalid_topic", json!(1))),
        case("pattern in publish: *", Open, Json, ws(vec![text(r#"{"op":"publish","topic":"a.*","data":1,"id":1}"#)]), errors("invalid_topic", json!(1))),
        case("pattern in publish: >", Open, Json, ws(vec![text(r#"{"op":"publish","topic":"a.>","data":1,"id":1}"#)]), errors("invalid_topic", json!(1))),
        case("'>' not last in a pattern", Open, Json, ws(vec![text(r#"{"op":"subscribe","topic":"a.>.b","id":1}"#)]), errors("invalid_topic", json!(1))),
        // --- MessagePack.
        case("invalid MessagePack: a truncated map", Open, Msgpack, ws(vec![bin([0x82, 0xa2, b'o', b'p'])]), errors("bad_frame", null.clone())),
        case("invalid MessagePack: a map claiming 2^32-1 entries", Open, Msgpack, ws(vec![bin([0xdf, 0xff, 0xff, 0xff, 0xff, 0xa2, b'o', b'p'])]), errors("bad_frame", null.clone())),
        case(
            "invalid MessagePack: bytes after the map",
            Open, Msgpack,
            ws(vec![bin([rmp_serde::to_vec_named(&json!({"op": "ping", "id": 1})).unwrap(), vec![0x00]].concat())]),
            errors("bad_frame", json!(1)),
        ),
        case(
            "invalid MessagePack: data claims an array of 2^32-1 items",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(1))], &[0xdd, 0xff, 0xff, 0xff, 0xff]))]),
            errors("bad_frame", null.clone()),
        ),
        case("MessagePack that is not a map: an array", Open, Msgpack, ws(vec![bin([0x93, 1, 2, 3])]), errors("bad_frame", null.clone())),
        case("MessagePack that is not a map: nil", Open, Msgpack, ws(vec![bin([0xc0])]), errors("bad_frame", null.clone())),
        case("MessagePack that is not a map: a string", Open, Msgpack, ws(vec![bin([0xa4, b'p', b'i', b'n', b'g'])]), errors("bad_frame", null.clone())),
        case("an empty binary frame", Open, Msgpack, ws(vec![bin(Vec::new())]), errors("bad_frame", null.clone())),
        case("reserved byte 0xc1 as the frame", Open, Msgpack, ws(vec![bin([0xc1])]), errors("bad_frame", null.clone())),
        case(
            "reserved byte 0xc1 as data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("case.c1")), ("id", json!(2))], &[0xc1]))]),
            errors("bad_frame", null.clone()),
        ).then(Check::NextSeq("case.c1", 1)),
        case(
            "reserved byte 0xc1 deep inside data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(2))], &[0x92, 0x01, 0x81, 0xa1, b'k', 0xc1]))]),
            errors("bad_frame", null.clone()),
        ),
        case(
            "extension type fixext1 in data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("case.ext")), ("id", json!(3))], &[0xd4, 0x01, 0x00]))]),
            errors("bad_frame", json!(3)),
        ).then(Check::NextSeq("case.ext", 1)),
        case(
            "extension type ext8 in data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(3))], &[0xc7, 0x02, 0x05, 0xaa, 0xbb]))]),
            errors("bad_frame", json!(3)),
        ),
        case(
            "a timestamp (extension type -1) in data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(3))], &[0xd6, 0xff, 0x65, 0x00, 0x00, 0x00]))]),
            errors("bad_frame", json!(3)),
        ),
        case(
            "a string that is not UTF-8 in data",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(4))], &[0xa2, 0xff, 0xfe]))]),
            errors("bad_frame", json!(4)),
        ),
        case(
            "a topic that is not UTF-8",
            Open, Msgpack,
            ws(vec![bin([0x83, 0xa2, b'o', b'p', 0xa9, b's', b'u', b'b', b's', b'c', b'r', b'i', b'b', b'e', 0xa5, b't', b'o', b'p', b'i', b'c', 0xa2, 0xc3, 0x28, 0xa2, b'i', b'd', 0x05])]),
            errors("bad_frame", json!(5)),
        ),
        case("wrong type: topic is an array", Open, Msgpack, ws(vec![mp(json!({"op": "subscribe", "topic": ["a"], "id": 5}))]), errors("bad_frame", json!(5))),
        case("wrong type: data is missing and id is a map", Open, Msgpack, ws(vec![mp(json!({"op": "publish", "topic": "t", "id": {"x": 1}}))]), errors("bad_frame", null.clone())),
        case(
            "MessagePack data nested 101 deep",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("t")), ("id", json!(6))], &msgpack_nested(101)))]),
            errors("bad_frame", json!(6)),
        ),
        // Data nested up to 100 levels is valid in either encoding; the frame's own map is not
        // part of the data.
        case(
            "MessagePack data nested 100 deep (the limit) is accepted",
            Open, Msgpack,
            ws(vec![bin(mp_with_raw_data(&[("op", json!("publish")), ("topic", json!("case.mpdeep100")), ("id", json!(6))], &msgpack_nested(100)))]),
            reply(json!({"op": "ack", "id": 6, "seq": 1})),
        ),
        case("a text frame on a MessagePack connection is read as JSON", Open, Msgpack, ws(vec![text(r#"{"op":"ping","id":5}"#)]), reply(json!({"op": "pong", "id": 5}))),
        case("a text frame on a MessagePack connection that is not JSON", Open, Msgpack, ws(vec![text("not json")]), errors("bad_frame", null.clone())),
        case("a binary frame on a JSON connection is read as MessagePack", Open, Json, ws(vec![mp(json!({"op": "ping", "id": 5}))]), reply(json!({"op": "pong", "id": 5}))),
        // --- WebSocket framing.
        case(
            "invalid UTF-8 in a text frame",
            Open, Json,
            ws(vec![Message::Frame(Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(OpData::Text), true))]),
            Outcome::Close(1007),
        ),
        case(
            "invalid UTF-8 split across fragments",
            Open, Json,
            ws(vec![
                Message::Frame(Frame::message(vec![b'{', b'"', 0xe2, 0x82], OpCode::Data(OpData::Text), false)),
                Message::Frame(Frame::message(vec![b'"', b'}'], OpCode::Data(OpData::Continue), true)),
            ]),
            Outcome::Close(1007),
        ),
        case("an oversized text frame", Open, Json, ws(vec![text("x".repeat(MAX_FRAME_BYTES + 1))]), Outcome::Close(1009)),
        case("an oversized binary frame", Open, Msgpack, ws(vec![bin(vec![0x80; MAX_FRAME_BYTES + 1])]), Outcome::Close(1009)),
        case(
            "fragments exceeding the limit in total",
            Open, Json,
            ws(vec![
                Message::Frame(Frame::message(vec![b' '; 100_000], OpCode::Data(OpData::Text), false)),
                Message::Frame(Frame::message(vec![b' '; 100_000], OpCode::Data(OpData::Continue), false)),
                Message::Frame(Frame::message(vec![b' '; 100_000], OpCode::Data(OpData::Continue), true)),
            ]),
            Outcome::Close(1009),
        ),
        case(
            "fragments within the limit are joined",
            Open, Json,
            ws(vec![
                Message::Frame(Frame::message(b"{\"op\":".to_vec(), OpCode::Data(OpData::Text), false)),
                Message::Frame(Frame::message(vec![b' '; 100_000], OpCode::Data(OpData::Continue), false)),
                Message::Frame(Frame::message(b"\"ping\",\"id\":\"joined\"}".to_vec(), OpCode::Data(OpData::Continue), true)),
            ]),
            reply(json!({"op": "pong", "id": "joined"})),
        ),
        case(
            "a continuation with nothing to continue",
            Open, Json,
            ws(vec![Message::Frame(Frame::message(b"{}".to_vec(), OpCode::Data(OpData::Continue), true))]),
            Outcome::Close(1002),
        ),
        case("an unmasked client frame", Open, Json, Input::RawFrames(vec![client_frame(0x81, br#"{"op":"ping"}"#, false)]), Outcome::Close(1002)),
        case("a reserved opcode (0x3)", Open, Json, Input::RawFrames(vec![client_frame(0x83, b"x", true)]), Outcome::Close(1002)),
        // RFC 6455 5.2: reserved bits without an extension break the protocol (1002); 1007 is
        // for text that is not UTF-8.
        case("RSV1 set without an extension", Open, Json, Input::RawFrames(vec![client_frame(0xc1, br#"{"op":"ping"}"#, true)]), Outcome::Close(1002)),
        case("a fragmented ping", Open, Json, Input::RawFrames(vec![client_frame(0x09, b"abc", true)]), Outcome::Close(1002)),
        // RFC 6455 5.5: a control frame carries at most 125 bytes, so this breaks the protocol
        // (1002); it is nowhere near max_frame_bytes (1009).
        case("a ping with a 126-byte payload", Open, Json, Input::RawFrames(vec![client_frame(0x89, &[b'p'; 126], true)]), Outcome::Close(1002)),
        case(
            "a frame header announcing 2^63 bytes",
            Open, Json,
            Input::RawFrames(vec![vec![0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]]),
            Outcome::Close(1009),
        ),
        // --- Floods and churn.
        case("ping flood, reading the pongs", Open, Json, Input::PingFlood { pings: 5000, payload: 16, reads: true }, Outcome::Pongs),
        case(
            "ping flood, never reading",
            Open, Json,
            Input::PingFlood { pings: 5000, payload: 125, reads: false },
            Outcome::SlowConsumer { gone_within: Duration::from_millis(2500) },
        ),
        case("subscribe/unsubscribe churn", Open, Json, ws(churn), reply(json!({"op": "pong", "id": "churned"})))
            .then(Check::Subscriptions(0))
            .then(Check::NoTopicsStartingWith("churn.")),
        case("10,000 subscriptions, then one more", Open, Json, ws(many), errors("too_many_subscriptions", json!("over")))
            .then(Check::Subscriptions(MAX_SUBSCRIPTIONS)),
        case("connection churn", Open, Json, Input::ConnectionChurn { connections: 300, parallel: 50 }, Outcome::Churned),
        case(
            "a client that never reads",
            Open, Json,
            Input::NeverReads,
            // Torn down within a second of the close (its socket takes nothing), plus polling.
            Outcome::SlowConsumer { gone_within: Duration::from_millis(2000) },
        ),
        case(
            "bad frames up to --max-bad-frames",
            Open, Json,
            ws(vec![text("not json"); MAX_BAD_FRAMES]),
            Outcome::ErrorsThenClose { codes: vec!["bad_frame"; MAX_BAD_FRAMES], close: 1008 },
        ),
        case(
            "bad frames of every kind up to --max-bad-frames",
            Open, Msgpack,
            ws(vec![
                mp(json!({"op": "yell"})),
                mp(json!({"op": "subscribe", "topic": "a..b"})),
                bin([0xc1]),
                text(r#"{"op":"publish","topic":"a.*","data":1}"#),
                mp(json!({"op": "subscribe", "topic": 5})),
            ]),
            Outcome::ErrorsThenClose {
                codes: vec!["unknown_op", "invalid_topic", "bad_frame", "invalid_topic", "bad_frame"],
                close: 1008,
            },
        ),
        // --- Handshakes and raw TCP.
        case(
            "a handshake that never finishes",
            Open, Json,
            Input::Tcp(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n".to_vec()),
            Outcome::AnswersThenCloses { status: 408, after: HANDSHAKE_TIMEOUT - Duration::from_millis(600), within: HANDSHAKE_TIMEOUT + Duration::from_millis(1000) },
        ),
        case(
            "a connection that sends nothing",
            Open, Json,
            Input::Tcp(Vec::new()),
            Outcome::AnswersThenCloses { status: 408, after: HANDSHAKE_TIMEOUT - Duration::from_millis(600), within: HANDSHAKE_TIMEOUT + Duration::from_millis(1000) },
        ),
        case(
            "garbage instead of HTTP",
            Open, Json,
            Input::Tcp(b"\x00\x01\x02garbage \xff\xfe not a request\r\n\r\n".to_vec()),
            Outcome::AnswersThenCloses { status: 400, after: Duration::ZERO, within: Duration::from_secs(2) },
        ),
        case(
            "a TLS ClientHello on the plain port",
            Open, Json,
            Input::Tcp(vec![0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, 0x00, 0x00, 0x0d, 0x0a, 0x0d, 0x0a]),
            Outcome::AnswersThenCloses { status: 400, after: Duration::ZERO, within: Duration::from_secs(2) },
        ),
        case("an upgrade offering only unknown subprotocols", Open, Json, upgrade_with("", vec![("sec-websocket-protocol", "chat, superchat".into())]), http_status(400, "bad_request")),
        case("an upgrade with ?encoding=xml", Open, Json, upgrade("?encoding=xml"), http_status(400, "bad_request")),
        case("an upgrade with an invalid ?subscribe topic", Open, Json, upgrade("?subscribe=ok,a..b"), http_status(400, "invalid_topic")),
        case("an upgrade with a 256-byte ?subscribe topic", Open, Json, upgrade(&format!("?subscribe={topic_256}")), http_status(400, "invalid_topic")),
        case("an upgrade from a foreign page", Open, Json, upgrade_with("", vec![("origin", "https://evil.example".into())]), http_status(403, "origin_not_allowed")),
        case("an upgrade with a bad Sec-WebSocket-Version", Open, Json, upgrade_with("", vec![("sec-websocket-version", "12".into())]), http_status(400, "bad_handshake")),
        // --- HTTP bodies.
        case("HTTP: MessagePack 0xc1", Open, Json, http("POST", "/api/topics/case.http-c1", "application/msgpack", None, [0xc1]), http_status(400, "bad_request"))
            .then(Check::NextSeq("case.http-c1", 1)),
        case("HTTP: MessagePack extension type", Open, Json, http("POST", "/api/topics/t", "application/msgpack", None, [0xd4, 0x01, 0x00]), http_status(400, "bad_request")),
        case("HTTP: MessagePack with trailing bytes", Open, Json, http("POST", "/api/topics/t", "application/msgpack", None, [0x01, 0x02]), http_status(400, "bad_request")),
        case("HTTP: JSON nested 100,000 deep", Open, Json, http("POST", "/api/topics/t", "application/json", None, json_nested(100_000)), http_status(400, "bad_request")),
        case("HTTP: malformed JSON", Open, Json, http("POST", "/api/topics/t", "application/json", None, r#"{"a":"#), http_status(400, "bad_request")),
        case("HTTP: two JSON values", Open, Json, http("POST", "/api/topics/t", "application/json", None, "1 2"), http_status(400, "bad_request")),
        case("HTTP: publish to a pattern", Open, Json, http("POST", "/api/topics/a.*", "application/json", None, "1"), http_status(400, "invalid_topic")),
        case("HTTP: publish to a 256-byte topic", Open, Json, http("POST", &format!("/api/topics/{topic_256}"), "application/json", None, "1"), http_status(400, "invalid_topic")),
        case("HTTP: a body over --max-message-bytes", Open, Json, http("POST", "/api/topics/t", "application/json", None, format!("\"{}\"", "x".repeat(MAX_MESSAGE_BYTES))), http_status(413, "payload_too_large")),
        case("HTTP: an unsupported content type", Open, Json, http("POST", "/api/topics/t", "text/plain", None, "1"), http_status(415, "unsupported_media_type")),
        case("HTTP: a batch that is not an array", Open, Json, http("POST", "/api/publish", "application/json", None, r#"{"topic":"t","data":1}"#), http_status(400, "bad_request")),
        case(
            "HTTP: a batch with one item on a pattern publishes nothing",
            Open, Json,
            http("POST", "/api/publish", "application/json", None, r#"[{"topic":"case.batch","data":1},{"topic":"case.*","data":2}]"#),
            http_status(400, "invalid_topic"),
        ).then(Check::NextSeq("case.batch", 1)),
        case(
            "HTTP: MessagePack nested 100 deep (the limit) is accepted and reads back intact",
            Open, Json,
            http("POST", "/api/topics/case.http-mp100", "application/msgpack", None, msgpack_nested(100)),
            Outcome::Published { seq: 1 },
        ).then(Check::LastInHistory("case.http-mp100".into(), json_nested_value(100))),
        // Read back in JSON: MessagePack data is rendered for JSON readers, at any valid depth.
        case(
            "HTTP: MessagePack nested 60 deep reads back intact",
            Open, Json,
            http("POST", "/api/topics/case.http-mp60", "application/msgpack", None, msgpack_nested(60)),
            Outcome::Published { seq: 1 },
        ).then(Check::LastInHistory("case.http-mp60".into(), json_nested_value(60))),
        case(
            "HTTP: MessagePack maps nested 100 deep around a string read back intact",
            Open, Json,
            http("POST", "/api/topics/case.http-maps100", "application/msgpack", None, msgpack_nested_maps(100)),
            Outcome::Published { seq: 1 },
        ).then(Check::LastInHistory("case.http-maps100".into(), json_nested_maps_value(100))),
        case(
            "HTTP: MessagePack nested 101 deep",
            Open, Json,
            http("POST", "/api/topics/t", "application/msgpack", None, msgpack_nested(101)),
            http_status(400, "bad_request"),
        ),
        // As over WebSocket: the batch's array and item maps are not part of the data.
        case(
            "HTTP: a MessagePack batch item nested 100 deep (the limit) is accepted",
            Open, Json,
            http("POST", "/api/publish", "application/msgpack", None, {
                let mut body = vec![0x91, 0x82];
                body.extend(rmp_serde::to_vec("topic").unwrap());
                body.extend(rmp_serde::to_vec("case.batch-mp100").unwrap());
                body.extend(rmp_serde::to_vec("data").unwrap());
                body.extend(msgpack_nested(100));
                body
            }),
            Outcome::PublishedBatch { seqs: vec![1] },
        ).then(Check::LastInHistory("case.batch-mp100".into(), json_nested_value(100))),
        // --- Tokens (HS256 server).
        case("expired token at the handshake", Secret, Json, upgrade(&q(&expired)), http_status(401, "invalid_token")),
        case("wrongly signed token at the handshake", Secret, Json, upgrade(&q(&wrong_signature)), http_status(401, "invalid_token")),
        case("alg: none token at the handshake", Secret, Json, upgrade(&q(&alg_none)), http_status(401, "invalid_token")),
        case("not-yet-valid (nbf) token at the handshake", Secret, Json, upgrade(&q(&not_yet_valid)), http_status(401, "invalid_token")),
        case("malformed token at the handshake", Secret, Json, upgrade("?token=not.a.jwt"), http_status(401, "invalid_token")),
        case("token granting an invalid pattern", Secret, Json, upgrade(&q(&bad_grant)), http_status(401, "invalid_token")),
        case("expired token in Authorization", Secret, Json, upgrade_with("", vec![("authorization", format!("Bearer {expired}"))]), http_status(401, "invalid_token")),
        case("Authorization that is not Bearer", Secret, Json, upgrade_with("", vec![("authorization", format!("Basic {chat}"))]), http_status(401, "unauthorized")),
        case("?subscribe= without a token", Secret, Json, upgrade("?subscribe=chat.room1"), http_status(401, "unauthorized")),
        case("?subscribe= outside the grants", Secret, Json, upgrade(&format!("?subscribe=notify.user42&token={chat}")), http_status(403, "forbidden")),
        case("subscribe before authenticating", Secret, Json, ws(vec![text(r#"{"op":"subscribe","topic":"chat.room1","id":1}"#)]), errors("unauthorized", json!(1))),
        case("ping before authenticating", Secret, Json, ws(vec![text(r#"{"op":"ping","id":2}"#)]), errors("unauthorized", json!(2))),
        case(
            "auth with an expired token keeps the connection unauthenticated",
            Secret, Json,
            ws(vec![auth(&expired, "a"), text(r#"{"op":"publish","topic":"chat.room1","data":1,"id":"p"}"#)]),
            Outcome::Replies(vec![error("invalid_token", json!("a")), error("unauthorized", json!("p"))]),
        ).then(Check::NextSeq("chat.room1", 1)),
        case("auth with an alg: none token", Secret, Json, ws(vec![auth(&alg_none, "a")]), errors("invalid_token", json!("a"))),
        case("auth with a wrongly signed token", Secret, Json, ws(vec![auth(&wrong_signature, "a")]), errors("invalid_token", json!("a"))),
        case("auth with a 60 KiB token", Secret, Json, ws(vec![auth(&"e".repeat(60 * 1024), "a")]), errors("invalid_token", json!("a"))),
        case("never authenticating", Secret, Json, ws(vec![]), Outcome::Close(4003)),
        case(
            "unauthenticated frames up to --max-bad-frames",
            Secret, Json,
            ws(vec![text(r#"{"op":"ping"}"#); MAX_BAD_FRAMES]),
            Outcome::ErrorsThenClose { codes: vec!["unauthorized"; MAX_BAD_FRAMES], close: 1008 },
        ),
        case("subscribe to a topic outside the grants", Secret, Json, ws_with(&q(&chat), vec![text(r#"{"op":"subscribe","topic":"notify.user42","id":1}"#)]), errors("forbidden", json!(1)))
            .then(Check::Subscriptions(0)),
        case("subscribe to a pattern wider than the grants", Secret, Json, ws_with(&q(&chat), vec![text(r#"{"op":"subscribe","topic":"chat.>","id":1}"#)]), errors("forbidden", json!(1)))
            .then(Check::Subscriptions(0)),
        case("subscribe to everything", Secret, Msgpack, ws_with(&q(&chat), vec![mp(json!({"op": "subscribe", "topic": ">", "id": 1}))]), errors("forbidden", json!(1))),
        case("publish outside the grants", Secret, Json, ws_with(&q(&chat), vec![text(r#"{"op":"publish","topic":"chat.room2","data":1,"id":1}"#)]), errors("forbidden", json!(1)))
            .then(Check::NextSeq("chat.room2", 1)),
        case("HTTP: publish without credentials", Secret, Json, http("POST", "/api/topics/chat.room1", "application/json", None, "1"), http_status(401, "unauthorized")),
        case("HTTP: publish with an expired token", Secret, Json, http("POST", "/api/topics/chat.room1", "application/json", Some(&expired), "1"), http_status(401, "invalid_token")),
        case("HTTP: publish with an alg: none token", Secret, Json, http("POST", "/api/topics/chat.room1", "application/json", Some(&alg_none), "1"), http_status(401, "invalid_token")),
        case("HTTP: publish outside the grants", Secret, Json, http("POST", "/api/topics/chat.room3", "application/json", Some(&chat), "1"), http_status(403, "forbidden"))
            .then(Check::NextSeq("chat.room3", 1)),
        case(
            "HTTP: a batch with one forbidden item publishes nothing",
            Secret, Json,
            http("POST", "/api/publish", "application/json", Some(&chat), r#"[{"topic":"chat.room1","data":1},{"topic":"chat.room4","data":2}]"#),
            http_status(403, "forbidden"),
        ),
        case("HTTP: history outside the grants", Secret, Json, http("GET", "/api/topics/notify.user42/history", "application/json", Some(&chat), ""), http_status(403, "forbidden")),
        case("HTTP: the connection list with a token", Secret, Json, http("GET", "/api/connections", "application/json", Some(&chat), ""), http_status(403, "forbidden")),
        // --- Tokens (RS256 server).
        case("HS256 signed with the public key", PublicKey, Json, upgrade(&q(&hs_with_public_key)), http_status(401, "invalid_token")),
        case("alg: none on the public-key server", PublicKey, Json, upgrade(&q(&rs_alg_none)), http_status(401, "invalid_token")),
        case("expired RS256 token", PublicKey, Json, upgrade(&q(&rs_expired)), http_status(401, "invalid_token")),
        case("HS256 token made with the server's own HS secret", PublicKey, Json, upgrade(&q(&chat)), http_status(401, "invalid_token")),
        case("auth with HS256 signed with the public key", PublicKey, Json, ws(vec![auth(&hs_with_public_key, "a")]), errors("invalid_token", json!("a"))),
        case("HTTP: HS256 signed with the public key", PublicKey, Json, http("POST", "/api/topics/chat.room1", "application/json", Some(&hs_with_public_key), "1"), http_status(401, "invalid_token")),
        case(
            "a valid RS256 token, then a forbidden subscribe",
            PublicKey, Msgpack,
            ws_with(&q(&rs_chat), vec![mp(json!({"op": "subscribe", "topic": "chat.room1", "id": 1})), mp(json!({"op": "subscribe", "topic": "admin.x", "id": 2}))]),
            Outcome::Replies(vec![json!({"op": "ack", "id": 1, "seq": 0}), error("forbidden", json!(2))]),
        ).then(Check::Subscriptions(1)),
    ]
}

// ---------------------------------------------------------------------------------------------
// The servers, their bystanders, and the checks after every row.

struct Env {
    kind: Kind,
    server: TestServer,
    /// The API key, on servers that require credentials.
    api_key: Option<&'static str>,
    /// A valid connection token for the bystander and the probes (`?token=`), if one is needed.
    token_query: String,
    bystander: Option<Bystander>,
    /// Kept for the server's lifetime.
    _key_file: Option<TempFile>,
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Env {
    async fn start(kind: Kind) -> Env {
        let mut key_file = None;
        let server = match kind {
            Kind::Open => TestServer::with(|c| {
                c.max_message_bytes = MAX_MESSAGE_BYTES;
                c.max_buffered_bytes = MAX_BUFFERED_BYTES;
                c.slow_consumer = SlowConsumerPolicy::Disconnect;
                c.max_subscriptions = MAX_SUBSCRIPTIONS;
                c.max_bad_frames = MAX_BAD_FRAMES;
                c.handshake_timeout = HANDSHAKE_TIMEOUT;
                c.ping_interval = PING_INTERVAL;
                c.idle_timeout = Duration::from_secs(30);
            }),
            Kind::Secret => TestServer::with(|c| {
                c.workers = Some(1);
                c.jwt_secret = Some(SECRET.into());
                c.api_keys = vec![API_KEY.into()];
                c.auth_timeout = AUTH_TIMEOUT;
                c.max_bad_frames = MAX_BAD_FRAMES;
                c.ping_interval = PING_INTERVAL;
                c.idle_timeout = Duration::from_secs(30);
            }),
            Kind::PublicKey => {
                let path = std::env::temp_dir()
                    .join(format!("crier-hostile-{}-rsa.pub.pem", std::process::id()));
                std::fs::write(&path, RSA_PUBLIC_PEM).unwrap();
                key_file = Some(TempFile(path.clone()));
                TestServer::with(|c| {
                    c.workers = Some(1);
                    c.jwt_public_key = Some(path);
                    c.api_keys = vec![API_KEY.into()];
                    c.max_bad_frames = MAX_BAD_FRAMES;
                    c.ping_interval = PING_INTERVAL;
                    c.idle_timeout = Duration::from_secs(30);
                })
            }
        };
        let grants = claims(&["bystander.>", "probe.>"], &[], hour());
        let token_query = match kind {
            Kind::Open => String::new(),
            Kind::Secret => format!("token={}", hs256(SECRET.as_bytes(), &grants)),
            Kind::PublicKey => format!("token={}", rs256(&grants)),
        };
        let mut env = Env {
            kind,
            server,
            api_key: (kind != Kind::Open).then_some(API_KEY),
            token_query,
            bystander: None,
            _key_file: key_file,
        };
        env.bystander = Some(Bystander::start(&env).await);
        env
    }

    fn query(&self, query: &str) -> String {
        match (query.is_empty(), self.token_query.is_empty()) {
            (_, true) => query.to_owned(),
            (true, false) => format!("?{}", self.token_query),
            (false, false) => format!("{query}&{}", self.token_query),
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.server.http.request(method, self.server.url(path));
        match self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn admin_get(&self, path: &str) -> Value {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }

    async fn connections(&self) -> Vec<Value> {
        self.admin_get("/api/connections").await["connections"]
            .as_array()
            .unwrap()
            .clone()
    }

    async fn connection(&self, id: &str) -> Option<Value> {
        self.connections().await.into_iter().find(|c| c["id"] == id)
    }

    /// Publishes with the API key (or openly); returns the seq.
    async fn publish(&self, topic: &str, data: Value) -> u64 {
        let response = self
            .request(reqwest::Method::POST, &format!("/api/topics/{topic}"))
            .json(&data)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "publish to {topic}");
        response.json::<Value>().await.unwrap()["seq"]
            .as_u64()
            .unwrap()
    }

    async fn scrape(&self) -> Scrape {
        self.server.scrape().await
    }

    /// After every row: up, answering a fresh client, back to the bystander alone, bounded, and
    /// the bystander has everything published so far.
    async fn still_healthy(&mut self, row: &str) {
        let health = self
            .server
            .http
            .get(self.server.url("/healthz"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{row}: healthz failed: {e}"));
        assert_eq!(health.status(), 200, "{row}: healthz");

        let mut probe = Client::connect_with(&self.server, Enc::Json, &self.query("")).await;
        probe.sync().await;
        let _ = probe.ws.close(None).await;
        drop(probe);

        let bystander_id = self.bystander.as_ref().unwrap().id.clone();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let connections = self.connections().await;
            if connections.len() == 1 && connections[0]["id"] == bystander_id.as_str() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{row}: still connected besides the bystander: {connections:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let scrape = self.scrape().await;
        let buffered = scrape.get("crier_buffered_bytes");
        assert!(
            buffered <= MAX_BUFFERED_BYTES as f64,
            "{row}: {buffered} bytes buffered with only the bystander connected"
        );
        self.bystander.as_mut().unwrap().caught_up(row).await;
    }
}

/// A subscriber on [`FEED`] and a publisher posting to it every [`PACE`] over HTTP.
struct Bystander {
    id: String,
    stop: tokio::sync::watch::Sender<bool>,
    published: tokio::sync::watch::Receiver<u64>,
    received: tokio::sync::watch::Receiver<u64>,
    publisher: tokio::task::JoinHandle<u64>,
    reader: tokio::task::JoinHandle<Vec<u64>>,
}

impl Bystander {
    async fn start(env: &Env) -> Bystander {
        let enc = if env.kind == Kind::Open {
            Enc::Msgpack
        } else {
            Enc::Json
        };
        let mut client =
            Client::connect_with(&env.server, enc, &env.query(&format!("?subscribe={FEED}"))).await;
        let id = client.id.clone();
        let (received_tx, received) = tokio::sync::watch::channel(0);
        let reader = tokio::spawn(async move {
            let mut seqs = Vec::new();
            loop {
                let frame = client.recv().await;
                assert_eq!(frame["op"], "message", "the bystander got {frame}");
                let seq = frame["seq"].as_u64().unwrap();
                seqs.push(seq);
                received_tx.send_replace(seq);
                if frame["data"]["last"] == true {
                    return seqs;
                }
            }
        });

        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (published_tx, published) = tokio::sync::watch::channel(0);
        let http = env.server.http.clone();
        let url = env.server.url(&format!("/api/topics/{FEED}"));
        let api_key = env.api_key;
        let publisher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PACE);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = 0;
            loop {
                tokio::select! {
                    _ = stopped.changed() => return last,
                    _ = tick.tick() => {}
                }
                let mut request = http.post(&url).json(&json!({"n": last + 1}));
                if let Some(key) = api_key {
                    request = request.bearer_auth(key);
                }
                let response = request.send().await.expect("the steady publisher's POST");
                assert_eq!(response.status(), 200, "the steady publisher was refused");
                let body: Value = response.json().await.unwrap();
                let seq = body["seq"].as_u64().unwrap();
                assert_eq!(seq, last + 1, "the feed's seq skipped");
                last = seq;
                published_tx.send_replace(last);
            }
        });
        Bystander {
            id,
            stop,
            published,
            received,
            publisher,
            reader,
        }
    }

    /// Waits until the bystander has received everything published so far.
    async fn caught_up(&mut self, row: &str) {
        let target = *self.published.borrow();
        let wait = self.received.wait_for(|&got| got >= target);
        tokio::time::timeout(PATIENCE, wait)
            .await
            .unwrap_or_else(|_| panic!("{row}: the bystander fell behind (published {target})"))
            .unwrap_or_else(|_| panic!("{row}: the bystander's reader stopped"));
    }

    /// Stops the publisher and checks that every seq arrived exactly once, in order.
    async fn finish(self, env: &Env) -> u64 {
        self.stop.send_replace(true);
        let last = self.publisher.await.expect("the steady publisher failed");
        let end = env.publish(FEED, json!({"last": true})).await;
        assert_eq!(end, last + 1);
        let seqs = self.reader.await.expect("the bystander's reader failed");
        assert!(
            seqs == (1..=end).collect::<Vec<_>>(),
            "{:?}: the bystander did not get every seq exactly once in order: {} frames for {end} seqs",
            env.kind,
            seqs.len()
        );
        end
    }
}

// ---------------------------------------------------------------------------------------------
// Running a row.

/// Reads the next data frame, in the connection's encoding.
async fn next_data_frame(client: &mut Client, row: &str) -> Value {
    let message = client.recv_message().await;
    match (&message, client.enc) {
        (Message::Text(_), Enc::Json) | (Message::Binary(_), Enc::Msgpack) => {}
        _ => panic!("{row}: answered in the wrong encoding: {message:?}"),
    }
    decode(&message).unwrap()
}

/// Whether `actual` has every field of `expected` (a `null` there means the field is absent).
fn matches_fields(actual: &Value, expected: &Value) -> bool {
    expected.as_object().unwrap().iter().all(|(key, want)| {
        let got = actual.get(key).unwrap_or(&Value::Null);
        got == want
    })
}

fn assert_frame(row: &str, actual: &Value, expected: &Value) {
    assert!(
        matches_fields(actual, expected),
        "{row}: expected {expected}, got {}",
        shorten(actual)
    );
    if actual["op"] == "error" {
        let message = actual["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{row}: an error without a message");
    }
}

fn shorten(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 300 {
        text.truncate(300);
        text.push('…');
    }
    text
}

/// The connection still answers: a WebSocket ping gets its pong, and nothing else arrives first.
async fn assert_open(client: &mut Client, row: &str) {
    client
        .ws
        .send(Message::Ping(b"still open?".to_vec().into()))
        .await
        .unwrap();
    loop {
        let next = tokio::time::timeout(PATIENCE, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{row}: no pong"));
        match next {
            Some(Ok(Message::Pong(payload))) if &payload[..] == b"still open?" => return,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("{row}: expected only a pong, got {other:?}"),
        }
    }
}

/// The data frames up to the server's close frame, and the close frame. Does not wait for the
/// socket to end: after the close handshake the HTTP layer lingers up to a second for the client
/// to hang up first.
async fn frames_until_close(client: &mut Client, row: &str) -> (Vec<Value>, Option<CloseFrame>) {
    let mut frames = Vec::new();
    loop {
        let next = tokio::time::timeout(PATIENCE, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("{row}: no close frame came"));
        match next {
            Some(Ok(Message::Close(close))) => return (frames, close),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(message)) => frames.push(decode(&message).unwrap()),
            other => panic!("{row}: the connection ended without a close frame: {other:?}"),
        }
    }
}

async fn send_all(client: &mut Client, messages: Vec<Message>) {
    for message in messages {
        client.ws.feed(message).await.unwrap();
    }
    client.ws.flush().await.unwrap();
}

async fn run(env: &Env, case: Case) {
    let Case {
        name: row,
        enc,
        input,
        expect,
        then,
        ..
    } = case;
    let server = &env.server;
    let mut connection_id = None;
    match input {
        Input::Ws { query, messages } => {
            let mut client = Client::connect_with(server, enc, &query).await;
            connection_id = Some(client.id.clone());
            send_all(&mut client, messages).await;
            match expect {
                Outcome::Replies(frames) => {
                    for expected in &frames {
                        let actual = next_data_frame(&mut client, row).await;
                        assert_frame(row, &actual, expected);
                    }
                    assert_open(&mut client, row).await;
                    run_checks(env, row, &then, connection_id.as_deref()).await;
                    let _ = client.ws.close(None).await;
                    return;
                }
                Outcome::ErrorsThenClose { codes, close } => {
                    let (frames, frame) = frames_until_close(&mut client, row).await;
                    let got: Vec<&str> = frames
                        .iter()
                        .map(|f| f["code"].as_str().unwrap_or("?"))
                        .collect();
                    assert_eq!(got, codes, "{row}: errors before the close");
                    assert!(
                        frames.iter().all(|f| f["op"] == "error"),
                        "{row}: {frames:?}"
                    );
                    assert_eq!(close_code(&frame), close, "{row}: close code");
                }
                Outcome::Close(code) => {
                    let (frames, frame) = frames_until_close(&mut client, row).await;
                    assert!(
                        frames.is_empty(),
                        "{row}: frames before the close: {frames:?}"
                    );
                    assert_eq!(close_code(&frame), code, "{row}: close code ({frame:?})");
                }
                _ => panic!("{row}: this outcome does not apply to WebSocket input"),
            }
        }
        Input::RawFrames(frames) => {
            let Outcome::Close(code) = expect else {
                panic!("{row}: raw frames end in a close")
            };
            let mut raw = RawWs::open(server).await;
            for frame in frames {
                raw.tcp.write_all(&frame).await.unwrap();
            }
            assert_eq!(raw.close_code(row).await, code, "{row}: close code");
        }
        Input::Upgrade { query, headers } => {
            let Outcome::Http { status, code } = expect else {
                panic!("{row}: an upgrade is refused over HTTP")
            };
            let mut request = server
                .http
                .get(server.url(&format!("/ws{query}")))
                .header("connection", "Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
            if !headers
                .iter()
                .any(|(name, _)| *name == "sec-websocket-version")
            {
                request = request.header("sec-websocket-version", "13");
            }
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await.unwrap();
            assert_http(row, response, status, code).await;
        }
        Input::Http {
            method,
            path,
            headers,
            body,
        } => {
            let mut request = server
                .http
                .request(method.parse().unwrap(), server.url(&path))
                .body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await.unwrap();
            match expect {
                Outcome::Http { status, code } => assert_http(row, response, status, code).await,
                Outcome::Published { seq } => {
                    let status = response.status();
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(status, 200, "{row}: {body}");
                    assert_eq!(body["seq"], seq, "{row}: {body}");
                }
                Outcome::PublishedBatch { seqs } => {
                    let status = response.status();
                    let body: Value = response.json().await.unwrap();
                    assert_eq!(status, 200, "{row}: {body}");
                    let got: Vec<u64> = body["results"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r["seq"].as_u64().unwrap())
                        .collect();
                    assert_eq!(got, seqs, "{row}: {body}");
                }
                _ => panic!("{row}: this outcome does not apply to HTTP input"),
            }
        }
        Input::Tcp(bytes) => {
            let Outcome::AnswersThenCloses {
                status,
                after,
                within,
            } = expect
            else {
                panic!("{row}: raw TCP gets an HTTP answer")
            };
            let (answer, closed_after) = tcp_exchange(server, &bytes, within).await;
            let head = String::from_utf8_lossy(&answer);
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status} ")),
                "{row}: expected HTTP {status}, got {head:?}"
            );
            let closed_after =
                closed_after.unwrap_or_else(|| panic!("{row}: not closed within {within:?}"));
            assert!(
                closed_after >= after,
                "{row}: closed after {closed_after:?}, sooner than {after:?}"
            );
        }
        Input::PingFlood {
            pings,
            payload,
            reads,
        } => ping_flood(env, row, pings, payload, reads, expect).await,
        Input::ConnectionChurn {
            connections,
            parallel,
        } => {
            assert!(matches!(expect, Outcome::Churned));
            connection_churn(env, row, connections, parallel).await;
        }
        Input::NeverReads => {
            let Outcome::SlowConsumer { gone_within } = expect else {
                panic!("{row}: a client that never reads is a slow consumer")
            };
            never_reads(env, row, enc, gone_within).await;
        }
    }
    run_checks(env, row, &then, connection_id.as_deref()).await;
}

async fn run_checks(env: &Env, row: &str, checks: &[Check], connection: Option<&str>) {
    for check in checks {
        match check {
            Check::Subscriptions(n) => {
                let id = connection.expect("a connection to check");
                let info = env
                    .connection(id)
                    .await
                    .unwrap_or_else(|| panic!("{row}: the connection is not listed"));
                assert_eq!(info["subscriptions"], *n, "{row}: subscriptions");
            }
            Check::NoTopicsStartingWith(prefix) => {
                let topics = env.admin_get("/api/topics").await;
                let left: Vec<&Value> = topics["topics"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|t| t["name"].as_str().unwrap().starts_with(prefix))
                    .collect();
                assert!(left.is_empty(), "{row}: topics left behind: {left:?}");
            }
            Check::NextSeq(topic, seq) => {
                let got = env.publish(topic, json!("after")).await;
                assert_eq!(
                    got, *seq,
                    "{row}: the refused publish consumed a seq on {topic}"
                );
            }
            Check::LastInHistory(topic, data) => {
                let history = env.admin_get(&format!("/api/topics/{topic}/history")).await;
                let last = history["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .unwrap_or_else(|| panic!("{row}: no history: {history}"));
                assert!(
                    &last["data"] == data,
                    "{row}: history of {topic} ends with {}, not what was published",
                    shorten(&last["data"])
                );
            }
        }
    }
}

async fn assert_http(row: &str, response: reqwest::Response, status: u16, code: &str) {
    let got = response.status().as_u16();
    let www_authenticate = response.headers().get("www-authenticate").cloned();
    let body = response.text().await.unwrap();
    assert_eq!(got, status, "{row}: status ({body})");
    let body: Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("{row}: not a JSON error body: {body:?}"));
    assert_eq!(body["error"]["code"], code, "{row}: {body}");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{row}: no message in {body}"
    );
    if status == 401 {
        assert_eq!(
            www_authenticate.as_ref().map(|v| v.to_str().unwrap()),
            Some("Bearer"),
            "{row}: a 401 names its scheme"
        );
    }
}

/// Sends `bytes` on a fresh TCP connection and reads until the server closes it or `patience`
/// has passed; returns what came back and, if it closed, how long after the bytes went out.
async fn tcp_exchange(
    server: &TestServer,
    bytes: &[u8],
    patience: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let sent = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(sent + patience, tcp.read(&mut buf)).await {
            Err(_) => return (answer, None),
            Ok(Ok(0) | Err(_)) => return (answer, Some(sent.elapsed())),
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
        }
    }
}

/// A WebSocket connection with its handshake done by hand, to send frames no library would.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    async fn open(server: &TestServer) -> RawWs {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            server.addr
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(at) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(raw.fill().await, "the handshake's answer ended early");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        raw.buf.drain(..end);
        raw
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(PATIENCE, self.tcp.read(&mut chunk)).await {
            Err(_) => panic!("timed out reading a raw WebSocket"),
            Ok(Ok(0) | Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next server frame (opcode, payload); None once the socket has closed.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (header, len) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n as usize),
                };
                if header != usize::MAX && self.buf.len() >= header + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads past data frames and pings to the close frame; returns its code.
    async fn close_code(&mut self, row: &str) -> u16 {
        loop {
            match self.frame().await {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "{row}: a close frame without a code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some((0x1 | 0x2, payload)) => {
                    let text = String::from_utf8_lossy(&payload);
                    assert!(
                        text.contains("welcome"),
                        "{row}: a frame other than welcome before the close: {text}"
                    );
                }
                Some(_) => {}
                None => panic!("{row}: the connection ended without a close frame"),
            }
        }
    }
}

async fn ping_flood(
    env: &Env,
    row: &str,
    pings: usize,
    payload: usize,
    reads: bool,
    expect: Outcome,
) {
    let server = &env.server;
    let payload_of = move |i: usize| {
        let mut p = format!("{i:08}").into_bytes();
        p.resize(payload, b'.');
        p
    };
    if reads {
        assert!(matches!(expect, Outcome::Pongs));
        let mut client = Client::connect(server, Enc::Json).await;
        let (mut sink, mut stream) = client.ws.split();
        let writer = tokio::spawn(async move {
            for i in 0..pings {
                sink.feed(Message::Ping(payload_of(i).into()))
                    .await
                    .unwrap();
            }
            sink.flush().await.unwrap();
            sink
        });
        let mut answered = 0;
        while answered < pings {
            let next = tokio::time::timeout(PATIENCE, stream.next())
                .await
                .unwrap_or_else(|_| panic!("{row}: pong {answered} did not come"));
            match next {
                Some(Ok(Message::Pong(p))) => {
                    assert_eq!(
                        &p[..],
                        &payload_of(answered)[..],
                        "{row}: pong {answered} out of order"
                    );
                    answered += 1;
                }
                // The server's own heartbeat.
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("{row}: expected pong {answered}, got {other:?}"),
            }
        }
        let sink = writer.await.unwrap();
        client.ws = sink.reunite(stream).unwrap();
        client.sync().await;
        let _ = client.ws.close(None).await;
        return;
    }

    let Outcome::SlowConsumer { gone_within } = expect else {
        panic!("{row}: a flood that is never read ends as a slow consumer")
    };
    let closed_before = slow_consumer_closes(env).await;
    let mut client = Client::connect_slow(server, Enc::Json).await;
    let id = client.id.clone();
    for i in 0..pings {
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            client.ws.feed(Message::Ping(payload_of(i).into())),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.ws.flush()).await;
    let flooded = Instant::now();
    eventually(
        &format!("{row}: the flooding connection to be gone"),
        || async { env.connection(&id).await.is_none().then_some(()) },
    )
    .await;
    let gone_after = flooded.elapsed();
    assert!(
        gone_after <= gone_within,
        "{row}: still listed {gone_after:?} after the flood"
    );
    assert_eq!(
        slow_consumer_closes(env).await,
        closed_before + 1.0,
        "{row}: closed as a slow consumer"
    );
}

async fn slow_consumer_closes(env: &Env) -> f64 {
    env.scrape()
        .await
        .series
        .get(r#"crier_connections_closed_total{reason="slow_consumer"}"#)
        .copied()
        .unwrap_or(0.0)
}

async fn connection_churn(env: &Env, row: &str, connections: usize, parallel: usize) {
    let accepted = |s: &Scrape| s.get("crier_connections_accepted_total");
    let before = accepted(&env.scrape().await);
    let mut opened = 0;
    while opened < connections {
        let wave = parallel.min(connections - opened);
        let mut tasks = Vec::new();
        for i in opened..opened + wave {
            let url = env.server.ws_url("");
            tasks.push(tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
                let welcome = ws.next().await.unwrap().unwrap();
                assert!(welcome.is_text());
                if i % 2 == 0 {
                    ws.close(None).await.unwrap();
                    // Until the server's answer; the socket is then dropped.
                    loop {
                        match ws.next().await {
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                            Some(Ok(_)) => {}
                        }
                    }
                }
                // Otherwise the socket is dropped without a close frame.
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        opened += wave;
    }
    let after = accepted(&env.scrape().await);
    assert_eq!(
        after - before,
        connections as f64,
        "{row}: every connection accepted"
    );
}

async fn never_reads(env: &Env, row: &str, enc: Enc, gone_within: Duration) {
    let closed_before = slow_consumer_closes(env).await;
    let mut slow = Client::connect_slow(&env.server, enc).await;
    slow.subscribe("flood").await;
    let batch: Vec<Value> = (0..20)
        .map(|_| json!({"topic": "flood", "data": {"pad": "x".repeat(1000)}}))
        .collect();
    // Until the policy closes it: its queue overflows once the kernel's buffers are full.
    let closing_seen = loop {
        env.server.publish_batch(&batch).await;
        let scrape = env.scrape().await;
        let largest = scrape.get("crier_buffered_bytes_max");
        assert!(
            largest <= MAX_BUFFERED_BYTES as f64,
            "{row}: one connection buffers {largest} bytes"
        );
        match env.connection(&slow.id).await {
            None => break Instant::now(),
            Some(info) if info["dropped"].as_u64().unwrap() > 0 => break Instant::now(),
            Some(info) => assert!(
                info["buffered_high_water"].as_u64().unwrap() <= MAX_BUFFERED_BYTES as u64,
                "{row}: {info}"
            ),
        }
    };
    eventually(
        &format!("{row}: the slow connection to be gone"),
        || async { env.connection(&slow.id).await.is_none().then_some(()) },
    )
    .await;
    let gone_after = closing_seen.elapsed();
    assert!(
        gone_after <= gone_within,
        "{row}: still listed {gone_after:?} after it was closed"
    );
    assert_eq!(
        slow_consumer_closes(env).await,
        closed_before + 1.0,
        "{row}: closed as a slow consumer"
    );
    drop(slow);
}

// ---------------------------------------------------------------------------------------------

/// Runs one server's rows in order; returns the failures, each as "row: message". Every row
/// runs even when one fails, so that one run reports every failing row.
async fn run_lane(env: &mut Env, cases: Vec<Case>) -> Vec<String> {
    let timings = std::env::var_os("CRIER_TEST_TIMINGS").is_some();
    let mut failures = Vec::new();
    for case in cases {
        let row = case.name;
        let row_started = Instant::now();
        let outcome = std::panic::AssertUnwindSafe(async {
            run(env, case).await;
            env.still_healthy(row).await;
        })
        .catch_unwind()
        .await;
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{row}: {message}"));
        }
        if timings {
            eprintln!("{:>6} ms  {row}", row_started.elapsed().as_millis());
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_exactly_and_harms_no_one_else() {
    let started = Instant::now();
    let mut open = Env::start(Kind::Open).await;
    let mut secret = Env::start(Kind::Secret).await;
    let mut public_key = Env::start(Kind::PublicKey).await;
    let cases = cases();
    let total = cases.len();
    assert!(total >= 30);
    let mut lanes: [Vec<Case>; 3] = Default::default();
    for case in cases {
        let lane = match case.kind {
            Kind::Open => 0,
            Kind::Secret => 1,
            Kind::PublicKey => 2,
        };
        lanes[lane].push(case);
    }
    // The servers are independent: their rows run side by side.
    let [open_cases, secret_cases, public_key_cases] = lanes;
    let (a, b, c) = tokio::join!(
        run_lane(&mut open, open_cases),
        run_lane(&mut secret, secret_cases),
        run_lane(&mut public_key, public_key_cases),
    );
    for env in [&mut open, &mut secret, &mut public_key] {
        let bystander = env.bystander.take().unwrap();
        let seqs = bystander.finish(env).await;
        assert!(
            seqs > 100,
            "{:?}: the steady publisher barely ran ({seqs})",
            env.kind
        );
    }
    let failures: Vec<String> = [a, b, c].concat();
    assert!(
        failures.is_empty(),
        "{} of {total} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{total} hostile inputs in {:?}", started.elapsed());
}
