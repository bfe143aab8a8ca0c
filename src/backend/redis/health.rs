//! Whether this node can serve requests over Redis: Redis answers, and the node's subscriptions
//! are in place. Anything that sees them lost says so here; the watcher in the parent module
//! notices when Redis answers again and has them made again.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::metrics::RedisMetrics;

pub(crate) struct Health {
    ready: AtomicBool,
    /// Set when the subscriptions may have been lost.
    resync_needed: AtomicBool,
    /// Asks the reader for what was published while they were.
    catch_up: mpsc::UnboundedSender<()>,
}

impl Health {
    pub(crate) fn new(catch_up: mpsc::UnboundedSender<()>) -> Self {
        Health {
            ready: AtomicBool::new(true),
            resync_needed: AtomicBool::new(false),
            catch_up,
        }
    }

    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The subscriptions may be gone (Redis unreachable, or the pub/sub connection lost).
    pub(crate) fn need_resync(&self) {
        self.ready.store(false, Ordering::Relaxed);
        self.resync_needed.store(true, Ordering::Relaxed);
    }

    pub(crate) fn resync_needed(&self) -> bool {
        self.resync_needed.load(Ordering::Relaxed)
    }

    /// Takes the request to make the subscriptions again, if there is one.
    pub(crate) fn take_resync(&self) -> bool {
        self.resync_needed.swap(false, Ordering::Relaxed)
    }

    /// Every subscription is in place again: the reader fetches what was missed.
    pub(crate) fn resynced(&self, metrics: &RedisMetrics) {
        metrics.reconnects.inc();
        self.ready.store(true, Ordering::Relaxed);
        let _ = self.catch_up.send(());
        tracing::info!("Redis subscriptions re-established");
    }
}
