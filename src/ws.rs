//! `GET /ws`: the WebSocket on actix's side, in one place: the handshake (origin, token,
//! connection limits, encoding negotiation, `?subscribe=`, `?batch=`), the guard that bounds how much a client can make the broker buffer
//! on the way in, and the response body that hands a connection's queued frames to its socket on
//! the way out.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_http::error::PayloadError;
use actix_http::ws::HandshakeError;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http::{StatusCode, header};
use actix_web::{FromRequest, HttpRequest, HttpResponse, dev, web};
use bytes::Bytes;
use futures_core::Stream;
use serde::Deserialize;

use crate::actor::ConnectionActor;
use crate::admission::AdmissionLimit;
use crate::api::{ApiError, bearer_token};
use crate::broker::Broker;
use crate::config::Config;
use crate::connection::Connection;
use crate::frame::{self, FrameJoin, Limits, ServerFrame};
use crate::metrics::Refused;
use crate::model::Encoding;
use crate::queue::{FrameSink, Next, OutboundQueue};

/// The accepted socket's descriptor, recorded when the connection is accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawSocket(RawFd);

/// `HttpServer::on_connect` hook: caps how many bytes each TCP socket keeps unsent in the kernel
/// (0 leaves the OS default) and remembers its descriptor, so that a connection whose socket
/// takes nothing can be torn down (see [`Connection::force_close`]).
pub(crate) fn on_accept(
    unsent_bytes: usize,
) -> impl Fn(&dyn std::any::Any, &mut dev::Extensions) + Clone {
    move |io, extensions| {
        type Tcp = actix_web::rt::net::TcpStream;
        let tcp = io.downcast_ref::<Tcp>().or_else(|| {
            io.downcast_ref::<actix_tls::accept::rustls_0_23::TlsStream<Tcp>>()
                .map(|tls| tls.get_ref().0)
        });
        if let Some(tcp) = tcp {
            let fd = tcp.as_raw_fd();
            if unsent_bytes > 0 {
                let limit = libc::c_int::try_from(unsent_bytes).unwrap_or(libc::c_int::MAX);
                // SAFETY: `fd` is the open socket actix just accepted; the call only sets an option.
                let set = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::IPPROTO_TCP,
                        libc::TCP_NOTSENT_LOWAT,
                        (&limit as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if set != 0 {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "could not set TCP_NOTSENT_LOWAT");
                }
            }
            extensions.insert(RawSocket(fd));
        }
    }
}

#[derive(Deserialize)]
struct WsQuery {
    encoding: Option<String>,
    subscribe: Option<String>,
    batch: Option<String>,
    token: Option<String>,
}

