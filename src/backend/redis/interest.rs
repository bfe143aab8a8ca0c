//! What this node listens to in Redis: one Redis subscription per topic or pattern glob its
//! clients want, made when the first local subscriber arrives and dropped when the last leaves.
//!
//! The hub declares interest under its own locks, in the order changes happen; declaring only
//! records the change and queues it, so the hub never waits on Redis. One task carries the
//! queue out in order over the pub/sub connection, and tells each subscription when Redis has
//! confirmed it: `listening` answers then, and only then does the hub read the history a new
//! subscription joins its live stream to.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::health::Health;
use super::keys::{Channel, Keys};
use super::link::{Link, RESPONSE_TIMEOUT, error_kind, is_connection_failure};
use super::metrics::{Op, RedisMetrics};
use crate::backend::{Answer, Unavailable};
use crate::topic::Subject;

/// Whether a Redis subscription is in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Listening {
    Pending,
    Yes,
    No(String),
}

/// The node's wanted Redis subscriptions.
pub(crate) struct Interest {
    keys: Keys,
    wants: Mutex<Wants>,
    changes: mpsc::UnboundedSender<Change>,
}

#[derive(Default)]
struct Wants {
    by_channel: HashMap<Channel, Want>,
    next_version: u64,
}

/// One Redis subscription and the subjects it serves (patterns `a.*` and `a.>` share a glob).
struct Want {
    subjects: HashSet<Subject>,
    state: watch::Sender<Listening>,
    /// Which declaration the state answers: a subscription dropped and wanted again is a new one.
    version: u64,
}

/// A change for the task to carry out, or a request to make every subscription again.
pub(crate) enum Change {
    Subscribe { channel: Channel, version: u64 },
    Unsubscribe(Channel),
    Resync,
}

impl Interest {
    pub(crate) fn new(keys: Keys, changes: mpsc::UnboundedSender<Change>) -> Self {
        Interest {
            keys,
            wants: Mutex::new(Wants::default()),
            changes,
        }
    }

    /// Records that this node gained (`on`) or lost its interest in `subject`, and queues the
    /// Redis subscription change it calls for.
    pub(crate) fn declare(&self, subject: &Subject, on: bool) {
        let channel = self.keys.subscription(subject);
        let mut wants = self.wants.lock();
        if on {
            let version = wants.next_version;
            let want = wants
                .by_channel
                .entry(channel.clone())
                .or_insert_with(|| Want {
                    subjects: HashSet::new(),
                    state: watch::Sender::new(Listening::Pending),
                    version,
                });
            let first = want.subjects.is_empty();
            want.subjects.insert(subject.clone());
            if first {
                wants.next_version += 1;
                let _ = self.changes.send(Change::Subscribe { channel, version });
            }
            return;
        }
        let Some(want) = wants.by_channel.get_mut(&channel) else {
            return;
        };
        want.subjects.remove(subject);
        if want.subjects.is_empty() {
            wants.by_channel.remove(&channel);
            let _ = self.changes.send(Change::Unsubscribe(channel));
        }
    }

    /// Answers once Redis has confirmed the subscription that serves `subject`.
    pub(crate) fn listening(&self, subject: &Subject) -> Answer<Result<(), Unavailable>> {
        let channel = self.keys.subscription(subject);
        let wants = self.wants.lock();
        let Some(want) = wants.by_channel.get(&channel) else {
            return Answer::Now(Err(Unavailable("no subscription is wanted".into())));
        };
        let mut state = want.state.subscribe();
        drop(wants);
        let now = state.borrow_and_update().clone();
        match now {
            Listening::Yes => Answer::Now(Ok(())),
            Listening::No(why) => Answer::Now(Err(Unavailable(why))),
            Listening::Pending => Answer::Later(Box::pin(async move {
                let settled = state.wait_for(|s| *s != Listening::Pending);
                match tokio::time::timeout(RESPONSE_TIMEOUT * 2, settled).await {
                    Ok(Ok(state)) => match &*state {
                        Listening::No(why) => Err(Unavailable(why.clone())),
                        _ => Ok(()),
                    },
                    Ok(Err(_)) => Err(Unavailable("the subscription was dropped".into())),
                    Err(_) => Err(Unavailable("Redis did not confirm the subscription".into())),
                }
            })),
        }
    }

