//! Credentials on HTTP: API keys, JWT publish and history grants, the metrics token, allowed
//! origins at the WebSocket handshake, and `crier_refused_total` counting every refusal.

mod access;
mod common;

use std::time::Duration;

use access::*;
use common::*;
use serde_json::json;

const KEY_ONE: &str = "first-api-key";
const KEY_TWO: &str = "second-api-key";
const METRICS_TOKEN: &str = "metrics-scraper-token";

#[tokio::test]
async fn api_keys_guard_every_api_route() {
    let server = TestServer::with(|c| c.api_keys = vec![KEY_ONE.into(), KEY_TWO.into()]);
    let batch = json!([{"topic": "a", "data": 1}]);

    // Refused requests publish nothing.
    for (method, path) in [
        ("POST", "/api/topics/a"),
        ("POST", "/api/publish"),
        ("GET", "/api/topics"),
        ("GET", "/api/topics/a/history"),
        ("GET", "/api/connections"),
    ] {
        let body = if path == "/api/publish" {
            batch.clone()
        } else {
            json!(1)
        };
        let send = |authorization: Option<&'static str>| {
            let mut request = match method {
                "POST" => server.http.post(server.url(path)).json(&body),
                _ => server.http.get(server.url(path)),
            };
            if let Some(a) = authorization {
                request = request.header("Authorization", a);
            }
            request
        };
        let missing = answer_of(send(None)).await;
        missing.assert_error(
            401,
            "unauthorized",
            &format!("{method} {path} without a key"),
        );
        let wrong = answer_of(send(Some("Bearer not-a-key"))).await;
        wrong.assert_error(
            401,
            "invalid_token",
            &format!("{method} {path} with a wrong key"),
        );
        let prefix = answer_of(send(Some("Bearer first-api-ke"))).await;
        prefix.assert_error(
            401,
            "invalid_token",
            &format!("{method} {path} with a key's prefix"),
        );
        let scheme = answer_of(send(Some("Basic Zmlyc3QtYXBpLWtleQ=="))).await;
        scheme.assert_error(401, "unauthorized", &format!("{method} {path} with Basic"));
    }
    assert_eq!(
        get(&server, "/api/topics", Some(KEY_ONE)).await.body["topics"],
        json!([]),
        "the refused publishes published nothing"
    );

    // Both keys work on every route.
    for (i, key) in [KEY_ONE, KEY_TWO].into_iter().enumerate() {
        let one = publish(&server, Some(key), "a", json!("one")).await;
        assert_eq!(
            (one.status, one.body["seq"].clone()),
            (200, json!(2 * i + 1)),
            "{}",
            one.text
        );
        let many = post(&server, "/api/publish", Some(key), &batch).await;
        assert_eq!(
            (many.status, many.body["results"][0]["seq"].clone()),
            (200, json!(2 * i + 2)),
            "{}",
            many.text
        );
        for path in ["/api/topics", "/api/topics/a/history", "/api/connections"] {
            let answer = get(&server, path, Some(key)).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.text);
        }
    }
    let history = get(&server, "/api/topics/a/history", Some(KEY_TWO)).await;
    assert_eq!(history.body["seq"], 4, "{}", history.text);

    // Health and metrics are not part of the API.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(get(&server, path, None).await.status, 200, "{path}");
    }
}

async fn answer_of(request: reqwest::RequestBuilder) -> Answer {
    access::answer(request.send().await.unwrap()).await
}

