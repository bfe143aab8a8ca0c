//! The v1 wire protocol (`proto/README.md`): client frames in, server frames out, in JSON text
//! frames or MessagePack binary frames.
//!
//! Server frames leave here as complete WebSocket frames (header included). Server frames are not
//! masked, so the same bytes are valid on every connection: a published message is encoded once
//! per encoding and shared by all of its subscribers.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use actix_http::ws::OpCode;
use bytes::{Buf, Bytes};
use serde::{Deserialize, Deserializer, Serialize};

use crate::data::{
    Data, msgpack_envelope_len, msgpack_map_value, msgpack_scalar_len, msgpack_text, msgpack_uint,
    msgpack_value_len,
};
use crate::model::{DeliveryMode, Encoding, ErrorCode, Replay, SubscribeOptions};

/// The WebSocket subprotocol that selects `encoding`.
pub(crate) fn subprotocol(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Json => "crier.json",
        Encoding::Msgpack => "crier.msgpack",
    }
}

pub(crate) fn encoding_of_subprotocol(s: &str) -> Option<Encoding> {
    Encoding::ALL.into_iter().find(|&e| subprotocol(e) == s)
}

fn opcode(encoding: Encoding) -> OpCode {
    match encoding {
        Encoding::Json => OpCode::Text,
        Encoding::Msgpack => OpCode::Binary,
    }
}

/// A close code Crier sends, its reason text, and the reason label it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CloseCode {
    pub code: u16,
    pub reason: &'static str,
    pub metric: &'static str,
}

impl CloseCode {
    /// Answer to a client's own close.
    pub(crate) const NORMAL: CloseCode = CloseCode {
        code: 1000,
        reason: "",
        metric: "client",
    };
    /// The server is shutting down; reconnect (to another node) and recover.
    pub(crate) const GOING_AWAY: CloseCode = CloseCode {
        code: 1001,
        reason: "going away",
        metric: "shutdown",
    };
    /// The client broke the WebSocket protocol.
    pub(crate) const PROTOCOL_ERROR: CloseCode = CloseCode {
        code: 1002,
        reason: "protocol error",
        metric: "protocol_error",
    };
    /// A text frame that is not UTF-8.
    pub(crate) const INVALID_PAYLOAD: CloseCode = CloseCode {
        code: 1007,
        reason: "invalid UTF-8 in a text frame",
        metric: "protocol_error",
    };
    /// A WebSocket message above the frame limit.
    pub(crate) const MESSAGE_TOO_BIG: CloseCode = CloseCode {
        code: 1009,
        reason: "message too big",
        metric: "protocol_error",
    };
    /// Too many bad frames in a minute (`--max-bad-frames`).
    pub(crate) const POLICY_VIOLATION: CloseCode = CloseCode {
        code: 1008,
        reason: "too many bad frames",
        metric: "bad_frames",
    };
    /// Nothing (not even a pong) came from the client within the idle timeout.
    pub(crate) const IDLE_TIMEOUT: CloseCode = CloseCode {
        code: 4001,
        reason: "idle timeout",
        metric: "idle_timeout",
    };
    /// The connection's token expired and no fresh one came with `auth`.
    pub(crate) const TOKEN_EXPIRED: CloseCode = CloseCode {
        code: 4002,
        reason: "token expired",
        metric: "token_expired",
    };
    /// No valid token came within `--auth-timeout`.
    pub(crate) const AUTH_REQUIRED: CloseCode = CloseCode {
        code: 4003,
        reason: "authentication required",
        metric: "auth_timeout",
    };
    /// The client could not keep up with its messages.
    pub(crate) const SLOW_CONSUMER: CloseCode = CloseCode {
        code: 4008,
        reason: "slow consumer",
        metric: "slow_consumer",
    };
}

/// A frame header that breaks RFC 6455 itself (reserved bits, an oversized or fragmented
/// control frame), as the incoming guard reports it; closed with 1002.
#[derive(Debug)]
pub(crate) struct ProtocolViolation(pub &'static str);

impl fmt::Display for ProtocolViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ProtocolViolation {}

/// A client's request id, echoed in the answer: an unsigned integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(crate) enum FrameId {
    Num(u64),
    Str(String),
}

