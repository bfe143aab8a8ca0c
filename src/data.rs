//! Message `data` as a publisher sent it, and its form in each wire encoding.
//!
//! Data is validated once when it arrives and kept in its publisher's encoding. It is rendered
//! into the other encoding only when a subscriber of that encoding needs it. MessagePack values
//! JSON has no word for are mapped as `proto/README.md` says: `bin` becomes a base64 string,
//! map keys that are not strings become their JSON text, and non-finite floats become `null`.
//! MessagePack's reserved byte (0xc1), extension types, and strings that are not UTF-8 are
//! invalid data, as is a value of either encoding nested deeper than [`MAX_DEPTH`] levels.

use base64::Engine as _;
use bytes::Bytes;
use rmpv::ValueRef;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

/// How deeply arrays and maps may nest in data of either encoding: under serde_json's own
/// limit (127), so that data of either encoding can always be rendered in the other.
pub(crate) const MAX_DEPTH: usize = 100;
/// rmpv's depth budget to read valid data back: it spends two per array or map level and up
/// to three on the innermost value (a string).
const MAX_MSGPACK_DEPTH: usize = 2 * MAX_DEPTH + 3;

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
    /// Data from JSON text, checked to be exactly one JSON value. Line breaks are dropped:
    /// outside strings they are insignificant whitespace, inside strings JSON does not allow
    /// them raw; without them a JSON frame is one line, so frames can be batched one per line.
    pub(crate) fn from_json(bytes: Bytes) -> Result<Data, InvalidData> {
        // serde_json checks the UTF-8 of the strings it reads, not of those it skips over.
        std::str::from_utf8(&bytes).map_err(|e| InvalidData(format!("data is not UTF-8: {e}")))?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| InvalidData(format!("data is not valid JSON: {e}")))?;
        Data::from_parsed_json(bytes)
    }

    /// Data from the UTF-8 text of a JSON value a parser has already read (a frame's `data`):
    /// checked for depth and for what could not be rendered as MessagePack, without line
    /// breaks.
    pub(crate) fn from_parsed_json(bytes: Bytes) -> Result<Data, InvalidData> {
        let scan = check_json_depth(&bytes)?;
        if scan.reading == Reading::Needed {
            read_json(&bytes)?;
        }
        if scan.line_breaks {
            let one_line: Vec<u8> = bytes
                .iter()
                .copied()
                .filter(|&b| b != b'\n' && b != b'\r')
                .collect();
            return Ok(Data::Json(one_line.into()));
        }
        Ok(Data::Json(bytes))
    }

    /// Data from MessagePack bytes, checked to be exactly one valid MessagePack value and kept
    /// as they came.
    pub(crate) fn from_msgpack(bytes: Bytes) -> Result<Data, InvalidData> {
        let len = msgpack_value_len(&bytes)
            .map_err(|e| InvalidData(format!("data is not valid MessagePack: {}", e.0)))?;
        if len < bytes.len() {
            return Err(InvalidData(format!(
                "data has {} bytes after its MessagePack value",
                bytes.len() - len
            )));
        }
        Ok(Data::Msgpack(bytes))
    }

    /// Data from a MessagePack value built in a test.
    #[cfg(test)]
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

/// Whether JSON text must be read in full (see [`read_json`]) to know it can be rendered.
#[derive(Debug, PartialEq)]
enum Reading {
    Needed,
    NotNeeded,
}

/// What [`check_json_depth`] found.
struct JsonScan {
    reading: Reading,
    /// Line breaks between tokens (valid JSON has none inside its strings).
    line_breaks: bool,
}

