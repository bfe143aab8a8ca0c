//! Connection tokens end to end over real sockets: the three kinds of key, the three ways to
//! present a token, what is refused, grants on subscribe and publish, expiry and re-auth.

mod access;
mod common;

use std::time::{Duration, Instant};

use access::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const API_KEY: &str = "operator-key";

/// A server trusting [`SECRET`] (and [`API_KEY`], to look at it over HTTP).
fn hs256_server() -> TestServer {
    TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![API_KEY.into()];
    })
}

/// Asserts that presenting `token` at the handshake, both as `?token=` and as a bearer header,
/// is refused with 401 `invalid_token`.
async fn assert_refused(server: &TestServer, token: &str, what: &str) {
    let query = handshake(server, &format!("?token={token}"), &[]).await;
    query
        .answer
        .assert_error(401, "invalid_token", &format!("{what} in ?token="));
    let bearer = format!("Bearer {token}");
    let header = handshake(server, "", &[("Authorization", &bearer)]).await;
    header
        .answer
        .assert_error(401, "invalid_token", &format!("{what} as a bearer"));
}

/// Asserts that the token opens an authenticated connection as `sub`.
async fn assert_accepted(server: &TestServer, token: &str, sub: &str, what: &str) {
    let (_client, welcome) = connect_with_token(server, token).await;
    assert_eq!(
        (welcome["authenticated"].clone(), welcome["user"].clone()),
        (json!(true), json!(sub)),
        "{what}: {welcome}"
    );
}

#[tokio::test]
async fn hs256_token_in_the_query_a_bearer_header_or_an_auth_frame() {
    let server = hs256_server();
    let mut claims = claims("alice", &["chat.*"], &["chat.*"]);
    let exp = now() + 600;
    claims["exp"] = json!(exp);
    let token = hs256(&claims);

    // ?token=
    let (mut by_query, welcome) = connect_with_token(&server, &token).await;
    assert_eq!(welcome["authenticated"], true, "{welcome}");
    assert_eq!(welcome["user"], "alice");
    assert_eq!(
        welcome["expires_at"],
        exp + 5,
        "exp plus the default leeway of 5 s"
    );
    by_query.subscribe("chat.room1").await;

    // Authorization: Bearer
    let bearer = format!("Bearer {token}");
    let (mut by_header, welcome) =
        access::connect(&server, Enc::Msgpack, "", &[("Authorization", &bearer)]).await;
    assert_eq!(
        (welcome["authenticated"].clone(), welcome["user"].clone()),
        (json!(true), json!("alice"))
    );
    let ack = ws_publish(&mut by_header, "chat.room1", json!("hi"), "p").await;
    assert_eq!(ack, json!({"op": "ack", "id": "p", "seq": 1}));
    assert_eq!(
        by_query.recv().await,
        json!({"op": "message", "topic": "chat.room1", "seq": 1, "data": "hi"})
    );

    // The auth frame, on a connection that opened without a token.
    let (mut by_frame, welcome) = access::connect(&server, Enc::Json, "", &[]).await;
    assert_eq!(welcome["authenticated"], false, "{welcome}");
    assert!(welcome.get("user").is_none() && welcome.get("expires_at").is_none());
    let ack = request(
        &mut by_frame,
        json!({"op": "auth", "token": token, "id": 1}),
    )
    .await;
    assert_eq!(
        ack,
        json!({"op": "ack", "id": 1, "expires_at": exp + 5}),
        "the ack says when the token expires"
    );
    by_frame.subscribe("chat.room1").await;
    let (message, ack) =
        ws_publish_to_self(&mut by_frame, "chat.room1", json!("after auth"), "p2").await;
    assert_eq!(ack, json!({"op": "ack", "id": "p2", "seq": 2}));
    assert_eq!(message["data"], "after auth");
    assert_eq!(by_query.recv().await["data"], "after auth");
}

