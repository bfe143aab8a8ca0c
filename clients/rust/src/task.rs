//! The background task that owns the WebSocket: it sends requests, matches the server's answers
//! to them, hands messages to the application and, if asked, reconnects and renews
//! subscriptions (recovering exact topics with `since`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::BufReader;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::frame::{self, Control, Incoming, Payload, Welcome};
use crate::token::{TokenFuture, Tokens};
use crate::{Backoff, CloseInfo, Encoding, Error, ErrorCode, Event, Mode, Since, SubscribeOptions};

type Ws = WebSocketStream<MaybeTlsStream<BufReader<TcpStream>>>;

/// What one read from the socket takes at most. Reading straight into tungstenite's buffer, a
/// `recvfrom` took about one of the server's batched WebSocket messages (8,103 bytes, the rest of
/// an 8 KiB message after its header, was the most common size), so a 16 KiB write cost the
/// client two or more reads; through this buffer a read takes what has arrived, half as many
/// reads in all. It costs 16 KiB per connection and a copy of what is read. (32 KiB, the first
/// size tried, halved the reads again but measured no cheaper per message: slightly dearer at
/// 100 subscribers, the same at 1000.)
const READ_BUFFER: usize = 16 * 1024;

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
    Auth {
        token: String,
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

/// Events handed to the application at once: at most this many. A batch is handed over as soon
/// as it is full, in the middle of a WebSocket message's frames if need be: left to grow to the
/// end of the message (a batching server's 8 KiB message holds about 80 small ones), every
/// batch was moved to a buffer twice its size.
pub(crate) const BATCH: usize = 64;

/// How long the server gets to send its welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to open a connection: the same for the first one and every reconnection.
pub(crate) struct Dial {
    url: String,
    encoding: Encoding,
    local: Option<IpAddr>,
    /// For `wss://`: rustls with the ring provider, the system's roots and any given.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Dial {
    pub(crate) fn new(
        url: String,
        encoding: Encoding,
        local: Option<IpAddr>,
        roots: &[Vec<u8>],
    ) -> Result<Dial, Error> {
        let secure = url
            .get(..6)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("wss://"));
        let tls = if secure {
            Some(tls_config(roots)?)
        } else {
            None
        };
        Ok(Dial {
            url,
            encoding,
            local,
            tls,
        })
    }

    /// Opens a WebSocket (from `local` if given) presenting `token`, and reads the server's
    /// welcome.
    pub(crate) async fn open(&self, token: Option<&str>) -> Result<(Ws, Welcome), Error> {
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Error::Connect(e.to_string()))?;
        let headers = request.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.encoding.subprotocol()),
        );
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Error::Connect("the token is not valid in an HTTP header".into()))?;
            value.set_sensitive(true);
            headers.insert("Authorization", value);
        }
        let config = Some(ws_config());
        let connector = Some(match &self.tls {
            Some(tls) => Connector::Rustls(tls.clone()),
            None => Connector::Plain,
        });
        let tcp = tcp_to(request.uri(), self.local).await?;
        let tcp = BufReader::with_capacity(READ_BUFFER, tcp);
        let opened =
            tokio_tungstenite::client_async_tls_with_config(request, tcp, config, connector).await;
        let (mut ws, _) = opened.map_err(|e| match e {
            tungstenite::Error::Http(response) => refusal(
                response.status().as_u16(),
                response.body().as_deref().unwrap_or_default(),
            ),
            other => Error::Connect(other.to_string()),
        })?;
        let first = tokio::time::timeout(WELCOME_TIMEOUT, ws.next())
            .await
            .map_err(|_| Error::Timeout)?;
        match first {
            Some(Ok(message @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => {
                if let Incoming::Control(control) =
                    frame::parse(message.into_data(), self.encoding)?
                    && let Control::Welcome(welcome) = *control
                {
                    Ok((ws, welcome))
                } else {
                    Err(Error::Protocol("the first frame is not a welcome".into()))
                }
            }
            Some(Ok(WsMessage::Close(close))) => Err(Error::Closed(close.map(close_info))),
            Some(Ok(other)) => Err(Error::Protocol(format!("unexpected first frame {other:?}"))),
            Some(Err(e)) => Err(Error::Disconnected(e.to_string())),
            None => Err(Error::Disconnected("closed before the welcome".into())),
        }
    }
}

