//! The Redis backend: several Crier nodes act as one broker over Redis or a Redis Cluster.
//!
//! Each topic's seq, epoch and history live in Redis, assigned and appended atomically by a Lua
//! script that also publishes the message (`scripts`), under keys and channels that share the
//! topic as hash tag, so that in a cluster a topic lives on one shard (`keys`). A node listens
//! only to the topics and patterns its own clients subscribe to (`interest`); what Redis pushes
//! becomes deliveries to the hub, once each and in order (`reader`). Publishes are pipelined:
//! everything queued while one round trip is under way goes in the next.
//!
//! All Redis I/O runs on a runtime of its own (one thread, `crier-redis`): the actix workers
//! only queue requests and await their answers. That thread also carries the reader's fan-out
//! to this node's subscribers, so a node's deliveries from Redis use one core.
//! Redis unreachable: a request waits at most a round trip's timeout (plus the one it queued
//! behind) and is answered [`Unavailable`]; one that waited that long is never sent afterwards.
//! `/readyz` says so, and a watcher notices when Redis is back, subscribes again and has the
//! reader fetch what was published meanwhile.

mod health;
mod interest;
mod keys;
mod link;
mod metrics;
mod reader;
mod scripts;
mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::RedisResult;
use tokio::sync::{mpsc, oneshot};

use self::health::Health;
use self::interest::Interest;
use self::keys::{Keys, tagged};
use self::link::{Link, Target};
use self::metrics::{Op, RedisMetrics};
use self::reader::{Delivered, Reader};
use self::store::{PublishRequest, Settings, Store, publish_loop};
use super::{
    Answer, Backend, BackendStats, DeliverySink, HistoryPage, HistoryQuery, Published,
    StreamFilter, StreamInfo, Unavailable,
};
use crate::config::Config;
use crate::data::Data;
use crate::metrics::Metrics;
use crate::topic::Subject;

/// The shortest a topic's seq and epoch live in Redis after its last publish, whatever
/// `--topic-ttl` says: renewals for subscribed topics come every third of it.
const MIN_TOPIC_TTL: Duration = Duration::from_secs(10);
/// How often the watcher checks that Redis answers.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// The longest pause between checks while Redis does not answer.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(4);
/// How long the node may take to reach Redis when it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct RedisBackend {
    store: Arc<Store>,
    interest: Arc<Interest>,
    health: Arc<Health>,
    delivered: Arc<Mutex<Delivered>>,
    sink: Arc<dyn DeliverySink>,
    publishes: mpsc::Sender<PublishRequest>,
    runtime: RedisRuntime,
    /// When the TTLs of the topics this node subscribes to were last renewed.
    last_refresh: Mutex<Instant>,
}

/// The runtime the Redis tasks run on; stopped (without waiting) when the backend goes.
struct RedisRuntime(Option<tokio::runtime::Runtime>);

impl RedisRuntime {
    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(|r| r.handle())
    }
}

impl Drop for RedisRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl RedisBackend {
    /// Connects to Redis (failing if it cannot within a few seconds) and starts the tasks that
    /// publish, listen and watch.
    pub(crate) fn connect(
        config: &Config,
        metrics: &Metrics,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<Arc<dyn Backend>, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("crier-redis")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the Redis runtime: {e}"))?;
        // Dropped (on failure too) without waiting: the caller may be inside a runtime.
        let runtime = RedisRuntime(Some(runtime));
        let Some(handle) = runtime.handle().cloned() else {
            return Err("the Redis runtime did not start".into());
        };
        let target = Target {
            urls: config.redis.clone(),
            cluster: config.redis_cluster,
        };
        let (pushes_in, pushes) = mpsc::unbounded_channel();
        // The caller may itself be inside a runtime, which cannot block on another.
        let connected = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    handle.block_on(async {
                        let connect = async {
                            let commands = Link::connect(&target, None).await?;
                            let pubsub = Link::connect(&target, Some(pushes_in)).await?;
                            commands.load(scripts::PUBLISH).await?;
                            commands.load(scripts::HISTORY).await?;
                            RedisResult::Ok((commands, pubsub))
                        };
                        tokio::time::timeout(STARTUP_TIMEOUT, connect).await
                    })
                })
                .join()
        });
        let (commands, pubsub) = match connected {
            Ok(Ok(Ok(links))) => links,
            Ok(Ok(Err(e))) => return Err(format!("cannot connect to Redis (--redis): {e}")),
            Ok(Err(_)) => {
                return Err(format!(
                    "cannot connect to Redis (--redis): no answer within {}s",
                    STARTUP_TIMEOUT.as_secs()
                ));
            }
            Err(_) => return Err("connecting to Redis failed unexpectedly".into()),
        };

        let keys = Keys::new(&config.redis_prefix, config.redis_cluster);
        let metrics = Arc::new(RedisMetrics::new(metrics));
        let history_size = if config.history_enabled() {
            config.history_size
        } else {
            0
        };
        let settings = Settings {
            cluster: config.redis_cluster,
            history_size,
            history_ttl_ms: store::millis(config.history_ttl),
            // Never so short that a subscribed topic's epoch could lapse between renewals.
            meta_ttl: config.topic_ttl.max(config.history_ttl).max(MIN_TOPIC_TTL),
        };
        let store = Arc::new(Store::new(
            keys.clone(),
            commands,
            settings,
            metrics.clone(),
        ));
        let (changes_in, changes) = mpsc::unbounded_channel();
        let (catch_up_in, catch_up) = mpsc::unbounded_channel();
        let interest = Arc::new(Interest::new(keys, changes_in));
        let health = Arc::new(Health::new(catch_up_in));
        let delivered = Arc::new(Mutex::new(Delivered::default()));
        let reader = Reader {
            store: store.clone(),
            interest: interest.clone(),
            health: health.clone(),
            delivered: delivered.clone(),
            sink: sink.clone(),
        };
        let (publishes, requests) = mpsc::channel(store::MAX_WAITING_PUBLISHES);
        handle.spawn(publish_loop(store.clone(), requests));
        handle.spawn(interest::run(
            interest.clone(),
            health.clone(),
            metrics.clone(),
            pubsub.clone(),
            changes,
        ));
        handle.spawn(reader::run(reader, pushes, catch_up));
        handle.spawn(watch(
            store.clone(),
            interest.clone(),
            health.clone(),
            pubsub,
        ));
        tracing::info!(
            prefix = %config.redis_prefix,
            cluster = config.redis_cluster,
            "connected to Redis"
        );
        Ok(Arc::new(RedisBackend {
            store,
            interest,
            health,
            delivered,
            sink,
            publishes,
            runtime,
            last_refresh: Mutex::new(Instant::now()),
        }))
    }

    /// Runs `work` on the Redis runtime and answers with its outcome.
    fn on_runtime<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, Unavailable>> + Send + 'static,
    ) -> Answer<Result<T, Unavailable>> {
        let Some(handle) = self.runtime.handle() else {
            return Answer::Now(Err(stopped()));
        };
        let task = handle.spawn(work);
        Answer::Later(Box::pin(async move {
            task.await.unwrap_or_else(|_| Err(stopped()))
        }))
    }
}

