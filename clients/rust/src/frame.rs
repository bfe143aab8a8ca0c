//! Crier's wire protocol from the client's side: requests out, server frames in.
//!
//! `message` frames, the hot path, are not copied: a [`Message`] keeps the received frame and
//! the positions of its topic and data in it.

use std::ops::Range;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Encoding, Error, Mode, Since, SubscribeOptions};

/// A message published on a topic the client subscribed to.
#[derive(Clone)]
pub struct Message {
    frame: Bytes,
    encoding: Encoding,
    topic: Range<usize>,
    data: Range<usize>,
    seq: u64,
    /// When `data` is a MessagePack `bin`, the length of its header (2, 3 or 5): [`Message::bytes`]
    /// then slices without reading the value again. 0 otherwise.
    bin: u8,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("topic", &self.topic())
            .field("seq", &self.seq)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

impl Message {
    pub fn topic(&self) -> &str {
        // Checked to be UTF-8 when the frame was parsed (and Crier topics are ASCII).
        std::str::from_utf8(&self.frame[self.topic.clone()]).unwrap_or_default()
    }

    /// The message's sequence number on its topic.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The data as it arrived: JSON text, or one MessagePack value.
    pub fn raw_data(&self) -> &[u8] {
        &self.frame[self.data.clone()]
    }

    /// Decodes the data.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        match self.encoding {
            Encoding::Json => {
                serde_json::from_slice(self.raw_data()).map_err(|e| Error::Decode(e.to_string()))
            }
            Encoding::Msgpack => {
                rmp_serde::from_slice(self.raw_data()).map_err(|e| Error::Decode(e.to_string()))
            }
        }
    }

    /// The bytes of data published with [`crate::Client::publish_bytes`]: a MessagePack `bin`, or
    /// the base64 string a JSON connection receives it as.
    pub fn bytes(&self) -> Result<Bytes, Error> {
        match self.encoding {
            Encoding::Msgpack if self.bin == 0 => {
                Err(Error::Decode("the data is not a MessagePack bin".into()))
            }
            Encoding::Msgpack => Ok(self
                .frame
                .slice(self.data.start + usize::from(self.bin)..self.data.end)),
            Encoding::Json => {
                use base64::Engine as _;
                let text: String = serde_json::from_slice(self.raw_data())
                    .map_err(|e| Error::Decode(e.to_string()))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| Error::Decode(e.to_string()))?;
                Ok(bytes.into())
            }
        }
    }
}

/// The first frame on every connection.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Welcome {
    pub connection: String,
    /// The node (server process) the connection landed on; older servers do not send it.
    #[serde(default)]
    pub node: Option<String>,
    pub encoding: String,
    pub server: String,
    pub limits: Limits,
    /// Whether this connection's WebSocket messages may carry several frames.
    #[serde(default)]
    pub batch: bool,
    /// False when the connection opened without a token on a server that requires one: it must
    /// send [`crate::Client::auth`] before anything else, within `limits.auth_timeout_ms`.
    #[serde(default = "yes")]
    pub authenticated: bool,
    /// The token's subject (`sub`), when it has one.
    #[serde(default)]
    pub user: Option<String>,
    /// When the connection's token expires (Unix seconds, the server's leeway included): the
    /// server closes the connection with 4002 then, unless a fresh token came with `auth`.
    #[serde(default)]
    pub expires_at: Option<u64>,
}

fn yes() -> bool {
    true
}

/// The server's limits, from [`Welcome`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Limits {
    pub max_message_bytes: u64,
    pub max_frame_bytes: u64,
    pub max_buffered_bytes: u64,
    pub max_subscriptions: u64,
    pub slow_consumer: String,
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    /// Publishes a second allowed per connection (0: no limit); over it, `rate_limited`.
    #[serde(default)]
    pub publish_rate: u64,
    /// Bad frames in a minute that close the connection with 1008 (0: never).
    #[serde(default)]
    pub max_bad_frames: u64,
    /// How long a connection without a token has to send `auth`.
    #[serde(default)]
    pub auth_timeout_ms: u64,
}

