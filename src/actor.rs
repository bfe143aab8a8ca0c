//! The connection actor: one per WebSocket, living as long as it does. It reads the client's
//! frames, answers them through the broker, and keeps the connection's clocks: pings, idle and
//! write timeouts, the deadline to authenticate, the token's expiry, the bad-frame window and
//! the time a closing socket gets to take its close frame.
//!
//! Outgoing data never travels through the actor's mailbox: publishers push encoded frames
//! straight into the connection's bounded outbound queue, from whatever thread they run on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, SpawnHandle, StreamHandler,
};
use actix_http::error::PayloadError;
use actix_ws::{AggregatedMessage, ProtocolError};

use crate::broker::{Broker, Publisher, Refusal};
use crate::connection::Connection;
use crate::frame::{self, CloseCode, FrameError, FrameId, NamedTopic, Op, Request, ServerFrame};
use crate::metrics::Refused;
use crate::model::{Answer, ErrorCode, SubscribeOptions, Subscribed};
use crate::topic::Subject;

/// How long a closing connection's socket may take nothing (the close frame, or what is queued
/// before it) before the connection is torn down.
const CLOSE_STALL_LIMIT: Duration = Duration::from_secs(1);

/// The window `--max-bad-frames` counts in.
const BAD_FRAME_WINDOW: Duration = Duration::from_secs(60);

/// The actor behind one connection.
pub(crate) struct ConnectionActor {
    broker: Arc<Broker>,
    conn: Arc<Connection>,
    last_seen: Instant,
    last_ping: Instant,
    /// Set once the connection is being closed because of what the client sent.
    failed: bool,
    /// Set once the connection is closing on the server's initiative over a sound stream (its
    /// token expired or never came, too many bad frames): requests are no longer served, but
    /// the client's close frame is still read, so that the close handshake completes.
    closing: bool,
    reader: Option<SpawnHandle>,
    /// Closes the connection when its token expires, or when it has not authenticated in time.
    deadline: Option<SpawnHandle>,
    /// When the last bad frames came, at most `--max-bad-frames` of them.
    bad_frames: VecDeque<Instant>,
    /// Set while a request waits on the backend (a subscribe over Redis): the frames read
    /// meanwhile wait here, to be served in order after it.
    waiting: bool,
    deferred: VecDeque<Read>,
}

impl ConnectionActor {
    pub(crate) fn new(broker: Arc<Broker>, conn: Arc<Connection>) -> Self {
        let now = Instant::now();
        ConnectionActor {
            broker,
            conn,
            last_seen: now,
            last_ping: now,
            failed: false,
            closing: false,
            reader: None,
            deadline: None,
            bad_frames: VecDeque::new(),
            waiting: false,
            deferred: VecDeque::new(),
        }
    }

    /// Makes the subscriptions asked for in the upgrade request (`?subscribe=`, already checked
    /// by the broker), before the client can see its `welcome` and act on it.
    pub(crate) async fn subscribe_on_connect(&self, topics: &[String]) {
        for topic in topics {
            let subscribing = subscribe(
                self.broker.clone(),
                self.conn.clone(),
                topic.clone(),
                SubscribeOptions::default(),
                None,
            );
            if let Err(refusal) = subscribing.await {
                self.reply_error(&refused(None, refusal));
            }
        }
    }

    /// Starts the actor on the current worker, reading `frames`.
    pub(crate) fn start_with<S>(mut self, frames: S)
    where
        S: futures_core::Stream<Item = Result<AggregatedMessage, ProtocolError>> + Unpin + 'static,
    {
        Self::create(move |ctx| {
            self.reader = Some(ctx.add_stream(Batches(frames)));
            self
        });
    }

    fn reply(&self, frame: &ServerFrame<'_>) {
        self.conn
            .queue
            .push_control(frame::encode(self.conn.encoding, frame));
    }

    fn reply_error(&self, err: &FrameError) {
        self.send_error(err, None);
    }

    fn send_error(&self, err: &FrameError, topic: Option<&str>) {
        self.broker.metrics().error_sent(err.code);
        self.reply(&ServerFrame::Error {
            id: err.id.as_ref(),
            code: err.code.as_str(),
            message: &err.message,
            topic,
        });
    }