impl<'de> Deserialize<'de> for FrameId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FrameId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an unsigned integer or a string")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FrameId, E> {
                Ok(FrameId::Num(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FrameId, E> {
                u64::try_from(v)
                    .map(FrameId::Num)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FrameId, E> {
                Ok(FrameId::Str(v.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A parsed client request, well-formed but not yet checked against the broker's rules (valid
/// topics, limits).
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub id: Option<FrameId>,
    pub op: Op<'a>,
}

#[derive(Debug)]
pub(crate) enum Op<'a> {
    Subscribe {
        topic: String,
        options: SubscribeOptions,
    },
    Unsubscribe {
        topic: String,
    },
    Publish {
        /// Borrowed from the frame when the publish fast path read it: a publish is served
        /// before the next frame is read, and the `String` was an allocation per publish.
        topic: Cow<'a, str>,
        data: Data,
    },
    Ping,
    /// A connection token, to authenticate or to replace the one the connection has.
    Auth {
        token: String,
    },
}

/// A client frame that could not be served, answered with an `error` frame.
#[derive(Debug)]
pub(crate) struct FrameError {
    pub id: Option<FrameId>,
    pub code: ErrorCode,
    pub message: String,
    /// The topic the frame names, when it has one. A bad topic is the first thing wrong with a
    /// frame, so whoever answers checks it before reporting this error.
    pub topic: Option<NamedTopic>,
}

/// A topic a malformed frame names, and what it was to be used for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NamedTopic {
    /// Published to: a topic, no wildcards.
    Publish(String),
    /// Subscribed to: a topic or a pattern.
    Subscribe(String),
}

impl FrameError {
    pub(crate) fn new(id: Option<FrameId>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            id,
            code,
            message: message.into(),
            topic: None,
        }
    }

    fn naming(mut self, topic: NamedTopic) -> Self {
        self.topic = Some(topic);
        self
    }
}

/// Every field any op may carry; `D` is how `data` is captured in each encoding.
#[derive(Deserialize)]
#[serde(bound(deserialize = "D: Deserialize<'de>"))]
struct RawFrame<D> {
    op: String,
    #[serde(default)]
    id: Option<FrameId>,
    #[serde(default)]
    topic: Option<String>,
    /// `Some` whenever the field is present, even when it is `null`.
    #[serde(default, deserialize_with = "present")]
    data: Option<D>,
    #[serde(default)]
    since: Option<RawSince>,
    #[serde(default)]
    rewind: Option<u64>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    max_rate: Option<f64>,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
struct RawSince {
    epoch: String,
    seq: u64,
}

impl<D> RawFrame<D> {
    fn map_data(self, f: impl FnOnce(D) -> Data) -> RawFrame<Data> {
        match self.try_map_data(|d| Ok::<_, std::convert::Infallible>(f(d))) {
            Ok(frame) => frame,
            Err(never) => match never {},
        }
    }

    fn try_map_data<E>(self, f: impl FnOnce(D) -> Result<Data, E>) -> Result<RawFrame<Data>, E> {
        Ok(RawFrame {
            op: self.op,
            id: self.id,
            topic: self.topic,
            data: self.data.map(f).transpose()?,
            since: self.since,
            rewind: self.rewind,
            mode: self.mode,
            max_rate: self.max_rate,
            token: self.token,
        })
    }
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Only the id, to answer a frame that failed to parse as a whole.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<FrameId>,
}

/// Parses a JSON text frame.
pub(crate) fn parse_json(text: &str) -> Result<Request<'_>, FrameError> {
    if let Some(request) = json_publish(text) {
        return Ok(request);
    }
    parse_json_envelope(text)
}

/// A publish as Crier's clients write it, read without serde's envelope: `{"op":"publish"`, then
/// `"topic"`, `"data"` and perhaps `"id"` once each in any order, no whitespace between them, and
/// `}`. The envelope's decoding was a third of a JSON publish. `data` is still read by serde_json
/// (which validates it) and checked as on the general path. None for any other frame, valid or
/// not: the general path then answers it exactly as before.
fn json_publish(text: &str) -> Option<Request<'_>> {
    let mut rest = text.strip_prefix(r#"{"op":"publish""#)?;
    let (mut topic, mut data, mut id) = (None, None, None);
    while let Some(entry) = rest.strip_prefix(",\"") {
        let (key, value) = entry.split_once("\":")?;
        rest = match key {
            "topic" if topic.is_none() => {
                let (text, after) = plain_json_string(value)?;
                topic = Some(text);
                after
            }
            "id" if id.is_none() => {
                let (frame_id, after) = match plain_json_string(value) {
                    Some((text, after)) => (FrameId::Str(text.to_owned()), after),
                    None => {
                        let digits = value.bytes().take_while(u8::is_ascii_digit).count();
                        // JSON has no leading zeros; anything else is left to serde.
                        if digits == 0 || digits > 1 && value.starts_with('0') {
                            return None;
                        }
                        (
                            FrameId::Num(value[..digits].parse().ok()?),
                            &value[digits..],
                        )
                    }
                };
                id = Some(frame_id);
                after
            }
            "data" if data.is_none() => {
                // serde_json skips leading whitespace the general path's value would not have.
                if value.starts_with(|c: char| c.is_ascii_whitespace()) {
                    return None;
                }
                let mut values = serde_json::Deserializer::from_str(value)
                    .into_iter::<&serde_json::value::RawValue>();
                let raw = values.next()?.ok()?;
                data = Some(raw.get());
                &value[values.byte_offset()..]
            }
            _ => return None,
        };
    }
    if rest != "}" {
        return None;
    }
    let data = Data::from_parsed_json(Bytes::copy_from_slice(data?.as_bytes())).ok()?;
    Some(Request {
        id,
        op: Op::Publish {
            topic: Cow::Borrowed(topic?),
            data,
        },
    })
}

/// A JSON string at the start of `text` that has no escapes or control characters, and what
/// follows it.
fn plain_json_string(text: &str) -> Option<(&str, &str)> {
    let contents = text.strip_prefix('"')?;
    let end = contents.find(|c: char| c == '"' || c == '\\' || c < ' ')?;
    if !contents[end..].starts_with('"') {
        return None;
    }
    Some((&contents[..end], &contents[end + 1..]))
}

/// Parses any JSON text frame, validating it as a whole.
fn parse_json_envelope(text: &str) -> Result<Request<'static>, FrameError> {
    if !text.trim_start().starts_with('{') {
        return Err(FrameError::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be a JSON object",
        ));
    }
    match serde_json::from_str::<RawFrame<&serde_json::value::RawValue>>(text) {
        Ok(raw) => {
            let id = raw.id.clone();
            let raw = raw
                .try_map_data(|d| {
                    Data::from_parsed_json(Bytes::copy_from_slice(d.get().as_bytes()))
                })
                .map_err(|e| FrameError::new(id, ErrorCode::BadFrame, e.0))?;
            validate(raw)
        }
        Err(e) => {
            let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id);
            Err(FrameError::new(
                id,
                ErrorCode::BadFrame,
                format!("bad frame: {e}"),
            ))
        }
    }
}

/// Parses a MessagePack binary frame.
pub(crate) fn parse_msgpack(bytes: &[u8]) -> Result<Request<'_>, FrameError> {
    let is_map = matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf));
    if !is_map {
        return Err(FrameError::new(
            None,
            ErrorCode::BadFrame,
            "a frame must be a MessagePack map",
        ));
    }
    if let Some(request) = msgpack_publish(bytes) {
        return Ok(request);
    }
    let checked = match msgpack_envelope_len(bytes, 1) {
        Ok(len) if len < bytes.len() => {
            Err(format!("{} bytes after the frame's map", bytes.len() - len))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(e.0),
    };
    if let Err(e) = checked {
        let id = rmp_serde::from_slice::<IdOnly>(bytes)
            .ok()
            .and_then(|f| f.id);
        return Err(FrameError::new(
            id,
            ErrorCode::BadFrame,
            format!("bad frame: not valid MessagePack: {e}"),
        ));
    }
    parse_msgpack_envelope(bytes)
}

