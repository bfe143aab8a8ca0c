//! Tokens, grants, expiry, refusals and TLS: the client against a real Crier that requires
//! authentication.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{PATIENCE, TestServer};
use crier_client::{Backoff, Client, CloseInfo, Error, ErrorCode, Event};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "a test secret that is long enough for HS256";
const API_KEY: &str = "test-api-key";

/// A server that requires a token: HS256 with [`SECRET`], no leeway (expiry is exact), and
/// [`API_KEY`] for the HTTP API.
fn secured(adjust: impl FnOnce(&mut crier::Config)) -> TestServer {
    TestServer::with(|config| {
        config.jwt_secret = Some(SECRET.into());
        config.jwt_leeway = Duration::ZERO;
        config.api_keys = vec![API_KEY.into()];
        adjust(config);
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token for `sub`, valid for `secs` more seconds, granting these patterns.
fn token(sub: &str, secs: i64, subscribe: &[&str], publish: &[&str]) -> String {
    let claims = json!({
        "sub": sub,
        "exp": now().saturating_add_signed(secs),
        "crier": {"subscribe": subscribe, "publish": publish},
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Publishes over HTTP with the API key; returns the seq.
async fn publish(server: &TestServer, topic: &str, data: &Value) -> u64 {
    let response = server
        .http
        .post(server.url(&format!("/api/topics/{topic}")))
        .bearer_auth(API_KEY)
        .json(data)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    response.json::<Value>().await.unwrap()["seq"]
        .as_u64()
        .unwrap()
}

async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(PATIENCE, client.next_event())
        .await
        .expect("an event in time")
        .expect("an event")
}

async fn next_message(client: &mut Client) -> crier_client::Message {
    tokio::time::timeout(PATIENCE, client.next_message())
        .await
        .expect("a message in time")
        .expect("a message")
}

fn reconnecting(url: String) -> crier_client::ClientBuilder {
    Client::builder(url).backoff(Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(200),
    })
}

/// A provider that counts its calls and makes tokens valid for `secs(call)` seconds.
fn provider(
    calls: &Arc<AtomicUsize>,
    secs: impl Fn(usize) -> i64 + Send + Sync + 'static,
    subscribe: &'static [&'static str],
) -> impl Fn() -> std::future::Ready<Result<String, String>> + Send + Sync + 'static {
    let calls = calls.clone();
    move || {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(token("alice", secs(call), subscribe, &[])))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_grants_what_it_names_and_refusals_are_typed() {
    let server = secured(|_| {});
    let mut client = Client::builder(server.ws_url(""))
        .token(token("alice", 60, &["news.>"], &["news.>"]))
        .connect()
        .await
        .unwrap();
    let welcome = client.welcome();
    assert!(welcome.authenticated);
    assert_eq!(welcome.user.as_deref(), Some("alice"));
    let expires_at = welcome.expires_at.expect("a token's expiry");
    assert!(expires_at.abs_diff(now() + 60) <= 2, "{expires_at}");

    client.subscribe("news.today").await.unwrap();
    assert_eq!(client.publish("news.today", &json!(1)).await.unwrap(), 1);
    assert_eq!(next_message(&mut client).await.seq(), 1);

    let refused = client.publish("secret", &json!(1)).await.unwrap_err();
    assert!(
        matches!(
            &refused,
            Error::Server {
                code: ErrorCode::Forbidden,
                ..
            }
        ),
        "{refused:?}"
    );
    let refused = client.subscribe("secret.>").await.unwrap_err();
    assert_eq!(refused.code(), Some(&ErrorCode::Forbidden));
    assert_eq!(refused.server_code(), Some("forbidden"));
    // Nothing changed: the connection still works.
    client.ping().await.unwrap();

    // Without a token: only `auth` is served, until a valid one arrives.
    let anonymous = Client::connect(&server.ws_url("")).await.unwrap();
    assert!(!anonymous.welcome().authenticated);
    assert_eq!(
        anonymous.subscribe("news.today").await.unwrap_err().code(),
        Some(&ErrorCode::Unauthorized)
    );
    assert_eq!(
        anonymous.auth("not a token").await.unwrap_err().code(),
        Some(&ErrorCode::InvalidToken)
    );
    anonymous
        .auth(&token("bob", 60, &["news.>"], &[]))
        .await
        .unwrap();
    anonymous.subscribe("news.today").await.unwrap();
    // An API key is a token that grants everything.
    let operator = Client::builder(server.ws_url(""))
        .token(API_KEY)
        .connect()
        .await
        .unwrap();
    operator.publish("secret", &json!(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_carry_the_servers_error_code() {
    let server = secured(|config| config.max_connections_per_ip = 2);
    let refused = |result: Result<Client, Error>| match result {
        Err(error @ Error::Refused { .. }) => error,
        Err(other) => panic!("expected a refusal, got {other:?}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    };

    let error = refused(
        Client::builder(server.ws_url(""))
            .token("not.a.jwt")
            .connect()
            .await,
    );
    assert!(
        matches!(
            &error,
            Error::Refused { status: 401, code: Some(ErrorCode::InvalidToken), message }
                if !message.is_empty()
        ),
        "{error:?}"
    );
    let expired = token("alice", -60, &[">"], &[]);
    let error = refused(
        Client::builder(server.ws_url(""))
            .token(expired)
            .connect()
            .await,
    );
    assert_eq!(error.code(), Some(&ErrorCode::InvalidToken));

    // `?subscribe=` outside the grant, and without a token at all.
    let narrow = token("alice", 60, &["news.>"], &[]);
    let error = refused(
        Client::builder(server.ws_url("?subscribe=secret"))
            .token(narrow.clone())
            .connect()
            .await,
    );
    assert!(
        matches!(
            &error,
            Error::Refused {
                status: 403,
                code: Some(ErrorCode::Forbidden),
                ..
            }
        ),
        "{error:?}"
    );
    let error = refused(Client::connect(&server.ws_url("?subscribe=news.a")).await);
    assert!(
        matches!(
            &error,
            Error::Refused {
                status: 401,
                code: Some(ErrorCode::Unauthorized),
                ..
            }
        ),
        "{error:?}"
    );

    // The per-address connection limit.
    let _first = Client::builder(server.ws_url(""))
        .token(narrow.clone())
        .connect()
        .await
        .unwrap();
    let _second = Client::builder(server.ws_url(""))
        .token(narrow.clone())
        .connect()
        .await
        .unwrap();
    let error = refused(
        Client::builder(server.ws_url(""))
            .token(narrow)
            .connect()
            .await,
    );
    assert!(
        matches!(
            &error,
            Error::Refused {
                status: 429,
                code: Some(ErrorCode::TooManyConnections),
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrower_token_ends_the_subscriptions_it_no_longer_grants() {
    let server = secured(|_| {});
    let mut client = Client::builder(server.ws_url(""))
        .token(token("alice", 60, &["a.>", "b.>"], &[]))
        .connect()
        .await
        .unwrap();
    client.subscribe("a.x").await.unwrap();
    client.subscribe("b.*").await.unwrap();

    client
        .auth(&token("alice", 60, &["a.>"], &[]))
        .await
        .unwrap();
    match next_event(&mut client).await {
        Event::SubscriptionEnded {
            topic,
            code,
            message,
        } => {
            assert_eq!((topic.as_str(), code), ("b.*", ErrorCode::Forbidden));
            assert!(!message.is_empty());
        }
        other => panic!("expected the end of b.*, got {other:?}"),
    }
    publish(&server, "b.y", &json!("not for alice any more")).await;
    publish(&server, "a.x", &json!("still hers")).await;
    let m = next_message(&mut client).await;
    assert_eq!(
        (m.topic(), m.decode::<String>().unwrap()),
        ("a.x", "still hers".to_owned())
    );
    // What the server ended stays ended on the client: subscribing again is refused.
    assert_eq!(
        client.subscribe("b.*").await.unwrap_err().code(),
        Some(&ErrorCode::Forbidden)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_replaced_from_the_provider_and_subscriptions_restored() {
    let server = secured(|_| {});
    let calls = Arc::new(AtomicUsize::new(0));
    // The first token expires in two or three seconds; the next ones last.
    let fresh = provider(
        &calls,
        |call| if call == 0 { 3 } else { 600 },
        &["notify.>", "alerts.>"],
    );
    let mut client = reconnecting(server.ws_url(""))
        .token_provider(fresh)
        .token_refresh(None)
        .connect()
        .await
        .unwrap();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the first connection's token"
    );
    client.subscribe("notify.alice").await.unwrap();
    client.subscribe("alerts.*").await.unwrap();
    assert_eq!(publish(&server, "notify.alice", &json!(1)).await, 1);
    assert_eq!(next_message(&mut client).await.seq(), 1);

    // The server closes with 4002 at expiry; the client reconnects with a fresh token.
    match next_event(&mut client).await {
        Event::Reconnected { recovered } => {
            assert_eq!(recovered, vec![("notify.alice".to_owned(), true)])
        }
        other => panic!("expected a reconnection, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one fresh token");
    publish(&server, "notify.alice", &json!(2)).await;
    publish(&server, "alerts.fire", &json!("both renewed")).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = next_message(&mut client).await;
        got.push((m.topic().to_owned(), m.seq()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("alerts.fire".to_owned(), 1),
            ("notify.alice".to_owned(), 2)
        ]
    );
    client.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_ahead_of_expiry_keeps_the_connection_up() {
    let server = secured(|_| {});
    let calls = Arc::new(AtomicUsize::new(0));
    // Every token lasts two to three seconds: refreshed about halfway through.
    let fresh = provider(&calls, |_| 3, &["ticks"]);
    // Without reconnecting: a 4002 would end the client.
    let mut client = Client::builder(server.ws_url(""))
        .token_provider(fresh)
        .connect()
        .await
        .unwrap();
    let connection = client.welcome().connection.clone();
    client.subscribe("ticks").await.unwrap();
    let started = tokio::time::Instant::now();
    let mut expected = 0;
    while started.elapsed() < Duration::from_secs(7) {
        expected += 1;
        assert_eq!(publish(&server, "ticks", &json!(expected)).await, expected);
        match next_event(&mut client).await {
            Event::Message(m) => assert_eq!(m.seq(), expected),
            other => panic!("expected tick {expected}, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let calls = calls.load(Ordering::SeqCst);
    assert!(calls >= 4, "the provider was asked {calls} times in 7 s");
    // The same connection all along.
    let row = server
        .http
        .get(server.url("/api/connections"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let ids: Vec<&str> = row["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, vec![connection.as_str()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_is_reported_and_the_token_expires() {
    let server = secured(|_| {});
    let refreshes = Arc::new(AtomicU64::new(0));
    let counted = refreshes.clone();
    let mut client = Client::builder(server.ws_url(""))
        .token(token("alice", 3, &[">"], &[]))
        .token_provider(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, String>("not a token".to_owned()) }
        })
        .connect()
        .await
        .unwrap();
    let mut failures = 0;
    loop {
        match next_event(&mut client).await {
            Event::TokenRefreshFailed(error) => {
                assert_eq!(error.code(), Some(&ErrorCode::InvalidToken), "{error:?}");
                failures += 1;
            }
            Event::Closed(error) => {
                assert_eq!(
                    error.close_code(),
                    Some(CloseInfo::TOKEN_EXPIRED),
                    "{error:?}"
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(failures >= 1);
    assert_eq!(refreshes.load(Ordering::SeqCst), failures);

    // A provider that fails outright fails the first connection.
    let error = Client::builder(server.ws_url(""))
        .token_provider(|| async { Err::<String, _>("the login service is down") })
        .connect()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&error, Error::Token(message) if message.contains("down")),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_that_reconnecting_cannot_cure_end_the_client() {
    let server = secured(|config| config.auth_timeout = Duration::from_millis(300));
    // No token and no `auth`: 4003, and no reconnection.
    let mut anonymous = reconnecting(server.ws_url("")).connect().await.unwrap();
    match next_event(&mut anonymous).await {
        Event::Closed(error) => assert_eq!(
            error.close_code(),
            Some(CloseInfo::AUTHENTICATION_REQUIRED),
            "{error:?}"
        ),
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(anonymous.next_event().await.is_none());

    // An expired token and no provider to replace it: 4002, and no reconnection.
    let mut client = reconnecting(server.ws_url(""))
        .token(token("alice", 2, &[">"], &[]))
        .connect()
        .await
        .unwrap();
    client.subscribe("t").await.unwrap();
    match next_event(&mut client).await {
        Event::Closed(error) => {
            assert_eq!(
                error.close_code(),
                Some(CloseInfo::TOKEN_EXPIRED),
                "{error:?}"
            )
        }
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(matches!(client.ping().await, Err(Error::ClientClosed)));
}

/// A self-signed certificate for 127.0.0.1 and localhost, written where the server reads it.
struct SelfSigned {
    cert_pem: String,
    dir: std::path::PathBuf,
}

impl SelfSigned {
    fn new() -> SelfSigned {
        let certified =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                .unwrap();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crier-client-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
        SelfSigned {
            cert_pem: certified.cert.pem(),
            dir,
        }
    }
}

impl Drop for SelfSigned {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_self_signed_certificate() {
    let cert = SelfSigned::new();
    let server = secured(|config| {
        config.tls_cert = Some(cert.dir.join("cert.pem"));
        config.tls_key = Some(cert.dir.join("key.pem"));
    });
    let url = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let grant = || token("alice", 60, &["secure.>"], &["secure.>"]);

    // The certificate is not one the system trusts.
    let error = Client::builder(url.clone())
        .token(grant())
        .connect()
        .await
        .err()
        .unwrap();
    assert!(matches!(&error, Error::Connect(_)), "{error:?}");
    let error = Client::builder(url.clone())
        .root_certificate("not a certificate")
        .connect()
        .await
        .err()
        .unwrap();
    assert!(matches!(&error, Error::Connect(_)), "{error:?}");

    for local in [None, Some("127.0.0.1".parse().unwrap())] {
        let mut builder = Client::builder(url.clone())
            .token(grant())
            .root_certificate(&cert.cert_pem);
        if let Some(local) = local {
            builder = builder.local_address(local);
        }
        let mut client = builder.connect().await.unwrap();
        assert_eq!(client.welcome().user.as_deref(), Some("alice"));
        let topic = format!("secure.{}", local.is_some());
        client.subscribe(&topic).await.unwrap();
        client.publish(&topic, &json!("over TLS")).await.unwrap();
        assert_eq!(
            next_message(&mut client).await.decode::<String>().unwrap(),
            "over TLS"
        );
        // A refusal over TLS is typed too.
        let error = Client::builder(url.clone())
            .token("not.a.jwt")
            .root_certificate(&cert.cert_pem)
            .connect()
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                &error,
                Error::Refused {
                    status: 401,
                    code: Some(ErrorCode::InvalidToken),
                    ..
                }
            ),
            "{error:?}"
        );
        client.close().await.unwrap();
    }
}