/// Refuses JSON whose arrays and objects nest deeper than [`MAX_DEPTH`]: serde_json skips over
/// a value it need not build without a depth limit, and a subscriber of the other encoding
/// could never be given such data. Also tells whether the text has what serde_json checks only
/// when it reads a value rather than skips it: numbers with an exponent or many digits (out of
/// f64's range), `\u` escapes of surrogates (unpaired); and whether it has line breaks.
///
/// `bytes` must be valid JSON. Strings, most of a publish's data, are crossed with `memchr` to
/// their next quote or backslash: a test per byte was a quarter of a small JSON publish.
fn check_json_depth(bytes: &[u8]) -> Result<JsonScan, InvalidData> {
    let mut depth = 0usize;
    // Bytes of the number being scanned.
    let mut number_len = 0usize;
    let mut scan = JsonScan {
        reading: Reading::NotNeeded,
        line_breaks: false,
    };
    let mut at = 0;
    while let Some(&b) = bytes.get(at) {
        at += 1;
        let in_number = matches!(b, b'-' | b'0'..=b'9')
            || number_len > 0 && matches!(b, b'.' | b'e' | b'E' | b'+');
        if in_number {
            number_len += 1;
            // Without an exponent, a number beyond f64's range (1.8e308) has 309 digits.
            if matches!(b, b'e' | b'E') || number_len > 308 {
                scan.reading = Reading::Needed;
            }
            continue;
        }
        number_len = 0;
        match b {
            b'"' => at = string_end(bytes, at, &mut scan.reading),
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(InvalidData(format!(
                        "data is nested deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b'\n' | b'\r' => scan.line_breaks = true,
            _ => {}
        }
    }
    Ok(scan)
}

/// Where the string whose contents start at `at` ends (past its closing quote); a `\u` escape
/// of a surrogate (`\uD800`-`\uDFFF`) makes the text `Needed` reading.
fn string_end(bytes: &[u8], mut at: usize, reading: &mut Reading) -> usize {
    loop {
        let Some(found) = bytes
            .get(at..)
            .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
        else {
            return bytes.len();
        };
        at += found;
        if bytes[at] == b'"' {
            return at + 1;
        }
        if bytes.get(at + 1) == Some(&b'u') && matches!(bytes.get(at + 2), Some(b'd' | b'D')) {
            *reading = Reading::Needed;
        }
        // The backslash and the character it escapes; `\u`'s hex digits are plain bytes.
        at += 2;
    }
}

/// Reads JSON text the way it is read to render it as MessagePack: only then does serde_json
/// refuse numbers out of f64's range and unpaired surrogate escapes, and a subscriber of the
/// other encoding would get nil.
fn read_json(bytes: &[u8]) -> Result<(), InvalidData> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .map(drop)
        .map_err(|e| InvalidData(format!("data cannot be rendered as MessagePack: {e}")))
}

/// An array or map being read by [`msgpack_value_len`].
#[derive(Clone, Copy, Default)]
struct Open {
    /// Items still to read (a map's keys and values both count).
    remaining: u64,
    is_map: bool,
    /// Whether it is a map key or inside one.
    in_key: bool,
}

/// The arrays and maps a walk is inside, innermost last. The first levels live inline: every
/// frame is a map, and a heap stack cost every publish an allocation.
#[derive(Default)]
struct OpenStack {
    inline: [Open; 8],
    len: usize,
    deeper: Vec<Open>,
}

impl OpenStack {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, open: Open) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = open,
            None => self.deeper.push(open),
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Open> {
        self.len = self.len.checked_sub(1)?;
        match self.inline.get(self.len) {
            Some(&open) => Some(open),
            None => self.deeper.pop(),
        }
    }
}

/// The length of the one MessagePack value `bytes` starts with, checked without building it:
/// every marker known and not reserved, no extension types, strings UTF-8, nothing truncated,
/// arrays and maps nested at most [`MAX_DEPTH`] deep, no array or map as a map key inside a
/// map key. (JSON renders a map key that is not a string as its JSON text in a JSON string, so
/// keys inside keys are escaped once more per level: their JSON would double in size with
/// each.)
pub(crate) fn msgpack_value_len(bytes: &[u8]) -> Result<usize, InvalidData> {
    msgpack_len_within(bytes, MAX_DEPTH)
}

/// [`msgpack_value_len`] for a value that carries data `envelope` levels down (a frame's map, a
/// batch's array and item maps), so that the data itself may still nest [`MAX_DEPTH`] deep.
pub(crate) fn msgpack_envelope_len(bytes: &[u8], envelope: usize) -> Result<usize, InvalidData> {
    msgpack_len_within(bytes, MAX_DEPTH + envelope)
}

/// The bytes of the value under `key` in a MessagePack map that [`msgpack_envelope_len`] has
/// validated (a later entry wins, as when deserializing); None if the key is absent.
pub(crate) fn msgpack_map_value<'a>(map: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    msgpack_map_entries(map)?
        .filter(|(k, _)| msgpack_str(k) == Some(key))
        .last()
        .map(|(_, value)| value)
}

