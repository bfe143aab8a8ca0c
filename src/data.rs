//! Message `data` as a publisher sent it, and its form in each wire encoding.
//!
//! Data is validated once when it arrives and kept in its publisher's encoding. It is rendered
//! into the other encoding only when a subscriber of that encoding needs it. MessagePack values
//! JSON has no word for are mapped as `proto/README.md` says: `bin` becomes a base64 string,
//! `ext` becomes `{"ext": type, "data": "<base64>"}`, map keys that are not strings become their
//! JSON text, and non-finite floats become `null`.

use base64::Engine as _;
use bytes::Bytes;
use rmpv::ValueRef;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// How deeply nested a MessagePack value may be (serde_json's own limit for JSON is 128).
const MAX_MSGPACK_DEPTH: usize = 128;

/// One message's data, valid in the encoding it is held in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Data {
    /// JSON text of one value.
    Json(Bytes),
    /// One MessagePack value.
    Msgpack(Bytes),
}

#[derive(Debug)]
pub(crate) struct InvalidData(pub String);

impl Data {
    /// Data from JSON text, checked to be exactly one JSON value.
    /// Data from JSON text, checked to be exactly one JSON value. Line breaks are dropped:
    /// outside strings they are insignificant whitespace, inside strings JSON does not allow
    /// them raw; without them a JSON frame is one line, so frames can be batched one per line.
    pub(crate) fn from_json(bytes: Bytes) -> Result<Data, InvalidData> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| InvalidData(format!("data is not valid JSON: {e}")))?;
        if bytes.iter().any(|&b| b == b'\n' || b == b'\r') {
            let one_line: Vec<u8> = bytes
                .iter()
                .copied()
                .filter(|&b| b != b'\n' && b != b'\r')
                .collect();
            return Ok(Data::Json(one_line.into()));
        }
        Ok(Data::Json(bytes))
    }

    /// Data from MessagePack bytes, checked to be exactly one MessagePack value and re-encoded,
    /// so that subscribers get well-formed bytes (the decoder reads the reserved marker 0xc1 as
    /// nil, for one).
    pub(crate) fn from_msgpack(bytes: Bytes) -> Result<Data, InvalidData> {
        let mut rest = &bytes[..];
        let value = rmpv::decode::read_value_ref_with_max_depth(&mut rest, MAX_MSGPACK_DEPTH)
            .map_err(|e| InvalidData(format!("data is not valid MessagePack: {e}")))?;
        if !rest.is_empty() {
            return Err(InvalidData(format!(
                "data has {} bytes after its MessagePack value",
                rest.len()
            )));
        }
        let mut out = Vec::with_capacity(bytes.len());
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value_ref(&mut out, &value);
        Ok(Data::Msgpack(out.into()))
    }

    /// Data already parsed out of a MessagePack frame.
    pub(crate) fn from_msgpack_value(value: &rmpv::Value) -> Data {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, value);
        Data::Msgpack(out.into())
    }

    /// Size in the publisher's encoding; this is what `--max-message-bytes` limits.
    pub(crate) fn len(&self) -> usize {
        match self {
            Data::Json(b) | Data::Msgpack(b) => b.len(),
        }
    }

    /// Appends the data as JSON text.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Data::Json(b) => out.extend_from_slice(b),
            Data::Msgpack(b) => {
                let value =
                    rmpv::decode::read_value_ref_with_max_depth(&mut &b[..], MAX_MSGPACK_DEPTH);
                match value {
                    Ok(value) => {
                        // JsonView maps every MessagePack value; serializing into a Vec cannot fail.
                        let _ = serde_json::to_writer(&mut *out, &JsonView(&value));
                    }
                    // Validated on arrival, so this is unreachable; stay valid JSON regardless.
                    Err(_) => out.extend_from_slice(b"null"),
                }
            }
        }
    }

    /// Appends the data as one MessagePack value.
    pub(crate) fn write_msgpack(&self, out: &mut Vec<u8>) {
        match self {
            Data::Msgpack(b) => out.extend_from_slice(b),
            Data::Json(b) => {
                let start = out.len();
                let mut de = serde_json::Deserializer::from_slice(b);
                let mut ser = rmp_serde::Serializer::new(&mut *out);
                if serde_transcode::transcode(&mut de, &mut ser).is_err() {
                    // Validated on arrival, so this is unreachable; stay a valid value regardless.
                    out.truncate(start);
                    out.push(0xc0);
                }
            }
        }
    }
}

impl Data {
    /// The data as JSON text (for HTTP responses).
    pub(crate) fn to_json(&self) -> Box<serde_json::value::RawValue> {
        let mut out = Vec::with_capacity(self.len());
        self.write_json(&mut out);
        String::from_utf8(out)
            .ok()
            .and_then(|s| serde_json::value::RawValue::from_string(s).ok())
            .unwrap_or_else(|| serde_json::value::RawValue::NULL.to_owned())
    }
}