/// A server frame other than `message`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Control {
    Welcome(Welcome),
    Ack {
        id: u64,
        seq: Option<u64>,
        epoch: Option<String>,
        recovered: Option<bool>,
    },
    Pong {
        id: Option<u64>,
    },
    Error {
        id: Option<u64>,
        code: String,
        message: String,
        /// The subscription this error ended.
        #[serde(default)]
        topic: Option<String>,
    },
}

pub(crate) enum Incoming {
    Message(Message),
    /// Boxed: rare, and bigger than a message, which would otherwise be moved at its size.
    Control(Box<Control>),
}

/// Parses one server frame (the payload of a WebSocket message).
pub(crate) fn parse(frame: Bytes, encoding: Encoding) -> Result<Incoming, Error> {
    match encoding {
        Encoding::Json => parse_json(frame),
        Encoding::Msgpack => parse_msgpack(&frame, 0).map(|(incoming, _)| incoming),
    }
}

/// The frames of one WebSocket message, parsed one by one: one frame, or several on a batching
/// connection (JSON frames one per line, MessagePack frames back to back). Nothing is collected:
/// the caller takes each as it comes, so a message frame is moved once on its way to the
/// application. After a frame that does not parse it yields nothing more (MessagePack frames
/// have no separator to resynchronise on).
pub(crate) fn frames(data: Bytes, encoding: Encoding) -> Frames {
    Frames {
        data,
        encoding,
        start: 0,
    }
}

pub(crate) struct Frames {
    data: Bytes,
    encoding: Encoding,
    start: usize,
}

impl Iterator for Frames {
    type Item = Result<Incoming, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = &self.data;
        let parsed = match self.encoding {
            Encoding::Json => loop {
                if self.start >= data.len() {
                    return None;
                }
                let start = self.start;
                let end = data[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(data.len(), |i| start + i);
                self.start = end + 1;
                if end > start {
                    break parse_json(data.slice(start..end));
                }
            },
            Encoding::Msgpack => {
                if self.start >= data.len() {
                    return None;
                }
                parse_msgpack(data, self.start).map(|(incoming, end)| {
                    self.start = end;
                    incoming
                })
            }
        };
        if parsed.is_err() {
            self.start = self.data.len();
        }
        Some(parsed)
    }
}

/// The start of a `message` frame in Crier's own layout: `{"op":"message","topic":"…","seq":…,"data":…}`.
const JSON_MESSAGE_PREFIX: &[u8] = br#"{"op":"message","topic":""#;