/// A frame the walk validated, any op: the envelope's fields are decoded; `data` is only skipped
/// (no tree is built) and then kept as the bytes it came as.
fn parse_msgpack_envelope(bytes: &[u8]) -> Result<Request<'static>, FrameError> {
    match rmp_serde::from_slice::<RawFrame<serde::de::IgnoredAny>>(bytes) {
        Ok(raw) => validate(raw.map_data(|_| {
            let data = msgpack_map_value(bytes, b"data").map_or(&[0xc0][..], |d| d);
            Data::Msgpack(Bytes::copy_from_slice(data))
        })),
        Err(e) => {
            let id = rmp_serde::from_slice::<IdOnly>(bytes)
                .ok()
                .and_then(|f| f.id);
            Err(FrameError::new(
                id,
                ErrorCode::BadFrame,
                format!("bad frame: {e}"),
            ))
        }
    }
}

/// The frame nearly every message arrives in, a `publish` with `op`, `topic`, `data` and
/// perhaps `id`, each once and of the usual types, read in one pass over its bytes without serde
/// (whose decoding was a tenth of a publish's cost). Only `data` is walked; the other fields are
/// scalars whose headers give their lengths and whose text is checked as it is read, so the frame
/// is not walked first as a whole (that walk was a further 6% of a publish). None for any other
/// frame, valid or not: the general path then validates and reads it, and so answers it exactly
/// as before.
fn msgpack_publish(bytes: &[u8]) -> Option<Request<'_>> {
    let (entries, mut at) = match *bytes.first()? {
        b @ 0x80..=0x8f => (usize::from(b & 0x0f), 1),
        0xde => (
            usize::from(u16::from_be_bytes([*bytes.get(1)?, *bytes.get(2)?])),
            3,
        ),
        _ => return None,
    };
    let mut next = |len_of: fn(&[u8]) -> Option<usize>| -> Option<&[u8]> {
        let rest = bytes.get(at..)?;
        let len = len_of(rest)?;
        at += len;
        rest.get(..len)
    };
    let data_len = |data: &[u8]| msgpack_value_len(data).ok();
    let (mut op, mut topic, mut data, mut id) = (None, None, None, None);
    // Keys and the op are matched as the bytes a MessagePack encoder writes for them (fixstr);
    // any other spelling is left to the general path.
    for _ in 0..entries {
        match next(msgpack_scalar_len)? {
            b"\xa2op" if op.is_none() => op = Some(next(msgpack_scalar_len)?),
            b"\xa5topic" if topic.is_none() => {
                topic = Some(msgpack_text(next(msgpack_scalar_len)?)?)
            }
            b"\xa4data" if data.is_none() => data = Some(next(data_len)?),
            b"\xa2id" if id.is_none() => {
                let value = next(msgpack_scalar_len)?;
                id = Some(match msgpack_text(value) {
                    Some(text) => FrameId::Str(text.to_owned()),
                    None => FrameId::Num(msgpack_uint(value)?),
                })
            }
            _ => return None,
        }
    }
    if at != bytes.len() || op? != b"\xa7publish" {
        return None;
    }
    // What `validate` makes of a publish with its topic and data, without its op's `String`.
    Some(Request {
        id,
        op: Op::Publish {
            topic: Cow::Borrowed(topic?),
            data: Data::Msgpack(Bytes::copy_from_slice(data?)),
        },
    })
}

fn validate(raw: RawFrame<Data>) -> Result<Request<'static>, FrameError> {
    let RawFrame {
        op,
        id,
        topic,
        data,
        token,
        ..
    } = raw;
    let bad = |message: String| FrameError::new(id.clone(), ErrorCode::BadFrame, message);
    let needs_topic =
        |topic: Option<String>| topic.ok_or_else(|| bad(format!("{op} needs a topic")));
    let op = match op.as_str() {
        "subscribe" => {
            let topic = needs_topic(topic)?;
            let options = subscribe_options(raw.since, raw.rewind, raw.mode, raw.max_rate)
                .map_err(|e| bad(e).naming(NamedTopic::Subscribe(topic.clone())))?;
            Op::Subscribe { topic, options }
        }
        "unsubscribe" => Op::Unsubscribe {
            topic: needs_topic(topic)?,
        },
        "publish" => {
            let topic = needs_topic(topic)?;
            let data = data.ok_or_else(|| {
                bad("publish needs data".into()).naming(NamedTopic::Publish(topic.clone()))
            })?;
            Op::Publish {
                topic: Cow::Owned(topic),
                data,
            }
        }
        "ping" => Op::Ping,
        "auth" => Op::Auth {
            token: token.ok_or_else(|| bad("auth needs a token".into()))?,
        },
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(FrameError::new(
                id,
                ErrorCode::UnknownOp,
                format!(
                    "unknown op {shown:?}; expected subscribe, unsubscribe, publish, ping or auth"
                ),
            ));
        }
    };
    Ok(Request { id, op })
}

