//! The Lua scripts that make a publish and a history read atomic in Redis, and what they answer.
//!
//! A publish assigns the topic's next seq, appends the message to its history stream and
//! publishes it, in one script: so every node sees one order per topic, a message is in history
//! before anyone receives it, and a history read (also one script) sees exactly the messages
//! published before it. A topic whose hash is gone (expired, or a Redis that lost its data)
//! starts afresh with a new epoch, and its stale history goes with it.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use redis::Value;

use super::keys::untagged;
use crate::backend::HistoryPage;
use crate::model::{Publication, StreamPosition};

/// KEYS: meta, history. ARGV: channel, tagged data, a fresh epoch, history size, history ttl
/// (ms), meta ttl (ms), broadcast channel (or ""), "1" for a shard channel.
pub(crate) const PUBLISH: &str = r#"
local meta, history = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', history)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
if tonumber(ARGV[4]) > 0 then
  local now = redis.call('TIME')
  local ms = now[1] * 1000 + math.floor(now[2] / 1000)
  redis.call('XADD', history, 'MAXLEN', ARGV[4], seq .. '-0', 'd', ARGV[2], 't', ms)
  redis.call('PEXPIRE', history, ARGV[5])
end
redis.call('PEXPIRE', meta, ARGV[6])
local message = seq .. ':' .. epoch .. ':' .. ARGV[2]
if ARGV[8] == '1' then
  redis.call('SPUBLISH', ARGV[1], message)
else
  redis.call('PUBLISH', ARGV[1], message)
end
if ARGV[7] ~= '' then
  redis.call('PUBLISH', ARGV[7], message)
end
return {seq, epoch}
"#;

/// KEYS: meta, history. ARGV: a fresh epoch to start the topic with if it does not exist (or ""
/// to answer nil), "after" or "last", the seq (after) or count (last), the most to return
/// (after), history ttl (ms), meta ttl (ms). Answers {epoch, seq, oldest id or false, entries}.
/// Messages older than the history ttl are removed first.
pub(crate) const HISTORY: &str = r#"
local meta, history = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  if ARGV[1] == '' then
    return false
  end
  epoch = ARGV[1]
  redis.call('DEL', history)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  redis.call('PEXPIRE', meta, ARGV[6])
end
local seq = redis.call('HGET', meta, 'seq')
local now = redis.call('TIME')
local cutoff = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(ARGV[5])
local oldest = false
while true do
  local first = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)[1]
  if not first then
    break
  end
  if tonumber(first[2][4]) >= cutoff then
    oldest = first[1]
    break
  end
  redis.call('XDEL', history, first[1])
end
local entries = {}
if ARGV[2] == 'after' then
  entries = redis.call('XRANGE', history, '(' .. ARGV[3] .. '-0', '+', 'COUNT', ARGV[4])
elseif tonumber(ARGV[3]) > 0 then
  entries = redis.call('XREVRANGE', history, '+', '-', 'COUNT', ARGV[3])
end
return {epoch, seq, oldest, entries}
"#;

/// Reads the publish script's answer: the message's position.
pub(crate) fn published(value: &Value) -> Option<StreamPosition> {
    let Value::Array(items) = value else {
        return None;
    };
    let [seq, epoch] = items.as_slice() else {
        return None;
    };
    Some(StreamPosition {
        seq: integer(seq)?,
        epoch: text(epoch)?.into(),
    })
}

/// Reads the history script's answer for `topic`: None for a topic that does not exist. `newest
/// first` is set for a `last` read, whose entries come newest first.
pub(crate) fn page(
    topic: &Arc<str>,
    value: Value,
    newest_first: bool,
) -> Result<Option<HistoryPage>, String> {
    let items = match value {
        // Lua's false: nil over RESP2, a boolean over RESP3.
        Value::Nil | Value::Boolean(false) => return Ok(None),
        Value::Array(items) => items,
        other => return Err(format!("unexpected history answer {other:?}")),
    };
    let [epoch, seq, oldest, entries] = <[Value; 4]>::try_from(items)
        .map_err(|items| format!("history answer has {} parts, not 4", items.len()))?;
    let epoch: Arc<str> = text(&epoch).ok_or("history epoch is not text")?.into();
    let seq = integer(&seq).ok_or("history seq is not a number")?;
    let oldest = match &oldest {
        Value::Nil | Value::Boolean(false) => None,
        id => Some(entry_seq(id).ok_or("history oldest id is not an id")?),
    };
    let position = StreamPosition { epoch, seq };
    let Value::Array(entries) = entries else {
        return Err("history entries are not a list".into());
    };
    let now = Instant::now();
    let mut publications = Vec::with_capacity(entries.len());
    for entry in entries {
        let (seq, data) = entry_of(entry).ok_or("a history entry is malformed")?;
        let position = StreamPosition {
            epoch: position.epoch.clone(),
            seq,
        };
        publications.push(Arc::new(Publication::new(
            topic.clone(),
            &position,
            data,
            now,
        )));
    }
    if newest_first {
        publications.reverse();
    }
    Ok(Some(HistoryPage {
        position,
        oldest,
        publications,
        frame_meter: None,
    }))
}

/// One stream entry, `[id, [d, data, t, ms]]`.
fn entry_of(entry: Value) -> Option<(u64, crate::data::Data)> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [id, fields] = <[Value; 2]>::try_from(parts).ok()?;
    let seq = entry_seq(&id)?;
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut fields = fields.into_iter();
    while let Some(name) = fields.next() {
        let value = fields.next()?;
        if bytes_of(&name)? == b"d" {
            let Value::BulkString(data) = value else {
                return None;
            };
            return Some((seq, untagged(Bytes::from(data))?));
        }
    }
    None
}

/// The seq of a stream id `<seq>-0`.
fn entry_seq(id: &Value) -> Option<u64> {
    let id = text(id)?;
    id.split_once('-')?.0.parse().ok()
}

pub(crate) fn integer(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

pub(crate) fn text(value: &Value) -> Option<&str> {
    std::str::from_utf8(bytes_of(value)?).ok()
}

pub(crate) fn bytes_of(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn answers_are_read_and_malformed_ones_refused() {
        assert_eq!(
            published(&Value::Array(vec![Value::Int(7), bulk("e1")])),
            Some(StreamPosition {
                epoch: "e1".into(),
                seq: 7
            })
        );
        assert_eq!(published(&Value::Int(7)), None);
        let topic: Arc<str> = "t".into();
        let entry = |seq: &str, data: &str| {
            Value::Array(vec![
                bulk(&format!("{seq}-0")),
                Value::Array(vec![bulk("d"), bulk(data), bulk("t"), bulk("1")]),
            ])
        };
        let answer = Value::Array(vec![
            bulk("e1"),
            bulk("9"),
            bulk("8-0"),
            Value::Array(vec![entry("9", "j2"), entry("8", "j1")]),
        ]);
        let page = page(&topic, answer, true).unwrap().unwrap();
        let seqs: Vec<u64> = page.publications.iter().map(|p| p.seq).collect();
        assert_eq!(
            (seqs, page.oldest, page.position.seq),
            (vec![8, 9], Some(8), 9)
        );
        assert!(super::page(&topic, Value::Nil, false).unwrap().is_none());
        let short = Value::Array(vec![bulk("e1")]);
        assert!(super::page(&topic, short, false).is_err());
        let bad_entry = Value::Array(vec![
            bulk("e1"),
            bulk("1"),
            Value::Nil,
            Value::Array(vec![entry("1", "x")]),
        ]);
        assert!(super::page(&topic, bad_entry, false).is_err());
    }
}