/// The entries of a MessagePack map that [`msgpack_envelope_len`] has validated, as the bytes of
/// each key and each value, in order; None if `map` is not a map.
pub(crate) fn msgpack_map_entries(map: &[u8]) -> Option<impl Iterator<Item = (&[u8], &[u8])>> {
    let (entries, mut at) = match *map.first()? {
        b @ 0x80..=0x8f => (usize::from(b & 0x0f), 1),
        0xde => (
            usize::from(u16::from_be_bytes([*map.get(1)?, *map.get(2)?])),
            3,
        ),
        0xdf => {
            let n = u32::from_be_bytes(map.get(1..5)?.try_into().ok()?);
            (usize::try_from(n).ok()?, 5)
        }
        _ => return None,
    };
    Some((0..entries).map_while(move |_| {
        let key_len = validated_len(map.get(at..)?)?;
        let key = map.get(at..at + key_len)?;
        at += key_len;
        let value_len = validated_len(map.get(at..)?)?;
        let value = map.get(at..at + value_len)?;
        at += value_len;
        Some((key, value))
    }))
}

/// A validated MessagePack `str` value as text; None for any other type (`bin` included).
pub(crate) fn msgpack_text(value: &[u8]) -> Option<&str> {
    match value.first()? {
        0xa0..=0xbf | 0xd9 | 0xda | 0xdb => ascii_or_utf8(msgpack_str(value)?),
        _ => None,
    }
}

/// `bytes` as text. A publish's keys, op and topic are short ASCII, and `from_utf8` is a call
/// per string that was 7% of a publish; `is_ascii` inlines.
fn ascii_or_utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

/// A validated MessagePack unsigned integer (positive fixint or `uint` 8–64); None otherwise.
pub(crate) fn msgpack_uint(value: &[u8]) -> Option<u64> {
    let be = |n: usize| -> Option<u64> {
        let bytes = value.get(1..1 + n)?;
        Some(bytes.iter().fold(0, |v, b| v << 8 | u64::from(*b)))
    };
    match *value.first()? {
        b @ 0x00..=0x7f => Some(u64::from(b)),
        0xcc => be(1),
        0xcd => be(2),
        0xce => be(4),
        0xcf => be(8),
        _ => None,
    }
}

/// The bytes of a MessagePack `str` (or `bin`, which serde also reads as a field name).
fn msgpack_str(value: &[u8]) -> Option<&[u8]> {
    let start = match *value.first()? {
        0xa0..=0xbf => 1,
        0xd9 | 0xc4 => 2,
        0xda | 0xc5 => 3,
        0xdb | 0xc6 => 5,
        _ => return None,
    };
    value.get(start..)
}

/// The items of a MessagePack array that [`msgpack_envelope_len`] has validated, as bytes.
pub(crate) fn msgpack_array_items(array: &[u8]) -> Option<Vec<&[u8]>> {
    let (entries, mut at) = match *array.first()? {
        b @ 0x90..=0x9f => (usize::from(b & 0x0f), 1),
        0xdc => (
            usize::from(u16::from_be_bytes([*array.get(1)?, *array.get(2)?])),
            3,
        ),
        0xdd => {
            let n = u32::from_be_bytes(array.get(1..5)?.try_into().ok()?);
            (usize::try_from(n).ok()?, 5)
        }
        _ => return None,
    };
    let mut items = Vec::with_capacity(entries.min(array.len()));
    for _ in 0..entries {
        let len = validated_len(array.get(at..)?)?;
        items.push(array.get(at..at + len)?);
        at += len;
    }
    Some(items)
}

/// The length of the first value in bytes a walk has already validated (envelope included).
///
/// A scalar's length is read off its header: the fields of a publish are scalars, and a walk per
/// field was most of the 16% of a publish's instructions spent walking (callgrind).
fn validated_len(bytes: &[u8]) -> Option<usize> {
    msgpack_scalar_len(bytes).or_else(|| msgpack_walk(bytes, MAX_DEPTH + 2, false).ok())
}

/// The length of the MessagePack scalar (nil, bool, number, str or bin) that `bytes` starts
/// with, read off its header; None for an array, map or extension type, for the reserved byte,
/// and when `bytes` ends before the scalar does. A str's bytes are not checked for UTF-8.
pub(crate) fn msgpack_scalar_len(bytes: &[u8]) -> Option<usize> {
    let be = |n: usize| -> Option<usize> {
        let field = bytes.get(1..1 + n)?;
        usize::try_from(field.iter().fold(0u64, |v, b| v << 8 | u64::from(*b))).ok()
    };
    let len = match *bytes.first()? {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => 1,
        b @ 0xa0..=0xbf => 1 + usize::from(b & 0x1f),
        0xcc | 0xd0 => 2,
        0xcd | 0xd1 => 3,
        0xca | 0xce | 0xd2 => 5,
        0xcb | 0xcf | 0xd3 => 9,
        0xd9 | 0xc4 => 2 + be(1)?,
        0xda | 0xc5 => 3 + be(2)?,
        0xdb | 0xc6 => 5 + be(4)?,
        _ => return None,
    };
    (len <= bytes.len()).then_some(len)
}

