//! One WebSocket connection as every part of the broker shares it: its identity and what it is
//! granted, its outbound queue, its subscriptions, its publish rate and its socket.
//!
//! Publishers push encoded frames straight into the connection's bounded [`OutboundQueue`], from
//! whatever thread they run on; the connection's actor (`crate::actor`) owns its lifecycle.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::{Mutex, RwLock};

use crate::admission::Admission;
use crate::auth::Identity;
use crate::model::{ConnectionId, Encoding};
use crate::queue::OutboundQueue;
use crate::topic::Subject;
use crate::workers::WorkerId;

pub(crate) struct Connection {
    pub id: ConnectionId,
    pub peer: Option<SocketAddr>,
    pub encoding: Encoding,
    /// Whether WebSocket messages may carry several frames (the client asked with `?batch=1`).
    pub batching: bool,
    pub connected_at: SystemTime,
    pub queue: OutboundQueue,
    /// The worker thread its actor and socket run on, when it runs on one (`crate::workers`).
    pub worker: Option<WorkerId>,
    /// The topics and patterns subscribed, as the broker keeps them.
    subscriptions: Mutex<HashSet<Subject>>,
    /// Their number, readable without the lock (for `/metrics` and `/api/connections`).
    subscription_count: AtomicUsize,
    /// The socket's descriptor while the response body (and so the socket) is alive.
    socket: Mutex<Option<RawFd>>,
    /// Who the client is; replaced when it sends a fresh token.
    identity: RwLock<Arc<Identity>>,
    /// `--publish-rate`, when set.
    publish_rate: Option<DefaultDirectRateLimiter>,
    /// Its place under the connection limits, given back when it disconnects.
    admission: Mutex<Option<Admission>>,
}

impl Connection {
    pub(crate) fn new(
        peer: Option<SocketAddr>,
        encoding: Encoding,
        queue: OutboundQueue,
        socket: Option<RawFd>,
        identity: Arc<Identity>,
    ) -> Self {
        Connection {
            id: ConnectionId(fastrand::u64(..)),
            peer,
            encoding,
            batching: false,
            connected_at: SystemTime::now(),
            queue,
            worker: None,
            subscriptions: Mutex::new(HashSet::new()),
            subscription_count: AtomicUsize::new(0),
            socket: Mutex::new(socket),
            identity: RwLock::new(identity),
            publish_rate: None,
            admission: Mutex::new(None),
        }
    }

    /// Limits how fast the client may publish: `per_second` messages a second, in bursts of as
    /// many (0: no limit).
    pub(crate) fn with_publish_rate(mut self, per_second: u32) -> Self {
        self.publish_rate = std::num::NonZeroU32::new(per_second)
            .map(|n| RateLimiter::direct(Quota::per_second(n)));
        self
    }

    pub(crate) fn with_admission(self, admission: Admission) -> Self {
        *self.admission.lock() = Some(admission);
        self
    }

    /// Gives the connection's place under the connection limits back.
    pub(crate) fn release_admission(&self) {
        self.admission.lock().take();
    }

    pub(crate) fn identity(&self) -> Arc<Identity> {
        self.identity.read().clone()
    }

    /// Runs `f` on the identity without cloning it (identities are shared by many connections).
    pub(crate) fn with_identity<R>(&self, f: impl FnOnce(&Identity) -> R) -> R {
        f(&self.identity.read())
    }

    pub(crate) fn set_identity(&self, identity: Arc<Identity>) {
        *self.identity.write() = identity;
    }

    /// Takes one publish from the rate allowance; false when over it.
    pub(crate) fn may_publish_now(&self) -> bool {
        self.publish_rate
            .as_ref()
            .is_none_or(|limiter| limiter.check().is_ok())
    }

    pub(crate) fn on_worker(mut self, worker: Option<WorkerId>) -> Self {
        self.worker = worker;
        self
    }

    /// Lets WebSocket messages carry several frames.
    pub(crate) fn with_batching(mut self, on: bool) -> Self {
        self.batching = on;
        self
    }

    pub(crate) fn subscription_count(&self) -> usize {
        self.subscription_count.load(Ordering::Relaxed)
    }

    /// Runs `f` on the subscription set, keeping the count in step.
    pub(crate) fn with_subscriptions<R>(&self, f: impl FnOnce(&mut HashSet<Subject>) -> R) -> R {
        let mut subscriptions = self.subscriptions.lock();
        let result = f(&mut subscriptions);
        self.subscription_count
            .store(subscriptions.len(), Ordering::Relaxed);
        result
    }

    /// Called when the response body is dropped, before the socket is closed.
    pub(crate) fn release_socket(&self) {
        *self.socket.lock() = None;
    }

    /// Tears the connection down at once, for a socket that takes no bytes: queued data could
    /// never reach the client, so the socket is reset rather than drained.
    pub(crate) fn force_close(&self) {
        let socket = self.socket.lock();
        if let Some(fd) = *socket {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: `fd` is open: the body that owns the socket clears `socket` (under this
            // lock) before the socket is closed. Both calls only change socket state.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
        drop(socket);
        self.queue.finish();
    }
}
