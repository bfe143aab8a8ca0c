//! The background task that owns the WebSocket: it sends requests, matches the server's answers
//! to them, hands messages to the application and, if asked, reconnects and renews
//! subscriptions (recovering exact topics with `since`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::frame::{self, Control, Incoming, Payload, Welcome};
use crate::{Backoff, CloseInfo, Encoding, Error, Event, Mode, Since, SubscribeOptions};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
pub(crate) type Responder = oneshot::Sender<Result<Reply, Error>>;

pub(crate) enum Command {
    Subscribe {
        topic: String,
        options: SubscribeOptions,
        reply: Responder,
    },
    Unsubscribe {
        topic: String,
        reply: Responder,
    },
    Publish {
        topic: String,
        payload: Payload,
        reply: Option<Responder>,
    },
    Ping {
        reply: Responder,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// What an ack or pong carried.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub seq: Option<u64>,
    pub epoch: Option<String>,
    pub recovered: Option<bool>,
}

/// Most commands written together before a flush.
const COALESCE: usize = 256;

/// Events handed to the application at once: at most this many, plus the rest of one
/// WebSocket message's frames.
pub(crate) const BATCH: usize = 64;

/// How long the server gets to send its welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a WebSocket in `encoding` (from `local` if given) and reads the server's welcome.
pub(crate) async fn connect(
    url: &str,
    encoding: Encoding,
    local: Option<IpAddr>,
) -> Result<(Ws, Welcome), Error> {
    let mut request = url
        .into_client_request()
        .map_err(|e| Error::Connect(e.to_string()))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(encoding.subprotocol()),
    );
    let config = Some(ws_config());
    let opened = match local {
        None => tokio_tungstenite::connect_async_with_config(request, config, false).await,
        Some(local) => {
            let tcp = tcp_from(request.uri(), local).await?;
            tokio_tungstenite::client_async_with_config(request, MaybeTlsStream::Plain(tcp), config)
                .await
        }
    };
    let (mut ws, _) = opened.map_err(|e| match e {
        tungstenite::Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            Error::Refused {
                status: response.status().as_u16(),
                body: body.into_owned(),
            }
        }
        other => Error::Connect(other.to_string()),
    })?;
    let first = tokio::time::timeout(WELCOME_TIMEOUT, ws.next())
        .await
        .map_err(|_| Error::Timeout)?;
    match first {
        Some(Ok(message @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
            match frame::parse(message.into_data(), encoding)? {
                Incoming::Control(Control::Welcome(welcome)) => Ok((ws, welcome)),
                _ => Err(Error::Protocol("the first frame is not a welcome".into())),
            }
        }
        Some(Ok(WsMessage::Close(close))) => Err(Error::Closed(close.map(close_info))),
        Some(Ok(other)) => Err(Error::Protocol(format!("unexpected first frame {other:?}"))),
        Some(Err(e)) => Err(Error::Disconnected(e.to_string())),
        None => Err(Error::Disconnected("closed before the welcome".into())),
    }
}

/// The WebSocket settings: tungstenite zero-fills its read buffer up to its size before every
/// read, so the 128 KiB default costs more than it saves; Crier frames are small.
pub fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// A TCP connection to the URI's host from a chosen local address.
async fn tcp_from(uri: &tungstenite::http::Uri, local: IpAddr) -> Result<TcpStream, Error> {
    let host = uri
        .host()
        .ok_or_else(|| Error::Connect("no host in the URL".into()))?;
    let port = uri.port_u16().unwrap_or(80);
    let remote = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| Error::Connect(e.to_string()))?
        .next()
        .ok_or_else(|| Error::Connect(format!("{host} has no address")))?;
    let socket = if remote.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Error::Connect(e.to_string()))?;
    socket
        .bind(SocketAddr::new(local, 0))
        .map_err(|e| Error::Connect(e.to_string()))?;
    socket
        .connect(remote)
        .await
        .map_err(|e| Error::Connect(e.to_string()))
}