/// A JSON `message` frame in Crier's own layout; None if it is laid out otherwise.
fn parse_json_message(frame: &Bytes) -> Option<Message> {
    let rest = frame.strip_prefix(JSON_MESSAGE_PREFIX)?;
    // Topics never need escaping: the first quote ends it.
    let topic_len = rest.iter().position(|&b| b == b'"')?;
    let topic_start = JSON_MESSAGE_PREFIX.len();
    let rest = rest[topic_len..].strip_prefix(br#"","seq":"#)?;
    let digits = rest.iter().position(|b| !b.is_ascii_digit())?;
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(br#","data":"#)?;
    let data_start = frame.len() - rest.len();
    let data_end = frame
        .len()
        .checked_sub(1)
        .filter(|&end| frame[end] == b'}' && end > data_start)?;
    Some(Message {
        frame: frame.clone(),
        encoding: Encoding::Json,
        topic: topic_start..topic_start + topic_len,
        data: data_start..data_end,
        seq,
        bin: 0,
    })
}

fn parse_json(frame: Bytes) -> Result<Incoming, Error> {
    if let Some(message) = parse_json_message(&frame) {
        return Ok(Incoming::Message(message));
    }
    #[derive(Deserialize)]
    struct Peek<'a> {
        op: &'a str,
        #[serde(default, borrow)]
        topic: Option<&'a str>,
        #[serde(default)]
        seq: Option<u64>,
        #[serde(default, borrow)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let peek: Peek =
        serde_json::from_slice(&frame).map_err(|e| Error::Protocol(format!("bad frame: {e}")))?;
    if peek.op == "message" {
        let (Some(topic), Some(seq), Some(data)) = (peek.topic, peek.seq, peek.data) else {
            return Err(Error::Protocol("message without topic, seq or data".into()));
        };
        let range = |s: &str| {
            let start = s.as_ptr() as usize - frame.as_ptr() as usize;
            start..start + s.len()
        };
        let (topic, data) = (range(topic), range(data.get()));
        return Ok(Incoming::Message(Message {
            frame,
            encoding: Encoding::Json,
            topic,
            data,
            seq,
            bin: 0,
        }));
    }
    serde_json::from_slice(&frame)
        .map(|control| Incoming::Control(Box::new(control)))
        .map_err(|e| Error::Protocol(format!("bad {} frame: {e}", peek.op)))
}

/// Reads a MessagePack str (marker and bytes) without checking it is UTF-8; returns its range.
fn str_range(frame: &[u8], rest: &mut &[u8]) -> Option<std::ops::Range<usize>> {
    let (header, len) = str_header(rest)?;
    let start = frame.len() - rest.len() + header;
    *rest = rest.get(header + len..)?;
    Some(start..start + len)
}

/// The header of the MessagePack str at the front of `rest`: its length and the string's.
fn str_header(rest: &[u8]) -> Option<(usize, usize)> {
    let marker = *rest.first()?;
    match marker {
        0xa0..=0xbf => Some((1, usize::from(marker & 0x1f))),
        0xd9..=0xdb => value_header(rest),
        _ => None,
    }
}

/// The MessagePack unsigned integer at the front of `rest` (how Crier encodes `seq`), read
/// without rmp's general reader: the integer and its length. None for any other value.
fn uint(rest: &[u8]) -> Option<(u64, usize)> {
    let marker = *rest.first()?;
    let bytes = |n: usize| rest.get(1..1 + n);
    Some(match marker {
        0x00..=0x7f => (u64::from(marker), 1),
        0xcc => (u64::from(*rest.get(1)?), 2),
        0xcd => (u64::from(u16::from_be_bytes(bytes(2)?.try_into().ok()?)), 3),
        0xce => (u64::from(u32::from_be_bytes(bytes(4)?.try_into().ok()?)), 5),
        0xcf => (u64::from_be_bytes(bytes(8)?.try_into().ok()?), 9),
        _ => return None,
    })
}

/// For a scalar, string or `bin` at the front of `rest`: the length of its header and of its
/// body. None for any other value (array, map, ext) and for a truncated header.
fn value_header(rest: &[u8]) -> Option<(usize, usize)> {
    let marker = *rest.first()?;
    Some(match marker {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0),
        0xa0..=0xbf => (1, usize::from(marker & 0x1f)),
        0xcc | 0xd0 => (2, 0),
        0xcd | 0xd1 => (3, 0),
        0xca | 0xce | 0xd2 => (5, 0),
        0xcb | 0xcf | 0xd3 => (9, 0),
        0xc4 | 0xd9 => (2, usize::from(*rest.get(1)?)),
        0xc5 | 0xda => (
            3,
            usize::from(u16::from_be_bytes(rest.get(1..3)?.try_into().ok()?)),
        ),
        0xc6 | 0xdb => (
            5,
            u32::from_be_bytes(rest.get(1..5)?.try_into().ok()?) as usize,
        ),
        _ => return None,
    })
}

/// Steps over one MessagePack value: scalars, strings and `bin` directly (the usual data), the
/// rest through rmpv. Returns the length of its header when it is a `bin` (0 otherwise).
fn skip_value(rest: &mut &[u8]) -> Option<u8> {
    match value_header(rest) {
        Some((header, len)) => {
            let bin = if matches!(rest[0], 0xc4..=0xc6) {
                header as u8
            } else {
                0
            };
            *rest = rest.get(header + len..)?;
            Some(bin)
        }
        None => {
            rmpv::decode::read_value_ref(rest).ok()?;
            Some(0)
        }
    }
}

/// Crier encodes every `message` frame the same way: a map of `op`, `topic`, `seq`, `data`, in
/// that order. Such a frame is read straight through; anything else takes the general path.
const MSGPACK_MESSAGE_PREFIX: &[u8] = b"\x84\xa2op\xa7message\xa5topic";

/// A `message` frame in Crier's own layout, starting at `start`; None if it is laid out otherwise.
fn parse_msgpack_message(data: &Bytes, start: usize) -> Option<(Message, usize)> {
    let frame: &[u8] = data;
    let mut rest = frame.get(start..)?.strip_prefix(MSGPACK_MESSAGE_PREFIX)?;
    let topic = str_range(frame, &mut rest)?;
    rest = rest.strip_prefix(b"\xa3seq")?;
    let (seq, len) = uint(rest)?;
    rest = rest[len..].strip_prefix(b"\xa4data")?;
    let data_start = frame.len() - rest.len();
    let bin = skip_value(&mut rest)?;
    let end = frame.len() - rest.len();
    let message = Message {
        frame: data.clone(),
        encoding: Encoding::Msgpack,
        topic,
        data: data_start..end,
        seq,
        bin,
    };
    Some((message, end))
}

/// Parses the MessagePack frame starting at `start` of `data`; returns it and where it ends.
fn parse_msgpack(data: &Bytes, start: usize) -> Result<(Incoming, usize), Error> {
    if let Some((message, end)) = parse_msgpack_message(data, start) {
        return Ok((Incoming::Message(message), end));
    }
    let bad = |what: &str| Error::Protocol(format!("bad frame: {what}"));
    let frame: &[u8] = data;
    let mut rest: &[u8] = frame.get(start..).ok_or_else(|| bad("truncated"))?;
    let entries = rmp::decode::read_map_len(&mut rest).map_err(|_| bad("not a map"))?;
    let (mut op, mut topic, mut seq, mut payload) = (None, None, None, None);
    let mut bin = 0;
    for _ in 0..entries {
        let key = str_range(frame, &mut rest).ok_or_else(|| bad("a key is not a string"))?;
        let value_start = frame.len() - rest.len();
        match &frame[key] {
            b"op" => op = Some(str_range(frame, &mut rest).ok_or_else(|| bad("op"))?),
            // Checked to be UTF-8 when read (`Message::topic`): Crier topics are ASCII.
            b"topic" => topic = Some(str_range(frame, &mut rest).ok_or_else(|| bad("topic"))?),
            b"seq" => seq = Some(rmp::decode::read_int(&mut rest).map_err(|_| bad("seq"))?),
            key => {
                let value_bin = skip_value(&mut rest).ok_or_else(|| bad("a value"))?;
                if key == b"data" {
                    payload = Some(value_start..frame.len() - rest.len());
                    bin = value_bin;
                }
            }
        }
    }
    let end = frame.len() - rest.len();
    if op.is_some_and(|op| &frame[op] == b"message") {
        let (Some(topic), Some(seq), Some(data_range)) = (topic, seq, payload) else {
            return Err(bad("message without topic, seq or data"));
        };
        let message = Message {
            frame: data.clone(),
            encoding: Encoding::Msgpack,
            topic,
            data: data_range,
            seq,
            bin,
        };
        return Ok((Incoming::Message(message), end));
    }
    let control = rmp_serde::from_slice(&frame[start..end])
        .map_err(|e| Error::Protocol(format!("bad frame: {e}")))?;
    Ok((Incoming::Control(Box::new(control)), end))
}

/// The data of a publish, encoded for the connection's encoding.
pub(crate) enum Payload {
    /// Any serializable value, already encoded in the connection's encoding.
    Encoded(Vec<u8>),
    /// Bytes: MessagePack `bin`, base64 text in JSON.
    Bytes(Bytes),
}

#[derive(Serialize)]
struct Request<'a> {
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<&'a Since>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rewind: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
}

