//! Topic names and subscription patterns: what is valid, and what matches what.
//!
//! A topic is 1 to 255 bytes of `[A-Za-z0-9_\-:@]` segments separated by `.`. A subscription may
//! also be a pattern, where `*` stands for exactly one segment and `>` (last only) for one or more
//! trailing segments, as in NATS.

use std::fmt;
use std::sync::Arc;

pub(crate) const MAX_TOPIC_BYTES: usize = 255;

/// The first segment of the broker's own topics (`_crier.stats`): only the broker publishes there.
pub(crate) const SYSTEM_NAMESPACE: &str = "_crier";

/// Why a topic or pattern was refused; the text is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidTopic(pub String);

impl fmt::Display for InvalidTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated subscription target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Topic(Arc<str>),
    Pattern(Arc<str>),
}

impl Subject {
    /// The topic or pattern as the client wrote it.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Subject::Topic(s) | Subject::Pattern(s) => s,
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Subject, InvalidTopic> {
        Ok(match check(s, true)? {
            false => Subject::Topic(s.into()),
            true => Subject::Pattern(s.into()),
        })
    }
}

/// Checks a topic that messages are published to: wildcards are not allowed.
pub(crate) fn validate_topic(s: &str) -> Result<(), InvalidTopic> {
    check(s, false).map(|_| ())
}

/// Returns whether `s` is a pattern.
fn check(s: &str, allow_wildcards: bool) -> Result<bool, InvalidTopic> {
    if s.len() <= MAX_TOPIC_BYTES && is_plain_topic(s.as_bytes()) {
        return Ok(false);
    }
    check_segments(s, allow_wildcards)
}

fn check_segments(s: &str, allow_wildcards: bool) -> Result<bool, InvalidTopic> {
    if s.is_empty() {
        return Err(InvalidTopic("topic is empty".into()));
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(InvalidTopic(format!(
            "topic is {} bytes long; the limit is {MAX_TOPIC_BYTES}",
            s.len()
        )));
    }
    let mut is_pattern = false;
    let mut segments = s.split('.').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" => return Err(InvalidTopic(format!("topic {s:?} has an empty segment"))),
            "*" | ">" if !allow_wildcards => {
                return Err(InvalidTopic(format!(
                    "topic {s:?} contains the wildcard {segment:?}; wildcards are only allowed in subscriptions"
                )));
            }
            "*" => is_pattern = true,
            ">" if segments.peek().is_some() => {
                return Err(InvalidTopic(format!(
                    "pattern {s:?}: '>' may only be the last segment"
                )));
            }
            ">" => is_pattern = true,
            _ => {
                if let Some(bad) = segment.chars().find(|&c| !is_topic_char(c)) {
                    return Err(InvalidTopic(format!(
                        "topic {s:?} contains {bad:?}; segments may only use A-Z a-z 0-9 _ - : @"
                    )));
                }
            }
        }
    }
    Ok(is_pattern)
}

/// Whether `s` is non-empty topic segments joined by single dots, in one pass over its bytes.
/// Every publish checks its topic: splitting it into `&str` segments was 4% of a publish, and the
/// segment-wise walk in [`check`] stays for patterns and for saying what is wrong.
fn is_plain_topic(s: &[u8]) -> bool {
    let mut after_dot = true;
    for &b in s {
        match BYTE_CLASS[usize::from(b)] {
            SEGMENT_BYTE => after_dot = false,
            DOT if !after_dot => after_dot = true,
            _ => return false,
        }
    }
    !after_dot
}

const SEGMENT_BYTE: u8 = 1;
const DOT: u8 = 2;

/// What each byte is in a topic, looked up instead of tested range by range (the tests were most
/// of a publish's topic check).
static BYTE_CLASS: [u8; 256] = {
    let mut class = [0; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b':' | b'@') {
            class[b] = SEGMENT_BYTE;
        }
        b += 1;
    }
    class[b'.' as usize] = DOT;
    class
};

fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '@')
}

