//! Topics' streams in Redis: publishing (pipelined, in order), reading history, listing topics
//! and keeping subscribed topics' epochs alive. Every call is one of the scripts in `scripts`
//! or a plain command, timed and counted in `metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Pipeline, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use super::keys::Keys;
use super::link::{Link, RESPONSE_TIMEOUT, is_noscript};
use super::metrics::{Op, RedisMetrics};
use super::scripts;
use crate::backend::memory::new_epoch;
use crate::backend::{HistoryPage, HistoryQuery, StreamFilter, StreamInfo, Unavailable};
use crate::model::StreamPosition;
use crate::topic;

/// Most publishes sent in one pipeline.
const PUBLISH_BATCH: usize = 512;
/// Most publishes waiting to be sent; more are refused at once (`unavailable`).
pub(crate) const MAX_WAITING_PUBLISHES: usize = 65_536;

pub(crate) struct Store {
    pub keys: Keys,
    pub commands: Link,
    pub settings: Settings,
    pub metrics: Arc<RedisMetrics>,
    publish_sha: String,
    history_sha: String,
}

pub(crate) struct Settings {
    pub cluster: bool,
    pub history_size: usize,
    pub history_ttl_ms: u64,
    /// How long a topic's seq and epoch outlive its last publish (renewed while subscribed).
    pub meta_ttl: Duration,
}