#[tokio::test]
async fn a_jwt_publishes_over_http_where_its_grants_allow() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![KEY_ONE.into()];
    });
    let (mut watcher, _) = connect_with_token(&server, KEY_ONE).await;
    watcher.subscribe(">").await;
    let jwt = token("pub", &["chat.room1"], &["chat.*"]);

    let ok = publish(&server, Some(&jwt), "chat.room1", json!("granted")).await;
    assert_eq!(
        (ok.status, ok.body["seq"].clone()),
        (200, json!(1)),
        "{}",
        ok.text
    );
    publish(&server, Some(&jwt), "notify.x", json!("no"))
        .await
        .assert_error(403, "forbidden", "publish outside the grant");
    publish(&server, Some(&jwt), "chat.room1.deeper", json!("no"))
        .await
        .assert_error(403, "forbidden", "a topic one segment deeper than chat.*");

    let batch = post(
        &server,
        "/api/publish",
        Some(&jwt),
        &json!([{"topic": "chat.a", "data": 1}, {"topic": "chat.b", "data": 2}]),
    )
    .await;
    assert_eq!(batch.status, 200, "{}", batch.text);
    // All or nothing: one item outside the grant refuses the whole batch.
    post(
        &server,
        "/api/publish",
        Some(&jwt),
        &json!([{"topic": "chat.a", "data": "refused"}, {"topic": "notify.x", "data": "refused"}]),
    )
    .await
    .assert_error(403, "forbidden", "a batch with one item outside the grant");
    let after = publish(&server, Some(&jwt), "chat.a", json!("after")).await;
    assert_eq!(
        after.body["seq"], 2,
        "the refused batch consumed no seq on chat.a: {}",
        after.text
    );

    let mut seen = Vec::new();
    for _ in 0..4 {
        let m = watcher.recv().await;
        seen.push((m["topic"].as_str().unwrap().to_owned(), m["data"].clone()));
    }
    assert_eq!(
        seen,
        [
            ("chat.room1".to_owned(), json!("granted")),
            ("chat.a".to_owned(), json!(1)),
            ("chat.b".to_owned(), json!(2)),
            ("chat.a".to_owned(), json!("after")),
        ]
    );
    watcher.expect_silence(Duration::from_millis(200)).await;

    // Without publish grants, or expired, a token publishes nothing.
    let reader = token("reader", &["chat.*"], &[]);
    publish(&server, Some(&reader), "chat.room1", json!("no"))
        .await
        .assert_error(403, "forbidden", "a token without publish grants");
    let mut expired = claims("pub", &[], &["chat.*"]);
    expired["exp"] = json!(now() - 60);
    publish(&server, Some(&hs256(&expired)), "chat.room1", json!("no"))
        .await
        .assert_error(401, "invalid_token", "an expired token");

    // The whole-broker views need an API key.
    for path in ["/api/topics", "/api/connections"] {
        get(&server, path, Some(&jwt)).await.assert_error(
            403,
            "forbidden",
            &format!("{path} with a token"),
        );
        assert_eq!(
            get(&server, path, Some(KEY_ONE)).await.status,
            200,
            "{path}"
        );
    }

    // History needs a subscribe grant covering the topic.
    let history = get(&server, "/api/topics/chat.room1/history", Some(&jwt)).await;
    assert_eq!(history.status, 200, "{}", history.text);
    assert_eq!(
        history.body["messages"],
        json!([{"seq": 1, "data": "granted"}])
    );
    get(&server, "/api/topics/chat.a/history", Some(&jwt))
        .await
        .assert_error(
            403,
            "forbidden",
            "history of a topic granted for publish only",
        );
    let wide = get(&server, "/api/topics/chat.a/history", Some(&reader)).await;
    assert_eq!(wide.status, 200, "chat.* covers chat.a: {}", wide.text);
    assert_eq!(
        get(&server, "/api/topics/chat.a/history", Some(KEY_ONE))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn the_metrics_token_guards_metrics_and_nothing_else() {
    let server = TestServer::with(|c| c.metrics_token = Some(METRICS_TOKEN.into()));
    get(&server, "/metrics", None).await.assert_error(
        401,
        "unauthorized",
        "/metrics without a token",
    );
    get(&server, "/metrics", Some("wrong-token"))
        .await
        .assert_error(401, "unauthorized", "/metrics with a wrong token");
    get_authorized(&server, "/metrics", "Basic bWV0cmljcw==")
        .await
        .assert_error(401, "unauthorized", "/metrics with Basic");
    let metrics = get(&server, "/metrics", Some(METRICS_TOKEN)).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.text.contains("crier_refused_total"),
        "{}",
        metrics.text
    );
    assert_eq!(
        get(&server, "/healthz", None).await.body,
        json!({"status": "ok"})
    );
    assert_eq!(
        get(&server, "/readyz", None).await.body,
        json!({"status": "ready"})
    );
    // Without API keys the API stays open; the metrics token is not needed there.
    assert_eq!(get(&server, "/api/topics", None).await.status, 200);

    // An API key does not open /metrics.
    let keyed = TestServer::with(|c| {
        c.metrics_token = Some(METRICS_TOKEN.into());
        c.api_keys = vec![KEY_ONE.into()];
    });
    get(&keyed, "/metrics", Some(KEY_ONE)).await.assert_error(
        401,
        "unauthorized",
        "/metrics with an API key",
    );
    assert_eq!(
        get(&keyed, "/metrics", Some(METRICS_TOKEN)).await.status,
        200
    );
    get(&keyed, "/api/topics", Some(METRICS_TOKEN))
        .await
        .assert_error(401, "invalid_token", "the API with the metrics token");
    assert_eq!(get(&keyed, "/healthz", None).await.status, 200);
    assert_eq!(get(&keyed, "/readyz", None).await.status, 200);
}