fn close_info(frame: tungstenite::protocol::CloseFrame) -> CloseInfo {
    CloseInfo {
        code: frame.code.into(),
        reason: frame.reason.to_string(),
    }
}

/// What the task remembers of a subscription to renew it after a reconnect.
struct Subscription {
    options: SubscribeOptions,
    /// For a topic: its stream's epoch and the last seq handed to the application.
    position: Option<Since>,
}

enum Pending {
    Request(Responder),
    Subscribe {
        topic: String,
        options: SubscribeOptions,
        reply: Responder,
    },
    /// A subscription renewed after a reconnect.
    Renew {
        topic: String,
        asked_since: bool,
    },
}

/// Why serving a connection ended.
enum End {
    /// The application closed the client or dropped it.
    Shutdown,
    Lost(Error),
}

pub(crate) struct Task {
    url: String,
    encoding: Encoding,
    local: Option<IpAddr>,
    reconnect: Option<Backoff>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Vec<Event>>,
    /// Events not yet handed over.
    batch: Vec<Event>,
    /// Frames of the WebSocket message being handled.
    parsed: Vec<frame::Incoming>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    subscriptions: HashMap<String, Subscription>,
    /// Renewals still unanswered after a reconnect, and what they recovered.
    renewing: Option<(usize, Vec<(String, bool)>)>,
    /// Messages of the new connection, held until it is announced.
    held: Vec<crate::Message>,
}

impl Task {
    pub(crate) fn new(
        url: String,
        encoding: Encoding,
        local: Option<IpAddr>,
        reconnect: Option<Backoff>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Vec<Event>>,
    ) -> Self {
        Task {
            url,
            encoding,
            local,
            reconnect,
            commands,
            events,
            batch: Vec::new(),
            parsed: Vec::new(),
            pending: HashMap::new(),
            next_id: 1,
            subscriptions: HashMap::new(),
            renewing: None,
            held: Vec::new(),
        }
    }

    pub(crate) async fn run(mut self, mut ws: Ws) {
        loop {
            let error = match self.serve(&mut ws).await {
                End::Shutdown => return,
                End::Lost(error) => error,
            };
            for (_, pending) in self.pending.drain() {
                if let Pending::Request(reply) | Pending::Subscribe { reply, .. } = pending {
                    let _ = reply.send(Err(Error::Disconnected(error.to_string())));
                }
            }
            self.renewing = None;
            self.held.clear();
            let retry = self.reconnect.filter(|_| !fatal(&error));
            let Some(backoff) = retry else {
                self.batch.push(Event::Closed(error));
                self.deliver().await;
                return;
            };
            tracing::debug!(%error, "connection lost; reconnecting");
            match self.reconnect(backoff).await {
                Some(new) => ws = new,
                None => return,
            }
        }
    }

    /// Queues an event for the application, handing the batch over once it is full; false
    /// once the application has gone.
    async fn emit(&mut self, event: Event) -> bool {
        self.batch.push(event);
        self.batch.len() < BATCH || self.deliver().await
    }