#[tokio::test]
async fn hs256_secret_from_a_file() {
    // Surrounding whitespace (the newline editors add) is not part of the secret.
    let file = TempFile::new("jwt-secret", format!("  {SECRET}\n").as_bytes());
    let path = file.0.clone();
    let server = TestServer::with(move |c| c.jwt_secret_file = Some(path));
    assert_accepted(
        &server,
        &token("bob", &["a"], &[]),
        "bob",
        "the file's secret",
    )
    .await;
    let other = hs256_with(
        b"another secret, also long enough!!",
        &claims("bob", &["a"], &[]),
    );
    assert_refused(&server, &other, "a token signed with another secret").await;
    let with_newline = hs256_with(
        format!("{SECRET}\n").as_bytes(),
        &claims("bob", &["a"], &[]),
    );
    assert_refused(
        &server,
        &with_newline,
        "a token signed with the untrimmed file",
    )
    .await;
}

#[tokio::test]
async fn rs256_public_key() {
    // ring cannot generate RSA keys, so rcgen cannot either: the pair is committed.
    let private = include_bytes!("keys/rsa_private.pem");
    let public = include_bytes!("keys/rsa_public.pem");
    let file = TempFile::new("rsa.pem", public);
    let path = file.0.clone();
    let server = TestServer::with(move |c| c.jwt_public_key = Some(path));

    let key = EncodingKey::from_rsa_pem(private).unwrap();
    let good = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("carol", &["x"], &[]),
        &key,
    )
    .unwrap();
    assert_accepted(&server, &good, "carol", "RS256").await;

    // The classic confusion: HS256 keyed with the public key's bytes.
    let confused = hs256_with(public, &claims("carol", &["x"], &[]));
    assert_refused(&server, &confused, "HS256 signed with the public key").await;
    let ps256 = jsonwebtoken::encode(
        &Header::new(Algorithm::PS256),
        &claims("carol", &["x"], &[]),
        &key,
    )
    .unwrap();
    assert_refused(&server, &ps256, "PS256 with the right key").await;
    assert_refused(
        &server,
        &unsigned(&claims("carol", &["x"], &[])),
        "alg none",
    )
    .await;
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forged_claims = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(claims("mallory", &[">"], &[">"]).to_string())
    };
    assert_refused(
        &server,
        &format!("{head}.{forged_claims}.{signature}"),
        "claims swapped under a valid signature",
    )
    .await;
}

#[tokio::test]
async fn es256_public_key() {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let file = TempFile::new("p256.pem", pair.public_key_pem().as_bytes());
    let path = file.0.clone();
    let server = TestServer::with(move |c| c.jwt_public_key = Some(path));

    let sign = |pair: &rcgen::KeyPair, claims: &Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::ES256),
            claims,
            &EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    assert_accepted(
        &server,
        &sign(&pair, &claims("dave", &["x"], &[])),
        "dave",
        "ES256",
    )
    .await;

    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert_refused(
        &server,
        &sign(&stranger, &claims("dave", &["x"], &[])),
        "ES256 signed by another key",
    )
    .await;
    let confused = hs256_with(
        pair.public_key_pem().as_bytes(),
        &claims("dave", &["x"], &[]),
    );
    assert_refused(&server, &confused, "HS256 signed with the public key").await;
    assert_refused(
        &server,
        &token("dave", &["x"], &[]),
        "HS256 on an ES256 server",
    )
    .await;
}