    /// Whether this node subscribes to exactly `topic`.
    pub(crate) fn wants_topic(&self, topic: &str) -> bool {
        let channel = self.keys.subscription(&Subject::Topic(topic.into()));
        self.wants.lock().by_channel.contains_key(&channel)
    }

    /// The exact topics this node subscribes to.
    pub(crate) fn topics(&self) -> Vec<Arc<str>> {
        let wants = self.wants.lock();
        let mut topics = Vec::new();
        for want in wants.by_channel.values() {
            for subject in &want.subjects {
                if let Subject::Topic(t) = subject {
                    topics.push(t.clone());
                }
            }
        }
        topics
    }

    /// Sets the state of the subscription `version` declared, if it is still the wanted one.
    fn settle(&self, channel: &Channel, version: u64, state: Listening) {
        if let Some(want) = self.wants.lock().by_channel.get(channel)
            && want.version == version
        {
            want.state.send_replace(state);
        }
    }

    /// Every wanted subscription with its version.
    fn wanted(&self) -> Vec<(Channel, u64)> {
        let wants = self.wants.lock();
        wants
            .by_channel
            .iter()
            .map(|(channel, want)| (channel.clone(), want.version))
            .collect()
    }

    /// Has every wanted subscription made again (after the pub/sub connection was lost).
    pub(crate) fn resync(&self) {
        let _ = self.changes.send(Change::Resync);
    }

    /// Marks every subscription as not in place (Redis is unreachable, or the pub/sub
    /// connection was lost): new subscribers are answered `unavailable` until they are again.
    pub(crate) fn lost(&self, why: &str) {
        for want in self.wants.lock().by_channel.values() {
            want.state.send_replace(Listening::No(why.to_owned()));
        }
    }
}

/// Carries out the changes in order over the pub/sub connection.
pub(crate) async fn run(
    interest: Arc<Interest>,
    health: Arc<Health>,
    metrics: Arc<RedisMetrics>,
    pubsub: Link,
    mut changes: mpsc::UnboundedReceiver<Change>,
) {
    while let Some(change) = changes.recv().await {
        match change {
            Change::Subscribe { channel, version } => {
                let state = match subscribe(&metrics, &pubsub, &channel).await {
                    Ok(()) => Listening::Yes,
                    Err((why, connection_lost)) => {
                        // Made again once the connection is known to be back; a subscription
                        // Redis refuses (an ACL, say) is only answered as such.
                        if connection_lost {
                            health.need_resync();
                        }
                        Listening::No(why)
                    }
                };
                interest.settle(&channel, version, state);
            }
            Change::Unsubscribe(channel) => {
                // Left subscribed, it only brings messages the hub has no one for.
                metrics.operation(Op::Unsubscribe);
                let _ = metrics
                    .timed(Op::Unsubscribe, pubsub.unsubscribe(&channel))
                    .await;
            }
            Change::Resync => resync(&interest, &health, &metrics, &pubsub).await,
        }
    }
}

/// Makes every wanted subscription again, after the pub/sub connection was lost; then has the
/// reader fetch what was published meanwhile.
async fn resync(interest: &Interest, health: &Health, metrics: &RedisMetrics, pubsub: &Link) {
    let wanted = interest.wanted();
    let mut refused = Vec::new();
    for (channel, version) in &wanted {
        match subscribe(metrics, pubsub, channel).await {
            Ok(()) => {}
            Err((why, true)) => {
                health.need_resync();
                interest.lost(&why);
                return;
            }
            Err((why, false)) => refused.push((channel, *version, why)),
        }
    }
    for (channel, version) in &wanted {
        interest.settle(channel, *version, Listening::Yes);
    }
    for (channel, version, why) in refused {
        interest.settle(channel, version, Listening::No(why));
    }
    health.resynced(metrics);
}

/// Subscribes once; a failure says why, and whether the connection failed (rather than Redis
/// refusing this one subscription).
async fn subscribe(
    metrics: &RedisMetrics,
    pubsub: &Link,
    channel: &Channel,
) -> Result<(), (String, bool)> {
    metrics.operation(Op::Subscribe);
    let attempt = async { Ok(pubsub.subscribe(channel).await) };
    match metrics.timed(Op::Subscribe, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            metrics.error(Op::Subscribe, error_kind(&e));
            Err((format!("Redis: {e}"), is_connection_failure(&e)))
        }
        Err(timed_out) => Err((timed_out.0, true)),
    }
}
