//! The HTTP API: publish, look at topics and connections, health. Every answer is JSON, every
//! error is `{"error":{"code":...,"message":...}}` with a 4xx status.

use std::fmt;
use std::sync::Arc;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::auth::{Identity, InvalidToken};
use crate::broker::{Accepted, Broker, Publisher, Refusal};
use crate::data::{Data, msgpack_array_items, msgpack_envelope_len, msgpack_map_value};
use crate::metrics::Refused;
use crate::model::ErrorCode;

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::from_code(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    pub(crate) fn invalid_token(invalid: InvalidToken) -> Self {
        ApiError::from_code(StatusCode::UNAUTHORIZED, ErrorCode::InvalidToken, invalid.0)
    }

    fn from_code(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError::new(status, code.as_str(), message)
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let status = match refusal.code {
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadFrame
            | ErrorCode::UnknownOp
            | ErrorCode::InvalidTopic
            | ErrorCode::TooManySubscriptions => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized | ErrorCode::InvalidToken => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::from_code(status, refusal.code, refusal.message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(json!({"error": {"code": self.code, "message": self.message}}))
    }
}

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default()
            .error_handler(|e, _| ApiError::bad_request(e.to_string()).into()),
    )
    .app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::bad_request(e.to_string()).into()),
    )
    .service(resource("/api/topics/{topic}").route(web::post().to(publish_one)))
    .service(resource("/api/publish").route(web::post().to(publish_batch)))
    .service(resource("/api/topics").route(web::get().to(list_topics)))
    .service(resource("/api/topics/{topic}/history").route(web::get().to(topic_history)))
    .service(resource("/api/connections").route(web::get().to(list_connections)))
    .service(resource("/healthz").route(web::get().to(healthz)))
    .service(resource("/readyz").route(web::get().to(readyz)))
    .service(resource("/metrics").route(web::get().to(metrics)));
}

/// A resource that answers other methods with a JSON 405.
pub(crate) fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(|| async {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed here",
        )
        .error_response()
    }))
}

pub(crate) async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", req.path()),
    )
    .error_response()
}

/// The token of an `Authorization: Bearer` header, if there is one.
/// A malformed header is refused (and counted) as `unauthorized`.
pub(crate) fn bearer_token<'r>(
    req: &'r HttpRequest,
    broker: &Broker,
) -> Result<Option<&'r str>, ApiError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|value| match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Some(token.trim()),
            _ => None,
        });
    match token {
        Some(token) => Ok(Some(token)),
        None => {
            broker.metrics().refused(Refused::Unauthorized);
            Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ))
        }
    }
}

/// Who an HTTP API request is: its `Authorization: Bearer` API key or token. On a broker without
/// authentication everyone is allowed everything.
fn credentials(req: &HttpRequest, broker: &Broker) -> Result<Arc<Identity>, ApiError> {
    let auth = broker.auth();
    if auth.api_open() {
        return Ok(auth.unauthenticated());
    }
    let Some(presented) = bearer_token(req, broker)? else {
        broker.metrics().refused(Refused::Unauthorized);
        return Err(ApiError::unauthorized(
            "this API needs `Authorization: Bearer <API key or token>`",
        ));
    };
    auth.authenticate(presented).map_err(|invalid| {
        broker.metrics().refused(Refused::InvalidToken);
        ApiError::invalid_token(invalid)
    })
}

/// Credentials for the routes that show the whole broker (topics, connections): an API key.
fn operator(req: &HttpRequest, broker: &Broker) -> Result<Arc<Identity>, ApiError> {
    let identity = credentials(req, broker)?;
    if !identity.is_operator() {
        broker.metrics().refused(Refused::Forbidden);
        return Err(ApiError::from_code(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "this route needs an API key",
        ));
    }
    Ok(identity)
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum BodyEncoding {
    Json,
    Msgpack,
}

fn body_encoding(req: &HttpRequest) -> Result<BodyEncoding, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyEncoding::Json),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Ok(BodyEncoding::Msgpack)
        }
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {content_type:?} is not supported; use application/json or application/msgpack"
            ),
        )),
    }
}

async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "could not read the body: {e}"
        ))),
        Err(_) => Err(ApiError::from_code(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than {limit} bytes"),
        )),
    }
}

#[derive(Serialize)]
struct PublishResult {
    topic: String,
    seq: u64,
    receivers: usize,
}