/// The status (and error code) a handshake with this `Origin` header, if any, gets; 101 when it
/// opens.
async fn status(server: &TestServer, origin: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    let answer = handshake(server, "", &headers).await.answer;
    (answer.status, answer.code().to_owned())
}

#[tokio::test]
async fn allowed_origins_decide_which_pages_may_connect() {
    let server = TestServer::with(|c| c.allowed_origins = vec!["https://app.example".into()]);
    let own = format!("http://{}", server.addr);
    let own_by_name = format!("http://localhost:{}", server.addr.port());
    let forbidden = (403, "origin_not_allowed".to_owned());
    let opened = (101, String::new());
    let cases = [
        ("no Origin", None, &opened),
        ("a listed origin", Some("https://app.example"), &opened),
        (
            "a listed origin, other case",
            Some("https://APP.example"),
            &opened,
        ),
        ("the page's own origin", Some(own.as_str()), &opened),
        ("another origin", Some("https://evil.example"), &forbidden),
        (
            "a listed host on another scheme",
            Some("http://app.example"),
            &forbidden,
        ),
        (
            "a listed host on another port",
            Some("https://app.example:8443"),
            &forbidden,
        ),
        (
            "a listed name as a prefix",
            Some("https://app.example.evil"),
            &forbidden,
        ),
        (
            "another name for this host",
            Some(own_by_name.as_str()),
            &forbidden,
        ),
        ("the opaque origin", Some("null"), &forbidden),
    ];
    for (what, origin, expected) in cases {
        assert_eq!(&status(&server, origin).await, expected, "{what}");
    }
    let refusal = handshake(&server, "", &[("Origin", "https://evil.example")]).await;
    refusal
        .answer
        .assert_error(403, "origin_not_allowed", "a foreign page");
    let scrape = scrape(&server, None).await;
    let refusals = cases.iter().filter(|c| *c.2 == forbidden).count() + 1;
    assert_eq!(refused(&scrape, "origin"), refusals as f64);

    let any = TestServer::with(|c| c.allowed_origins = vec!["*".into()]);
    assert_eq!(status(&any, Some("https://evil.example")).await, opened);
    assert_eq!(status(&any, None).await, opened);

    // With no list, only the page's own origin is allowed.
    let default = TestServer::start();
    let own = format!("http://{}", default.addr);
    assert_eq!(
        status(&default, Some("https://evil.example")).await,
        forbidden
    );
    assert_eq!(status(&default, Some(&own)).await, opened);
    assert_eq!(status(&default, None).await, opened);
    let own_on_https = format!("https://{}", default.addr);
    assert_eq!(
        status(&default, Some(&own_on_https)).await,
        forbidden,
        "a page of another scheme is another origin"
    );
    // A DNS-rebinding page: its name now points at this server, and the browser sends that
    // name as both Host and Origin. Only origins addressed by IP or localhost are the server's own.
    let rebound = format!("evil.example:{}", default.addr.port());
    let answer = handshake(
        &default,
        "",
        &[("Host", &rebound), ("Origin", &format!("http://{rebound}"))],
    )
    .await;
    answer
        .answer
        .assert_error(403, "origin_not_allowed", "a rebound host name");
}

/// Waits until the server holds no WebSocket connection, so that the next step starts with
/// every connection place free.
async fn no_connections(server: &TestServer) {
    eventually("every connection to be gone", || async {
        let all = get(server, "/api/connections", Some(KEY_ONE)).await;
        all.body["connections"]
            .as_array()
            .is_some_and(|c| c.is_empty())
            .then_some(())
    })
    .await;
}

