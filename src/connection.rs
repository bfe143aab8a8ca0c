//! One WebSocket connection as every part of the broker shares it: its identity, its outbound
//! queue, its subscriptions and its socket.
//!
//! Publishers push encoded frames straight into the connection's bounded [`OutboundQueue`], from
//! whatever thread they run on; the connection's actor (`crate::actor`) owns its lifecycle.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::model::{ConnectionId, Encoding};
use crate::queue::OutboundQueue;
use crate::topic::Subject;

pub(crate) struct Connection {
    pub id: ConnectionId,
    pub peer: Option<SocketAddr>,
    pub encoding: Encoding,
    /// Whether WebSocket messages may carry several frames (the client asked with `?batch=1`).
    pub batching: bool,
    pub connected_at: SystemTime,
    pub queue: OutboundQueue,
    /// The topics and patterns subscribed, as the broker keeps them.
    subscriptions: Mutex<HashSet<Subject>>,
    /// Their number, readable without the lock (for `/metrics` and `/api/connections`).
    subscription_count: AtomicUsize,
    /// The socket's descriptor while the response body (and so the socket) is alive.
    socket: Mutex<Option<RawFd>>,
}

impl Connection {
    pub(crate) fn new(
        peer: Option<SocketAddr>,
        encoding: Encoding,
        queue: OutboundQueue,
        socket: Option<RawFd>,
    ) -> Self {
        Connection {
            id: ConnectionId(fastrand::u64(..)),
            peer,
            encoding,
            batching: false,
            connected_at: SystemTime::now(),
            queue,
            subscriptions: Mutex::new(HashSet::new()),
            subscription_count: AtomicUsize::new(0),
            socket: Mutex::new(socket),
        }
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