impl PublishResult {
    fn new(topic: String, accepted: Accepted) -> Self {
        PublishResult {
            topic,
            seq: accepted.seq,
            receivers: accepted.receivers,
        }
    }
}

/// `POST /api/topics/{topic}`: the body is the message data.
async fn publish_one(
    req: HttpRequest,
    topic: web::Path<String>,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let topic = topic.into_inner();
    let identity = credentials(&req, &broker)?;
    // Before reading a body that could not be published anyway.
    broker.check_topic(&topic)?;
    let encoding = body_encoding(&req)?;
    let body = read_body(payload, broker.config().max_message_bytes).await?;
    let data = decode_data(encoding, body)?;
    let accepted = broker
        .publish(Publisher::Http(&identity), &topic, data)?
        .get()
        .await?;
    Ok(HttpResponse::Ok().json(PublishResult::new(topic, accepted)))
}

/// A publish body: the message's data.
pub(crate) fn decode_data(encoding: BodyEncoding, body: web::Bytes) -> Result<Data, ApiError> {
    match encoding {
        BodyEncoding::Json => Data::from_json(body),
        BodyEncoding::Msgpack => Data::from_msgpack(body),
    }
    .map_err(|e| ApiError::bad_request(e.0))
}

/// A batch body: `[{"topic":...,"data":...}, ...]` in either encoding.
pub(crate) fn decode_batch(
    encoding: BodyEncoding,
    body: &[u8],
) -> Result<Vec<(String, Data)>, ApiError> {
    let shape = |e: &dyn fmt::Display| {
        ApiError::bad_request(format!("the body must be an array of {{topic, data}}: {e}"))
    };
    match encoding {
        BodyEncoding::Json => {
            serde_json::from_slice::<Vec<BatchItem<&serde_json::value::RawValue>>>(body)
                .map_err(|e| shape(&e))?
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let data = web::Bytes::copy_from_slice(item.data.get().as_bytes());
                    Data::from_parsed_json(data)
                        .map(|data| (item.topic, data))
                        .map_err(|e| ApiError::bad_request(format!("item {i}: {}", e.0)))
                })
                .collect()
        }
        BodyEncoding::Msgpack => {
            // The batch's array and each item's map hold the data.
            match msgpack_envelope_len(body, 2) {
                Ok(len) if len == body.len() => {}
                Ok(len) => return Err(shape(&format!("{} bytes after it", body.len() - len))),
                Err(e) => return Err(shape(&format!("not valid MessagePack: {}", e.0))),
            }
            // The topics are decoded; each item's data is kept as the bytes it came as.
            let items = rmp_serde::from_slice::<Vec<BatchItem<serde::de::IgnoredAny>>>(body)
                .map_err(|e| shape(&e))?;
            let datas = msgpack_array_items(body)
                .ok_or_else(|| shape(&"not an array"))?
                .into_iter()
                .map(|item| msgpack_map_value(item, b"data"));
            items
                .into_iter()
                .zip(datas)
                .map(|(item, data)| {
                    let data = data.ok_or_else(|| shape(&"an item has no data"))?;
                    Ok((item.topic, Data::Msgpack(web::Bytes::copy_from_slice(data))))
                })
                .collect()
        }
    }
}

#[derive(Deserialize)]
struct BatchItem<D> {
    topic: String,
    data: D,
}

/// `POST /api/publish`: `[{"topic":...,"data":...}, ...]`, all validated before any is published.
async fn publish_batch(
    req: HttpRequest,
    payload: web::Payload,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let identity = credentials(&req, &broker)?;
    let encoding = body_encoding(&req)?;
    let body = read_body(payload, broker.config().max_batch_bytes).await?;
    let items = decode_batch(encoding, &body)?;
    let results: Vec<PublishResult> = broker
        .publish_batch(&identity, items)
        .await?
        .into_iter()
        .map(|(topic, accepted)| PublishResult::new(topic, accepted))
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "results": results })))
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// `GET /api/topics`
async fn list_topics(
    req: HttpRequest,
    query: web::Query<Limit>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    operator(&req, &broker)?;
    let mut topics = broker.topics().await?;
    topics.truncate(query.limit.unwrap_or(usize::MAX));
    Ok(HttpResponse::Ok().json(json!({
        "topics": topics,
        "backend": broker.backend_name(),
        "node": broker.node(),
    })))
}