    /// Hands the queued events over (waiting while the application is behind).
    async fn deliver(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        self.events.send(batch).await.is_ok()
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Queues a frame on the socket; [`Task::flush`] sends what is queued.
    async fn send(&mut self, ws: &mut Ws, bytes: Vec<u8>) -> Result<(), Error> {
        let message = match self.encoding {
            Encoding::Json => {
                let text = String::from_utf8(bytes).map_err(|e| Error::Encode(e.to_string()))?;
                WsMessage::text(text)
            }
            Encoding::Msgpack => WsMessage::binary(bytes),
        };
        ws.feed(message)
            .await
            .map_err(|e| Error::Disconnected(e.to_string()))
    }

    async fn flush(ws: &mut Ws) -> Result<(), Error> {
        ws.flush()
            .await
            .map_err(|e| Error::Disconnected(e.to_string()))
    }

    async fn serve(&mut self, ws: &mut Ws) -> End {
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        let _ = ws.close(None).await;
                        return End::Shutdown;
                    };
                    if let Err(end) = self.command(ws, command).await {
                        return end;
                    }
                    // Whatever else is ready goes out in the same write. While commands keep
                    // coming (a publisher in a loop), give the sender one turn to queue more
                    // before writing: each park and wake of this task costs the sender a
                    // cross-thread wake-up, more than the message itself.
                    let mut taken = 1;
                    let mut waited = false;
                    while taken < COALESCE {
                        match self.commands.try_recv() {
                            Ok(command) => {
                                if let Err(end) = self.command(ws, command).await {
                                    return end;
                                }
                                taken += 1;
                            }
                            Err(_) if taken > 1 && !waited => {
                                waited = true;
                                tokio::task::yield_now().await;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(error) = Self::flush(ws).await {
                        return End::Lost(error);
                    }
                }
                incoming = ws.next() => {
                    // This frame and whatever else has already arrived, handed over together.
                    let mut next = Some(incoming);
                    let mut taken = 0;
                    while let Some(incoming) = next.take() {
                        let message = match incoming {
                            Some(Ok(message)) => message,
                            Some(Err(e)) => return self.lost(Error::Disconnected(e.to_string())).await,
                            None => return self.lost(Error::Disconnected("the connection closed".into())).await,
                        };
                        let data = match message {
                            WsMessage::Text(_) | WsMessage::Binary(_) => message.into_data(),
                            WsMessage::Close(close) => return self.lost(Error::Closed(close.map(close_info))).await,
                            _ => Default::default(),
                        };
                        if let Err(e) = frame::parse_all(data, self.encoding, &mut self.parsed) {
                            tracing::warn!(error = %e, "ignoring a frame Crier should not have sent");
                        }
                        // Reused from message to message: no allocation per message.
                        let mut parsed = std::mem::take(&mut self.parsed);
                        for incoming in parsed.drain(..) {
                            let more = match incoming {
                                Incoming::Message(message) => {
                                    self.message(message);
                                    true
                                }
                                control => self.incoming(control).await,
                            };
                            if !more {
                                let _ = ws.close(None).await;
                                return End::Shutdown;
                            }
                        }
                        self.parsed = parsed;
                        taken += 1;
                        if self.batch.len() >= BATCH && !self.deliver().await {
                            let _ = ws.close(None).await;
                            return End::Shutdown;
                        }
                        if taken < BATCH {
                            next = ws.next().now_or_never();
                        }
                    }
                    if !self.deliver().await {
                        let _ = ws.close(None).await;
                        return End::Shutdown;
                    }
                }
            }
        }
    }

    /// Hands over what came before the connection was lost, then reports the loss.
    async fn lost(&mut self, error: Error) -> End {
        self.deliver().await;
        End::Lost(error)
    }

    /// Handles one command; `Err` ends serving the connection.
    async fn command(&mut self, ws: &mut Ws, command: Command) -> Result<(), End> {
        let (frame, pending) = match command {
            Command::Subscribe {
                topic,
                options,
                reply,
            } => {
                let id = self.id();
                let frame = frame::subscribe(self.encoding, &topic, &options, id);
                (
                    frame,
                    Some((
                        id,
                        Pending::Subscribe {
                            topic,
                            options,
                            reply,
                        },
                    )),
                )
            }
            Command::Unsubscribe { topic, reply } => {
                self.subscriptions.remove(&topic);
                let id = self.id();
                let frame = frame::simple(self.encoding, "unsubscribe", Some(&topic), Some(id));
                (frame, Some((id, Pending::Request(reply))))
            }
            Command::Publish {
                topic,
                payload,
                reply,
            } => {
                let id = reply.as_ref().map(|_| self.id());
                let frame = frame::publish(self.encoding, &topic, &payload, id);
                (
                    frame,
                    id.zip(reply)
                        .map(|(id, reply)| (id, Pending::Request(reply))),
                )
            }
            Command::Ping { reply } => {
                let id = self.id();
                let frame = frame::simple(self.encoding, "ping", None, Some(id));
                (frame, Some((id, Pending::Request(reply))))
            }
            Command::Close { reply } => {
                let _ = ws.close(None).await;
                // Let the close handshake finish (bounded), then stop.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .await;
                let _ = reply.send(());
                return Err(End::Shutdown);
            }
        };
        let bytes = match frame {
            Ok(bytes) => bytes,
            Err(error) => {
                // Nothing went out: answer the request, keep serving.
                match pending {
                    Some((_, Pending::Request(reply) | Pending::Subscribe { reply, .. })) => {
                        let _ = reply.send(Err(error));
                    }
                    _ => tracing::warn!(%error, "could not encode a publish"),
                }
                return Ok(());
            }
        };
        if let Some((id, pending)) = pending {
            self.pending.insert(id, pending);
        }
        // Requests in flight when this fails are answered by `run`.
        self.send(ws, bytes).await.map_err(End::Lost)
    }