pub(crate) async fn upgrade(
    req: HttpRequest,
    body: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse<OutboundBody>, ApiError> {
    if broker.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    actix_http::ws::verify_handshake(req.head()).map_err(handshake_error)?;
    check_origin(
        &req,
        &broker.config().allowed_origins,
        broker.config().tls_cert.is_some(),
    )
    .inspect_err(|_| {
        broker.metrics().refused(Refused::Origin);
    })?;
    let query = web::Query::<WsQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request(format!("bad query string: {e}")))?;
    // A token in the query wins; the header is read only when credentials matter, so that an
    // open broker behind a proxy with its own (Basic) authentication is not disturbed.
    let presented = match query.token.as_deref() {
        Some(token) => Some(token),
        None if broker.auth().required() => bearer_token(&req, &broker)?,
        None => None,
    };
    let identity = match presented {
        Some(token) => broker.auth().authenticate(token).map_err(|invalid| {
            broker.metrics().refused(Refused::InvalidToken);
            ApiError::invalid_token(invalid)
        })?,
        None => broker.auth().unauthenticated(),
    };
    let encoding = negotiate(&req, query.encoding.as_deref())?;
    let batching = match query.batch.as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "?batch={other:?}: use 1 or 0"
            )));
        }
    };
    let initial = broker
        .check_subscriptions(&identity, query.subscribe.as_deref().unwrap_or_default())
        .map_err(ApiError::from)?;
    let admission = broker
        .admit(req.peer_addr().map(|a| a.ip()))
        .map_err(|limit| match limit {
            AdmissionLimit::Total(max) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                format!("this server holds its limit of {max} connections; try another or later"),
            ),
            AdmissionLimit::PerIp(max) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!("{max} connections from this address are open, the limit"),
            ),
        })?;

    let config = broker.config();
    let limit = config.max_frame_bytes();
    let guarded: actix_http::BoxedPayloadStream =
        Box::pin(FrameSizeGuard::new(body.into_inner(), limit));
    let mut guarded = dev::Payload::Stream { payload: guarded };
    let body = web::Payload::from_request(&req, &mut guarded)
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let protocols = Encoding::ALL.map(frame::subprotocol);
    let (response, session, messages) = actix_ws::handle_with_protocols(&req, body, &protocols)
        .map_err(|e| ApiError::bad_request(format!("WebSocket handshake failed: {e}")))?;
    // Outgoing frames take Crier's own byte-accounted path, not the session.
    drop(session);

    let conn = Arc::new(
        Connection::new(
            req.peer_addr(),
            encoding,
            OutboundQueue::new(
                config.max_buffered_bytes,
                config.slow_consumer,
                broker.metrics().clone(),
            ),
            req.conn_data::<RawSocket>().map(|s| s.0),
            identity.clone(),
        )
        .with_batching(batching)
        .on_worker(broker.join_worker())
        .with_publish_rate(config.publish_rate)
        .with_admission(admission),
    );
    let id = conn.id.to_string();
    conn.queue.push_control(frame::encode(
        encoding,
        &ServerFrame::Welcome {
            connection: &id,
            node: broker.node(),
            encoding: encoding.name(),
            server: frame::SERVER,
            limits: &limits(config),
            batch: batching,
            authenticated: identity.is_authenticated(),
            user: identity.user.as_deref(),
            expires_at: identity.expires_at_unix(),
        },
    ));
    broker.connect(conn.clone());
    tracing::debug!(connection = %id, peer = ?conn.peer, encoding = encoding.name(), "connection opened");

    let messages = messages
        .max_frame_size(limit)
        .aggregate_continuations()
        .max_continuation_size(limit);
    let broker = broker.into_inner();
    let actor = ConnectionActor::new(broker.clone(), conn.clone());
    // If the client goes away while the subscriptions wait on the backend, this handler is
    // dropped before the actor starts, and the connection is ended here instead.
    let unstarted = Unstarted(Some((broker, conn.clone())));
    // The response, and so `welcome`, goes out only after this returns.
    actor.subscribe_on_connect(&initial).await;
    actor.start_with(messages);
    unstarted.started();

    let (head, ws_body) = response.into_parts();
    Ok(head.set_body(OutboundBody::new(conn, ws_body)))
}

/// A connection the broker took in whose actor has not started: dropped as such, it is ended.
struct Unstarted(Option<(Arc<Broker>, Arc<Connection>)>);

impl Unstarted {
    fn started(mut self) {
        self.0 = None;
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some((broker, conn)) = self.0.take() {
            broker.disconnect(&conn);
        }
    }
}

/// The limits a client is told about in `welcome`.
fn limits(config: &Config) -> Limits {
    let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Limits {
        max_message_bytes: config.max_message_bytes,
        max_frame_bytes: config.max_frame_bytes(),
        max_buffered_bytes: config.max_buffered_bytes,
        max_subscriptions: config.max_subscriptions,
        slow_consumer: config.slow_consumer.as_str(),
        ping_interval_ms: millis(config.ping_interval),
        idle_timeout_ms: millis(config.idle_timeout),
        publish_rate: config.publish_rate,
        max_bad_frames: config.max_bad_frames,
        auth_timeout_ms: millis(config.auth_timeout),
    }
}

/// Refuses a browser page from another origin (cross-site WebSocket hijacking): its `Origin`
/// must be in `--allowed-origins` (or the list is `*`), or be the server's own origin addressed
/// by IP or `localhost` (the dashboard at `/`, reached as `http://127.0.0.1:8080/`). A page's
/// own origin under a host name must be listed: a host name is what a DNS-rebinding page sends
/// as its `Host`. Clients that send no `Origin` are not browsers and are not affected.
fn check_origin(req: &HttpRequest, allowed: &[String], tls: bool) -> Result<(), ApiError> {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
    // The Host header itself, never a forwarded one a client could set.
    let own = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let scheme = if tls { "https" } else { "http" };
    let same_origin = is_address(own)
        && origin
            .split_once("://")
            .is_some_and(|(s, host)| s == scheme && host.eq_ignore_ascii_case(own));
    if same_origin
        || allowed
            .iter()
            .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        format!("pages from {origin:?} may not connect here; see --allowed-origins"),
    ))
}

