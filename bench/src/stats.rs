//! What a scenario measures: end-to-end latency (HdrHistogram), deliveries, losses and
//! duplicates, and the one-line JSON summary and table every scenario prints.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Every payload starts with when it was published (ns since the run's epoch) and which
/// message it is (publisher or topic in the high 24 bits, a counter in the low 40).
pub const HEADER: usize = 16;

pub fn payload(epoch: Instant, stream: u64, n: u64, size: usize) -> Bytes {
    let mut bytes = BytesMut::with_capacity(size.max(HEADER));
    bytes.put_u64_le(epoch.elapsed().as_nanos() as u64);
    bytes.put_u64_le((stream << 40) | n);
    bytes.resize(size.max(HEADER), b'.');
    bytes.freeze()
}

/// (published at, stream, n) of a payload.
pub fn parse(payload: &[u8]) -> Option<(u64, u64, u64)> {
    let at = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let id = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((at, id >> 40, id & ((1 << 40) - 1)))
}

/// What one subscriber saw.
pub struct Received {
    pub latency: Histogram<u64>,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Messages whose topic `seq` was not above the previous message's: the broker orders a
    /// topic once for all its subscribers (and all its nodes), so any is a fault. Counted only
    /// in numbered runs, which have one topic, and only for brokers that number messages.
    pub out_of_order: u64,
    pub last_at: Option<Instant>,
    /// The next counter expected from each stream (streams are small numbers).
    next: Vec<u64>,
    last_seq: Option<u64>,
}

impl Default for Received {
    fn default() -> Self {
        Received {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            messages: 0,
            lost: 0,
            duplicated: 0,
            out_of_order: 0,
            last_at: None,
            next: Vec::new(),
            last_seq: None,
        }
    }
}

impl Received {
    /// Records a message received now, with its topic seq if the broker numbers messages;
    /// `numbered` says whether each stream's counter starts at 0 and goes up by one (so gaps are
    /// losses) and all messages are on one topic.
    pub fn record(&mut self, epoch: Instant, seq: Option<u64>, payload: &[u8], numbered: bool) {
        let now = Instant::now();
        let Some((at, stream, n)) = parse(payload) else {
            return;
        };
        let latency_us = (now.duration_since(epoch).as_nanos() as u64).saturating_sub(at) / 1000;
        let _ = self.latency.record(latency_us.max(1));
        self.messages += 1;
        self.last_at = Some(now);
        if numbered {
            let stream = stream as usize;
            if stream >= self.next.len() {
                self.next.resize(stream + 1, 0);
            }
            let next = &mut self.next[stream];
            if n == *next {
                *next += 1;
            } else if n > *next {
                self.lost += n - *next;
                *next = n + 1;
            } else {
                self.duplicated += 1;
            }
            if let Some(seq) = seq {
                if self.last_seq.is_some_and(|last| seq <= last) {
                    self.out_of_order += 1;
                }
                self.last_seq = Some(seq);
            }
        }
    }

    pub fn merge(&mut self, other: &Received) {
        let _ = self.latency.add(&other.latency);
        self.messages += other.messages;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.last_at = self.last_at.max(other.last_at);
    }

    /// Messages each stream should have had, by the counters seen: for the losses at the end.
    pub fn expected_lost_at_end(&self, published_per_stream: &HashMap<u64, u64>) -> u64 {
        published_per_stream
            .iter()
            .map(|(stream, published)| {
                published.saturating_sub(*self.next.get(*stream as usize).unwrap_or(&0))
            })
            .sum()
    }
}

pub fn latency_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p99_9": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// Prints the summary as one JSON line, then as a table (quietly stopping if stdout is closed,
/// as when piped into `head`).
pub fn report(summary: &Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = write_summary(&mut out, summary);
    let _ = out.flush();
}

fn write_summary(out: &mut impl std::io::Write, summary: &Value) -> std::io::Result<()> {
    writeln!(out, "{summary}")?;
    let Some(map) = summary.as_object() else {
        return Ok(());
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    for (key, value) in map {
        match value {
            Value::Object(inner) => {
                for (k, v) in inner {
                    rows.push((format!("{key}.{k}"), v.to_string()));
                }
            }
            other => rows.push((key.clone(), other.to_string())),
        }
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        writeln!(out, "  {key:<width$}  {value}")?;
    }
    Ok(())
}

pub fn per_second(count: u64, over: Duration) -> f64 {
    if over.is_zero() {
        0.0
    } else {
        (count as f64 / over.as_secs_f64() * 10.0).round() / 10.0
    }
}

/// Resident memory of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_time_stream_and_counter() {
        let epoch = Instant::now();
        let p = payload(epoch, 3, 41, 64);
        assert_eq!(p.len(), 64);
        let (_, stream, n) = parse(&p).unwrap();
        assert_eq!((stream, n), (3, 41));
        assert_eq!(
            payload(epoch, 0, 0, 4).len(),
            HEADER,
            "never shorter than the header"
        );
    }

    #[test]
    fn gaps_and_repeats_are_counted() {
        let epoch = Instant::now();
        let mut r = Received::default();
        for n in [0, 1, 3, 4, 4, 2] {
            r.record(epoch, None, &payload(epoch, 7, n, 16), true);
        }
        assert_eq!((r.messages, r.lost, r.duplicated), (6, 1, 2));
        assert_eq!(r.out_of_order, 0, "nothing to say without seqs");
        let published = HashMap::from([(7, 8)]);
        assert_eq!(r.expected_lost_at_end(&published), 3);
    }

    #[test]
    fn seqs_going_back_are_out_of_order() {
        let epoch = Instant::now();
        let mut r = Received::default();
        // Two publishers' streams interleaved on one topic; seq 12 comes back after 13.
        for (seq, stream, n) in [(10, 0, 0), (11, 1, 0), (13, 1, 1), (12, 0, 1), (14, 0, 2)] {
            r.record(epoch, Some(seq), &payload(epoch, stream, n, 16), true);
        }
        assert_eq!((r.lost, r.duplicated, r.out_of_order), (0, 0, 1));
    }
}