#[tokio::test]
async fn invalid_tokens_are_refused_at_the_handshake_with_401() {
    let server = hs256_server();
    let mut expired = claims("alice", &["a"], &[]);
    // Past the default leeway of 5 s.
    expired["exp"] = json!(now() - 30);
    let mut immature = claims("alice", &["a"], &[]);
    immature["nbf"] = json!(now() + 600);
    let mut no_exp = claims("alice", &["a"], &[]);
    no_exp.as_object_mut().unwrap().remove("exp");
    let cases: Vec<(&str, String)> = vec![
        ("garbage", "not-a-token".into()),
        ("three empty parts", "..".into()),
        (
            "a wrong signature",
            hs256_with(
                b"not the server's secret, but long",
                &claims("a", &["a"], &[]),
            ),
        ),
        ("alg none", unsigned(&claims("alice", &[">"], &[">"]))),
        ("expired", hs256(&expired)),
        ("nbf in the future", hs256(&immature)),
        ("no exp", hs256(&no_exp)),
        (
            "a grant that is not a pattern",
            token("alice", &["a..b"], &[]),
        ),
        (
            "a publish grant that is not a pattern",
            token("alice", &[], &["a.>.b"]),
        ),
        (
            "a crier claim that is not an object",
            hs256(&json!({"sub": "a", "exp": now() + 60, "crier": ["a"]})),
        ),
    ];
    for (what, token) in &cases {
        assert_refused(&server, token, what).await;
    }
    // A token the leeway still covers is accepted.
    let mut within_leeway = claims("alice", &["a"], &[]);
    within_leeway["exp"] = json!(now() - 1);
    assert_accepted(
        &server,
        &hs256(&within_leeway),
        "alice",
        "exp within the leeway",
    )
    .await;

    // Refused in an auth frame too, and the connection stays unauthenticated.
    let (mut client, _) = access::connect(&server, Enc::Json, "", &[]).await;
    for (i, (what, token)) in cases.iter().enumerate() {
        let answer = request(&mut client, json!({"op": "auth", "token": token, "id": i})).await;
        assert_error_frame(&answer, "invalid_token", what);
    }
    let answer = ws_subscribe(&mut client, "a", "s").await;
    assert_error_frame(&answer, "unauthorized", "after invalid tokens");

    let scrape = scrape(&server, None).await;
    assert_eq!(
        refused(&scrape, "invalid_token"),
        (cases.len() * 3) as f64,
        "each refused token is counted"
    );
}

#[tokio::test]
async fn an_invalid_auth_frame_keeps_the_identity_the_connection_had() {
    let server = hs256_server();
    let (mut client, _) = connect_with_token(&server, &token("alice", &["a"], &["a"])).await;
    client.subscribe("a").await;
    let answer = request(
        &mut client,
        json!({"op": "auth", "token": "nonsense", "id": "re"}),
    )
    .await;
    assert_error_frame(&answer, "invalid_token", "a bad fresh token");
    let (message, ack) = ws_publish_to_self(&mut client, "a", json!(1), "p").await;
    assert_eq!(ack["op"], "ack", "still alice: {ack}");
    assert_eq!(message["seq"], 1, "still subscribed");
    let row = connection_row(&server, &client.id).await.unwrap();
    assert_eq!(row["user"], "alice");
}

#[tokio::test]
async fn audience_and_issuer_are_checked_when_set() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_audience = Some("crier".into());
        c.jwt_issuer = Some("https://issuer.test".into());
    });
    let with = |aud: Option<Value>, iss: Option<&str>| {
        let mut c = claims("erin", &["a"], &[]);
        if let Some(aud) = aud {
            c["aud"] = aud;
        }
        if let Some(iss) = iss {
            c["iss"] = json!(iss);
        }
        hs256(&c)
    };
    let issuer = Some("https://issuer.test");
    assert_accepted(
        &server,
        &with(Some(json!("crier")), issuer),
        "erin",
        "right aud and iss",
    )
    .await;
    assert_accepted(
        &server,
        &with(Some(json!(["another", "crier"])), issuer),
        "erin",
        "aud listing this server among others",
    )
    .await;
    assert_refused(&server, &with(Some(json!("another")), issuer), "wrong aud").await;
    assert_refused(
        &server,
        &with(Some(json!(["another"])), issuer),
        "aud list without this server",
    )
    .await;
    assert_refused(
        &server,
        &with(Some(json!("crier")), Some("https://evil.test")),
        "wrong iss",
    )
    .await;
    // "a token's aud must include this", "a token's iss must be this": a token minted for no
    // audience, or by no named issuer, does not qualify.
    let mut statuses = Vec::new();
    for (what, token) in [
        ("no aud", with(None, issuer)),
        ("no iss", with(Some(json!("crier")), None)),
    ] {
        let answer = handshake(&server, &format!("?token={token}"), &[])
            .await
            .answer;
        statuses.push((what, answer.status, answer.code().to_owned()));
    }
    assert_eq!(
        statuses,
        [
            ("no aud", 401, "invalid_token".to_owned()),
            ("no iss", 401, "invalid_token".to_owned()),
        ]
    );
}