/// Whether a `Host` header names the server by address (an IP literal or `localhost`, with an
/// optional port), which no other site's page can be served under.
fn is_address(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn handshake_error(err: HandshakeError) -> ApiError {
    match err {
        HandshakeError::NoWebsocketUpgrade | HandshakeError::NoConnectionUpgrade => ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only: send `Upgrade: websocket`",
        ),
        other => ApiError::new(StatusCode::BAD_REQUEST, "bad_handshake", other.to_string()),
    }
}

/// Picks the encoding: the first Crier subprotocol the client offers; without the header,
/// `?encoding=`; JSON by default.
fn negotiate(req: &HttpRequest, query: Option<&str>) -> Result<Encoding, ApiError> {
    let mut offered = Vec::new();
    for value in req.headers().get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        let value = value
            .to_str()
            .map_err(|_| ApiError::bad_request("Sec-WebSocket-Protocol is not valid text"))?;
        offered.extend(value.split(',').map(str::trim).filter(|p| !p.is_empty()));
    }
    if !offered.is_empty() {
        return offered.iter().find_map(|p| frame::encoding_of_subprotocol(p)).ok_or_else(|| {
            ApiError::bad_request(format!(
                "none of the offered subprotocols {offered:?} is spoken here; use crier.json or crier.msgpack"
            ))
        });
    }
    match query {
        None => Ok(Encoding::Json),
        Some(name) => Encoding::from_name(name).ok_or_else(|| {
            ApiError::bad_request(format!("unknown encoding {name:?}; use json or msgpack"))
        }),
    }
}

/// Watches the client's bytes frame by frame and fails the stream as soon as a frame header
/// announces a message above the limit. actix-http's parser only reports an oversized frame once
/// all of it has arrived, which would let one client make the broker buffer gigabytes.
struct FrameSizeGuard<S> {
    inner: S,
    limit: u64,
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    remaining: u64,
    /// Size so far of the current (possibly fragmented) data message.
    message: u64,
    failed: bool,
}

impl<S> FrameSizeGuard<S> {
    fn new(inner: S, limit: usize) -> Self {
        FrameSizeGuard {
            inner,
            limit: limit as u64,
            header: [0; 14],
            header_len: 0,
            remaining: 0,
            message: 0,
            failed: false,
        }
    }

    fn inspect(&mut self, mut chunk: &[u8]) -> Result<(), PayloadError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len() as u64);
                self.remaining -= n;
                chunk = &chunk[n as usize..];
                continue;
            }
            self.header[self.header_len] = chunk[0];
            self.header_len += 1;
            chunk = &chunk[1..];
            let header = &self.header[..self.header_len];
            let Some(needed) = header_size(header) else {
                continue;
            };
            if header.len() < needed {
                continue;
            }
            let (fin, opcode, len) = parse_header(header);
            let reserved_bits = header[0] & 0x70 != 0;
            self.header_len = 0;
            self.remaining = len;
            if reserved_bits {
                // No extension is negotiated, so none of RSV1-3 may be set.
                return Err(protocol_violation("a frame sets reserved bits"));
            }
            if opcode & 0x8 != 0 {
                // Control frames carry at most 125 bytes and are never fragmented.
                if len > 125 || !fin {
                    return Err(protocol_violation(
                        "a control frame is fragmented or longer than 125 bytes",
                    ));
                }
                continue;
            }
            self.message = if opcode == 0 {
                self.message.saturating_add(len)
            } else {
                len
            };
            if self.message > self.limit {
                return Err(PayloadError::Overflow);
            }
            if fin {
                self.message = 0;
            }
        }
        Ok(())
    }
}

fn protocol_violation(what: &'static str) -> PayloadError {
    PayloadError::Io(std::io::Error::other(frame::ProtocolViolation(what)))
}

/// The full header size once its first two bytes are known.
fn header_size(header: &[u8]) -> Option<usize> {
    let second = *header.get(1)?;
    let extended = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// (fin, opcode, payload length) of a complete header.
fn parse_header(header: &[u8]) -> (bool, u8, u64) {
    let fin = header[0] & 0x80 != 0;
    let opcode = header[0] & 0x0f;
    let len = match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().unwrap_or([0xff; 8])),
        n => u64::from(n),
    };
    (fin, opcode, len)
}

impl<S> Stream for FrameSizeGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => match this.inspect(&chunk) {
                Ok(()) => Poll::Ready(Some(Ok(chunk))),
                Err(e) => {
                    this.failed = true;
                    Poll::Ready(Some(Err(e)))
                }
            },
            other => other,
        }
    }
}