impl<'a> Request<'a> {
    fn new(op: &'a str, topic: Option<&'a str>, id: Option<u64>) -> Self {
        Request {
            op,
            topic,
            id,
            since: None,
            rewind: None,
            mode: None,
            max_rate: None,
            token: None,
        }
    }
}

fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Result<Vec<u8>, Error> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).map_err(|e| Error::Encode(e.to_string())),
        Encoding::Msgpack => {
            rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
        }
    }
}

pub(crate) fn subscribe(
    encoding: Encoding,
    topic: &str,
    options: &SubscribeOptions,
    id: u64,
) -> Result<Vec<u8>, Error> {
    let mut request = Request::new("subscribe", Some(topic), Some(id));
    request.since = options.since.as_ref();
    request.rewind = options.rewind;
    match options.mode {
        Mode::All => {}
        Mode::Latest { max_rate } => {
            request.mode = Some("latest");
            request.max_rate = max_rate;
        }
    }
    encode(encoding, &request)
}

pub(crate) fn simple(
    encoding: Encoding,
    op: &str,
    topic: Option<&str>,
    id: Option<u64>,
) -> Result<Vec<u8>, Error> {
    encode(encoding, &Request::new(op, topic, id))
}

/// `{"op":"auth","token":...,"id":...}`: a fresh token for the connection.
pub(crate) fn auth(encoding: Encoding, token: &str, id: u64) -> Result<Vec<u8>, Error> {
    let mut request = Request::new("auth", None, Some(id));
    request.token = Some(token);
    encode(encoding, &request)
}