fn msgpack_len_within(bytes: &[u8], max_depth: usize) -> Result<usize, InvalidData> {
    msgpack_walk(bytes, max_depth, true)
}

/// The walk behind the lengths above; `check_strings` off for bytes already validated, where
/// only the length is wanted (the UTF-8 check is most of a short string's cost).
fn msgpack_walk(bytes: &[u8], max_depth: usize, check_strings: bool) -> Result<usize, InvalidData> {
    let truncated = || InvalidData("it ends inside a value".into());
    let mut pos = 0usize;
    // The enclosing arrays and maps, innermost last.
    let mut open = OpenStack::default();
    let mut current = Open {
        remaining: 1,
        is_map: false,
        in_key: false,
    };
    loop {
        while current.remaining == 0 {
            match open.pop() {
                Some(outer) => current = outer,
                None => return Ok(pos),
            }
        }
        let is_key = current.is_map && current.remaining.is_multiple_of(2);
        current.remaining -= 1;
        let marker = *bytes.get(pos).ok_or_else(truncated)?;
        if let Some(len) = msgpack_scalar_len(&bytes[pos..]) {
            let is_str = matches!(marker, 0xa0..=0xbf | 0xd9 | 0xda | 0xdb);
            if check_strings && is_str && msgpack_text(&bytes[pos..pos + len]).is_none() {
                return Err(InvalidData("a string is not UTF-8".into()));
            }
            pos += len;
            continue;
        }
        pos += 1;
        let mut take = |n: usize| -> Result<u64, InvalidData> {
            let field = bytes.get(pos..pos + n).ok_or_else(truncated)?;
            pos += n;
            Ok(field.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        };
        // Items the array or map contains (a map's keys and values both count).
        let items = match marker {
            0x80..=0x8f => 2 * u64::from(marker & 0x0f),
            0x90..=0x9f => u64::from(marker & 0x0f),
            0xc1 => return Err(InvalidData("it uses the reserved byte 0xc1".into())),
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                return Err(InvalidData("extension types are not accepted".into()));
            }
            0xdc => take(2)?,
            0xdd => take(4)?,
            0xde => 2 * take(2)?,
            0xdf => 2 * take(4)?,
            // A scalar whose header or payload runs past the end.
            _ => return Err(truncated()),
        };
        let is_map = matches!(marker, 0x80..=0x8f | 0xde | 0xdf);
        if is_key && current.in_key {
            return Err(InvalidData(
                "an array or map is a map key inside another map key".into(),
            ));
        }
        if items > 0 {
            // Each item takes at least a byte: a count past the end is a lie, found at once.
            if items > (bytes.len() - pos) as u64 {
                return Err(truncated());
            }
            if open.len() >= max_depth {
                return Err(InvalidData(format!(
                    "it is nested deeper than {MAX_DEPTH} levels"
                )));
            }
            let inner = Open {
                remaining: items,
                is_map,
                in_key: current.in_key || is_key,
            };
            open.push(std::mem::replace(&mut current, inner));
        }
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

    /// The byte-at-a-time scan `check_json_depth` replaced.
    fn scan_byte_by_byte(bytes: &[u8]) -> Option<(bool, bool)> {
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        let (mut number_len, mut unicode_escape) = (0usize, false);
        let (mut needed, mut line_breaks) = (false, false);
        for &b in bytes {
            if in_string {
                needed |= unicode_escape && matches!(b, b'd' | b'D');
                unicode_escape = escaped && b == b'u';
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            if matches!(b, b'-' | b'0'..=b'9')
                || number_len > 0 && matches!(b, b'.' | b'e' | b'E' | b'+')
            {
                number_len += 1;
                needed |= matches!(b, b'e' | b'E') || number_len > 308;
                continue;
            }
            number_len = 0;
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return None;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'\n' | b'\r' => line_breaks = true,
                _ => {}
            }
        }
        Some((needed, line_breaks))
    }

    #[test]
    fn the_json_scan_agrees_with_a_byte_by_byte_one() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let just = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let in_a_string = format!("\"{}\"", "[".repeat(MAX_DEPTH + 1));
        let long_number = "9".repeat(309);
        let texts = [
            r#""plain""#,
            r#""q\"uote [ { \\" "#,
            r#"["\\", "\\u", "\\uD800", 1]"#,
            r#""\uD83D\uDE00""#,
            r#""\ud800""#,
            r#""caf\u00e9""#,
            r#""\"\\\"\/\b\f\n\r\t""#,
            r#"{"a": [1, -2.5, 3e10, 4E-2, 5.0e+3]}"#,
            "{\n \"a\": \"x\",\r\n \"b\": [true, false, null]\n}",
            "[1.5,\"e\",\"E\",-0]",
            "",
            r#"{"k": "v", "n": {"m": []}}"#,
            &deep,
            &just,
            &in_a_string,
            &long_number,
        ];
        for text in texts {
            let got = check_json_depth(text.as_bytes())
                .ok()
                .map(|scan| (scan.reading == Reading::Needed, scan.line_breaks));
            assert_eq!(got, scan_byte_by_byte(text.as_bytes()), "{text:.80}");
        }
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
            (Value::from("nan"), Value::F64(f64::NAN)),
        ]);
        let json: serde_json::Value = serde_json::from_str(&as_json(&msgpack(&value))).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"bin": "AAEC/w==", "7": "seven", "nan": null})
        );
    }

    #[test]
    fn invalid_data_is_refused() {
        assert!(Data::from_json(Bytes::from_static(b"{")).is_err());
        assert!(Data::from_json(Bytes::from_static(b"1 2")).is_err());
        assert!(Data::from_json(Bytes::from_static(b"")).is_err());
        assert!(Data::from_msgpack(Bytes::from_static(&[0x92, 0x01])).is_err());
        assert!(Data::from_msgpack(Bytes::from_static(&[0x01, 0x02])).is_err());
        for bad in [
            &[0xc1][..],
            &[0x91, 0xc1],
            &[0xd4, 0x01, 0x02],
            &[0xc7, 0x01, 0x05, 0x00],
            &[0xa2, 0xff, 0xfe],
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
            &[0xc6, 0xff, 0xff, 0xff, 0xff, 0x00],
            &[0xcb, 0x00],
        ] {
            assert!(
                Data::from_msgpack(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:02x?}"
            );
        }
        let deep = [vec![0x91u8; 101], vec![0xc0]].concat();
        assert!(Data::from_msgpack(Bytes::from(deep)).is_err());
        let deep = "[".repeat(100_000);
        assert!(Data::from_json(Bytes::from(deep)).is_err());
        let fine = format!("{}\"[[[\"{}", "[".repeat(100), "]".repeat(100));
        assert!(Data::from_json(Bytes::from(fine)).is_ok());
    }

    #[test]
    fn valid_msgpack_is_measured_exactly() {
        let value = Value::Map(vec![
            (
                Value::from("a"),
                Value::Array(vec![Value::from(1), Value::F64(2.5)]),
            ),
            (Value::from("b"), Value::Binary(vec![0; 300])),
            (Value::from("c"), Value::from("x".repeat(70_000))),
            (Value::from(-5), Value::from(u64::MAX)),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).unwrap();
        assert_eq!(msgpack_value_len(&bytes).unwrap(), bytes.len());
        bytes.push(0xc0);
        assert_eq!(msgpack_value_len(&bytes).unwrap(), bytes.len() - 1);
    }

    #[test]
    fn nesting_past_the_inline_stack_is_measured_and_limited() {
        // Each level is [inner, level] or {level: inner}: leaving every level must come back to
        // the right container with the right count, past the stack's inline levels too.
        let nested = |depth: usize| {
            let mut value = Value::Nil;
            for level in 1..depth {
                value = if level % 3 == 0 {
                    Value::Map(vec![(Value::from(level), value)])
                } else {
                    Value::Array(vec![value, Value::from(level)])
                };
            }
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &Value::Array(vec![value])).unwrap();
            bytes
        };
        for depth in [1, 7, 8, 9, 20, MAX_DEPTH] {
            let bytes = nested(depth);
            assert_eq!(
                msgpack_value_len(&bytes).ok(),
                Some(bytes.len()),
                "depth {depth}"
            );
            assert_eq!(validated_len(&bytes), Some(bytes.len()), "depth {depth}");
        }
        assert!(msgpack_value_len(&nested(MAX_DEPTH + 1)).is_err());
        // A map key that is a map, deep inside a key, is refused however deep the stack is.
        let inner_key = Value::Map(vec![(Value::Nil, Value::Nil)]);
        let mut key = Value::Map(vec![(inner_key, Value::Nil)]);
        for _ in 0..12 {
            key = Value::Array(vec![key]);
        }
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &Value::Map(vec![(key.clone(), Value::Nil)]))
            .unwrap();
        assert!(msgpack_value_len(&bytes).is_err());
        // The same as a value is fine.
        bytes.clear();
        rmpv::encode::write_value(&mut bytes, &Value::Map(vec![(Value::Nil, key)])).unwrap();
        assert_eq!(msgpack_value_len(&bytes).ok(), Some(bytes.len()));
    }

    #[test]
    fn a_scalar_s_length_from_its_header_is_the_walk_s() {
        let values = [
            Value::Nil,
            Value::from(true),
            Value::from(false),
            Value::from(0),
            Value::from(127),
            Value::from(-1),
            Value::from(-32),
            Value::from(200),
            Value::from(-100),
            Value::from(60_000),
            Value::from(-30_000),
            Value::from(4_000_000_000u64),
            Value::from(-2_000_000_000),
            Value::from(u64::MAX),
            Value::from(i64::MIN),
            Value::F32(1.5),
            Value::F64(2.5),
            Value::from(""),
            Value::from("x".repeat(31)),
            Value::from("x".repeat(32)),
            Value::from("x".repeat(300)),
            Value::from("x".repeat(70_000)),
            Value::Binary(vec![]),
            Value::Binary(vec![1; 300]),
            Value::Binary(vec![1; 70_000]),
            Value::Array(vec![Value::from(1), Value::from("a")]),
            Value::Map(vec![(Value::from("k"), Value::Nil)]),
        ];
        for value in &values {
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, value).unwrap();
            let walked = msgpack_walk(&bytes, MAX_DEPTH + 2, false).ok();
            assert_eq!(walked, Some(bytes.len()), "{value:?}");
            bytes.push(0xc0);
            assert_eq!(validated_len(&bytes), walked, "{value:?} followed by more");
            bytes.truncate(bytes.len() - 2);
            assert_eq!(validated_len(&bytes), None, "{value:?} cut short");
        }
        // Extension types are refused, by the header path as by the walk.
        assert_eq!(validated_len(&[0xd6, 1, 0, 0, 0, 0]), None);
    }

    #[test]
    fn a_validated_frame_s_values_are_found_as_the_bytes_they_came_as() {
        let encode = |v: &Value| {
            let mut out = Vec::new();
            rmpv::encode::write_value(&mut out, v).unwrap();
            out
        };
        let data = Value::Array(vec![Value::from(1), Value::from("x")]);
        let frame = Value::Map(vec![
            (Value::from("op"), Value::from("publish")),
            (Value::from("data"), Value::from(0)),
            (Value::Binary(b"data".to_vec()), data.clone()),
        ]);
        let bytes = encode(&frame);
        // A later key wins, as when deserializing; a bin key names a field too.
        assert_eq!(msgpack_map_value(&bytes, b"data"), Some(&encode(&data)[..]));
        assert_eq!(
            msgpack_map_value(&bytes, b"op"),
            Some(&encode(&Value::from("publish"))[..])
        );
        assert_eq!(msgpack_map_value(&bytes, b"topic"), None);
        // map16 and array16 headers.
        let wide: Vec<(Value, Value)> = (0..20)
            .map(|i| (Value::from(format!("k{i}")), Value::from(i)))
            .collect();
        let wide = encode(&Value::Map(wide));
        assert_eq!(wide[0], 0xde);
        assert_eq!(msgpack_map_value(&wide, b"k19"), Some(&[19u8][..]));
        let items = encode(&Value::Array((0..17).map(Value::from).collect()));
        assert_eq!(items[0], 0xdc);
        let found = msgpack_array_items(&items).unwrap();
        assert_eq!(found.len(), 17);
        assert_eq!(found[16], &[16u8][..]);
        assert!(
            msgpack_array_items(&bytes).is_none(),
            "a map is not an array"
        );
        assert!(
            msgpack_map_value(&items, b"data").is_none(),
            "an array is not a map"
        );
    }
}
