//! Entry points into the decoders of untrusted bytes, for the fuzz targets in `fuzz/` and the
//! property tests below: whatever the bytes, each returns (a frame or an error), never panics.
//! Not part of Crier's API: built only for tests and with the `fuzzing` feature.

use bytes::Bytes;

use crate::api::{self, BodyEncoding};
use crate::data::Data;
use crate::frame::{self, Op};

/// A WebSocket text frame from a JSON client (the bytes as actix hands them over: only
/// valid UTF-8 reaches the decoder).
pub fn json_frame(bytes: &[u8]) {
    if let Ok(text) = std::str::from_utf8(bytes) {
        render(frame::parse_json(text).ok().map(|r| r.op));
    }
}

/// A WebSocket binary frame from a MessagePack client.
pub fn msgpack_frame(bytes: &[u8]) {
    render(frame::parse_msgpack(bytes).ok().map(|r| r.op));
}

/// An HTTP publish body (`POST /api/topics/{topic}`) and batch body (`POST /api/publish`), in
/// both encodings.
pub fn http_body(bytes: &[u8]) {
    for encoding in [BodyEncoding::Json, BodyEncoding::Msgpack] {
        if let Ok(data) = api::decode_data(encoding, Bytes::copy_from_slice(bytes)) {
            render_data(&data);
        }
        if let Ok(items) = api::decode_batch(encoding, bytes) {
            for (_, data) in items {
                render_data(&data);
            }
        }
    }
}

/// Whatever was accepted must also render for subscribers of either encoding.
fn render(op: Option<Op>) {
    if let Some(Op::Publish { topic, data }) = op {
        for encoding in crate::model::Encoding::ALL {
            frame::encode_message(encoding, &topic, 1, &data);
        }
        render_data(&data);
    }
}

fn render_data(data: &Data) {
    let (mut json, mut msgpack) = (Vec::new(), Vec::new());
    data.write_json(&mut json);
    data.write_msgpack(&mut msgpack);
    assert!(
        serde_json::from_slice::<serde::de::IgnoredAny>(&json).is_ok(),
        "accepted data renders as invalid JSON: {data:?}"
    );
    assert!(
        crate::data::msgpack_value_len(&msgpack).is_ok_and(|len| len == msgpack.len()),
        "accepted data renders as invalid MessagePack: {data:?}"
    );
}