/// Encodes a value as a publish's data.
pub(crate) fn data<T: Serialize + ?Sized>(encoding: Encoding, value: &T) -> Result<Payload, Error> {
    encode(encoding, &value).map(Payload::Encoded)
}

/// A publish frame: the envelope with the (already encoded) data spliced in.
pub(crate) fn publish(
    encoding: Encoding,
    topic: &str,
    payload: &Payload,
    id: Option<u64>,
) -> Result<Vec<u8>, Error> {
    match encoding {
        Encoding::Json => {
            let mut out = Vec::with_capacity(64 + topic.len());
            out.extend_from_slice(br#"{"op":"publish","topic":"#);
            serde_json::to_writer(&mut out, topic).map_err(|e| Error::Encode(e.to_string()))?;
            if let Some(id) = id {
                out.extend_from_slice(format!(r#","id":{id}"#).as_bytes());
            }
            out.extend_from_slice(br#","data":"#);
            match payload {
                Payload::Encoded(data) => out.extend_from_slice(data),
                Payload::Bytes(bytes) => {
                    use base64::Engine as _;
                    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
                    serde_json::to_writer(&mut out, &text)
                        .map_err(|e| Error::Encode(e.to_string()))?;
                }
            }
            out.push(b'}');
            Ok(out)
        }
        Encoding::Msgpack => {
            let mut out = Vec::with_capacity(48 + topic.len());
            let write = |e: rmp::encode::ValueWriteError| Error::Encode(e.to_string());
            rmp::encode::write_map_len(&mut out, if id.is_some() { 4 } else { 3 })
                .map_err(write)?;
            rmp::encode::write_str(&mut out, "op").map_err(write)?;
            rmp::encode::write_str(&mut out, "publish").map_err(write)?;
            rmp::encode::write_str(&mut out, "topic").map_err(write)?;
            rmp::encode::write_str(&mut out, topic).map_err(write)?;
            if let Some(id) = id {
                rmp::encode::write_str(&mut out, "id").map_err(write)?;
                rmp::encode::write_uint(&mut out, id).map_err(write)?;
            }
            rmp::encode::write_str(&mut out, "data").map_err(write)?;
            match payload {
                Payload::Encoded(data) => out.extend_from_slice(data),
                Payload::Bytes(bytes) => {
                    rmp::encode::write_bin(&mut out, bytes).map_err(write)?;
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(incoming: Incoming) -> Message {
        match incoming {
            Incoming::Message(m) => m,
            Incoming::Control(c) => panic!("expected a message, got {c:?}"),
        }
    }

    /// A MessagePack `message` frame in Crier's layout, up to and including the `data` key.
    fn msgpack_message_head(topic: &str, seq: u64) -> Vec<u8> {
        let mut m = Vec::new();
        rmp::encode::write_map_len(&mut m, 4).unwrap();
        for (k, v) in [("op", "message"), ("topic", topic)] {
            rmp::encode::write_str(&mut m, k).unwrap();
            rmp::encode::write_str(&mut m, v).unwrap();
        }
        rmp::encode::write_str(&mut m, "seq").unwrap();
        rmp::encode::write_uint(&mut m, seq).unwrap();
        rmp::encode::write_str(&mut m, "data").unwrap();
        m
    }

    fn control(incoming: Incoming) -> Control {
        match incoming {
            Incoming::Control(c) => *c,
            Incoming::Message(m) => panic!("expected a control frame, got {m:?}"),
        }
    }

    #[test]
    fn message_frames_are_parsed_in_place() {
        let json =
            Bytes::from_static(br#"{"op":"message","topic":"a.b","seq":7,"data":{"x":[1,2]}}"#);
        let m = message(parse(json, Encoding::Json).unwrap());
        assert_eq!(
            (m.topic(), m.seq(), m.raw_data()),
            ("a.b", 7, &br#"{"x":[1,2]}"#[..])
        );
        assert_eq!(
            m.decode::<serde_json::Value>().unwrap(),
            serde_json::json!({"x": [1, 2]})
        );

        let value =
            serde_json::json!({"op": "message", "topic": "a.b", "seq": 7, "data": {"x": [1, 2]}});
        let mp = Bytes::from(rmp_serde::to_vec_named(&value).unwrap());
        let m = message(parse(mp, Encoding::Msgpack).unwrap());
        assert_eq!((m.topic(), m.seq()), ("a.b", 7));
        assert_eq!(
            m.decode::<serde_json::Value>().unwrap(),
            serde_json::json!({"x": [1, 2]})
        );
    }

    #[test]
    fn bytes_travel_as_bin_or_base64() {
        let payload = Payload::Bytes(Bytes::from_static(&[0, 1, 2, 255]));
        for encoding in [Encoding::Json, Encoding::Msgpack] {
            let frame = publish(encoding, "t", &payload, Some(3)).unwrap();
            // The server's message frame carries the same data value.
            let data_start = match encoding {
                Encoding::Json => frame.windows(7).position(|w| w == br#""data":"#).unwrap() + 7,
                Encoding::Msgpack => frame.windows(5).position(|w| w == b"\xa4data").unwrap() + 5,
            };
            let data = &frame[data_start..frame.len() - usize::from(encoding == Encoding::Json)];
            let mut message = match encoding {
                Encoding::Json => br#"{"op":"message","topic":"t","seq":1,"data":"#.to_vec(),
                Encoding::Msgpack => msgpack_message_head("t", 1),
            };
            message.extend_from_slice(data);
            if encoding == Encoding::Json {
                message.push(b'}');
            }
            let m = self::message(parse(Bytes::from(message), encoding).unwrap());
            assert_eq!(&m.bytes().unwrap()[..], &[0, 1, 2, 255], "{encoding:?}");
        }
    }

    #[test]
    fn batched_messages_are_all_parsed() {
        let json = Bytes::from_static(b"{\"op\":\"message\",\"topic\":\"a\",\"seq\":1,\"data\":1}\n{\"op\":\"pong\",\"id\":4}\n{\"op\":\"message\",\"topic\":\"b\",\"seq\":2,\"data\":[2]}");
        let mut out: Vec<Incoming> = frames(json, Encoding::Json).map(Result::unwrap).collect();
        assert_eq!(out.len(), 3);
        let m = message(out.pop().unwrap());
        assert_eq!((m.topic(), m.seq(), m.raw_data()), ("b", 2, &b"[2]"[..]));
        assert!(matches!(
            control(out.pop().unwrap()),
            Control::Pong { id: Some(4) }
        ));

        let mut mp = Vec::new();
        for (topic, seq) in [("a", 1), ("b", 2)] {
            mp.extend(
                rmp_serde::to_vec_named(
                    &serde_json::json!({"op": "message", "topic": topic, "seq": seq, "data": seq}),
                )
                .unwrap(),
            );
        }
        let out: Vec<Incoming> = frames(Bytes::from(mp), Encoding::Msgpack)
            .map(Result::unwrap)
            .collect();
        let seqs: Vec<u64> = out
            .iter()
            .map(|i| match i {
                Incoming::Message(m) => m.decode::<u64>().unwrap(),
                _ => 0,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[test]
    fn the_fast_path_and_the_general_path_agree() {
        let cases = [
            serde_json::json!({"op": "message", "topic": "a.b", "seq": 7, "data": {"x": [1, "}"]}}),
            serde_json::json!({"op": "message", "topic": "t", "seq": 18446744073709551615u64, "data": null}),
        ];
        /// A message frame with its fields in Crier's order.
        #[derive(Serialize)]
        struct InOrder<'a> {
            op: &'a str,
            topic: &'a str,
            seq: u64,
            data: &'a serde_json::Value,
        }
        for value in cases {
            let frame = InOrder {
                op: "message",
                topic: value["topic"].as_str().unwrap(),
                seq: value["seq"].as_u64().unwrap(),
                data: &value["data"],
            };
            let json = Bytes::from(serde_json::to_vec(&frame).unwrap());
            let fast = parse_json_message(&json).expect("Crier's layout");
            let mp = Bytes::from(rmp_serde::to_vec_named(&frame).unwrap());
            let (fast_mp, end) = parse_msgpack_message(&mp, 0).expect("Crier's layout");
            assert_eq!(end, mp.len());
            for m in [&fast, &fast_mp] {
                assert_eq!(
                    (m.topic(), m.seq()),
                    (
                        value["topic"].as_str().unwrap(),
                        value["seq"].as_u64().unwrap()
                    )
                );
                assert_eq!(m.decode::<serde_json::Value>().unwrap(), value["data"]);
            }
        }
        // Another key order still parses, through the general path.
        let reordered = Bytes::from_static(br#"{"seq":3,"op":"message","data":1,"topic":"z"}"#);
        assert!(parse_json_message(&reordered).is_none());
        let Incoming::Message(m) = parse(reordered, Encoding::Json).unwrap() else {
            panic!("message expected")
        };
        assert_eq!((m.topic(), m.seq(), m.raw_data()), ("z", 3, &b"1"[..]));
    }

    #[test]
    fn every_width_of_seq_and_bin_reads_alike_on_both_paths() {
        for (seq, len) in [
            (5u64, 3usize),
            (200, 255),
            (60_000, 300),
            (70_000, 70_000),
            (u64::MAX, 0),
        ] {
            let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut fast = msgpack_message_head("a.b", seq);
            rmp::encode::write_bin(&mut fast, &body).unwrap();
            // The same fields in another order take the general path.
            let mut general = Vec::new();
            rmp::encode::write_map_len(&mut general, 4).unwrap();
            rmp::encode::write_str(&mut general, "data").unwrap();
            rmp::encode::write_bin(&mut general, &body).unwrap();
            rmp::encode::write_str(&mut general, "seq").unwrap();
            rmp::encode::write_uint(&mut general, seq).unwrap();
            for (k, v) in [("topic", "a.b"), ("op", "message")] {
                rmp::encode::write_str(&mut general, k).unwrap();
                rmp::encode::write_str(&mut general, v).unwrap();
            }
            let fast = Bytes::from(fast);
            assert!(parse_msgpack_message(&fast, 0).is_some(), "seq {seq}");
            assert!(parse_msgpack_message(&Bytes::from(general.clone()), 0).is_none());
            for frame in [fast, Bytes::from(general)] {
                let m = message(parse(frame, Encoding::Msgpack).unwrap());
                assert_eq!((m.topic(), m.seq()), ("a.b", seq));
                assert_eq!(&m.bytes().unwrap()[..], &body[..], "seq {seq}, {len} bytes");
            }
        }
        // Data that is not a bin has no bytes, on either path.
        let not_bin = serde_json::json!({"op": "message", "topic": "t", "seq": 1, "data": "text"});
        let m = message(
            parse(
                Bytes::from(rmp_serde::to_vec_named(&not_bin).unwrap()),
                Encoding::Msgpack,
            )
            .unwrap(),
        );
        assert!(matches!(m.bytes(), Err(Error::Decode(_))));
        // A truncated bin is a bad frame, not a message pointing past the end.
        let mut truncated = msgpack_message_head("t", 1);
        rmp::encode::write_bin_len(&mut truncated, 10).unwrap();
        truncated.extend_from_slice(b"short");
        assert!(parse(Bytes::from(truncated), Encoding::Msgpack).is_err());
    }

    #[test]
    fn frames_stop_after_one_that_does_not_parse() {
        let mut batch = rmp_serde::to_vec_named(
            &serde_json::json!({"op": "message", "topic": "a", "seq": 1, "data": 1}),
        )
        .unwrap();
        batch.push(0xc1); // never used in MessagePack
        batch.extend(
            rmp_serde::to_vec_named(
                &serde_json::json!({"op": "message", "topic": "b", "seq": 2, "data": 2}),
            )
            .unwrap(),
        );
        let results: Vec<_> = frames(Bytes::from(batch), Encoding::Msgpack).collect();
        assert_eq!(results.len(), 2);
        assert!(matches!(results[0], Ok(Incoming::Message(_))));
        assert!(results[1].is_err());
        // JSON lines: empty lines are skipped.
        let json = Bytes::from_static(b"\n{\"op\":\"pong\",\"id\":1}\n\n");
        let mut results: Vec<_> = frames(json, Encoding::Json).collect();
        assert_eq!(results.len(), 1);
        assert!(matches!(
            control(results.pop().unwrap().unwrap()),
            Control::Pong { id: Some(1) }
        ));
    }

    #[test]
    fn control_frames() {
        let ack =
            Bytes::from_static(br#"{"op":"ack","id":3,"seq":0,"epoch":"e","recovered":true}"#);
        let Control::Ack {
            id,
            seq,
            epoch,
            recovered,
        } = control(parse(ack, Encoding::Json).unwrap())
        else {
            panic!("ack expected")
        };
        assert_eq!(
            (id, seq, epoch.as_deref(), recovered),
            (3, Some(0), Some("e"), Some(true))
        );
        let error = serde_json::json!({"op": "error", "code": "bad_frame", "message": "no"});
        let frame = Bytes::from(rmp_serde::to_vec_named(&error).unwrap());
        assert!(matches!(
            control(parse(frame, Encoding::Msgpack).unwrap()),
            Control::Error { id: None, .. }
        ));
        assert!(parse(Bytes::from_static(b"[1]"), Encoding::Json).is_err());
        assert!(parse(Bytes::from_static(&[0x91, 0x01]), Encoding::Msgpack).is_err());
    }
}