#[tokio::test]
async fn without_a_token_only_auth_is_served_until_the_auth_timeout() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![API_KEY.into()];
        c.auth_timeout = Duration::from_secs(2);
    });
    let before = scrape(&server, None).await;

    let opened = Instant::now();
    let (mut client, welcome) = access::connect(&server, Enc::Json, "", &[]).await;
    assert_eq!(welcome["authenticated"], false, "{welcome}");
    assert_eq!(welcome["limits"]["auth_timeout_ms"], 2000);
    let frames = [
        json!({"op": "subscribe", "topic": "a", "id": 1}),
        json!({"op": "subscribe", "topic": "a.*", "id": 2}),
        json!({"op": "unsubscribe", "topic": "a", "id": 3}),
        json!({"op": "publish", "topic": "a", "data": 1, "id": 4}),
        json!({"op": "ping", "id": 5}),
    ];
    for frame in &frames {
        let answer = request(&mut client, frame.clone()).await;
        assert_error_frame(&answer, "unauthorized", &frame.to_string());
    }
    let (rest, close) = client.recv_until_close().await;
    assert!(rest.is_empty(), "{rest:?}");
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4003, "authentication required")
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(1900),
        "closed after the auth timeout, not before: {:?}",
        opened.elapsed()
    );
    // Nothing was published or subscribed.
    let topics = access::get(&server, "/api/topics", Some(API_KEY)).await;
    assert_eq!(topics.body["topics"], json!([]));

    // One that authenticates in time stays past the timeout.
    let (mut late, _) = access::connect(&server, Enc::Json, "", &[]).await;
    let ack = request(
        &mut late,
        json!({"op": "auth", "token": token("frank", &["a"], &[]), "id": "a"}),
    )
    .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    late.expect_silence(Duration::from_millis(3000)).await;
    late.sync().await;

    let after = eventually("the closed connection to be counted", || async {
        let s = scrape(&server, None).await;
        (s.get("crier_connections_closed_total{reason=\"auth_timeout\"}") >= 1.0).then_some(s)
    })
    .await;
    let delta = |s: &str| after.get(s) - before.get(s);
    assert_eq!(delta("crier_refused_total{reason=\"auth_timeout\"}"), 1.0);
    assert_eq!(
        delta("crier_refused_total{reason=\"unauthorized\"}"),
        frames.len() as f64
    );
    assert_eq!(
        delta("crier_connections_closed_total{reason=\"auth_timeout\"}"),
        1.0
    );
}