    /// Handles a server frame; false once the application has gone.
    /// Notes a message's position for recovery and queues it, without awaiting anything: this
    /// is the per-message path.
    fn message(&mut self, message: crate::Message) {
        if self.reconnect.is_some()
            && let Some(Subscription {
                position: Some(position),
                ..
            }) = self.subscriptions.get_mut(message.topic())
        {
            position.seq = message.seq();
        }
        if self.renewing.is_some() {
            self.held.push(message);
        } else {
            self.batch.push(Event::Message(message));
        }
    }

    async fn incoming(&mut self, incoming: Incoming) -> bool {
        match incoming {
            Incoming::Message(message) => {
                self.message(message);
                self.batch.len() < BATCH || self.deliver().await
            }
            Incoming::Control(Control::Ack {
                id,
                seq,
                epoch,
                recovered,
            }) => {
                let reply = Reply {
                    seq,
                    epoch,
                    recovered,
                };
                match self.pending.remove(&id) {
                    Some(Pending::Request(responder)) => {
                        let _ = responder.send(Ok(reply));
                    }
                    Some(Pending::Subscribe {
                        topic,
                        options,
                        reply: responder,
                    }) => {
                        self.remember(topic, options, &reply);
                        let _ = responder.send(Ok(reply));
                    }
                    Some(Pending::Renew { topic, asked_since }) => {
                        if asked_since && let Some((_, recovered)) = &mut self.renewing {
                            recovered.push((topic.clone(), reply.recovered == Some(true)));
                        }
                        if let Some(subscription) = self.subscriptions.get_mut(&topic) {
                            subscription.position = position(&subscription.options, &reply);
                        }
                        return self.renewed().await;
                    }
                    None => {}
                }
                true
            }
            Incoming::Control(Control::Pong { id: Some(id) }) => {
                if let Some(Pending::Request(responder)) = self.pending.remove(&id) {
                    let _ = responder.send(Ok(Reply::default()));
                }
                true
            }
            Incoming::Control(Control::Error {
                id: Some(id),
                code,
                message,
            }) => {
                let error = Error::Server { code, message };
                match self.pending.remove(&id) {
                    Some(
                        Pending::Request(responder)
                        | Pending::Subscribe {
                            reply: responder, ..
                        },
                    ) => {
                        let _ = responder.send(Err(error));
                    }
                    Some(Pending::Renew { topic, .. }) => {
                        tracing::warn!(%topic, %error, "could not renew a subscription");
                        self.subscriptions.remove(&topic);
                        return self.renewed().await;
                    }
                    None => {}
                }
                true
            }
            Incoming::Control(Control::Error {
                id: None,
                code,
                message,
            }) => self.emit(Event::ServerError { code, message }).await,
            Incoming::Control(Control::Pong { id: None } | Control::Welcome(_)) => true,
        }
    }

    fn remember(&mut self, topic: String, options: SubscribeOptions, reply: &Reply) {
        let position = position(&options, reply);
        self.subscriptions
            .insert(topic, Subscription { options, position });
    }

    /// One renewal answered; announces the reconnection once all are.
    async fn renewed(&mut self) -> bool {
        let Some((remaining, _)) = &mut self.renewing else {
            return true;
        };
        *remaining = remaining.saturating_sub(1);
        if *remaining > 0 {
            return true;
        }
        let (_, recovered) = self.renewing.take().unwrap_or_default();
        if !self.emit(Event::Reconnected { recovered }).await {
            return false;
        }
        for message in std::mem::take(&mut self.held) {
            if !self.emit(Event::Message(message)).await {
                return false;
            }
        }
        true
    }