fn subscribe_options(
    since: Option<RawSince>,
    rewind: Option<u64>,
    mode: Option<String>,
    max_rate: Option<f64>,
) -> Result<SubscribeOptions, String> {
    let replay = match (since, rewind) {
        (Some(_), Some(_)) => return Err("use since or rewind, not both".into()),
        (Some(since), None) => Replay::Since {
            epoch: since.epoch,
            seq: since.seq,
        },
        (None, Some(n)) => Replay::Rewind(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => Replay::None,
    };
    let mode = match (mode.as_deref(), max_rate) {
        (None | Some("all"), None) => DeliveryMode::All,
        (None | Some("all"), Some(_)) => return Err("max_rate needs \"mode\":\"latest\"".into()),
        (Some("latest"), None) => DeliveryMode::Latest { min_interval: None },
        (Some("latest"), Some(rate)) if rate.is_finite() && rate > 0.0 => DeliveryMode::Latest {
            min_interval: Some(Duration::from_secs_f64(
                (1.0 / rate).min(MAX_RATE_INTERVAL_SECS),
            )),
        },
        (Some("latest"), Some(rate)) => {
            return Err(format!(
                "max_rate must be a positive number of updates per second, not {rate}"
            ));
        }
        (Some(other), _) => {
            let shown: String = other.chars().take(32).collect();
            return Err(format!("unknown mode {shown:?}; expected all or latest"));
        }
    };
    Ok(SubscribeOptions { mode, replay })
}

/// A `max_rate` below one update a day is treated as one a day.
const MAX_RATE_INTERVAL_SECS: f64 = 86_400.0;

/// The limits a client should know about, sent in `welcome`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Limits {
    pub max_message_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_buffered_bytes: usize,
    pub max_subscriptions: usize,
    pub slow_consumer: &'static str,
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    /// Publishes a second allowed per connection (0: no limit).
    pub publish_rate: u32,
    /// Bad frames in a minute that close the connection with 1008 (0: never).
    pub max_bad_frames: usize,
    /// How long an unauthenticated connection has to send `auth`.
    pub auth_timeout_ms: u64,
}

/// Server frames other than `message` (which has its own fast path).
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ServerFrame<'a> {
    Welcome {
        connection: &'a str,
        /// The node (process) the connection landed on.
        node: &'a str,
        encoding: &'static str,
        server: &'static str,
        limits: &'a Limits,
        /// Whether a WebSocket message may carry several frames (`?batch=1`).
        batch: bool,
        /// False when the connection must send `auth` before anything else.
        authenticated: bool,
        /// The token's `sub`.
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        /// When the token expires (Unix seconds, leeway included): send a fresh one before.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    Ack {
        id: &'a FrameId,
        /// For publish: the message's seq. For subscribe to a topic: the topic's latest seq.
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// For subscribe to a topic: the stream's epoch.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        /// For subscribe with `since`: whether nothing was missed.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// For auth: when the new token expires (Unix seconds, leeway included).
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        /// The connection's buffered amount as the pong was queued: bytes queued for the client
        /// and not yet taken by its socket (the server side of `WebSocket.bufferedAmount`).
        buffered_bytes: usize,
        /// Messages for this connection dropped so far (slow-consumer policy).
        dropped: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a FrameId>,
        code: &'static str,
        message: &'a str,
        /// The subscription the error ended (a fresh token no longer grants it).
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<&'a str>,
    },
}

pub(crate) const SERVER: &str = concat!("crier/", env!("CARGO_PKG_VERSION"));

/// Room kept in front of a payload for the longest WebSocket header a server frame needs.
const HEADROOM: usize = 10;

