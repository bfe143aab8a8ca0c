//! Where a topic lives in Redis: its keys and channels, and the text a publication travels as.
//!
//! Every name starts with `--redis-prefix` and carries the topic as a hash tag (`{topic}`), so
//! that one topic's seq, history and channel are on one shard of a Redis Cluster. Topics cannot
//! contain braces or glob characters (see `crate::topic`), so a topic is always its own hash tag
//! and a pattern turns into a Redis glob by its wildcards alone.

use std::sync::Arc;

use bytes::Bytes;

use crate::data::Data;
use crate::topic::Subject;

#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    cluster: bool,
}

/// One Redis subscription of this node's pub/sub connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Channel {
    /// `SUBSCRIBE`.
    Plain(String),
    /// `SSUBSCRIBE` (a shard channel of a Redis Cluster).
    Shard(String),
    /// `PSUBSCRIBE`.
    Glob(String),
}

impl Keys {
    pub(crate) fn new(prefix: &str, cluster: bool) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            cluster,
        }
    }

    /// The hash holding the topic's `epoch` and `seq`.
    pub(crate) fn meta(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:m", self.prefix)
    }

    /// The stream holding the topic's history (ids `<seq>-0`).
    pub(crate) fn history(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:h", self.prefix)
    }

    /// The channel the topic's publications are published on (a shard channel in a cluster).
    pub(crate) fn channel(&self, topic: &str) -> String {
        format!("{}:{{{topic}}}:c", self.prefix)
    }

    /// In a cluster, where publications are also published for pattern subscribers: sharded
    /// pub/sub has no patterns, so those go over classic pub/sub, which the cluster broadcasts.
    /// (`{~p}` cannot begin another prefix's names: prefixes have no braces, topics no `~`.)
    pub(crate) fn broadcast(&self, topic: &str) -> Option<String> {
        self.cluster
            .then(|| format!("{}:{{~p}}:{topic}", self.prefix))
    }

    /// The glob every meta key of topics `pattern` may match is covered by (all, for None).
    pub(crate) fn meta_glob(&self, pattern: Option<&str>) -> String {
        format!("{}:{{{}}}:m", self.prefix, pattern.map_or("*".into(), glob))
    }

    /// The Redis subscription that brings this node the publications on `subject`. A pattern's
    /// glob may match more topics than the pattern (`*` spans dots); the hub delivers only what
    /// its subscriptions match.
    pub(crate) fn subscription(&self, subject: &Subject) -> Channel {
        match (subject, self.cluster) {
            (Subject::Topic(topic), false) => Channel::Plain(self.channel(topic)),
            (Subject::Topic(topic), true) => Channel::Shard(self.channel(topic)),
            (Subject::Pattern(pattern), false) => {
                Channel::Glob(format!("{}:{{{}}}:c", self.prefix, glob(pattern)))
            }
            (Subject::Pattern(pattern), true) => {
                Channel::Glob(format!("{}:{{~p}}:{}", self.prefix, glob(pattern)))
            }
        }
    }

    /// The topic a channel or meta key belongs to, if it is one of this prefix's.
    pub(crate) fn topic_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix(':')?;
        if let Some(topic) = rest.strip_prefix("{~p}:") {
            return Some(topic);
        }
        let rest = rest.strip_prefix('{')?;
        let end = rest.rfind('}')?;
        Some(&rest[..end])
    }
}