fn stopped() -> Unavailable {
    Unavailable("the Redis backend has stopped".into())
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn publish(&self, topic: &str, data: Data) -> Answer<Result<Published, Unavailable>> {
        let (reply, answer) = oneshot::channel();
        let request = PublishRequest {
            topic: topic.into(),
            data: tagged(&data),
            reply,
            queued_at: Instant::now(),
        };
        match self.publishes.try_send(request) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Answer::Now(Err(Unavailable(format!(
                    "{} publishes are already waiting for Redis",
                    store::MAX_WAITING_PUBLISHES
                ))));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Answer::Now(Err(stopped())),
        }
        Answer::Later(Box::pin(async move {
            let position = answer.await.unwrap_or_else(|_| Err(stopped()))?;
            Ok(Published {
                seq: position.seq,
                receivers: None,
            })
        }))
    }

    fn history(
        &self,
        topic: &str,
        query: HistoryQuery,
    ) -> Answer<Result<Option<HistoryPage>, Unavailable>> {
        let store = self.store.clone();
        let topic: Arc<str> = topic.into();
        // A topic this node subscribes to exists from then on, with an epoch of its own, and
        // its live stream continues from what this read finds.
        let subscribing = self.interest.wants_topic(&topic);
        let delivered = self.delivered.clone();
        self.on_runtime(async move {
            let page = store.read_history(&topic, query, subscribing).await?;
            if subscribing && let Some(page) = &page {
                delivered.lock().floor(&topic, page.position.clone());
            }
            Ok(page)
        })
    }

    fn interest(&self, subject: &Subject, on: bool) {
        self.interest.declare(subject, on);
        if !on {
            self.delivered.lock().forget_unwanted(subject, &*self.sink);
        }
    }

    fn listening(&self, subject: &Subject) -> Answer<Result<(), Unavailable>> {
        self.interest.listening(subject)
    }

    fn streams(&self, filter: StreamFilter) -> Answer<Result<Vec<StreamInfo>, Unavailable>> {
        let store = self.store.clone();
        self.on_runtime(async move { store.streams(filter).await })
    }

    fn ready(&self) -> bool {
        self.health.ready()
    }

    /// Renews the TTL of the topics this node subscribes to, so that their epoch lasts while
    /// anyone here listens (Redis expires what nobody publishes to).
    fn sweep(&self, now: Instant) {
        let every = (self.store.settings.meta_ttl / 3).min(Duration::from_secs(60));
        let mut last = self.last_refresh.lock();
        if now.saturating_duration_since(*last) < every {
            return;
        }
        *last = now;
        let topics = self.interest.topics();
        if topics.is_empty() {
            return;
        }
        let store = self.store.clone();
        drop(self.on_runtime(async move {
            store.refresh(&topics).await;
            Ok(())
        }));
    }

    /// Histories are held in Redis, not in this process.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }
}

/// Checks that Redis answers, on both connections; marks the node unready while it does not,
/// and has the subscriptions made again once it does. While Redis is away it is asked less and
/// less often (exponential backoff up to [`WATCH_BACKOFF_MAX`]).
async fn watch(store: Arc<Store>, interest: Arc<Interest>, health: Arc<Health>, pubsub: Link) {
    let metrics = &store.metrics;
    let mut pause = WATCH_EVERY;
    loop {
        tokio::time::sleep(pause).await;
        metrics.operations(Op::Ping, 2);
        let commands = metrics.timed(Op::Ping, store.commands.ping()).await;
        let subscriptions = metrics.timed(Op::Ping, pubsub.ping()).await;
        if commands.is_ok() && subscriptions.is_ok() {
            pause = WATCH_EVERY;
            metrics.connected.set(1);
            if health.take_resync() {
                interest.resync();
            }
        } else {
            pause = (pause * 2).min(WATCH_BACKOFF_MAX);
            metrics.connected.set(0);
            if !health.resync_needed() {
                tracing::warn!("Redis does not answer; publishes are refused until it does");
            }
            health.need_resync();
            interest.lost("Redis is unreachable");
        }
    }
}