#[derive(Deserialize)]
struct HistoryQuery {
    since: Option<u64>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct HistoryMessage {
    seq: u64,
    data: Box<serde_json::value::RawValue>,
}

/// `GET /api/topics/{topic}/history?since=SEQ&limit=N`: the messages after `since` that the
/// topic's history holds, oldest first, as a subscribe with `since` would replay them.
async fn topic_history(
    req: HttpRequest,
    topic: web::Path<String>,
    query: web::Query<HistoryQuery>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    let identity = credentials(&req, &broker)?;
    let since = query.since.unwrap_or(0);
    let page = broker
        .history(&identity, &topic, since, query.limit.unwrap_or(usize::MAX))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no topic {topic:?}"),
            )
        })?;
    let messages: Vec<HistoryMessage> = page
        .publications
        .iter()
        .map(|p| HistoryMessage {
            seq: p.seq,
            data: p.data.to_json(),
        })
        .collect();
    // Like a subscribe's `recovered`: whether every message after `since` is here.
    let complete =
        since >= page.position.seq || page.oldest.is_some_and(|oldest| oldest <= since + 1);
    Ok(HttpResponse::Ok().json(json!({
        "topic": topic.into_inner(),
        "epoch": page.position.epoch,
        "seq": page.position.seq,
        "oldest": page.oldest,
        "complete": complete,
        "messages": messages,
    })))
}

#[derive(Serialize)]
struct ConnectionInfo {
    id: String,
    /// The token's `sub`.
    user: Option<Arc<str>>,
    authenticated: bool,
    peer: Option<String>,
    encoding: &'static str,
    subscriptions: usize,
    buffered_bytes: usize,
    buffered_high_water: usize,
    dropped: u64,
    conflated: u64,
    connected_since: String,
}

/// `GET /api/connections`: the most backed-up first.
async fn list_connections(
    req: HttpRequest,
    query: web::Query<Limit>,
    broker: web::Data<Broker>,
) -> Result<HttpResponse, ApiError> {
    operator(&req, &broker)?;
    let mut connections: Vec<ConnectionInfo> = broker
        .connections()
        .iter()
        .map(|c| {
            let stats = c.queue.stats();
            let identity = c.identity();
            ConnectionInfo {
                id: c.id.to_string(),
                user: identity.user.clone(),
                authenticated: identity.is_authenticated(),
                peer: c.peer.map(|p| p.to_string()),
                encoding: c.encoding.name(),
                subscriptions: c.subscription_count(),
                buffered_bytes: c.queue.buffered().0,
                buffered_high_water: c.queue.buffered().1,
                dropped: stats.dropped(),
                conflated: stats.conflated(),
                connected_since: humantime::format_rfc3339_millis(c.connected_at).to_string(),
            }
        })
        .collect();
    connections.sort_unstable_by(|a, b| {
        b.buffered_bytes
            .cmp(&a.buffered_bytes)
            .then_with(|| a.id.cmp(&b.id))
    });
    connections.truncate(query.limit.unwrap_or(usize::MAX));
    Ok(HttpResponse::Ok().json(json!({ "connections": connections })))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /metrics`: Prometheus text exposition; with `--metrics-token`, for its bearer only.
async fn metrics(req: HttpRequest, broker: web::Data<Broker>) -> Result<HttpResponse, ApiError> {
    let presented = match broker.auth().metrics_token_required() {
        true => bearer_token(&req, &broker)?,
        false => None,
    };
    if !broker.auth().metrics_allowed(presented) {
        broker.metrics().refused(Refused::Unauthorized);
        return Err(ApiError::unauthorized(
            "/metrics needs `Authorization: Bearer <metrics token>`",
        ));
    }
    Ok(HttpResponse::Ok()
        .content_type(prometheus::TEXT_FORMAT)
        .body(broker.metrics().render()))
}

async fn readyz(broker: web::Data<Broker>) -> HttpResponse {
    if broker.is_shutting_down() {
        HttpResponse::ServiceUnavailable().json(json!({"status": "shutting_down"}))
    } else if !broker.backend_ready() {
        HttpResponse::ServiceUnavailable()
            .json(json!({"status": "unavailable", "backend": broker.backend_name()}))
    } else {
        HttpResponse::Ok().json(json!({"status": "ready"}))
    }
}
