//! The dashboard's files, embedded in the binary: served with their content types, revalidated
//! with strong ETags (304 on a match), open even when the API requires a credential.

mod common;

use common::*;
use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file the page loads, its content type, and a piece of text it must contain.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        HTML,
        "<script type=\"module\" src=\"dashboard/app.js\">",
    ),
    ("/dashboard/app.js", JAVASCRIPT, "from \"../crier.js\""),
    ("/dashboard/style.css", CSS, ".badge.connected"),
    (
        "/dashboard/vendor/uPlot.esm.js",
        JAVASCRIPT,
        "export { uPlot as default }",
    ),
    ("/dashboard/vendor/uPlot.min.css", CSS, ".uplot"),
    (
        "/dashboard/vendor/uPlot.LICENSE",
        "text/plain; charset=utf-8",
        "MIT",
    ),
    ("/crier.js", JAVASCRIPT, "export class Crier"),
];

#[tokio::test]
async fn every_file_is_served_with_its_type_and_revalidated_by_etag() {
    let server = TestServer::start();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut etags = Vec::new();
    for &(path, content_type, needle) in FILES {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let headers = response.headers().clone();
        assert_eq!(headers[CONTENT_TYPE], content_type, "{path}");
        assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let etag = headers[ETAG].to_str().unwrap().to_owned();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
            "{path}: a strong ETag, not {etag}"
        );
        let body = response.bytes().await.unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains(needle),
            "{path} holds {needle:?}"
        );
        // The bytes are the repository's files, as built.
        let source = match path {
            "/" => repo.join("dashboard/index.html"),
            "/crier.js" => repo.join("clients/js/crier.js"),
            other => repo.join(other.trim_start_matches('/')),
        };
        let file = std::fs::read(&source).unwrap();
        assert!(
            body == file,
            "{path}: {} bytes served, {} in {} (changed since the build?)",
            body.len(),
            file.len(),
            source.display()
        );

        for presented in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".to_owned(),
        ] {
            let again = server
                .http
                .get(server.url(path))
                .header(IF_NONE_MATCH, &presented)
                .send()
                .await
                .unwrap();
            assert_eq!(
                again.status(),
                StatusCode::NOT_MODIFIED,
                "{path} with If-None-Match: {presented}"
            );
            assert_eq!(again.headers()[ETAG], etag.as_str(), "{path}");
            assert_eq!(again.headers()[CACHE_CONTROL], "no-cache", "{path}");
            assert!(
                again.bytes().await.unwrap().is_empty(),
                "{path}: a 304 has no body"
            );
        }
        let stale = server
            .http
            .get(server.url(path))
            .header(IF_NONE_MATCH, "\"0-0000000000000000\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), StatusCode::OK, "{path} with another ETag");
        etags.push(etag);
    }
    let mut distinct = etags.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), etags.len(), "one ETag per file: {etags:?}");
}

#[tokio::test]
async fn the_page_restricts_what_it_loads_and_who_frames_it() {
    let server = TestServer::start();
    let response = server.http.get(server.url("/")).send().await.unwrap();
    let policy = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    for directive in [
        "default-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
}

#[tokio::test]
async fn other_paths_and_methods_answer_json_errors() {
    let server = TestServer::start();
    for path in [
        "/index.html",
        "/dashboard/",
        "/dashboard/vendor/nothing.js",
        "/dashboard/../Cargo.toml",
    ] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let response = server.http.post(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn the_page_stays_open_when_the_api_requires_a_credential() {
    let server = TestServer::with(|config| config.api_keys = vec!["operator-key".into()]);
    for &(path, content_type, _) in FILES {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(response.headers()[CONTENT_TYPE], content_type, "{path}");
    }
    let api = server
        .http
        .get(server.url("/api/topics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        api.status(),
        StatusCode::UNAUTHORIZED,
        "the data stays closed"
    );
}