#[tokio::test]
async fn subscribe_in_the_query_needs_a_token_and_a_grant() {
    let server = hs256_server();
    let alice = token("alice", &["chat.*", "notify.alice"], &[]);

    let (mut client, _) = connect_with_token(
        &server,
        &format!("{alice}&subscribe=chat.room1,notify.alice"),
    )
    .await;
    publish(&server, Some(API_KEY), "notify.alice", json!("hi")).await;
    assert_eq!(client.recv().await["topic"], "notify.alice");

    let refused_query = handshake(
        &server,
        &format!("?token={alice}&subscribe=chat.room1,notify.bob"),
        &[],
    )
    .await;
    refused_query
        .answer
        .assert_error(403, "forbidden", "?subscribe= outside the grant");
    let pattern = handshake(&server, &format!("?token={alice}&subscribe=chat.%3E"), &[]).await;
    pattern
        .answer
        .assert_error(403, "forbidden", "a pattern wider than the grant");
    let anonymous = handshake(&server, "?subscribe=chat.room1", &[]).await;
    anonymous
        .answer
        .assert_error(401, "unauthorized", "?subscribe= without a token");
    let invalid = handshake(&server, &format!("?token={alice}&subscribe=a..b"), &[]).await;
    invalid
        .answer
        .assert_error(400, "invalid_topic", "an invalid topic");

    // The refused handshakes left nothing behind.
    let connections = access::get(&server, "/api/connections", Some(API_KEY)).await;
    assert_eq!(connections.body["connections"].as_array().unwrap().len(), 1);
    let topics = access::get(&server, "/api/topics", Some(API_KEY)).await;
    let names: Vec<&str> = topics.body["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["chat.room1", "notify.alice"]);
}

#[tokio::test]
async fn grants_limit_subscribe_and_publish_and_a_refusal_consumes_no_seq() {
    let server = hs256_server();
    let (mut alice, _) = connect_with_token(
        &server,
        &token("alice", &["chat.*", "notify.alice"], &["chat.*"]),
    )
    .await;

    let answer = ws_subscribe(&mut alice, "notify.bob", "s1").await;
    assert_error_frame(&answer, "forbidden", "subscribe to another user's topic");
    let answer = ws_subscribe(&mut alice, "chat.room1.thread", "s2").await;
    assert_error_frame(
        &answer,
        "forbidden",
        "a topic one segment deeper than chat.*",
    );
    let ack = ws_subscribe(&mut alice, "chat.room1", "s3").await;
    assert_eq!(ack["op"], "ack", "{ack}");

    let (message, ack) = ws_publish_to_self(&mut alice, "chat.room1", json!(1), "p1").await;
    assert_eq!(ack, json!({"op": "ack", "id": "p1", "seq": 1}));
    assert_eq!(message["seq"], 1);
    for (topic, id) in [
        ("notify.alice", "p2"),
        ("chat.room1.thread", "p3"),
        ("notify.bob", "p4"),
    ] {
        let answer = ws_publish(&mut alice, topic, json!("nope"), id).await;
        assert_error_frame(&answer, "forbidden", &format!("publish to {topic}"));
    }
    // The refused publish to a topic alice may read consumed no seq and reached no one.
    let answer = ws_subscribe(&mut alice, "notify.alice", "s4").await;
    assert_eq!(answer["op"], "ack", "{answer}");
    assert_eq!(
        answer["seq"], 0,
        "nothing was published on notify.alice: {answer}"
    );
    let (message, ack) = ws_publish_to_self(&mut alice, "chat.room1", json!(2), "p5").await;
    assert_eq!(ack["seq"], 2, "{ack}");
    assert_eq!(
        message,
        json!({"op": "message", "topic": "chat.room1", "seq": 2, "data": 2})
    );
    let next = publish(&server, Some(API_KEY), "notify.alice", json!("first")).await;
    assert_eq!((next.status, next.body["seq"].clone()), (200, json!(1)));
    assert_eq!(
        alice.recv().await,
        json!({"op": "message", "topic": "notify.alice", "seq": 1, "data": "first"})
    );

    let topics = access::get(&server, "/api/topics", Some(API_KEY)).await;
    let seqs: Vec<(String, u64)> = topics.body["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                t["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seqs,
        [("chat.room1".to_owned(), 2), ("notify.alice".to_owned(), 1)],
        "refused publishes made no topics and consumed no seqs"
    );
    let row = connection_row(&server, &alice.id).await.unwrap();
    assert_eq!(
        row["subscriptions"], 2,
        "refused subscribes added nothing: {row}"
    );
}

#[tokio::test]
async fn a_pattern_is_granted_only_when_the_grants_cover_all_it_matches() {
    let server = hs256_server();
    let (mut client, _) =
        connect_with_token(&server, &token("u", &["a.*", "a.*.>", "b.x"], &[])).await;
    let cases = [
        ("a.>", true),
        ("a.*", true),
        ("a.*.*", true),
        ("a.b", true),
        ("b.x", true),
        ("b.*", false),
        ("*.x", false),
        (">", false),
        ("a", false),
        ("*", false),
    ];
    for (i, (subject, granted)) in cases.iter().enumerate() {
        let answer = ws_subscribe(&mut client, subject, &format!("s{i}")).await;
        if *granted {
            assert_eq!(answer["op"], "ack", "{subject}: {answer}");
        } else {
            assert_error_frame(&answer, "forbidden", subject);
        }
    }
    // The union covers `a.>` all the way down.
    publish(&server, Some(API_KEY), "a.b.c.d", json!("deep")).await;
    let message = client.recv().await;
    assert_eq!(
        (message["topic"].clone(), message["data"].clone()),
        (json!("a.b.c.d"), json!("deep"))
    );

    // Grants that stop at a depth do not cover `>`.
    let (mut shallow, _) = connect_with_token(&server, &token("v", &["a.*", "a.*.*"], &[])).await;
    let answer = ws_subscribe(&mut shallow, "a.>", "s").await;
    assert_error_frame(&answer, "forbidden", "a.> over a.* and a.*.*");
    let answer = ws_subscribe(&mut shallow, "a.*.*", "s2").await;
    assert_eq!(answer["op"], "ack", "{answer}");
}

#[tokio::test]
async fn an_api_key_is_a_token_with_every_grant() {
    let server = hs256_server();
    let (mut client, welcome) = connect_with_token(&server, API_KEY).await;
    assert_eq!(welcome["authenticated"], true, "{welcome}");
    assert!(
        welcome.get("expires_at").is_none(),
        "an API key does not expire: {welcome}"
    );
    client.subscribe(">").await;
    let (message, ack) = ws_publish_to_self(&mut client, "any.topic", json!(1), "p").await;
    assert_eq!(
        (ack["seq"].clone(), message["seq"].clone()),
        (json!(1), json!(1)),
        "{ack}"
    );
}

#[tokio::test]
async fn an_expired_token_closes_the_connection_with_4002() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_leeway = Duration::ZERO;
    });
    let mut c = claims("gina", &["a"], &["a"]);
    let exp = now() + 2;
    c["exp"] = json!(exp);
    let (mut client, welcome) = connect_with_token(&server, &hs256(&c)).await;
    assert_eq!(welcome["expires_at"], exp, "no leeway: {welcome}");
    client.subscribe("a").await;
    let (_, close) = client.recv_until_close().await;
    let close = close.expect("a close frame");
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4002, "token expired")
    );
    assert!(
        now_f64() >= exp as f64 - 0.1,
        "closed at {} before the token's exp {exp}",
        now_f64()
    );
}