    /// Answers a frame that could not be served, and closes a connection that sends too many.
    /// Going over the publish rate is not a bad frame: it has its own answer.
    fn reject(&mut self, err: &FrameError) {
        self.reply_error(err);
        if err.code == ErrorCode::RateLimited {
            return;
        }
        // Nor is a backend that cannot be reached.
        let limit = self.broker.config().max_bad_frames;
        if limit == 0 || err.code == ErrorCode::Unavailable {
            return;
        }
        let now = Instant::now();
        while self
            .bad_frames
            .front()
            .is_some_and(|&at| now.duration_since(at) >= BAD_FRAME_WINDOW)
        {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        if self.bad_frames.len() >= limit {
            tracing::debug!(connection = %self.conn.id, limit, "too many bad frames; closing");
            self.broker.metrics().refused(Refused::BadFrames);
            self.close(CloseCode::POLICY_VIOLATION);
        }
    }

    /// Closes after what is queued, serving no more requests.
    fn close(&mut self, code: CloseCode) {
        self.closing = true;
        self.conn.queue.close(code, false);
    }

    /// What to answer a malformed frame with: a bad topic it names comes first.
    fn first_fault(&self, err: FrameError) -> FrameError {
        let checked = match &err.topic {
            Some(NamedTopic::Publish(topic)) => self.broker.check_topic(topic),
            Some(NamedTopic::Subscribe(topic)) => self.broker.check_subject(topic),
            None => Ok(()),
        };
        match checked {
            Ok(()) => err,
            Err(refusal) => refused(err.id, refusal),
        }
    }

    fn ack(&self, id: Option<&FrameId>, seq: Option<u64>) {
        if let Some(id) = id {
            self.reply(&ServerFrame::Ack {
                id,
                seq,
                epoch: None,
                recovered: None,
                expires_at: None,
            });
        }
    }

    fn handle_request(
        &mut self,
        request: Result<Request<'_>, FrameError>,
        ctx: &mut Context<Self>,
    ) {
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                let err = self.first_fault(err);
                return self.reject(&err);
            }
        };
        let id = request.id;
        if let Op::Auth { token } = &request.op {
            return self.authenticate(token, id, ctx);
        }
        if !self
            .conn
            .with_identity(|identity| identity.is_authenticated())
        {
            self.broker.metrics().refused(Refused::Unauthorized);
            let err = FrameError::new(
                id,
                ErrorCode::Unauthorized,
                "authenticate first: send {\"op\":\"auth\",\"token\":...}",
            );
            return self.reject(&err);
        }
        let answered = match request.op {
            Op::Subscribe { topic, options } => {
                let subscribing = subscribe(
                    self.broker.clone(),
                    self.conn.clone(),
                    topic,
                    options,
                    id.clone(),
                );
                self.in_order(ctx, subscribing, move |actor, result| {
                    actor.answered(id, result)
                });
                return;
            }
            Op::Unsubscribe { topic } => self
                .broker
                .unsubscribe(&self.conn, &topic)
                .map(|()| self.ack(id.as_ref(), None)),
            Op::Publish { topic, data } => {
                match self
                    .broker
                    .publish(Publisher::Connection(&self.conn), &topic, data)
                {
                    Ok(Answer::Now(accepted)) => {
                        accepted.map(|accepted| self.ack(id.as_ref(), Some(accepted.seq)))
                    }
                    Ok(Answer::Later(accepted)) => {
                        // Stored once the backend answers; later frames need not wait for it.
                        let accepted = actix::fut::wrap_future::<_, Self>(accepted);
                        ctx.spawn(accepted.map(move |accepted, actor, _ctx| {
                            let answered =
                                accepted.map(|accepted| actor.ack(id.as_ref(), Some(accepted.seq)));
                            actor.answered(id, answered);
                        }));
                        return;
                    }
                    Err(refusal) => Err(refusal),
                }
            }
            Op::Ping => {
                self.reply(&ServerFrame::Pong {
                    id: id.as_ref(),
                    buffered_bytes: self.conn.queue.buffered().0,
                    dropped: self.conn.queue.stats().dropped(),
                });
                Ok(())
            }
            Op::Auth { .. } => Ok(()),
        };
        self.answered(id, answered);
    }

    /// Answers a request that was refused; one that was served has answered already.
    fn answered(&mut self, id: Option<FrameId>, answered: Result<(), Refusal>) {
        if let Err(refusal) = answered {
            self.reject(&refused(id, refusal));
        }
    }

    /// Runs `work` to its end now if it can (with the memory backend it always can); otherwise
    /// the frames read after it wait until it ends, so that a connection's requests are served
    /// in the order it sent them.
    fn in_order<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        work: impl Future<Output = T> + 'static,
        then: impl FnOnce(&mut Self, T) + 'static,
    ) {
        let mut work = Box::pin(work);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(output) = work.as_mut().poll(&mut cx) {
            return then(self, output);
        }
        self.waiting = true;
        let work = actix::fut::wrap_future::<_, Self>(work);
        ctx.wait(work.map(move |output, actor, ctx| {
            actor.waiting = false;
            then(actor, output);
            actor.serve_deferred(ctx);
        }));
    }

    /// Serves the frames that waited, until they are done or one has to wait in turn.
    fn serve_deferred(&mut self, ctx: &mut Context<Self>) {
        crate::queue::coalescing_wakes(|| {
            while !self.waiting
                && let Some(item) = self.deferred.pop_front()
            {
                self.handle_frame(item, ctx);
            }
        });
    }

    /// `auth`: a first token, or a fresh one before the current one expires. The new grants
    /// replace the old; subscriptions they no longer grant end, each with a `forbidden` error.
    fn authenticate(&mut self, token: &str, id: Option<FrameId>, ctx: &mut Context<Self>) {
        let identity = match self.broker.auth().authenticate(token) {
            Ok(identity) => identity,
            Err(invalid) => {
                self.broker.metrics().refused(Refused::InvalidToken);
                let err = FrameError::new(id, ErrorCode::InvalidToken, invalid.0);
                return self.reject(&err);
            }
        };
        let expires_at = identity.expires_at_unix();
        let ended = self.broker.reauthorize(&self.conn, identity);
        if let Some(id) = &id {
            self.reply(&ServerFrame::Ack {
                id,
                seq: None,
                epoch: None,
                recovered: None,
                expires_at,
            });
        }
        for subject in ended {
            let topic = match &subject {
                Subject::Topic(t) | Subject::Pattern(t) => t,
            };
            let err = FrameError::new(
                None,
                ErrorCode::Forbidden,
                format!("the new token does not grant {topic:?}; the subscription has ended"),
            );
            self.send_error(&err, Some(topic));
        }
        self.set_deadline(ctx);
    }

    /// Schedules the close the connection's identity calls for: 4002 when its token expires,
    /// 4003 if it has not authenticated within `--auth-timeout`.
    fn set_deadline(&mut self, ctx: &mut Context<Self>) {
        if let Some(old) = self.deadline.take() {
            ctx.cancel_future(old);
        }
        let identity = self.conn.identity();
        let (after, code) = if !identity.is_authenticated() {
            (self.broker.config().auth_timeout, CloseCode::AUTH_REQUIRED)
        } else if let Some(left) = identity.expires_in(SystemTime::now()) {
            (left, CloseCode::TOKEN_EXPIRED)
        } else {
            return;
        };
        self.deadline = Some(ctx.run_later(after, move |actor, _ctx| {
            actor.deadline = None;
            if code == CloseCode::AUTH_REQUIRED {
                actor.broker.metrics().refused(Refused::AuthTimeout);
            }
            tracing::debug!(connection = %actor.conn.id, code = code.code, "closing: {}", code.reason);
            actor.close(code);
        }));
    }

    /// Closes because of what the client sent: stop reading and send the close frame after what
    /// is queued, without waiting for the client's answer.
    fn fail(&mut self, code: CloseCode, ctx: &mut Context<Self>, detail: &str) {
        tracing::debug!(connection = %self.conn.id, code = code.code, detail, "closing connection");
        self.failed = true;
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        self.conn.queue.close(code, false);
        self.conn.queue.peer_closed(code);
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let config = self.broker.config();
        let now = Instant::now();
        let health = self.conn.queue.health(now);
        if health.finished {
            ctx.stop();
            return;
        }
        if let Some(closing_for) = health.closing_for {
            // The close frame or the client's answer has not come through in time.
            if closing_for >= config.write_timeout {
                self.conn.force_close();
            }
            return;
        }
        if health
            .stalled_for
            .is_some_and(|stalled| stalled >= config.write_timeout)
        {
            tracing::info!(connection = %self.conn.id, "socket took nothing within the write timeout; closing");
            self.conn.queue.close(CloseCode::SLOW_CONSUMER, true);
            self.conn.force_close();
            return;
        }
        if now.duration_since(self.last_seen) >= config.idle_timeout {
            self.conn.queue.close(CloseCode::IDLE_TIMEOUT, false);
            return;
        }
        if now.duration_since(self.last_ping) >= config.ping_interval {
            self.last_ping = now;
            self.conn.queue.push_control(frame::ping_frame());
        }
    }
}