/// Encodes a server frame as a complete WebSocket frame.
pub(crate) fn encode(encoding: Encoding, frame: &ServerFrame<'_>) -> Bytes {
    let mut buf = vec![0; HEADROOM];
    let written = match encoding {
        Encoding::Json => serde_json::to_writer(&mut buf, frame).map_err(|e| e.to_string()),
        Encoding::Msgpack => frame
            .serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = written {
        // Only our own types pass through here; none of them can fail to serialize.
        tracing::error!(error = %e, "could not encode a server frame");
    }
    finish_frame(opcode(encoding), buf)
}

/// Encodes a `message` frame: `{"op":"message","topic":...,"seq":...,"data":...}`.
pub(crate) fn encode_message(encoding: Encoding, topic: &str, seq: u64, data: &Data) -> Bytes {
    let mut buf = Vec::with_capacity(HEADROOM + 48 + topic.len() + data.len());
    buf.resize(HEADROOM, 0);
    match encoding {
        // Every delivered message is made here, so the fixed parts are written as the bytes they
        // encode to: going through rmp's writer and `write!` was 14% of a small publish.
        Encoding::Json => {
            // Topics are limited to characters that need no escaping in a JSON string.
            buf.extend_from_slice(br#"{"op":"message","topic":""#);
            buf.extend_from_slice(topic.as_bytes());
            buf.extend_from_slice(br#"","seq":"#);
            buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
            buf.extend_from_slice(br#","data":"#);
            data.write_json(&mut buf);
            buf.push(b'}');
        }
        Encoding::Msgpack => {
            // A fixmap of 4 entries; "op": "message"; "topic".
            buf.extend_from_slice(b"\x84\xa2op\xa7message\xa5topic");
            write_msgpack_str_len(&mut buf, topic.len());
            buf.extend_from_slice(topic.as_bytes());
            buf.extend_from_slice(b"\xa3seq");
            write_msgpack_uint(&mut buf, seq);
            buf.extend_from_slice(b"\xa4data");
            data.write_msgpack(&mut buf);
        }
    }
    finish_frame(opcode(encoding), buf)
}

/// The header of a MessagePack string of `len` bytes, in its shortest form (as rmp writes it).
fn write_msgpack_str_len(buf: &mut Vec<u8>, len: usize) {
    match len {
        0..=31 => buf.push(0xa0 | len as u8),
        32..=0xff => buf.extend_from_slice(&[0xd9, len as u8]),
        0x100..=0xffff => {
            buf.push(0xda);
            buf.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            buf.push(0xdb);
            buf.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// A MessagePack unsigned integer in its shortest form (as rmp writes it).
fn write_msgpack_uint(buf: &mut Vec<u8>, n: u64) {
    match n {
        0..=0x7f => buf.push(n as u8),
        0x80..=0xff => buf.extend_from_slice(&[0xcc, n as u8]),
        0x100..=0xffff => {
            buf.push(0xcd);
            buf.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(0xce);
            buf.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            buf.push(0xcf);
            buf.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// A WebSocket close frame with a code and a reason.
pub(crate) fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut buf = vec![0; HEADROOM];
    buf.extend_from_slice(&code.to_be_bytes());
    // Control frame payloads are limited to 125 bytes.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    buf.extend_from_slice(&reason.as_bytes()[..end]);
    finish_frame(OpCode::Close, buf)
}

pub(crate) fn ping_frame() -> Bytes {
    finish_frame(OpCode::Ping, vec![0; HEADROOM])
}

pub(crate) fn pong_frame(payload: &[u8]) -> Bytes {
    let mut buf = vec![0; HEADROOM];
    buf.extend_from_slice(&payload[..payload.len().min(125)]);
    finish_frame(OpCode::Pong, buf)
}

/// The payload of a complete (final, unmasked) server frame.
fn payload_of_frame(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header..).unwrap_or_default()
}

/// Whether a server frame carries protocol frames (text or binary), as opposed to a WebSocket
/// control frame (ping, pong, close).
pub(crate) fn is_data_frame(frame: &[u8]) -> bool {
    matches!(frame.first().map(|b| b & 0x0f), Some(0x1 | 0x2))
}

/// Joins each run of data frames into one WebSocket message, for connections that asked for
/// batches: JSON frames one per line, MessagePack frames back to back. Control frames (ping,
/// pong, close) stay on their own and in their place; a run of one frame is left as it is.
///
/// Frames are copied in as the queue hands them over, so the socket's writer reads each one
/// once, while it is taken, instead of queuing it and making two more passes to size and join
/// the run.
pub(crate) struct FrameJoin {
    encoding: Encoding,
    /// The room a run is given when it starts: the most a batch takes, so that a run is not
    /// grown while it is copied.
    capacity: usize,
    /// The run's first frame, kept whole until a second one comes.
    first: Option<Bytes>,
    /// The run so far, after [`HEADROOM`] for its header, once it has two frames.
    run: Vec<u8>,
}

impl FrameJoin {
    pub(crate) fn new(encoding: Encoding, capacity: usize) -> FrameJoin {
        FrameJoin {
            encoding,
            capacity,
            first: None,
            run: Vec::new(),
        }
    }

    /// Adds the next frame; what it completes goes to `out`.
    pub(crate) fn push(&mut self, frame: Bytes, out: &mut VecDeque<Bytes>) {
        if !is_data_frame(&frame) {
            self.finish(out);
            out.push_back(frame);
            return;
        }
        if let Some(first) = self.first.take() {
            let mut run =
                Vec::with_capacity(HEADROOM + self.capacity.max(first.len() + frame.len()));
            run.resize(HEADROOM, 0);
            run.extend_from_slice(payload_of_frame(&first));
            self.run = run;
        } else if self.run.is_empty() {
            self.first = Some(frame);
            return;
        }
        if self.encoding == Encoding::Json {
            self.run.push(b'\n');
        }
        self.run.extend_from_slice(payload_of_frame(&frame));
    }

    /// Ends the run under way, if any, into `out`.
    pub(crate) fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        if let Some(first) = self.first.take() {
            out.push_back(first);
        } else if !self.run.is_empty() {
            let run = std::mem::take(&mut self.run);
            out.push_back(finish_frame(opcode(self.encoding), run));
        }
    }
}

/// Writes the WebSocket header (final, unmasked) into the headroom in front of the payload.
fn finish_frame(opcode: OpCode, mut buf: Vec<u8>) -> Bytes {
    let len = buf.len() - HEADROOM;
    let mut header = [0u8; HEADROOM];
    header[0] = 0x80 | u8::from(opcode);
    let header_len = if len < 126 {
        header[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    let start = HEADROOM - header_len;
    buf[start..HEADROOM].copy_from_slice(&header[..header_len]);
    // Advanced rather than sliced: a slice is a second reference, which makes the buffer shared
    // (an allocation) even for a frame nothing else will ever point into.
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}

/// A server frame's payload decoded into JSON, for tests.
#[cfg(test)]
pub(crate) fn decode_for_test(frame: &Bytes) -> serde_json::Value {
    let header = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    match frame[0] & 0x0f {
        0x1 => serde_json::from_slice(&frame[header..]).expect("JSON frame"),
        0x2 => rmp_serde::from_slice(&frame[header..]).expect("MessagePack frame"),
        op => serde_json::json!({ "control": op }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::Parser;
    use bytes::BytesMut;

    /// The publish fast path answers every frame exactly as the general path does, or leaves it
    /// to the general path: publishes with and without ids of each kind, and frames it declines
    /// (extra or repeated fields, other ops, `bin` where text is expected, missing fields).
    #[test]
    fn message_frames_are_what_rmp_and_format_write() {
        let datas = [
            Data::Msgpack(Bytes::from_static(b"\xa5hello")),
            Data::from_json(Bytes::from_static(br#"{"a":[1,2.5,null]}"#)).unwrap(),
        ];
        for len in [1, 31, 32, 255, 256, 70_000] {
            let topic = "t".repeat(len);
            for seq in [
                0,
                0x7f,
                0x80,
                0xff,
                0x100,
                0xffff,
                0x1_0000,
                0xffff_ffff,
                0x1_0000_0000,
                u64::MAX,
            ] {
                for data in &datas {
                    let mut msgpack = Vec::new();
                    rmp::encode::write_map_len(&mut msgpack, 4).unwrap();
                    rmp::encode::write_str(&mut msgpack, "op").unwrap();
                    rmp::encode::write_str(&mut msgpack, "message").unwrap();
                    rmp::encode::write_str(&mut msgpack, "topic").unwrap();
                    rmp::encode::write_str(&mut msgpack, &topic).unwrap();
                    rmp::encode::write_str(&mut msgpack, "seq").unwrap();
                    rmp::encode::write_uint(&mut msgpack, seq).unwrap();
                    rmp::encode::write_str(&mut msgpack, "data").unwrap();
                    data.write_msgpack(&mut msgpack);
                    let mut json =
                        format!(r#"{{"op":"message","topic":"{topic}","seq":{seq},"data":"#)
                            .into_bytes();
                    data.write_json(&mut json);
                    json.push(b'}');
                    for (encoding, expected) in
                        [(Encoding::Msgpack, msgpack), (Encoding::Json, json)]
                    {
                        let frame = encode_message(encoding, &topic, seq, data);
                        let header = match frame[1] & 0x7f {
                            126 => 4,
                            127 => 10,
                            _ => 2,
                        };
                        assert_eq!(&frame[header..], &expected[..], "{encoding:?} {len} {seq}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_json_publish_fast_path_agrees_with_the_general_path() {
        let deep = format!(
            r#"{{"op":"publish","topic":"t","data":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let long_id = format!(
            r#"{{"op":"publish","topic":"t","data":1,"id":{}}}"#,
            "9".repeat(30)
        );
        let frames = [
            // What the JavaScript and Rust clients write: all taken by the fast path.
            r#"{"op":"publish","topic":"news","data":{"a":[1,2.5,null,true]},"id":7}"#,
            r#"{"op":"publish","topic":"news","id":7,"data":"aGVsbG8="}"#,
            r#"{"op":"publish","topic":"a.b.c","data":null}"#,
            r#"{"op":"publish","topic":"news","data":"x","id":"req-1"}"#,
            r#"{"op":"publish","topic":"news","data":0,"id":0}"#,
            r#"{"op":"publish","topic":"news","data":{"s":"q\"uote","n":{"m":[]}}}"#,
            r#"{"op":"publish","topic":"news","data":[1e400]}"#,
            r#"{"op":"publish","topic":"news.*","data":1}"#,
            r#"{"op":"publish","topic":"","data":1}"#,
            // Anything else: the general path's answer, valid or not.
            r#"{"op":"publish","topic":"news"}"#,
            r#"{"op":"publish","data":1}"#,
            r#"{"op":"publish","topic":5,"data":1}"#,
            r#"{"op":"publish","topic":"ne\u0077s","data":1}"#,
            r#"{"op":"publish","topic":"news","data":1,"extra":true}"#,
            r#"{"op":"publish","topic":"news","data":1,"data":2}"#,
            r#"{"op":"publish","topic":"news","topic":"x","data":1}"#,
            r#"{"op":"publish","topic":"news","data":1,"id":01}"#,
            r#"{"op":"publish","topic":"news","data":1,"id":-1}"#,
            r#"{"op":"publish","topic":"news","data":1,"id":1.5}"#,
            r#"{"op":"publish","topic":"news","data":1,"id":null}"#,
            r#"{"op":"publish","topic":"news","data":1,"id":"a\"b"}"#,
            r#"{"op":"publish","topic":"news","data": 1}"#,
            r#"{"op":"publish","topic":"news","data":1 }"#,
            r#"{"op":"publish","topic":"news","data":1} "#,
            r#"{"op":"publish","topic":"news","data":1}x"#,
            r#"{"op":"publish","topic":"news","data":1"#,
            r#"{"op":"publish","topic":"news","data":[1,}"#,
            r#"{"op":"publish","topic":"news","data":tru}"#,
            "{\"op\":\"publish\",\"topic\":\"ne\tws\",\"data\":1}",
            r#"{ "op":"publish","topic":"news","data":1}"#,
            r#"{"op":"PUBLISH","topic":"news","data":1}"#,
            r#"{"op":"subscribe","topic":"news","id":1}"#,
            r#"{"op":"publish","op":"ping","topic":"news","data":1}"#,
            &deep,
            &long_id,
        ];
        let mut fast = 0;
        for text in frames {
            if json_publish(text).is_some() {
                fast += 1;
            }
            assert_eq!(
                format!("{:?}", parse_json(text)),
                format!("{:?}", parse_json_envelope(text)),
                "{text:.100}"
            );
        }
        assert_eq!(fast, 8, "the fast path took the publishes it can read");
    }

    #[test]
    fn the_publish_fast_path_agrees_with_the_general_path() {
        use serde_json::json;
        let frames = [
            json!({"op": "publish", "topic": "news", "data": "hello"}),
            json!({"op": "publish", "topic": "news", "data": {"a": [1, 2.5, null, true]}, "id": 7}),
            json!({"id": "x-1", "data": null, "topic": "a.b.c", "op": "publish"}),
            json!({"op": "publish", "topic": "news", "data": 1, "id": 300}),
            json!({"op": "publish", "topic": "news", "data": 1, "id": 70000}),
            json!({"op": "publish", "topic": "news", "data": 1, "id": 5_000_000_000u64}),
            json!({"op": "publish", "topic": "news", "data": 1, "id": -1}),
            json!({"op": "publish", "topic": "news", "data": 1, "id": 1.5}),
            json!({"op": "publish", "topic": "news.*", "data": 1}),
            json!({"op": "publish", "topic": "", "data": 1}),
            json!({"op": "publish", "topic": "news"}),
            json!({"op": "publish", "data": 1}),
            json!({"op": "publish", "topic": 5, "data": 1}),
            json!({"op": "publish", "topic": "news", "data": 1, "extra": true}),
            json!({"op": "subscribe", "topic": "news", "id": 1}),
            json!({"op": "ping", "id": 2}),
            json!({"op": "PUBLISH", "topic": "news", "data": 1}),
        ];
        let mut fast = 0;
        for frame in &frames {
            let bytes = rmp_serde::to_vec_named(frame).unwrap();
            if msgpack_publish(&bytes).is_some() {
                fast += 1;
            }
            assert_eq!(
                format!("{:?}", parse_msgpack(&bytes)),
                format!("{:?}", parse_msgpack_envelope(&bytes)),
                "{frame}"
            );
        }
        assert_eq!(fast, 8, "the fast path took the publishes it can read");

        // Repeated fields and `bin` keys or values, which JSON cannot express.
        let map = |entries: &[(&[u8], &[u8])]| {
            let mut bytes = vec![0x80 | entries.len() as u8];
            for (k, v) in entries {
                bytes.extend_from_slice(k);
                bytes.extend_from_slice(v);
            }
            bytes
        };
        let (op, publish) = (&b"\xa2op"[..], &b"\xa7publish"[..]);
        let (topic, news) = (&b"\xa5topic"[..], &b"\xa4news"[..]);
        let data = &b"\xa4data"[..];
        for bytes in [
            map(&[
                (op, publish),
                (topic, news),
                (data, b"\x01"),
                (data, b"\x02"),
            ]),
            map(&[
                (op, publish),
                (topic, news),
                (topic, b"\xa1x"),
                (data, b"\x01"),
            ]),
            map(&[(op, publish), (b"\xc4\x05topic", news), (data, b"\x01")]),
            map(&[(op, publish), (topic, b"\xc4\x04news"), (data, b"\x01")]),
            map(&[(op, b"\xc4\x07publish"), (topic, news), (data, b"\x01")]),
            // Keys and op spelled as str8, which the fast path leaves to the general one.
            map(&[(b"\xd9\x02op", publish), (topic, news), (data, b"\x01")]),
            map(&[(op, b"\xd9\x07publish"), (topic, news), (data, b"\x01")]),
            map(&[
                (op, publish),
                (b"\xd9\x05topic", news),
                (b"\xd9\x04data", b"\x01"),
            ]),
        ] {
            assert!(msgpack_publish(&bytes).is_none(), "{bytes:x?}");
            assert_eq!(
                format!("{:?}", parse_msgpack(&bytes)),
                format!("{:?}", parse_msgpack_envelope(&bytes)),
            );
        }

        // The fast path reads unvalidated bytes: whatever is wrong with a frame, it leaves it to
        // the general path, which refuses it.
        let good = map(&[(op, publish), (topic, news), (data, b"\x01")]);
        assert!(msgpack_publish(&good).is_some());
        let deep = |levels: usize| [vec![0x91u8; levels], vec![0xc0]].concat();
        let mut count_lies = good.clone();
        count_lies[0] = 0x84;
        for bytes in [
            good[..good.len() - 1].to_vec(),
            [&good[..], b"\xc0"].concat(),
            count_lies,
            map(&[(op, publish), (topic, news), (data, b"\xa2\xff\xfe")]),
            map(&[(op, publish), (topic, b"\xa2\xff\xfe"), (data, b"\x01")]),
            map(&[(b"\xa2\xff\xfe", publish), (topic, news), (data, b"\x01")]),
            map(&[(op, publish), (topic, news), (data, b"\xd4\x01\x00")]),
            map(&[(op, publish), (topic, news), (data, b"\xc1")]),
            map(&[(op, publish), (topic, news), (data, &deep(101))]),
            map(&[(op, publish), (topic, news), (data, b"\x92\x01")]),
            map(&[(op, publish), (topic, news), (data, b"\xc4\x09ab")]),
            map(&[(op, publish), (topic, b"\xbf"), (data, b"\x01")]),
        ] {
            assert!(msgpack_publish(&bytes).is_none(), "{bytes:x?}");
            assert!(parse_msgpack(&bytes).is_err(), "{bytes:x?}");
        }
        let deepest = map(&[(op, publish), (topic, news), (data, &deep(100))]);
        assert!(msgpack_publish(&deepest).is_some());
        assert_eq!(
            format!("{:?}", parse_msgpack(&deepest)),
            format!("{:?}", parse_msgpack_envelope(&deepest)),
        );
    }

    fn actix_frame(op: OpCode, payload: &[u8]) -> Bytes {
        let mut buf = BytesMut::new();
        Parser::write_message(&mut buf, payload, op, true, false);
        buf.freeze()
    }

    #[test]
    fn headers_match_actix_for_every_length_class() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let mut buf = vec![0; HEADROOM];
            buf.extend_from_slice(&payload);
            assert_eq!(
                finish_frame(OpCode::Text, buf),
                actix_frame(OpCode::Text, &payload),
                "{len}"
            );
        }
    }

    fn payload_of(frame: &Bytes) -> &[u8] {
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        &frame[header..]
    }

    #[test]
    fn frames_join_into_one_message() {
        let data = Data::from_json(Bytes::from_static(b"[1]")).unwrap();
        for encoding in Encoding::ALL {
            let frames = [
                encode_message(encoding, "a", 1, &data),
                encode_message(encoding, "b", 2, &data),
            ];
            let mut joined = VecDeque::new();
            let mut join = FrameJoin::new(encoding, 0);
            for frame in frames {
                join.push(frame, &mut joined);
            }
            join.finish(&mut joined);
            let [joined] = <[Bytes; 1]>::try_from(Vec::from(joined)).unwrap();
            assert!(is_data_frame(&joined) && !is_data_frame(&ping_frame()));
            let payload = payload_of(&joined);
            let values: Vec<serde_json::Value> = match encoding {
                Encoding::Json => {
                    assert_eq!(payload.iter().filter(|&&b| b == b'\n').count(), 1);
                    serde_json::Deserializer::from_slice(payload)
                        .into_iter()
                        .map(Result::unwrap)
                        .collect()
                }
                Encoding::Msgpack => {
                    let mut rest = payload;
                    std::iter::from_fn(|| {
                        (!rest.is_empty()).then(|| rmp_serde::from_read(&mut rest).unwrap())
                    })
                    .collect()
                }
            };
            assert_eq!(
                values
                    .iter()
                    .map(|v| v["seq"].as_u64().unwrap())
                    .collect::<Vec<_>>(),
                vec![1, 2]
            );
        }
    }

    #[test]
    fn message_frames_in_both_encodings() {
        let data = Data::from_json(Bytes::from_static(br#"{"v":1}"#)).unwrap();
        let json = encode_message(Encoding::Json, "a.b", 42, &data);
        assert_eq!(json[0], 0x81);
        let value: serde_json::Value = serde_json::from_slice(payload_of(&json)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"op":"message","topic":"a.b","seq":42,"data":{"v":1}})
        );

        let mp = encode_message(Encoding::Msgpack, "a.b", 42, &data);
        assert_eq!(mp[0], 0x82);
        let value: serde_json::Value = rmp_serde::from_slice(payload_of(&mp)).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"op":"message","topic":"a.b","seq":42,"data":{"v":1}})
        );
    }

    #[test]
    fn server_frames_are_maps_in_msgpack() {
        let id = FrameId::Num(3);
        let frame = encode(
            Encoding::Msgpack,
            &ServerFrame::Ack {
                id: &id,
                seq: Some(9),
                epoch: None,
                recovered: None,
                expires_at: None,
            },
        );
        let value: serde_json::Value = rmp_serde::from_slice(payload_of(&frame)).unwrap();
        assert_eq!(value, serde_json::json!({"op":"ack","id":3,"seq":9}));
        let frame = encode(
            Encoding::Json,
            &ServerFrame::Pong {
                id: None,
                buffered_bytes: 12,
                dropped: 3,
            },
        );
        assert_eq!(
            payload_of(&frame),
            br#"{"op":"pong","buffered_bytes":12,"dropped":3}"#
        );
    }

    #[test]
    fn parse_requests() {
        let r = parse_json(r#"{"op":"publish","topic":"a.b","data":null,"id":"x"}"#).unwrap();
        assert_eq!(r.id, Some(FrameId::Str("x".into())));
        assert!(
            matches!(r.op, Op::Publish { ref topic, ref data } if topic == "a.b" && *data == Data::Json(Bytes::from_static(b"null")))
        );

        let r = parse_json(r#"{"op":"subscribe","topic":"a.*"}"#).unwrap();
        assert!(matches!(r.op, Op::Subscribe { ref topic, .. } if topic == "a.*"));

        let frame = rmp_serde::to_vec_named(&serde_json::json!({"op":"ping","id":7})).unwrap();
        let r = parse_msgpack(&frame).unwrap();
        assert_eq!(r.id, Some(FrameId::Num(7)));
        assert!(matches!(r.op, Op::Ping));
    }

    #[test]
    fn subscribe_options_parse() {
        let opts = |text: &str| match parse_json(text).unwrap().op {
            Op::Subscribe { options, .. } => options,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            opts(r#"{"op":"subscribe","topic":"t"}"#),
            SubscribeOptions::default()
        );
        assert_eq!(
            opts(r#"{"op":"subscribe","topic":"t","since":{"epoch":"e1","seq":41}}"#).replay,
            Replay::Since {
                epoch: "e1".into(),
                seq: 41
            }
        );
        assert_eq!(
            opts(r#"{"op":"subscribe","topic":"t.*","rewind":1}"#).replay,
            Replay::Rewind(1)
        );
        assert_eq!(
            opts(r#"{"op":"subscribe","topic":"t","mode":"latest","max_rate":5}"#).mode,
            DeliveryMode::Latest {
                min_interval: Some(Duration::from_millis(200))
            }
        );
        assert_eq!(
            opts(r#"{"op":"subscribe","topic":"t","mode":"all"}"#).mode,
            DeliveryMode::All
        );
        for bad in [
            r#"{"op":"subscribe","topic":"t","since":{"epoch":"e","seq":1},"rewind":2}"#,
            r#"{"op":"subscribe","topic":"t","since":{"epoch":"e"}}"#,
            r#"{"op":"subscribe","topic":"t","since":{"epoch":"e","seq":-1}}"#,
            r#"{"op":"subscribe","topic":"t","rewind":-1}"#,
            r#"{"op":"subscribe","topic":"t","rewind":"all"}"#,
            r#"{"op":"subscribe","topic":"t","max_rate":5}"#,
            r#"{"op":"subscribe","topic":"t","mode":"latest","max_rate":0}"#,
            r#"{"op":"subscribe","topic":"t","mode":"latest","max_rate":-2}"#,
            r#"{"op":"subscribe","topic":"t","mode":"latest","max_rate":"fast"}"#,
            r#"{"op":"subscribe","topic":"t","mode":"newest"}"#,
        ] {
            let err = parse_json(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadFrame, "{bad}");
        }
    }

    #[test]
    fn parse_errors_carry_code_and_id() {
        let cases = [
            (r#"[1,2]"#, ErrorCode::BadFrame, None),
            (r#"{"op":"publish","topic":"a""#, ErrorCode::BadFrame, None),
            (
                r#"{"op":"publish","topic":5,"id":4}"#,
                ErrorCode::BadFrame,
                Some(FrameId::Num(4)),
            ),
            (
                r#"{"op":"publish","topic":"a","id":4}"#,
                ErrorCode::BadFrame,
                Some(FrameId::Num(4)),
            ),
            (r#"{"op":"ping","id":-1}"#, ErrorCode::BadFrame, None),
            (r#"{"op":"ping","id":1.5}"#, ErrorCode::BadFrame, None),
            (
                r#"{"topic":"a","id":2}"#,
                ErrorCode::BadFrame,
                Some(FrameId::Num(2)),
            ),
            (
                r#"{"op":"shout","id":"s"}"#,
                ErrorCode::UnknownOp,
                Some(FrameId::Str("s".into())),
            ),
        ];
        for (text, code, id) in cases {
            let err = parse_json(text).unwrap_err();
            assert_eq!((err.code, err.id), (code, id), "{text}");
        }
        let err = parse_msgpack(&[0x93, 1, 2, 3]).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadFrame);
        // Errors in frames that name a topic carry it, for the topic to be checked first.
        let err = parse_json(r#"{"op":"subscribe","topic":"a..b","mode":"soon"}"#).unwrap_err();
        assert_eq!(err.topic, Some(NamedTopic::Subscribe("a..b".into())));
        let err = parse_json(r#"{"op":"publish","topic":"a.*"}"#).unwrap_err();
        assert_eq!(err.topic, Some(NamedTopic::Publish("a.*".into())));
    }

    #[test]
    fn close_reason_is_truncated_to_fit_a_control_frame() {
        let frame = close_frame(4008, &"é".repeat(100));
        assert!(frame.len() <= 127);
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }
}