/// Serializes a MessagePack value the way JSON subscribers see it.
struct JsonView<'a, 'v>(&'a ValueRef<'v>);

impl Serialize for JsonView<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            ValueRef::Nil => s.serialize_unit(),
            ValueRef::Boolean(b) => s.serialize_bool(*b),
            ValueRef::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => s.serialize_u64(u),
                (_, Some(n)) => s.serialize_i64(n),
                _ => s.serialize_unit(),
            },
            ValueRef::F32(f) => serialize_float(s, f64::from(*f)),
            ValueRef::F64(f) => serialize_float(s, *f),
            ValueRef::String(text) => match text.as_str() {
                Some(text) => s.serialize_str(text),
                // A MessagePack str that is not UTF-8 is carried like bin.
                None => s.serialize_str(&base64(text.as_bytes())),
            },
            ValueRef::Binary(bytes) => s.serialize_str(&base64(bytes)),
            ValueRef::Ext(kind, bytes) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("ext", kind)?;
                map.serialize_entry("data", &base64(bytes))?;
                map.end()
            }
            ValueRef::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonView(item))?;
                }
                seq.end()
            }
            ValueRef::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    match key {
                        ValueRef::String(k) if k.as_str().is_some() => {
                            map.serialize_key(k.as_str().unwrap_or_default())?
                        }
                        other => {
                            let text = serde_json::to_string(&JsonView(other))
                                .unwrap_or_else(|_| "null".into());
                            map.serialize_key(&text)?
                        }
                    }
                    map.serialize_value(&JsonView(value))?;
                }
                map.end()
            }
        }
    }
}

fn serialize_float<S: Serializer>(s: S, f: f64) -> Result<S::Ok, S::Error> {
    if f.is_finite() {
        s.serialize_f64(f)
    } else {
        s.serialize_unit()
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn msgpack(value: &Value) -> Data {
        Data::from_msgpack_value(value)
    }

    fn as_json(data: &Data) -> String {
        let mut out = Vec::new();
        data.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn as_msgpack(data: &Data) -> Value {
        let mut out = Vec::new();
        data.write_msgpack(&mut out);
        rmpv::decode::read_value(&mut &out[..]).unwrap()
    }

    #[test]
    fn json_round_trips_through_msgpack() {
        let json = r#"{"a":[1,-2,3.5,true,null,"x"],"b":{"c":18446744073709551615}}"#;
        let data = Data::from_json(Bytes::from(json)).unwrap();
        let value = as_msgpack(&data);
        let back = as_json(&msgpack(&value));
        let expected: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&back).unwrap(),
            expected
        );
    }

    #[test]
    fn json_data_loses_only_its_line_breaks() {
        let data = Data::from_json(Bytes::from_static(
            b"{\n  \"a\": [1,\r\n 2.50],\n  \"s\": \"x\\ny\"\n}",
        ))
        .unwrap();
        assert_eq!(as_json(&data), r#"{  "a": [1, 2.50],  "s": "x\ny"}"#);
    }

    #[test]
    fn json_data_is_kept_verbatim() {
        let data = Data::from_json(Bytes::from_static(b"{ \"a\" : 1 }")).unwrap();
        assert_eq!(as_json(&data), "{ \"a\" : 1 }");
    }

    #[test]
    fn msgpack_only_values_have_a_json_form() {
        let value = Value::Map(vec![
            (Value::from("bin"), Value::Binary(vec![0, 1, 2, 255])),
            (Value::from(7), Value::from("seven")),
            (Value::from("ext"), Value::Ext(5, vec![9, 9])),
            (Value::from("nan"), Value::F64(f64::NAN)),
        ]);
        let json: serde_json::Value = serde_json::from_str(&as_json(&msgpack(&value))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"bin": "AAEC/w==", "7": "seven", "ext": {"ext": 5, "data": "CQk="}, "nan": null})
        );
    }

    #[test]
    fn invalid_data_is_refused() {
        assert!(Data::from_json(Bytes::from_static(b"{")).is_err());
        assert!(Data::from_json(Bytes::from_static(b"1 2")).is_err());
        assert!(Data::from_json(Bytes::from_static(b"")).is_err());
        assert!(Data::from_msgpack(Bytes::from_static(&[0x92, 0x01])).is_err());
        assert!(Data::from_msgpack(Bytes::from_static(&[0x01, 0x02])).is_err());
        let reserved = Data::from_msgpack(Bytes::from_static(&[0xc1])).unwrap();
        assert_eq!(
            reserved,
            Data::Msgpack(Bytes::from_static(&[0xc0])),
            "re-encoded as nil"
        );
        let deep = [vec![0x91u8; 200], vec![0xc0]].concat();
        assert!(Data::from_msgpack(Bytes::from(deep)).is_err());
    }
}