    /// Reconnects with backoff and renews every subscription; None if the application closed
    /// the client meanwhile.
    async fn reconnect(&mut self, backoff: Backoff) -> Option<Ws> {
        let mut delay = backoff.initial;
        loop {
            let jittered = delay.mul_f64(0.8 + fastrand::f64() * 0.4);
            let sleep = tokio::time::sleep(jittered);
            tokio::pin!(sleep);
            // While waiting, requests fail at once rather than hang.
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        None => return None,
                        Some(Command::Close { reply }) => {
                            let _ = reply.send(());
                            return None;
                        }
                        Some(other) => refuse(other),
                    },
                }
            }
            match connect(&self.url, self.encoding, self.local).await {
                Ok((mut ws, _)) => match self.renew(&mut ws).await {
                    Ok(()) => return Some(ws),
                    Err(error) => tracing::debug!(%error, "lost again while renewing"),
                },
                Err(error) => tracing::debug!(%error, "reconnect failed"),
            }
            delay = (delay * 2).min(backoff.max);
        }
    }

    /// Sends a subscribe for every subscription: exact topics in `all` mode resume with `since`,
    /// `latest` ones with the current value (`rewind` 1), patterns as they were.
    async fn renew(&mut self, ws: &mut Ws) -> Result<(), Error> {
        let renewals: Vec<(String, SubscribeOptions)> = self
            .subscriptions
            .iter()
            .map(|(topic, subscription)| {
                let mut options = subscription.options.clone();
                options.since = None;
                options.rewind = None;
                match (&options.mode, &subscription.position) {
                    (Mode::All, Some(position)) => options.since = Some(position.clone()),
                    (Mode::Latest { .. }, Some(_)) => options.rewind = Some(1),
                    _ => {}
                }
                (topic.clone(), options)
            })
            .collect();
        self.renewing = Some((renewals.len(), Vec::new()));
        for (topic, options) in renewals {
            let id = self.id();
            let bytes = frame::subscribe(self.encoding, &topic, &options, id)?;
            self.pending.insert(
                id,
                Pending::Renew {
                    topic,
                    asked_since: options.since.is_some(),
                },
            );
            self.send(ws, bytes).await?;
        }
        Self::flush(ws).await?;
        if self.subscriptions.is_empty() {
            self.renewing = None;
            self.emit(Event::Reconnected {
                recovered: Vec::new(),
            })
            .await;
            self.deliver().await;
        }
        Ok(())
    }
}

/// Where a subscription stands after its ack: for a topic, the stream and the last seq the
/// application will have been given once the replay (if any) is through.
fn position(options: &SubscribeOptions, reply: &Reply) -> Option<Since> {
    let epoch = reply.epoch.clone()?;
    let seq = reply.seq?;
    let seq = match (&options.since, options.rewind) {
        (Some(since), _) if since.epoch == epoch => since.seq,
        (_, Some(n)) => seq.saturating_sub(n),
        _ => seq,
    };
    Some(Since { epoch, seq })
}

fn refuse(command: Command) {
    let error = || Err(Error::Disconnected("reconnecting".into()));
    match command {
        Command::Subscribe { reply, .. }
        | Command::Unsubscribe { reply, .. }
        | Command::Ping { reply } => {
            let _ = reply.send(error());
        }
        Command::Publish { reply, .. } => {
            if let Some(reply) = reply {
                let _ = reply.send(error());
            }
        }
        Command::Close { reply } => {
            let _ = reply.send(());
        }
    }
}

/// Closes after which reconnecting would not help: the client broke the protocol.
fn fatal(error: &Error) -> bool {
    matches!(
        error,
        Error::Closed(Some(CloseInfo {
            code: 1000 | 1002 | 1003 | 1007 | 1008 | 1009,
            ..
        }))
    )
}