/// A refused upgrade, with the code and message of Crier's JSON error body
/// (`{"error":{"code":...,"message":...}}`) when the body is one.
fn refusal(status: u16, body: &[u8]) -> Error {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(Body { error }) => Error::Refused {
            status,
            code: Some(error.code.into()),
            message: error.message,
        },
        Err(_) => Error::Refused {
            status,
            code: None,
            message: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

/// The TLS settings for `wss://`: the ring provider (never aws-lc), the system's root
/// certificates and the PEM ones given (a private CA, a self-signed server).
fn tls_config(roots: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut store = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "could not load a system root certificate");
    }
    store.add_parsable_certificates(native.certs);
    for pem in roots {
        let mut found = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| Error::Connect(format!("invalid root certificate: {e}")))?;
            store
                .add(cert)
                .map_err(|e| Error::Connect(format!("invalid root certificate: {e}")))?;
            found = true;
        }
        if !found {
            return Err(Error::Connect(
                "no certificate in the root certificate PEM".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Connect(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The WebSocket settings: tungstenite zero-fills its read buffer up to its size before every
/// read, so the 128 KiB default costs more than it saves; Crier frames are small.
pub fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default().read_buffer_size(16 * 1024)
}

/// A TCP connection to the URI's host, from `local` if given.
async fn tcp_to(uri: &tungstenite::http::Uri, local: Option<IpAddr>) -> Result<TcpStream, Error> {
    let host = uri
        .host()
        .ok_or_else(|| Error::Connect("no host in the URL".into()))?;
    let default_port = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("ws") => 80,
        Some(s) if s.eq_ignore_ascii_case("wss") => 443,
        _ => {
            return Err(Error::Connect(format!(
                "{uri} is not a ws:// or wss:// URL"
            )));
        }
    };
    let port = uri.port_u16().unwrap_or(default_port);
    let host = host.trim_matches(['[', ']']);
    let Some(local) = local else {
        return TcpStream::connect((host, port))
            .await
            .map_err(|e| Error::Connect(e.to_string()));
    };
    let remote = tokio::net::lookup_host((host, port))
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
    /// The application's `auth`: its token is the connection's once acknowledged.
    Auth {
        token: String,
        reply: Responder,
    },
    /// The `auth` of a refresh before the token expires.
    Refresh {
        token: String,
    },
}

/// Why serving a connection ended.
enum End {
    /// The application closed the client or dropped it.
    Shutdown,
    Lost(Error),
}

/// Refreshing the token before it expires (with a token provider).
enum Refresh {
    Off,
    /// Time to ask the provider.
    At(Pin<Box<tokio::time::Sleep>>),
    /// The provider is at work.
    Fetching(TokenFuture),
}

enum RefreshStep {
    Due,
    Fetched(Result<String, String>),
}

impl Refresh {
    /// The next step of the refresh; never, when there is none to make. Cancel-safe: the
    /// timer and the provider's future live in `self`.
    async fn step(&mut self) -> RefreshStep {
        match self {
            Refresh::Off => std::future::pending().await,
            Refresh::At(sleep) => {
                sleep.as_mut().await;
                RefreshStep::Due
            }
            Refresh::Fetching(fetch) => RefreshStep::Fetched(fetch.as_mut().await),
        }
    }
}

/// Renewals still unanswered after a reconnect, and what they came to.
struct Renewing {
    remaining: usize,
    recovered: Vec<(String, bool)>,
    /// Subscriptions the server would not renew: announced after the reconnection.
    ended: Vec<Event>,
}

pub(crate) struct Task {
    dial: Dial,
    tokens: Tokens,
    refresh: Refresh,
    reconnect: Option<Backoff>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Vec<Event>>,
    /// Events not yet handed over.
    batch: Vec<Event>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    subscriptions: HashMap<String, Subscription>,
    renewing: Option<Renewing>,
    /// Messages of the new connection, held until it is announced.
    held: Vec<crate::Message>,
}

impl Task {
    pub(crate) fn new(
        dial: Dial,
        tokens: Tokens,
        reconnect: Option<Backoff>,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Vec<Event>>,
    ) -> Self {
        Task {
            dial,
            tokens,
            refresh: Refresh::Off,
            reconnect,
            commands,
            events,
            batch: Vec::new(),
            pending: HashMap::new(),
            next_id: 1,
            subscriptions: HashMap::new(),
            renewing: None,
            held: Vec::new(),
        }
    }

    /// Serves the first connection (already welcomed, with `tokens` up to date) and, if asked,
    /// every reconnection.
    pub(crate) async fn run(mut self, mut ws: Ws) {
        self.schedule_refresh();
        loop {
            let error = match self.serve(&mut ws).await {
                End::Shutdown => return,
                End::Lost(error) => error,
            };
            for (_, pending) in self.pending.drain() {
                if let Pending::Request(reply)
                | Pending::Subscribe { reply, .. }
                | Pending::Auth { reply, .. } = pending
                {
                    let _ = reply.send(Err(Error::Disconnected(error.to_string())));
                }
            }
            self.renewing = None;
            self.held.clear();
            self.refresh = Refresh::Off;
            let retry = self.reconnect.filter(|_| self.reconnects_after(&error));
            let Some(backoff) = retry else {
                self.batch.push(Event::Closed(error));
                self.deliver().await;
                return;
            };
            tracing::debug!(%error, "connection lost; reconnecting");
            match self.reconnect(backoff).await {
                Ok(new) => ws = new,
                Err(None) => return,
                Err(Some(error)) => {
                    self.batch.push(Event::Closed(error));
                    self.deliver().await;
                    return;
                }
            }
        }
    }

    /// Whether reconnecting can help after the server closed with this: not after the client
    /// broke the protocol or never authenticated, nor after its token expired when there is
    /// no provider to get a fresh one.
    fn reconnects_after(&self, error: &Error) -> bool {
        match error.close_code() {
            Some(CloseInfo::TOKEN_EXPIRED) => self.tokens.provider.is_some(),
            Some(
                CloseInfo::NORMAL
                | CloseInfo::PROTOCOL_ERROR
                | CloseInfo::UNSUPPORTED_DATA
                | CloseInfo::INVALID_DATA
                | CloseInfo::POLICY_VIOLATION
                | CloseInfo::MESSAGE_TOO_BIG
                | CloseInfo::AUTHENTICATION_REQUIRED,
            ) => false,
            _ => true,
        }
    }

    /// Whether a failed reconnection should end the client rather than be tried again: a
    /// refusal no retry can change (without a provider, the token will not change either).
    fn gives_up_after(&self, error: &Error) -> bool {
        match error {
            Error::Refused {
                code: Some(ErrorCode::OriginNotAllowed),
                ..
            } => true,
            Error::Refused {
                status: 401 | 403, ..
            } => self.tokens.provider.is_none(),
            Error::Closed(Some(_)) => !self.reconnects_after(error),
            _ => false,
        }
    }

    fn schedule_refresh(&mut self) {
        self.refresh = match self.tokens.refresh_in() {
            Some(wait) => Refresh::At(Box::pin(tokio::time::sleep(wait))),
            None => Refresh::Off,
        };
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
        let message = match self.encoding() {
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
                step = self.refresh.step() => {
                    if let Err(end) = self.refresh_step(ws, step).await {
                        return end;
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
                        for incoming in frame::frames(data, self.encoding()) {
                            let more = match incoming {
                                Ok(Incoming::Message(message)) => {
                                    self.message(message);
                                    self.batch.len() < BATCH || self.deliver().await
                                }
                                Ok(Incoming::Control(control)) => self.control(*control).await,
                                Err(e) => {
                                    tracing::warn!(error = %e, "ignoring a frame Crier should not have sent");
                                    true
                                }
                            };
                            if !more {
                                let _ = ws.close(None).await;
                                return End::Shutdown;
                            }
                        }
                        taken += 1;
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

    /// Moves the token refresh on: asks the provider when it is time, sends what it gave.
    async fn refresh_step(&mut self, ws: &mut Ws, step: RefreshStep) -> Result<(), End> {
        self.refresh = Refresh::Off;
        let error = match step {
            RefreshStep::Due => {
                if let Some(provider) = &self.tokens.provider {
                    self.refresh = Refresh::Fetching(provider());
                }
                return Ok(());
            }
            RefreshStep::Fetched(Ok(token)) => {
                let id = self.id();
                match frame::auth(self.encoding(), &token, id) {
                    Ok(bytes) => {
                        self.pending.insert(id, Pending::Refresh { token });
                        self.send(ws, bytes).await.map_err(End::Lost)?;
                        return Self::flush(ws).await.map_err(End::Lost);
                    }
                    Err(error) => error,
                }
            }
            RefreshStep::Fetched(Err(error)) => Error::Token(error),
        };
        if self.refresh_failed(error).await && self.deliver().await {
            Ok(())
        } else {
            let _ = ws.close(None).await;
            Err(End::Shutdown)
        }
    }

    /// Reports a failed refresh and tries again later while there is time; false once the
    /// application has gone.
    async fn refresh_failed(&mut self, error: Error) -> bool {
        tracing::debug!(%error, "could not refresh the token");
        self.schedule_refresh();
        self.emit(Event::TokenRefreshFailed(error)).await
    }

    fn encoding(&self) -> Encoding {
        self.dial.encoding
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
                let frame = frame::subscribe(self.encoding(), &topic, &options, id);
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
                let frame = frame::simple(self.encoding(), "unsubscribe", Some(&topic), Some(id));
                (frame, Some((id, Pending::Request(reply))))
            }
            Command::Publish {
                topic,
                payload,
                reply,
            } => {
                let id = reply.as_ref().map(|_| self.id());
                let frame = frame::publish(self.encoding(), &topic, &payload, id);
                (
                    frame,
                    id.zip(reply)
                        .map(|(id, reply)| (id, Pending::Request(reply))),
                )
            }
            Command::Ping { reply } => {
                let id = self.id();
                let frame = frame::simple(self.encoding(), "ping", None, Some(id));
                (frame, Some((id, Pending::Request(reply))))
            }
            Command::Auth { token, reply } => {
                let id = self.id();
                let frame = frame::auth(self.encoding(), &token, id);
                (frame, Some((id, Pending::Auth { token, reply })))
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
                    Some((
                        _,
                        Pending::Request(reply)
                        | Pending::Subscribe { reply, .. }
                        | Pending::Auth { reply, .. },
                    )) => {
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

    /// Handles a server frame other than a message; false once the application has gone.
    async fn control(&mut self, control: Control) -> bool {
        match control {
            Control::Ack {
                id,
                seq,
                epoch,
                recovered,
            } => {
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
                        if asked_since && let Some(renewing) = &mut self.renewing {
                            renewing
                                .recovered
                                .push((topic.clone(), reply.recovered == Some(true)));
                        }
                        if let Some(subscription) = self.subscriptions.get_mut(&topic) {
                            subscription.position = position(&subscription.options, &reply);
                        }
                        return self.renewed().await;
                    }
                    Some(Pending::Auth {
                        token,
                        reply: responder,
                    }) => {
                        self.tokens.authenticated(token);
                        self.schedule_refresh();
                        let _ = responder.send(Ok(reply));
                    }
                    Some(Pending::Refresh { token }) => {
                        tracing::debug!("token refreshed");
                        self.tokens.authenticated(token);
                        self.schedule_refresh();
                    }
                    None => {}
                }
                true
            }
            Control::Pong { id: Some(id) } => {
                if let Some(Pending::Request(responder)) = self.pending.remove(&id) {
                    let _ = responder.send(Ok(Reply::default()));
                }
                true
            }
            Control::Error {
                id: Some(id),
                code,
                message,
                ..
            } => {
                let error = Error::Server {
                    code: code.into(),
                    message,
                };
                match self.pending.remove(&id) {
                    Some(
                        Pending::Request(responder)
                        | Pending::Subscribe {
                            reply: responder, ..
                        }
                        | Pending::Auth {
                            reply: responder, ..
                        },
                    ) => {
                        let _ = responder.send(Err(error));
                    }
                    Some(Pending::Renew { topic, .. }) => {
                        tracing::debug!(%topic, %error, "could not renew a subscription");
                        self.subscriptions.remove(&topic);
                        if let (Some(renewing), Error::Server { code, message }) =
                            (&mut self.renewing, error)
                        {
                            renewing.ended.push(Event::SubscriptionEnded {
                                topic,
                                code,
                                message,
                            });
                        }
                        return self.renewed().await;
                    }
                    Some(Pending::Refresh { .. }) => return self.refresh_failed(error).await,
                    None => {}
                }
                true
            }
            Control::Error {
                id: None,
                code,
                message,
                topic: Some(topic),
            } => {
                // A fresh token no longer grants it: the server has ended it.
                self.subscriptions.remove(&topic);
                self.emit(Event::SubscriptionEnded {
                    topic,
                    code: code.into(),
                    message,
                })
                .await
            }
            Control::Error {
                id: None,
                code,
                message,
                topic: None,
            } => {
                self.emit(Event::ServerError {
                    code: code.into(),
                    message,
                })
                .await
            }
            Control::Pong { id: None } | Control::Welcome(_) => true,
        }
    }

    fn remember(&mut self, topic: String, options: SubscribeOptions, reply: &Reply) {
        let position = position(&options, reply);
        self.subscriptions
            .insert(topic, Subscription { options, position });
    }

    /// One renewal answered; announces the reconnection once all are, then the subscriptions
    /// that could not be renewed.
    async fn renewed(&mut self) -> bool {
        let Some(renewing) = &mut self.renewing else {
            return true;
        };
        renewing.remaining = renewing.remaining.saturating_sub(1);
        if renewing.remaining > 0 {
            return true;
        }
        let Some(Renewing {
            recovered, ended, ..
        }) = self.renewing.take()
        else {
            return true;
        };
        if !self.emit(Event::Reconnected { recovered }).await {
            return false;
        }
        for event in ended {
            if !self.emit(event).await {
                return false;
            }
        }
        for message in std::mem::take(&mut self.held) {
            if !self.emit(Event::Message(message)).await {
                return false;
            }
        }
        true
    }

    /// Reconnects with backoff (a fresh token from the provider each time, if there is one) and
    /// renews every subscription. Err(None) if the application closed the client meanwhile;
    /// Err(Some) if the server refused in a way retrying cannot change.
    async fn reconnect(&mut self, backoff: Backoff) -> Result<Ws, Option<Error>> {
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
                        None => return Err(None),
                        Some(Command::Close { reply }) => {
                            let _ = reply.send(());
                            return Err(None);
                        }
                        Some(other) => refuse(other),
                    },
                }
            }
            delay = (delay * 2).min(backoff.max);
            let token = match self.tokens.for_connection(false).await {
                Ok(token) => token,
                Err(error) => {
                    tracing::debug!(%error, "no token to reconnect with");
                    continue;
                }
            };
            match self.dial.open(token.as_deref()).await {
                Ok((mut ws, welcome)) => {
                    self.tokens.connected(token, &welcome);
                    match self.renew(&mut ws).await {
                        Ok(()) => {
                            self.schedule_refresh();
                            return Ok(ws);
                        }
                        Err(error) => tracing::debug!(%error, "lost again while renewing"),
                    }
                }
                Err(error) if self.gives_up_after(&error) => return Err(Some(error)),
                Err(error) => tracing::debug!(%error, "reconnect failed"),
            }
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
        self.renewing = Some(Renewing {
            remaining: renewals.len(),
            recovered: Vec::new(),
            ended: Vec::new(),
        });
        for (topic, options) in renewals {
            let id = self.id();
            let bytes = frame::subscribe(self.encoding(), &topic, &options, id)?;
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
        | Command::Ping { reply }
        | Command::Auth { reply, .. } => {
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