/// Every `crier_refused_total` series of a scrape, by reason.
fn refusals(scrape: &Scrape) -> Vec<(String, f64)> {
    let mut all: Vec<(String, f64)> = scrape
        .series
        .iter()
        .filter_map(|(series, value)| {
            let reason = series.strip_prefix("crier_refused_total{reason=\"")?;
            Some((reason.trim_end_matches("\"}").to_owned(), *value))
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Asserts that since `before`, `reason` was counted once more and no other reason changed;
/// returns the new counts.
async fn counted_once(
    server: &TestServer,
    before: &[(String, f64)],
    reason: &str,
    step: &str,
) -> Vec<(String, f64)> {
    let expected: Vec<(String, f64)> = before
        .iter()
        .map(|(r, v)| (r.clone(), if r == reason { v + 1.0 } else { *v }))
        .collect();
    assert!(
        before.iter().any(|(r, _)| r == reason),
        "no reason {reason} in {before:?}"
    );
    // Some refusals are counted by a connection's own clock.
    let patience = eventually_within(step, Duration::from_secs(5), || async {
        let now = refusals(&scrape(server, Some(METRICS_TOKEN)).await);
        (now != before).then_some(now)
    });
    let now = patience.await;
    assert_eq!(
        now, expected,
        "{step}: counted as {reason}, once, and nothing else"
    );
    now
}

#[tokio::test]
async fn every_refusal_is_counted_by_reason() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![KEY_ONE.into()];
        c.metrics_token = Some(METRICS_TOKEN.into());
        c.allowed_origins = vec!["https://app.example".into()];
        c.auth_timeout = Duration::from_secs(2);
        c.publish_rate = 1;
        c.max_bad_frames = 3;
        c.max_connections = 3;
        c.max_connections_per_ip = 2;
    });
    let jwt = token("u", &["chat.*"], &["chat.*"]);
    let mut counts = refusals(&scrape(&server, Some(METRICS_TOKEN)).await);
    assert_eq!(
        counts.len(),
        9,
        "every reason is exported from the start: {counts:?}"
    );
    assert!(counts.iter().all(|(_, v)| *v == 0.0), "{counts:?}");

    // At the handshake.
    handshake(&server, "", &[("Origin", "https://evil.example")])
        .await
        .answer
        .assert_error(403, "origin_not_allowed", "a foreign page");
    counts = counted_once(&server, &counts, "origin", "a foreign page").await;
    handshake(&server, "?token=nonsense", &[])
        .await
        .answer
        .assert_error(401, "invalid_token", "a bad token");
    counts = counted_once(
        &server,
        &counts,
        "invalid_token",
        "a bad token at the handshake",
    )
    .await;
    handshake(&server, "?subscribe=chat.a", &[])
        .await
        .answer
        .assert_error(401, "unauthorized", "?subscribe= without a token");
    counts = counted_once(
        &server,
        &counts,
        "unauthorized",
        "?subscribe= without a token",
    )
    .await;
    handshake(&server, &format!("?token={jwt}&subscribe=notify.x"), &[])
        .await
        .answer
        .assert_error(403, "forbidden", "?subscribe= outside the grant");
    counts = counted_once(
        &server,
        &counts,
        "forbidden",
        "?subscribe= outside the grant",
    )
    .await;

    // Over HTTP.
    publish(&server, None, "chat.a", json!(1))
        .await
        .assert_error(401, "unauthorized", "no credentials");
    counts = counted_once(
        &server,
        &counts,
        "unauthorized",
        "an HTTP publish without credentials",
    )
    .await;
    publish(&server, Some("nonsense"), "chat.a", json!(1))
        .await
        .assert_error(401, "invalid_token", "a bad bearer");
    counts = counted_once(
        &server,
        &counts,
        "invalid_token",
        "an HTTP publish with a bad bearer",
    )
    .await;
    publish(&server, Some(&jwt), "notify.x", json!(1))
        .await
        .assert_error(403, "forbidden", "outside the grant");
    counts = counted_once(
        &server,
        &counts,
        "forbidden",
        "an HTTP publish outside the grant",
    )
    .await;
    get(&server, "/api/connections", Some(&jwt))
        .await
        .assert_error(403, "forbidden", "a token on an operator route");
    counts = counted_once(&server, &counts, "forbidden", "a token on /api/connections").await;
    get(&server, "/api/topics/notify.x/history", Some(&jwt))
        .await
        .assert_error(403, "forbidden", "history outside the grant");
    counts = counted_once(&server, &counts, "forbidden", "history outside the grant").await;
    get(&server, "/metrics", None).await.assert_error(
        401,
        "unauthorized",
        "metrics without the token",
    );
    counts = counted_once(
        &server,
        &counts,
        "unauthorized",
        "/metrics without the token",
    )
    .await;

    // Over a WebSocket, one connection at a time.
    {
        let (mut anonymous, _) = access::connect(&server, Enc::Json, "", &[]).await;
        let answer = ws_subscribe(&mut anonymous, "chat.a", "s").await;
        assert_error_frame(&answer, "unauthorized", "an op before auth");
        counts = counted_once(
            &server,
            &counts,
            "unauthorized",
            "a WebSocket op before auth",
        )
        .await;
        let answer = request(
            &mut anonymous,
            json!({"op": "auth", "token": "nonsense", "id": "a"}),
        )
        .await;
        assert_error_frame(&answer, "invalid_token", "a bad auth frame");
        counts = counted_once(&server, &counts, "invalid_token", "a bad auth frame").await;
        let (_, close) = anonymous.recv_until_close().await;
        assert_eq!(close_code(&close), 4003);
        counts = counted_once(&server, &counts, "auth_timeout", "no auth in time").await;
    }
    no_connections(&server).await;
    {
        let (mut client, _) = connect_with_token(&server, &jwt).await;
        let answer = ws_subscribe(&mut client, "notify.x", "s").await;
        assert_error_frame(&answer, "forbidden", "a subscribe outside the grant");
        counts = counted_once(
            &server,
            &counts,
            "forbidden",
            "a WebSocket subscribe outside the grant",
        )
        .await;
        let answer = ws_publish(&mut client, "notify.x", json!(1), "p0").await;
        assert_error_frame(&answer, "forbidden", "a publish outside the grant");
        counts = counted_once(
            &server,
            &counts,
            "forbidden",
            "a WebSocket publish outside the grant",
        )
        .await;
        // Rate 1/s, burst 1: of two publishes sent together, the second is over the rate.
        client
            .send(json!({"op": "publish", "topic": "chat.a", "data": 1, "id": "p1"}))
            .await;
        client
            .send(json!({"op": "publish", "topic": "chat.a", "data": 2, "id": "p2"}))
            .await;
        assert_eq!(client.recv().await["op"], "ack");
        assert_error_frame(&client.recv().await, "rate_limited", "the second publish");
        counts = counted_once(&server, &counts, "rate_limited", "a publish over the rate").await;
        // The third bad frame (the two forbidden ones counted) closes the connection.
        client
            .send_raw(tokio_tungstenite::tungstenite::Message::text("{oops"))
            .await;
        let (frames, close) = client.recv_until_close().await;
        assert_error_frame(&frames[0], "bad_frame", "malformed JSON");
        assert_eq!(close_code(&close), 1008);
        counts = counted_once(&server, &counts, "bad_frames", "too many bad frames").await;
    }
    no_connections(&server).await;

    // Connection limits: two per address, three in all.
    let (_a1, _) = connect_from_ip(&server, "127.0.0.1", &format!("?token={jwt}")).await;
    let (_a2, _) = connect_from_ip(&server, "127.0.0.1", &format!("?token={jwt}")).await;
    handshake_from(&server, "127.0.0.1", &format!("?token={jwt}"), &[])
        .await
        .answer
        .assert_error(
            429,
            "too_many_connections",
            "a third connection from one address",
        );
    counts = counted_once(
        &server,
        &counts,
        "max_connections_per_ip",
        "a third from one address",
    )
    .await;
    let (_b1, _) = connect_from_ip(&server, "127.0.0.2", &format!("?token={jwt}")).await;
    handshake_from(&server, "127.0.0.3", &format!("?token={jwt}"), &[])
        .await
        .answer
        .assert_error(503, "too_many_connections", "a fourth connection");
    counts = counted_once(&server, &counts, "max_connections", "a fourth in all").await;
    assert!(
        counts.iter().all(|(_, v)| *v > 0.0),
        "every reason was seen: {counts:?}"
    );
}