/// A pattern as a Redis glob: each wildcard becomes `*`.
fn glob(pattern: &str) -> String {
    pattern
        .split('.')
        .map(|segment| match segment {
            "*" | ">" => "*",
            literal => literal,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Data as stored and published in Redis: a tag byte for its encoding, then its bytes.
pub(crate) fn tagged(data: &Data) -> Vec<u8> {
    let (tag, bytes) = match data {
        Data::Json(bytes) => (b'j', bytes),
        Data::Msgpack(bytes) => (b'm', bytes),
    };
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(tag);
    out.extend_from_slice(bytes);
    out
}

/// Data from its tagged form (a slice of `bytes`, without copying).
pub(crate) fn untagged(bytes: Bytes) -> Option<Data> {
    match bytes.first()? {
        b'j' => Some(Data::Json(bytes.slice(1..))),
        b'm' => Some(Data::Msgpack(bytes.slice(1..))),
        _ => None,
    }
}

/// A publication as it travels on a channel: `<seq>:<epoch>:<tagged data>`.
pub(crate) struct Wire {
    pub seq: u64,
    pub epoch: Arc<str>,
    pub data: Data,
}

impl Wire {
    /// Reads what the publish script sent; None for anything else that reached the channel.
    pub(crate) fn parse(message: Bytes) -> Option<Wire> {
        let colon = message.iter().position(|&b| b == b':')?;
        let seq = std::str::from_utf8(&message[..colon]).ok()?.parse().ok()?;
        let rest = message.slice(colon + 1..);
        let colon = rest.iter().position(|&b| b == b':')?;
        let epoch = std::str::from_utf8(&rest[..colon]).ok()?.into();
        let data = untagged(rest.slice(colon + 1..))?;
        Some(Wire { seq, epoch, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_topic_as_hash_tag() {
        let keys = Keys::new("crier", false);
        assert_eq!(keys.meta("a.b"), "crier:{a.b}:m");
        assert_eq!(keys.history("a.b"), "crier:{a.b}:h");
        assert_eq!(keys.channel("a.b"), "crier:{a.b}:c");
        assert_eq!(keys.broadcast("a.b"), None);
        assert_eq!(keys.topic_of("crier:{a.b}:c"), Some("a.b"));
        assert_eq!(keys.topic_of("crier:{a.b}:m"), Some("a.b"));
        assert_eq!(keys.topic_of("other:{a.b}:c"), None);
        assert_eq!(keys.topic_of("crierx:{a.b}:c"), None);
        let pattern = Subject::parse("a.*.>").unwrap();
        assert_eq!(
            keys.subscription(&pattern),
            Channel::Glob("crier:{a.*.*}:c".into())
        );
        assert_eq!(keys.meta_glob(Some("a.>")), "crier:{a.*}:m");
        assert_eq!(keys.meta_glob(None), "crier:{*}:m");

        let cluster = Keys::new("x", true);
        let topic = Subject::parse("t").unwrap();
        assert_eq!(
            cluster.subscription(&topic),
            Channel::Shard("x:{t}:c".into())
        );
        assert_eq!(
            cluster.subscription(&Subject::parse(">").unwrap()),
            Channel::Glob("x:{~p}:*".into())
        );
        assert_eq!(cluster.broadcast("t").as_deref(), Some("x:{~p}:t"));
        assert_eq!(cluster.topic_of("x:{~p}:a.b"), Some("a.b"));
        // Another deployment's names never read as this one's, even when its prefix extends it.
        let nested = Keys::new("x:p", true);
        assert_eq!(cluster.topic_of(&nested.broadcast("t").unwrap()), None);
        assert_eq!(cluster.topic_of(&nested.channel("t")), None);
    }

    #[test]
    fn wire_messages_round_trip_and_junk_is_refused() {
        let data = Data::Msgpack(Bytes::from_static(&[0x92, 0x01, 0x3a]));
        let mut message = b"42:00ff:".to_vec();
        message.extend(tagged(&data));
        let wire = Wire::parse(Bytes::from(message)).unwrap();
        assert_eq!((wire.seq, &*wire.epoch, wire.data), (42, "00ff", data));
        let json = Wire::parse(Bytes::from_static(b"1:e:j{\"a\":1}")).unwrap();
        assert_eq!(json.data, Data::Json(Bytes::from_static(b"{\"a\":1}")));
        for junk in [&b""[..], b"1", b"x:e:j1", b"1:e:", b"1:e:q1", b"-1:e:j1"] {
            assert!(
                Wire::parse(Bytes::copy_from_slice(junk)).is_none(),
                "{junk:?}"
            );
        }
    }
}
