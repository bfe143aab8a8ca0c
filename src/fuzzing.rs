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
    // JSON goes out in text frames: it must be UTF-8 as well as JSON.
    assert!(
        std::str::from_utf8(&json)
            .is_ok_and(|json| serde_json::from_str::<serde::de::IgnoredAny>(json).is_ok()),
        "accepted data renders as invalid JSON: {data:?}"
    );
    assert!(
        crate::data::msgpack_value_len(&msgpack).is_ok_and(|len| len == msgpack.len()),
        "accepted data renders as invalid MessagePack: {data:?}"
    );
    // The renderers fall back to null for data they cannot render: for accepted data that
    // must never happen, so null comes out only for a null (or, from MessagePack, a NaN or an
    // infinity, which JSON renders as null). And a rendering is at most a few times the size
    // of the data: a publisher must not make the broker write much more than it was sent.
    match data {
        Data::Msgpack(b) => {
            assert!(
                json != b"null" || matches!(b.first(), Some(0xc0 | 0xca | 0xcb)),
                "accepted MessagePack data renders as JSON null: {data:?}"
            );
            assert!(
                json.len() <= 8 * b.len() + 64,
                "{} bytes of MessagePack data render as {} bytes of JSON: {data:?}",
                b.len(),
                json.len()
            );
        }
        Data::Json(b) => {
            assert!(
                msgpack != [0xc0] || b.trim_ascii() == b"null",
                "accepted JSON data renders as MessagePack nil: {data:?}"
            );
            assert!(
                msgpack.len() <= 3 * b.len() + 16,
                "{} bytes of JSON data render as {} bytes of MessagePack: {data:?}",
                b.len(),
                msgpack.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::MAX_DEPTH;
    use crate::frame::FrameId;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::test_runner::Config;
    use rmpv::Value;

    /// Cases per property: each property runs in well under 2 s in a debug build. Failures are
    /// not persisted: those found are kept below as regression tests, with their exact bytes.
    fn config(cases: u32) -> Config {
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        }
    }

    fn msgpack(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, value);
        out
    }

    /// Pieces of JSON frames, so that concatenations of them get past the first byte into the
    /// frame's fields and their values.
    fn json_fragment() -> impl Strategy<Value = String> {
        let fixed = prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ":",
            ",",
            " ",
            "\n",
            "\"",
            "\\",
            "\"op\"",
            "\"publish\"",
            "\"subscribe\"",
            "\"unsubscribe\"",
            "\"ping\"",
            "\"auth\"",
            "\"topic\"",
            "\"a.b\"",
            "\"a.*\"",
            "\"data\"",
            "\"id\"",
            "\"since\"",
            "\"epoch\"",
            "\"seq\"",
            "\"rewind\"",
            "\"mode\"",
            "\"latest\"",
            "\"all\"",
            "\"max_rate\"",
            "\"token\"",
            "null",
            "true",
            "false",
            "0",
            "-0",
            "-1",
            "1.5",
            "1e400",
            "-1e400",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "\"\\u0000\"",
            "\"\\ud800\"",
            "\"\\ud83d\\ude00\"",
            "\"\\udc00\\ud800\"",
            "\"\\n\"",
            "\"é\"",
            "\u{feff}",
        ])
        .prop_map(str::to_owned);
        prop_oneof![
            8 => fixed,
            1 => any::<i64>().prop_map(|n| n.to_string()),
            1 => any::<f64>().prop_map(|f| f.to_string()),
            1 => "\"[ -~]{0,8}\"",
        ]
    }

    /// Text made of JSON fragments, most of it starting like a frame.
    fn jsonish() -> impl Strategy<Value = String> {
        (any::<bool>(), vec(json_fragment(), 0..48)).prop_map(|(open, parts)| {
            let open = if open { "{" } else { "" };
            format!("{open}{}", parts.concat())
        })
    }

    /// MessagePack values that are not arrays or maps.
    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f32>().prop_map(Value::F32),
            any::<f64>().prop_map(Value::F64),
            ".{0,24}".prop_map(Value::from),
            vec(any::<u8>(), 0..24).prop_map(Value::Binary),
        ]
    }

    /// Valid map keys: scalars, and arrays and maps of scalars (not of further such keys).
    fn key() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => scalar(),
            1 => vec(scalar(), 0..4).prop_map(Value::Array),
            1 => vec((".{0,4}".prop_map(Value::from), scalar()), 0..3).prop_map(Value::Map),
        ]
    }

    /// Valid MessagePack data.
    fn data_value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key(), inner), 0..6).prop_map(Value::Map),
            ]
        })
    }

    /// A value nested `depth` levels deep, each level an array or a map, around a string.
    fn nested(depth: usize, maps: &[bool]) -> Value {
        (0..depth).fold(Value::from("x"), |inner, level| {
            if maps[level % maps.len()] {
                Value::Map(vec![(Value::from("k"), inner)])
            } else {
                Value::Array(vec![inner])
            }
        })
    }

    /// A map whose key is a map whose key is a map... `depth` times, around a string with a
    /// quote (which JSON escapes once more at each level).
    fn nested_keys(depth: usize) -> Value {
        (0..depth).fold(Value::from("\""), |key, _| {
            Value::Map(vec![(key, Value::Nil)])
        })
    }

    /// Any MessagePack value, invalid data included.
    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            12 => data_value(),
            2 => (any::<i8>(), vec(any::<u8>(), 0..20))
                .prop_map(|(kind, bytes)| Value::Ext(kind, bytes)),
            1 => (0usize..=MAX_DEPTH + 2, vec(any::<bool>(), 1..4))
                .prop_map(|(depth, maps)| nested(depth, &maps)),
            1 => (0usize..40).prop_map(nested_keys),
        ]
    }

    fn field_name() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => prop::sample::select(vec![
                "op", "topic", "data", "id", "since", "epoch", "seq", "rewind", "mode",
                "max_rate", "token",
            ])
            .prop_map(Value::from),
            1 => any_value(),
        ]
    }

    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "publish", "subscribe", "unsubscribe", "ping", "auth", "a.b", "a.*", "latest",
                "all",
            ])
            .prop_map(Value::from),
            2 => any::<u64>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<f64>().prop_map(Value::F64),
            4 => any_value(),
        ]
    }

    /// Frames as maps of frame fields, most of them valid MessagePack.
    fn frame_value() -> impl Strategy<Value = Value> {
        vec((field_name(), field_value()), 0..8).prop_map(Value::Map)
    }

    fn frame_id() -> impl Strategy<Value = Option<Value>> {
        prop::option::of(prop_oneof![
            any::<u64>().prop_map(Value::from),
            "[ -~]{0,16}".prop_map(Value::from),
        ])
    }

    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,12}(\\.[a-z0-9_-]{1,12}){0,3}"
    }

    /// JSON values (finite numbers only: JSON has no others).
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value as J;
        let leaf = prop_oneof![
            Just(J::Null),
            any::<bool>().prop_map(J::Bool),
            any::<i64>().prop_map(J::from),
            any::<u64>().prop_map(J::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(J::Null, J::Number)),
            ".{0,24}".prop_map(J::String),
        ];
        leaf.prop_recursive(6, 48, 6, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(J::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| J::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(config(1024))]

        #[test]
        fn any_bytes_as_a_json_frame(bytes in vec(any::<u8>(), 0..256)) {
            json_frame(&bytes);
        }

        #[test]
        fn any_text_as_a_json_frame(text in any::<String>()) {
            json_frame(text.as_bytes());
            json_frame(format!("{{{text}").as_bytes());
        }

        #[test]
        fn any_bytes_as_a_msgpack_frame(bytes in vec(any::<u8>(), 0..256)) {
            msgpack_frame(&bytes);
        }

        /// Random bytes rarely start with a map marker; these all do.
        #[test]
        fn any_bytes_after_a_map_marker_as_a_msgpack_frame(
            marker in prop_oneof![0x80u8..=0x8f, Just(0xde), Just(0xdf)],
            rest in vec(any::<u8>(), 0..256),
        ) {
            msgpack_frame(&[&[marker][..], &rest].concat());
        }

        #[test]
        fn any_bytes_as_an_http_body(bytes in vec(any::<u8>(), 0..256)) {
            http_body(&bytes);
        }
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn json_fragments_as_a_json_frame(text in jsonish()) {
            json_frame(text.as_bytes());
        }

        #[test]
        fn json_fragments_as_an_http_body(text in jsonish()) {
            http_body(text.as_bytes());
        }

        #[test]
        fn msgpack_values_as_an_http_body(value in any_value()) {
            http_body(&msgpack(&value));
        }

        #[test]
        fn msgpack_values_as_frames(frame in frame_value()) {
            let bytes = msgpack(&frame);
            msgpack_frame(&bytes);
            http_body(&bytes);
        }

        /// Frames cut short, or with one byte changed.
        #[test]
        fn damaged_msgpack_frames(
            frame in frame_value(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = msgpack(&frame);
            let at = at.index(bytes.len());
            msgpack_frame(&bytes[..at]);
            bytes[at] = byte;
            msgpack_frame(&bytes);
        }

        /// Data is accepted up to `MAX_DEPTH` levels of nesting in either encoding, and
        /// renders in the other.
        #[test]
        fn nesting_is_accepted_up_to_the_limit(
            depth in 0usize..=MAX_DEPTH + 2,
            maps in vec(any::<bool>(), 1..4),
        ) {
            let value = nested(depth, &maps);
            let from_msgpack = Data::from_msgpack(msgpack(&value).into());
            let json: serde_json::Value = rmpv::ext::from_value(value).unwrap_or_default();
            let from_json = Data::from_json(serde_json::to_vec(&json).unwrap_or_default().into());
            prop_assert_eq!(from_msgpack.is_ok(), depth <= MAX_DEPTH);
            prop_assert_eq!(from_json.is_ok(), depth <= MAX_DEPTH);
            for data in [from_msgpack, from_json].into_iter().flatten() {
                render_data(&data);
            }
        }

        #[test]
        fn valid_msgpack_publish_frames_are_accepted(
            topic in topic(),
            data in data_value(),
            id in frame_id(),
        ) {
            let mut fields = vec![
                (Value::from("op"), Value::from("publish")),
                (Value::from("topic"), Value::from(topic.as_str())),
                (Value::from("data"), data.clone()),
            ];
            fields.extend(id.map(|id| (Value::from("id"), id)));
            let bytes = msgpack(&Value::Map(fields));
            let request = frame::parse_msgpack(&bytes)
                .map_err(|e| TestCaseError::fail(format!("refused: {}", e.message)))?;
            match request.op {
                Op::Publish { topic: t, data: d } => {
                    prop_assert_eq!(t, topic);
                    prop_assert_eq!(d, Data::Msgpack(msgpack(&data).into()));
                }
                other => prop_assert!(false, "parsed as {:?}", other),
            }
            msgpack_frame(&bytes);
        }

        #[test]
        fn valid_json_publish_frames_are_accepted(
            topic in topic(),
            data in json_value(),
            id in prop::option::of(any::<u64>()),
        ) {
            let data_text = serde_json::to_string(&data).unwrap_or_default();
            let id_field = id.map(|id| format!(r#","id":{id}"#)).unwrap_or_default();
            let text =
                format!(r#"{{"op":"publish","topic":"{topic}","data":{data_text}{id_field}}}"#);
            let request = frame::parse_json(&text)
                .map_err(|e| TestCaseError::fail(format!("refused: {}", e.message)))?;
            prop_assert_eq!(request.id, id.map(FrameId::Num));
            match request.op {
                Op::Publish { topic: t, data: d } => {
                    prop_assert_eq!(t, topic);
                    prop_assert_eq!(&d, &Data::Json(data_text.clone().into()));
                    // MessagePack subscribers get the same value.
                    let mut packed = Vec::new();
                    d.write_msgpack(&mut packed);
                    let expected: serde_json::Value =
                        serde_json::from_str(&data_text).unwrap_or_default();
                    let unpacked: serde_json::Value = rmp_serde::from_slice(&packed)
                        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                    prop_assert_eq!(unpacked, expected);
                }
                other => prop_assert!(false, "parsed as {:?}", other),
            }
            json_frame(text.as_bytes());
        }

        #[test]
        fn valid_msgpack_batches_are_accepted(items in vec((topic(), data_value()), 0..4)) {
            let batch = Value::Array(
                items
                    .iter()
                    .map(|(topic, data)| {
                        Value::Map(vec![
                            (Value::from("topic"), Value::from(topic.as_str())),
                            (Value::from("data"), data.clone()),
                        ])
                    })
                    .collect(),
            );
            let bytes = msgpack(&batch);
            let decoded = api::decode_batch(BodyEncoding::Msgpack, &bytes)
                .map_err(|_| TestCaseError::fail("refused"))?;
            let expected: Vec<(String, Data)> = items
                .iter()
                .map(|(topic, data)| (topic.clone(), Data::Msgpack(msgpack(data).into())))
                .collect();
            prop_assert_eq!(decoded, expected);
            http_body(&bytes);
        }
    }

    // Regression tests: inputs the fuzz targets and the properties above found, minimised.

    /// JSON data with an unpaired surrogate escape was accepted, and MessagePack subscribers
    /// got nil for it (serde_json skips `\ud800` but refuses it when it reads the string).
    #[test]
    fn json_frame_with_an_unpaired_surrogate_in_data() {
        let found = b"{\"op\":\"publish\",\"topic\":\"\",\"data\":\"\\ud800\xc3\xa9x\\\\\"}";
        json_frame(found);
        for text in [
            std::str::from_utf8(found).unwrap_or_default(),
            r#"{"op":"publish","topic":"t","data":"\ud800"}"#,
            r#"{"op":"publish","topic":"t","data":["\udc00\ud800"]}"#,
        ] {
            assert!(frame::parse_json(text).is_err(), "{text}");
        }
        // A paired surrogate escape is a character like any other.
        let pair = r#"{"op":"publish","topic":"t","data":"\ud83d\ude00 \u00e9 \\ud800"}"#;
        assert!(frame::parse_json(pair).is_ok());
        json_frame(pair.as_bytes());
    }

    /// An HTTP JSON body with a string that is not UTF-8 was accepted (serde_json does not
    /// check strings it skips over): JSON subscribers would have got a text frame that is not
    /// UTF-8, and MessagePack subscribers nil.
    #[test]
    fn http_json_body_that_is_not_utf8() {
        http_body(b"\"\xda\"");
        assert!(api::decode_data(BodyEncoding::Json, Bytes::from_static(b"\"\xda\"")).is_err());
        assert!(
            api::decode_batch(BodyEncoding::Json, b"[{\"topic\":\"t\",\"data\":\"\xda\"}]")
                .is_err()
        );
    }

    /// JSON numbers beyond f64's range were accepted, and MessagePack subscribers got nil for
    /// the whole data.
    #[test]
    fn json_number_out_of_range() {
        http_body(b"1e400");
        let long = format!("[{}]", "9".repeat(309));
        let long_decimal = format!("-2{}.5", "0".repeat(308));
        for body in ["1e400", "[1,-1e400]", &long, &long_decimal] {
            assert!(
                api::decode_data(BodyEncoding::Json, Bytes::copy_from_slice(body.as_bytes()))
                    .is_err(),
                "{body}"
            );
        }
        assert!(frame::parse_json(r#"{"op":"publish","topic":"t","data":{"x":1E+400}}"#).is_err());
        // In range, however written.
        let in_range = format!("{}.5", "9".repeat(308));
        for body in [
            "1e-400",
            "1.5E+300",
            "-0",
            "18446744073709551616",
            "true",
            "[1,false]",
            &in_range,
        ] {
            let data =
                api::decode_data(BodyEncoding::Json, Bytes::copy_from_slice(body.as_bytes()));
            assert!(data.is_ok(), "{body}");
            http_body(body.as_bytes());
        }
    }

    /// MessagePack data nested 50 deep or more was accepted but rendered as JSON null.
    #[test]
    fn msgpack_data_nested_50_deep() {
        http_body(&[vec![0x91; 50], vec![0xc0]].concat());
        http_body(&[vec![0x91; MAX_DEPTH], vec![0xa1, b'x']].concat());
    }

    /// A map key inside a map key inside a map key...: each level of JSON escapes the text of
    /// the level inside once more, so the JSON of 1 KB of MessagePack was gigabytes (the fuzz
    /// target spent 40 s on one input of 1035 bytes with keys nested 23 deep).
    #[test]
    fn msgpack_map_keys_nested_in_map_keys() {
        let data = msgpack(&nested_keys(40));
        assert!(Data::from_msgpack(data.clone().into()).is_err());
        http_body(&data);
        let frame = Value::Map(vec![
            (Value::from("op"), Value::from("publish")),
            (Value::from("topic"), Value::from("t")),
            (Value::from("data"), nested_keys(40)),
        ]);
        assert!(frame::parse_msgpack(&msgpack(&frame)).is_err());
        msgpack_frame(&msgpack(&frame));
        // One level is fine: an array or a map as a key, with its JSON text as the JSON key.
        for key in [
            nested_keys(1),
            Value::Array(vec![Value::from(1), Value::from("\"")]),
        ] {
            let data = msgpack(&Value::Map(vec![(key, Value::Nil)]));
            assert!(Data::from_msgpack(data.clone().into()).is_ok());
            http_body(&data);
        }
    }
}