/// A malformed `Authorization` header (not `Bearer <token>`) is refused with 401 `unauthorized`
/// like a missing one, and counted like one, wherever it is presented.
#[tokio::test]
async fn a_malformed_authorization_header_is_counted_as_unauthorized() {
    let server = TestServer::with(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.api_keys = vec![KEY_ONE.into()];
        c.metrics_token = Some(METRICS_TOKEN.into());
    });
    let unauthorized = |s: &Scrape| refused(s, "unauthorized");
    let mut counted = Vec::new();
    for place in ["the handshake", "the API", "/metrics"] {
        let before = unauthorized(&scrape(&server, Some(METRICS_TOKEN)).await);
        let answer = match place {
            "the handshake" => {
                handshake(&server, "", &[("Authorization", "Basic dTpw")])
                    .await
                    .answer
            }
            "the API" => get_authorized(&server, "/api/topics", "Basic dTpw").await,
            _ => get_authorized(&server, "/metrics", "Basic dTpw").await,
        };
        answer.assert_error(
            401,
            "unauthorized",
            &format!("Basic credentials at {place}"),
        );
        // A refusal is counted before its answer is sent.
        let after = unauthorized(&scrape(&server, Some(METRICS_TOKEN)).await);
        counted.push((place, after - before));
    }
    assert_eq!(
        counted,
        [("the handshake", 1.0), ("the API", 1.0), ("/metrics", 1.0)],
        "each 401 unauthorized is counted once"
    );
}