pub(crate) struct PublishRequest {
    pub topic: Arc<str>,
    /// The data, tagged with its encoding.
    pub data: Vec<u8>,
    pub reply: oneshot::Sender<Result<StreamPosition, Unavailable>>,
    pub queued_at: Instant,
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store {
    pub(crate) fn new(
        keys: Keys,
        commands: Link,
        settings: Settings,
        metrics: Arc<RedisMetrics>,
    ) -> Self {
        Store {
            keys,
            commands,
            settings,
            metrics,
            publish_sha: redis::Script::new(scripts::PUBLISH).get_hash().to_owned(),
            history_sha: redis::Script::new(scripts::HISTORY).get_hash().to_owned(),
        }
    }

    /// Sends a pipeline of script calls, loading the scripts again where Redis forgot them.
    async fn scripted(&self, pipeline: &Pipeline) -> RedisResult<Vec<Value>> {
        match self.commands.pipeline(pipeline).await {
            Err(e) if is_noscript(&e) => {
                self.load_scripts().await?;
                self.commands.pipeline(pipeline).await
            }
            other => other,
        }
    }

    async fn load_scripts(&self) -> RedisResult<()> {
        self.commands.load(scripts::PUBLISH).await?;
        self.commands.load(scripts::HISTORY).await
    }

    /// How many topics one pipeline may carry: one in a cluster, where a pipeline stays within
    /// one slot.
    fn topics_per_pipeline(&self) -> usize {
        if self.settings.cluster { 1 } else { 256 }
    }

    fn publish_call(&self, request: &PublishRequest) -> redis::Cmd {
        let topic = &request.topic;
        let settings = &self.settings;
        let mut call = redis::cmd("EVALSHA");
        call.arg(&self.publish_sha)
            .arg(2)
            .arg(self.keys.meta(topic))
            .arg(self.keys.history(topic))
            .arg(self.keys.channel(topic))
            .arg(&request.data)
            .arg(&*new_epoch())
            .arg(settings.history_size)
            .arg(settings.history_ttl_ms)
            .arg(millis(settings.meta_ttl))
            .arg(self.keys.broadcast(topic).unwrap_or_default())
            .arg(if settings.cluster { "1" } else { "0" });
        call
    }

    /// Publishes a run of requests in one pipeline, and answers each. A request that waited
    /// longer than a round trip may take (Redis did not answer) is refused without being sent,
    /// so that it cannot be applied after its client was told `unavailable`.
    pub(crate) async fn publish_all(&self, requests: Vec<PublishRequest>) {
        self.send_publishes(requests, true).await;
    }

    async fn send_publishes(&self, requests: Vec<PublishRequest>, reload: bool) {
        let (requests, stale): (Vec<_>, Vec<_>) = requests
            .into_iter()
            .partition(|r| r.queued_at.elapsed() < RESPONSE_TIMEOUT);
        for request in stale {
            let why = "Redis did not answer in time; the message was not sent";
            let _ = request.reply.send(Err(Unavailable(why.into())));
        }
        if requests.is_empty() {
            return;
        }
        let mut pipeline = redis::pipe();
        // Each script's own failure answers its own request, not the whole pipeline's.
        pipeline.ignore_errors();
        for request in &requests {
            pipeline.add_command(self.publish_call(request));
        }
        self.metrics.operations(Op::Publish, requests.len());
        let answers = match self
            .metrics
            .timed(Op::Publish, self.commands.pipeline(&pipeline))
            .await
        {
            Ok(answers) if answers.len() == requests.len() => answers,
            Ok(answers) => {
                let why = format!("{} answers to {} publishes", answers.len(), requests.len());
                for request in requests {
                    let _ = request.reply.send(Err(Unavailable(why.clone())));
                }
                return;
            }
            Err(unavailable) => {
                for request in requests {
                    let _ = request.reply.send(Err(unavailable.clone()));
                }
                return;
            }
        };
        let mut forgotten = Vec::new();
        for (request, answer) in requests.into_iter().zip(answers) {
            match answer {
                // Not run: Redis lost its scripts (it restarted). Sent again below.
                Value::ServerError(e) if e.code() == "NOSCRIPT" => forgotten.push(request),
                Value::ServerError(e) => {
                    self.metrics.error(Op::Publish, "server");
                    tracing::warn!(topic = %request.topic, error = %e.details().unwrap_or(e.code()), "Redis refused a publish");
                    let why = format!("Redis refused the publish: {}", e.code());
                    let _ = request.reply.send(Err(Unavailable(why)));
                }
                answer => {
                    let position = scripts::published(&answer)
                        .ok_or_else(|| Unavailable(format!("unexpected answer {answer:?}")));
                    let _ = request.reply.send(position);
                }
            }
        }
        if forgotten.is_empty() {
            return;
        }
        let loaded = if reload {
            self.metrics.timed(Op::Publish, self.load_scripts()).await
        } else {
            Err(Unavailable("Redis keeps forgetting Crier's scripts".into()))
        };
        if let Err(unavailable) = loaded {
            for request in forgotten {
                let _ = request.reply.send(Err(unavailable.clone()));
            }
            return;
        }
        Box::pin(self.send_publishes(forgotten, false)).await;
    }

    pub(crate) async fn read_history(
        &self,
        topic: &Arc<str>,
        query: HistoryQuery,
        create: bool,
    ) -> Result<Option<HistoryPage>, Unavailable> {
        let (mode, n, limit) = match query {
            HistoryQuery::After { seq, limit } => ("after", seq, limit.min(1 << 20)),
            HistoryQuery::Last(n) => ("last", n as u64, 0),
        };
        let fresh = if create { new_epoch() } else { "".into() };
        let mut call = redis::cmd("EVALSHA");
        call.arg(&self.history_sha)
            .arg(2)
            .arg(self.keys.meta(topic))
            .arg(self.keys.history(topic))
            .arg(&*fresh)
            .arg(mode)
            .arg(n)
            .arg(limit)
            .arg(self.settings.history_ttl_ms)
            .arg(millis(self.settings.meta_ttl));
        let mut pipeline = redis::pipe();
        pipeline.add_command(call);
        self.metrics.operation(Op::History);
        let answer = self
            .metrics
            .timed(Op::History, self.scripted(&pipeline))
            .await?
            .pop()
            .unwrap_or(Value::Nil);
        scripts::page(topic, answer, mode == "last").map_err(|e| {
            self.metrics.error(Op::History, "malformed");
            Unavailable(e)
        })
    }

    /// The topics Redis knows under this prefix that `filter` accepts.
    pub(crate) async fn streams(
        &self,
        filter: StreamFilter,
    ) -> Result<Vec<StreamInfo>, Unavailable> {
        let pattern = match &filter {
            StreamFilter::All => None,
            StreamFilter::Matching(p) => Some(&**p),
        };
        self.metrics.operation(Op::Streams);
        let glob = self.keys.meta_glob(pattern);
        // A pattern's rewind (a client's request) lists fewer than an operator's listing.
        let limit = if pattern.is_some() { 10_000 } else { 100_000 };
        let names = self
            .metrics
            .timed(Op::Streams, self.commands.keys(&glob, limit))
            .await?;
        let topics: Vec<Arc<str>> = names
            .iter()
            .filter_map(|name| self.keys.topic_of(name))
            .filter(|t| topic::validate_topic(t).is_ok() && filter.accepts(t))
            .map(Arc::from)
            .collect();
        let mut streams = Vec::with_capacity(topics.len());
        let per_pipeline = self.topics_per_pipeline();
        for chunk in topics.chunks(per_pipeline * 16) {
            let infos = chunk
                .chunks(per_pipeline)
                .map(|topics| self.stream_infos(topics));
            for infos in futures_util::future::join_all(infos).await {
                streams.extend(infos?);
            }
        }
        Ok(streams)
    }

    async fn stream_infos(&self, topics: &[Arc<str>]) -> Result<Vec<StreamInfo>, Unavailable> {
        let mut pipeline = redis::pipe();
        for t in topics {
            pipeline
                .cmd("HMGET")
                .arg(self.keys.meta(t))
                .arg("epoch")
                .arg("seq")
                .cmd("XLEN")
                .arg(self.keys.history(t));
        }
        self.metrics.operations(Op::Streams, topics.len());
        let answers = self
            .metrics
            .timed(Op::Streams, self.commands.pipeline(&pipeline))
            .await?;
        let mut infos = Vec::with_capacity(topics.len());
        for (name, answer) in topics.iter().zip(answers.chunks(2)) {
            let [Value::Array(meta), history] = answer else {
                continue;
            };
            // Gone since it was listed.
            let (Some(epoch), Some(seq)) = (
                meta.first().and_then(scripts::text),
                meta.get(1).and_then(scripts::integer),
            ) else {
                continue;
            };
            infos.push(StreamInfo {
                name: name.clone(),
                position: StreamPosition {
                    epoch: epoch.into(),
                    seq,
                },
                history: scripts::integer(history).unwrap_or(0) as usize,
            });
        }
        Ok(infos)
    }

    /// Renews the TTL of topics' seq and epoch.
    pub(crate) async fn refresh(&self, topics: &[Arc<str>]) {
        let ttl = millis(self.settings.meta_ttl);
        for chunk in topics.chunks(self.topics_per_pipeline()) {
            let mut pipeline = redis::pipe();
            for t in chunk {
                pipeline
                    .cmd("PEXPIRE")
                    .arg(self.keys.meta(t))
                    .arg(ttl)
                    .ignore();
            }
            self.metrics.operations(Op::Refresh, chunk.len());
            let _ = self
                .metrics
                .timed(Op::Refresh, self.commands.pipeline(&pipeline))
                .await;
        }
    }
}

/// Sends publishes in the order they were made, a pipeline at a time. In a cluster each topic
/// (one slot) gets its own pipeline, sent side by side: a topic's order is kept either way.
pub(crate) async fn publish_loop(store: Arc<Store>, mut requests: mpsc::Receiver<PublishRequest>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while requests.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let run = std::mem::take(&mut batch);
        if !store.settings.cluster {
            store.publish_all(run).await;
            continue;
        }
        let mut by_topic: Vec<Vec<PublishRequest>> = Vec::new();
        let mut group_of: HashMap<Arc<str>, usize> = HashMap::new();
        for request in run {
            let group = *group_of.entry(request.topic.clone()).or_insert_with(|| {
                by_topic.push(Vec::new());
                by_topic.len() - 1
            });
            by_topic[group].push(request);
        }
        futures_util::future::join_all(by_topic.into_iter().map(|g| store.publish_all(g))).await;
    }
}