/// How many bytes of frames the body takes from the queue at once: the HTTP layer's write buffer.
pub(crate) const TAKE_BYTES: usize = 8 * 1024;

/// The most frames' room the body keeps while it waits.
const KEPT_CAPACITY: usize = 32;

/// The body of a WebSocket's 101 response: the connection's outbound frames.
pub(crate) struct OutboundBody {
    conn: Arc<Connection>,
    /// Frames taken from the queue together and handed to the HTTP layer one by one: at most
    /// [`TAKE_BYTES`], no more than the HTTP layer's own write buffer takes anyway. For a
    /// connection that asked for batches, each run of data frames is one message here.
    taken: VecDeque<Bytes>,
    /// Joins runs of data frames as they are taken, for a connection that asked for batches.
    join: Option<FrameJoin>,
    /// Wakes the body when a frame held for a rate slot is due.
    timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// actix-ws's own body, never polled. actix-ws's `MessageStream` (the read side) keeps reading
    /// only while this exists, which is exactly as long as the socket is ours.
    _ws_body: BoxBody,
}

impl OutboundBody {
    pub(crate) fn new(conn: Arc<Connection>, ws_body: BoxBody) -> Self {
        let join = conn
            .batching
            .then(|| FrameJoin::new(conn.encoding, TAKE_BYTES));
        OutboundBody {
            conn,
            taken: VecDeque::new(),
            join,
            timer: None,
            _ws_body: ws_body,
        }
    }
}

/// The frames a batching connection's body takes: joined on their way into `taken`.
struct Joining<'a> {
    join: &'a mut FrameJoin,
    taken: &'a mut VecDeque<Bytes>,
}

impl FrameSink for Joining<'_> {
    fn put(&mut self, frame: Bytes) {
        self.join.push(frame, self.taken);
    }
}

impl MessageBody for OutboundBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.taken.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            let next = match &mut this.join {
                Some(join) => {
                    let mut joining = Joining {
                        join,
                        taken: &mut this.taken,
                    };
                    let next = this.conn.queue.take_frames(cx, &mut joining, TAKE_BYTES);
                    join.finish(&mut this.taken);
                    next
                }
                None => this.conn.queue.take_frames(cx, &mut this.taken, TAKE_BYTES),
            };
            match next {
                Next::Taken => {}
                Next::End => return Poll::Ready(None),
                Next::Wait(due) if this.taken.capacity() > KEPT_CAPACITY => {
                    // Caught up after a burst: a quiet connection does not keep its room.
                    this.taken = VecDeque::new();
                    if due.is_none() {
                        return Poll::Pending;
                    }
                    // A held frame is due: the next round arms its timer.
                }
                Next::Wait(None) => return Poll::Pending,
                Next::Wait(Some(due)) => {
                    let deadline = tokio::time::Instant::from_std(due);
                    match &mut this.timer {
                        Some((at, sleep)) if *at != due => {
                            sleep.as_mut().reset(deadline);
                            *at = due;
                        }
                        Some(_) => {}
                        None => {
                            this.timer = Some((due, Box::pin(tokio::time::sleep_until(deadline))))
                        }
                    }
                    if let Some((_, sleep)) = &mut this.timer
                        && sleep.as_mut().poll(cx).is_pending()
                    {
                        return Poll::Pending;
                    }
                    // Due already: release it on the next round.
                }
            }
        }
    }
}