/// Whether a topic or pattern is (or reaches only) one of the broker's own topics.
pub(crate) fn is_system(subject: &str) -> bool {
    subject
        .strip_prefix(SYSTEM_NAMESPACE)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Whether a (valid) pattern matches a (valid) topic. The broker's own topics
/// ([`SYSTEM_NAMESPACE`]) are matched only by patterns that name their namespace: `>` and `*.x`
/// do not reach them.
pub(crate) fn matches(pattern: &str, topic: &str) -> bool {
    if is_system(topic) && !is_system(pattern) {
        return false;
    }
    let mut topic_segments = topic.split('.');
    for p in pattern.split('.') {
        match (p, topic_segments.next()) {
            (">", Some(_)) => return true,
            (_, None) => return false,
            ("*", Some(_)) => {}
            (p, Some(t)) if p == t => {}
            _ => return false,
        }
    }
    topic_segments.next().is_none()
}

/// The first segment of a topic, which metrics may label.
pub(crate) fn namespace(topic: &str) -> &str {
    // A byte loop: topics are short, and `split`'s searcher was 1.5% of a small publish.
    match topic.bytes().position(|b| b == b'.') {
        Some(dot) => &topic[..dot],
        None => topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_topics() {
        for t in [
            "a",
            "metrics.cpu",
            "user:42.inbox",
            "a-b_c.d@e",
            "A.B.C",
            &"x".repeat(255),
        ] {
            assert_eq!(validate_topic(t), Ok(()), "{t}");
            assert_eq!(Subject::parse(t), Ok(Subject::Topic(t.into())));
        }
    }

    #[test]
    fn invalid_topics() {
        for t in [
            "",
            ".",
            "a.",
            ".a",
            "a..b",
            "a b",
            "a/b",
            "ä",
            "a.*",
            "a.>",
            "*",
            ">",
            &"x".repeat(256),
        ] {
            assert!(validate_topic(t).is_err(), "{t:?} should be invalid");
        }
        let long = "a.".repeat(128); // 256 bytes, ends with '.'
        assert!(validate_topic(&long).is_err());
    }

    #[test]
    fn the_one_pass_check_agrees_with_the_segment_walk() {
        let pieces = ["a", "Z9", "_-:@", ".", "..", "*", ">", " ", "ä", "/", ""];
        let mut plain_ones = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let s = format!("{a}{b}{c}");
                    let plain = is_plain_topic(s.as_bytes());
                    assert_eq!(check_segments(&s, false) == Ok(false), plain, "{s:?}");
                    if plain {
                        assert_eq!(check_segments(&s, true), Ok(false), "{s:?}");
                        plain_ones += 1;
                    }
                }
            }
        }
        assert!(plain_ones > 50, "only {plain_ones} plain topics");
        // Every byte, between segment bytes: the table says what the segment walk says.
        for b in 0..=255u8 {
            let expected = b == b'.' || (b.is_ascii() && is_topic_char(char::from(b)));
            assert_eq!(is_plain_topic(&[b'a', b, b'a']), expected, "byte {b:#04x}");
            assert_eq!(is_plain_topic(&[b]), expected && b != b'.', "byte {b:#04x}");
        }
    }

    #[test]
    fn patterns() {
        for p in ["*", ">", "a.*", "a.>", "*.b", "a.*.c", "*.*", "a.*.>"] {
            assert_eq!(Subject::parse(p), Ok(Subject::Pattern(p.into())), "{p}");
        }
        for p in ["a.>.b", ">.a", "a*", "a.b*", "a.>>", "a.**"] {
            assert!(Subject::parse(p).is_err(), "{p:?} should be invalid");
        }
    }

    #[test]
    fn matching_agrees_with_the_nats_rules() {
        let cases = [
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            (">", "a", true),
            ("*.b", "a.b", true),
            ("a.*.c", "a.x.d", false),
            ("a.b", "a.b", true),
            ("a.b", "a.bc", false),
        ];
        for (pattern, topic, expected) in cases {
            assert_eq!(matches(pattern, topic), expected, "{pattern} vs {topic}");
        }
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace("metrics.cpu"), "metrics");
        assert_eq!(namespace("solo"), "solo");
        assert_eq!(namespace("a.b.c"), "a");
        assert_eq!(namespace(""), "");
        for subject in ["_crier", "_crier.connections", "_crier.*", "_crier.>"] {
            assert!(is_system(subject), "{subject}");
        }
        for subject in [
            "_crierx",
            "_crierx.a",
            "x._crier",
            "_crie",
            ">",
            "*.connections",
        ] {
            assert!(!is_system(subject), "{subject}");
        }
    }
}