#[tokio::test]
async fn a_fresh_token_keeps_the_connection_and_its_grants_replace_the_old() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![API_KEY.into()];
        c.jwt_leeway = Duration::ZERO;
    });
    let mut first = claims("hana", &["a.*", "b.*"], &["a.*", "b.*"]);
    // Room for the subscribes before it expires, even on a slow machine.
    let first_exp = now() + 3;
    first["exp"] = json!(first_exp);
    let (mut client, _) = connect_with_token(&server, &hs256(&first)).await;
    client.subscribe("a.x").await;
    client.subscribe("b.*").await;
    client.subscribe("b.y").await;

    let mut second = claims("hana-2", &["a.*"], &["a.*"]);
    let second_exp = now() + 600;
    second["exp"] = json!(second_exp);
    client
        .send(json!({"op": "auth", "token": hs256(&second), "id": "re"}))
        .await;
    assert_eq!(
        client.recv().await,
        json!({"op": "ack", "id": "re", "expires_at": second_exp})
    );
    let mut ended: Vec<Value> = vec![client.recv().await, client.recv().await];
    ended.sort_by_key(|f| f["topic"].as_str().unwrap_or_default().to_owned());
    for (frame, topic) in ended.iter().zip(["b.*", "b.y"]) {
        assert_error_frame(frame, "forbidden", "an ended subscription");
        assert_eq!(frame["topic"], topic, "{frame}");
        assert!(
            frame.get("id").is_none(),
            "not the answer to a request: {frame}"
        );
    }
    let row = connection_row(&server, &client.id).await.unwrap();
    assert_eq!(
        (row["user"].clone(), row["subscriptions"].clone()),
        (json!("hana-2"), json!(1))
    );

    // Past the first token's exp, the connection is still open and serves the new grants.
    let wait = (first_exp as f64 + 1.5 - now_f64()).max(0.0);
    client.expect_silence(Duration::from_secs_f64(wait)).await;
    client.sync().await;
    let (message, ack) = ws_publish_to_self(&mut client, "a.x", json!("still here"), "p1").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(message["data"], "still here");
    let answer = ws_publish(&mut client, "b.y", json!("no longer"), "p2").await;
    assert_error_frame(&answer, "forbidden", "publish under the narrower token");
    let receipt = publish(&server, Some(API_KEY), "b.y", json!("unseen")).await;
    assert_eq!(
        receipt.body["receivers"], 0,
        "the ended subscriptions are gone: {}",
        receipt.text
    );
    client.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn connections_show_their_user() {
    let server = hs256_server();
    let (alice, _) = connect_with_token(&server, &token("alice", &[], &[])).await;
    let (anonymous, _) = access::connect(&server, Enc::Json, "", &[]).await;
    let row = connection_row(&server, &alice.id).await.unwrap();
    assert_eq!(
        (row["user"].clone(), row["authenticated"].clone()),
        (json!("alice"), json!(true)),
        "{row}"
    );
    let row = connection_row(&server, &anonymous.id).await.unwrap();
    assert_eq!(
        (row["user"].clone(), row["authenticated"].clone()),
        (Value::Null, json!(false)),
        "{row}"
    );
}