/// Follows a connection from its close on: tears it down once its socket has taken nothing for
/// [`CLOSE_STALL_LIMIT`] (a client that reads nothing would otherwise hold it until the write
/// timeout; a socket that keeps taking bytes, a close after a flush, is left to finish), and
/// returns as soon as its body has ended, so that the actor ends with it and the socket is
/// closed at once.
async fn watch_close(conn: Arc<Connection>) {
    loop {
        conn.queue.closing_or_finished().await;
        loop {
            let health = conn.queue.health(Instant::now());
            if health.finished {
                return;
            }
            let Some(idle) = health.closing_idle_for else {
                break;
            };
            if idle >= CLOSE_STALL_LIMIT {
                tracing::debug!(connection = %conn.id, "closing socket takes nothing; tearing down");
                conn.force_close();
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(CLOSE_STALL_LIMIT - idle) => {}
                () = conn.queue.closing_or_finished() => {}
            }
        }
    }
}

/// The `error` frame for what the broker refused.
fn refused(id: Option<FrameId>, refusal: Refusal) -> FrameError {
    FrameError::new(id, refusal.code, refusal.message)
}

/// How often a connection checks its timers: often enough to honour the shortest of them
/// within a quarter of its length.
fn heartbeat_period(ping: Duration, idle: Duration, write: Duration) -> Duration {
    (ping.min(idle).min(write) / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
}

impl Actor for ConnectionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let config = self.broker.config();
        let period = heartbeat_period(
            config.ping_interval,
            config.idle_timeout,
            config.write_timeout,
        );
        ctx.run_interval(period, |actor, ctx| actor.heartbeat(ctx));
        self.set_deadline(ctx);
        let watcher = actix::fut::wrap_future::<_, Self>(watch_close(self.conn.clone()));
        ctx.spawn(watcher.map(|(), _actor, ctx| ctx.stop()));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.broker.disconnect(&self.conn);
        // A connection that ends without any close handshake was dropped by the network or the
        // client: "abnormal", like the browser's 1006.
        let code = self.conn.queue.closing_code();
        self.broker
            .metrics()
            .connection_closed(code.map_or("abnormal", |c| c.metric));
        tracing::debug!(connection = %self.conn.id, code = ?code.map(|c| c.code), "connection closed");
    }
}