impl Drop for OutboundBody {
    fn drop(&mut self) {
        // The dispatcher drops the body before it closes the socket.
        self.conn.release_socket();
        self.conn.queue.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::{OpCode, Parser};
    use bytes::BytesMut;

    fn client_frame(op: OpCode, fin: bool, len: usize) -> Vec<u8> {
        let mut buf = BytesMut::new();
        Parser::write_message(&mut buf, vec![b'x'; len], op, fin, true);
        buf.to_vec()
    }

    /// A server frame as the queue holds it: unmasked, with its header.
    fn server_frame(opcode: u8, payload: &str) -> Bytes {
        let mut frame = vec![0x80 | opcode, payload.len() as u8];
        frame.extend_from_slice(payload.as_bytes());
        Bytes::from(frame)
    }

    #[test]
    fn a_batch_joins_each_run_of_data_frames_and_keeps_control_frames_apart_and_in_order() {
        let text = |i: u32| server_frame(0x1, &format!("{{\"i\":{i}}}"));
        let pong = server_frame(0xA, "");
        let close = server_frame(0x8, "");
        // One joiner for every round: nothing of a round may reach the next.
        let mut join = FrameJoin::new(Encoding::Json, 16);
        for round in 0..2 {
            let mut joined = VecDeque::new();
            for frame in [
                text(1),
                text(2),
                pong.clone(),
                text(3),
                close.clone(),
                text(4),
                text(5),
                text(6),
            ] {
                join.push(frame, &mut joined);
            }
            join.finish(&mut joined);
            assert_eq!(
                joined,
                [
                    server_frame(0x1, "{\"i\":1}\n{\"i\":2}"),
                    pong.clone(),
                    text(3),
                    close.clone(),
                    server_frame(0x1, "{\"i\":4}\n{\"i\":5}\n{\"i\":6}"),
                ],
                "round {round}"
            );
        }
        // A lone frame is left as it is, and finishing twice adds nothing.
        let mut joined = VecDeque::new();
        join.push(text(7), &mut joined);
        join.finish(&mut joined);
        join.finish(&mut joined);
        assert_eq!(joined, [text(7)]);
    }

    fn guard(limit: usize) -> FrameSizeGuard<()> {
        FrameSizeGuard::new((), limit)
    }

    #[test]
    fn passes_frames_within_the_limit_split_anywhere() {
        let stream: Vec<u8> = [
            client_frame(OpCode::Text, true, 100),
            client_frame(OpCode::Ping, true, 5),
            client_frame(OpCode::Binary, true, 70_000),
            client_frame(OpCode::Text, true, 0),
        ]
        .concat();
        for chunk_size in [1, 3, 7, 1000, stream.len()] {
            let mut g = guard(70_000);
            for chunk in stream.chunks(chunk_size) {
                g.inspect(chunk).unwrap();
            }
            assert_eq!((g.header_len, g.remaining, g.message), (0, 0, 0));
        }
    }

    #[test]
    fn refuses_an_oversized_frame_from_its_header_alone() {
        let frame = client_frame(OpCode::Binary, true, 70_001);
        let mut g = guard(70_000);
        assert!(matches!(
            g.inspect(&frame[..14]),
            Err(PayloadError::Overflow)
        ));
        // The same header arriving in pieces.
        let mut g = guard(70_000);
        g.inspect(&frame[..3]).unwrap();
        assert!(matches!(
            g.inspect(&frame[3..14]),
            Err(PayloadError::Overflow)
        ));
        // A header announcing an absurd length.
        let mut g = guard(70_000);
        assert!(
            g.inspect(&[
                0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4
            ])
            .is_err()
        );
    }

    #[test]
    fn only_hosts_given_by_address_count_as_the_server_itself() {
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.5",
        ] {
            assert!(is_address(host), "{host}");
        }
        for host in [
            "evil.example:8080",
            "crier.example.com",
            "127.0.0.1.evil.example",
            "[nope]:1",
            "",
        ] {
            assert!(!is_address(host), "{host}");
        }
    }

    #[test]
    fn refuses_headers_that_break_the_protocol() {
        let mut rsv1 = client_frame(OpCode::Text, true, 3);
        rsv1[0] |= 0x40;
        let long_ping = client_frame(OpCode::Ping, true, 126);
        let fragmented_ping = client_frame(OpCode::Ping, false, 3);
        for (frame, split) in [rsv1, long_ping, fragmented_ping]
            .into_iter()
            .flat_map(|frame| [(frame.clone(), 0), (frame, 1)])
        {
            let mut g = guard(70_000);
            let (first, rest) = frame.split_at(split);
            let err = g.inspect(first).and_then(|()| g.inspect(rest)).unwrap_err();
            let violation = match &err {
                PayloadError::Io(io) => io
                    .get_ref()
                    .is_some_and(|e| e.is::<frame::ProtocolViolation>()),
                _ => false,
            };
            assert!(violation, "{frame:02x?}: {err:?}");
        }
    }

    #[test]
    fn counts_fragments_of_one_message_together() {
        let mut g = guard(250);
        g.inspect(&client_frame(OpCode::Text, false, 100)).unwrap();
        g.inspect(&client_frame(OpCode::Ping, true, 10)).unwrap();
        g.inspect(&client_frame(OpCode::Continue, false, 100))
            .unwrap();
        assert!(
            g.inspect(&client_frame(OpCode::Continue, true, 100))
                .is_err()
        );
    }
}