#[tokio::test]
async fn without_keys_the_server_is_open() {
    let server = TestServer::start();
    // A token is ignored, whatever it is.
    let (mut client, welcome) = connect_with_token(&server, "anything").await;
    assert_eq!(welcome["authenticated"], true, "{welcome}");
    client.subscribe(">").await;
    let (message, ack) = ws_publish_to_self(&mut client, "any.topic", json!(1), "p").await;
    assert_eq!(
        (ack["seq"].clone(), message["seq"].clone()),
        (json!(1), json!(1))
    );
    let (mut plain, welcome) = access::connect(&server, Enc::Json, "", &[]).await;
    assert_eq!(welcome["authenticated"], true, "{welcome}");
    let ack = ws_subscribe(&mut plain, "x.*", "s").await;
    assert_eq!(ack["op"], "ack");
    let receipt = publish(&server, None, "x.y", json!(2)).await;
    assert_eq!(receipt.status, 200, "{}", receipt.text);
    assert_eq!(get(&server, "/api/topics", None).await.status, 200);
    assert_eq!(get(&server, "/api/connections", None).await.status, 200);
}

/// The row of connection `id` in `GET /api/connections`, read with the API key.
async fn connection_row(server: &TestServer, id: &str) -> Option<Value> {
    let all = access::get(server, "/api/connections", Some(API_KEY)).await;
    assert_eq!(all.status, 200, "{}", all.text);
    all.body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .cloned()
}