/// Subscribes (or changes an existing subscription's options). The ack, when `id` is given, is
/// queued before any replayed or live message of the subscription.
async fn subscribe(
    broker: Arc<Broker>,
    conn: Arc<Connection>,
    topic: String,
    options: SubscribeOptions,
    id: Option<FrameId>,
) -> Result<(), Refusal> {
    let queue_conn = conn.clone();
    let mut acknowledge = move |subscribed: &Subscribed| {
        let Some(id) = &id else { return };
        let (epoch, seq) = match &subscribed.stream {
            Some(position) => (Some(&*position.epoch), Some(position.seq)),
            None => (None, None),
        };
        let ack = ServerFrame::Ack {
            id,
            seq,
            epoch,
            recovered: subscribed.recovered,
            expires_at: None,
        };
        queue_conn
            .queue
            .push_control(frame::encode(queue_conn.encoding, &ack));
    };
    broker
        .subscribe(&conn, &topic, &options, &mut acknowledge)
        .await
}

/// The client's frames in batches: everything already read, up to [`BATCH_FRAMES`].
struct Batches<S>(S);

const BATCH_FRAMES: usize = 32;

type Read = Result<AggregatedMessage, ProtocolError>;

impl<S: futures_core::Stream<Item = Read> + Unpin> futures_core::Stream for Batches<S> {
    type Item = Vec<Read>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Vec<Read>>> {
        use std::task::Poll;
        let mut batch = Vec::new();
        while batch.len() < BATCH_FRAMES {
            match std::pin::Pin::new(&mut self.0).poll_next(cx) {
                Poll::Ready(Some(item)) => batch.push(item),
                Poll::Ready(None) if batch.is_empty() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if batch.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(Some(batch))
        }
    }
}

impl StreamHandler<Vec<Read>> for ConnectionActor {
    fn handle(&mut self, batch: Vec<Read>, ctx: &mut Self::Context) {
        // One clock reading per batch read, not per frame.
        self.last_seen = Instant::now();
        // Subscribers' writers are woken once for the whole batch, not once per publish.
        crate::queue::coalescing_wakes(|| {
            let mut batch = batch.into_iter();
            for item in batch.by_ref() {
                if self.waiting {
                    self.deferred.push_back(item);
                    break;
                }
                self.handle_frame(item, ctx);
            }
            self.deferred.extend(batch);
        });
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // Nothing more will be read. While a close is under way the heartbeat sees it through
        // (the close frame still has to go out); otherwise the client is simply gone.
        let health = self.conn.queue.health(Instant::now());
        if health.closing_for.is_none() || health.finished {
            self.conn.queue.finish();
            ctx.stop();
        }
    }
}

impl ConnectionActor {
    fn handle_frame(&mut self, item: Read, ctx: &mut Context<Self>) {
        if self.failed {
            return;
        }
        match item {
            Ok(AggregatedMessage::Text(_) | AggregatedMessage::Binary(_)) if self.closing => {}
            Ok(AggregatedMessage::Text(text)) => {
                self.broker.metrics().received(text.len());
                self.handle_request(frame::parse_json(&text), ctx);
            }
            Ok(AggregatedMessage::Binary(bytes)) => {
                self.broker.metrics().received(bytes.len());
                self.handle_request(frame::parse_msgpack(&bytes), ctx);
            }
            Ok(AggregatedMessage::Ping(payload)) => {
                self.conn.queue.push_control(frame::pong_frame(&payload));
            }
            Ok(AggregatedMessage::Pong(_)) => {}
            Ok(AggregatedMessage::Close(_)) => self.conn.queue.peer_closed(CloseCode::NORMAL),
            Err(err) => {
                let code = classify(&err);
                if code == CloseCode::NORMAL {
                    // The socket failed (reset, or the connection is gone): nothing to answer.
                    self.failed = true;
                    self.conn.queue.finish();
                    ctx.stop();
                } else {
                    self.fail(code, ctx, &err.to_string());
                }
            }
        }
    }
}

/// The close code a read error calls for; `NORMAL` means the socket itself failed.
fn classify(err: &ProtocolError) -> CloseCode {
    match err {
        ProtocolError::Overflow => CloseCode::MESSAGE_TOO_BIG,
        ProtocolError::Io(io) => {
            let payload = io.get_ref().and_then(|e| e.downcast_ref::<PayloadError>());
            let violation = |inner: &std::io::Error| {
                inner
                    .get_ref()
                    .is_some_and(|e| e.is::<frame::ProtocolViolation>())
            };
            match payload {
                Some(PayloadError::Overflow) => CloseCode::MESSAGE_TOO_BIG,
                Some(PayloadError::Io(inner)) if violation(inner) => CloseCode::PROTOCOL_ERROR,
                Some(_) => CloseCode::NORMAL,
                None if io.kind() == std::io::ErrorKind::InvalidData => CloseCode::INVALID_PAYLOAD,
                // actix-ws's continuation limit; the frame guard normally trips first.
                None => CloseCode::MESSAGE_TOO_BIG,
            }
        }
        _ => CloseCode::PROTOCOL_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_period_follows_the_shortest_timer() {
        let s = Duration::from_secs;
        assert_eq!(
            heartbeat_period(s(25), s(60), s(10)),
            Duration::from_millis(2500)
        );
        assert_eq!(heartbeat_period(s(600), s(900), s(600)), s(5));
        assert_eq!(
            heartbeat_period(Duration::from_millis(1), s(1), s(1)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn read_errors_map_to_close_codes() {
        use std::io;
        assert_eq!(
            classify(&ProtocolError::Overflow),
            CloseCode::MESSAGE_TOO_BIG
        );
        assert_eq!(
            classify(&ProtocolError::UnmaskedFrame),
            CloseCode::PROTOCOL_ERROR
        );
        let utf8 = io::Error::new(io::ErrorKind::InvalidData, "invalid utf-8");
        assert_eq!(
            classify(&ProtocolError::Io(utf8)),
            CloseCode::INVALID_PAYLOAD
        );
        let too_big = io::Error::other(PayloadError::Overflow);
        assert_eq!(
            classify(&ProtocolError::Io(too_big)),
            CloseCode::MESSAGE_TOO_BIG
        );
        let violation = io::Error::other(PayloadError::Io(io::Error::other(
            frame::ProtocolViolation("reserved bits"),
        )));
        assert_eq!(
            classify(&ProtocolError::Io(violation)),
            CloseCode::PROTOCOL_ERROR
        );
        let gone = io::Error::other(PayloadError::Incomplete(None));
        assert_eq!(classify(&ProtocolError::Io(gone)), CloseCode::NORMAL);
    }
}
