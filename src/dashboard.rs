//! The operator dashboard: the page at `/`, its script, style and vendored chart library
//! (`dashboard/` at the top of the repository), and the JavaScript client at `/crier.js`
//! (`clients/js/crier.js`), embedded in the binary so that serving them needs no files and no
//! network. Each answer carries its content type, `Cache-Control: no-cache` and a strong `ETag`
//! made from the bytes, so browsers revalidate and get a 304 while the binary is the same.
//!
//! The page holds no data (it reads the HTTP API and `_crier.stats` with the operator's
//! credential), so these routes stay open when authentication is configured.

use std::sync::LazyLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};

use crate::api;

const HTML: &str = "text/html; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The page may load only its own files and talk only to the broker that served it.
const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; \
     connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: HTML,
        bytes: include_bytes!("../dashboard/index.html"),
    },
    Asset {
        path: "/dashboard/app.js",
        content_type: JAVASCRIPT,
        bytes: include_bytes!("../dashboard/app.js"),
    },
    Asset {
        path: "/dashboard/style.css",
        content_type: CSS,
        bytes: include_bytes!("../dashboard/style.css"),
    },
    Asset {
        path: "/dashboard/vendor/uPlot.esm.js",
        content_type: JAVASCRIPT,
        bytes: include_bytes!("../dashboard/vendor/uPlot.esm.js"),
    },
    Asset {
        path: "/dashboard/vendor/uPlot.min.css",
        content_type: CSS,
        bytes: include_bytes!("../dashboard/vendor/uPlot.min.css"),
    },
    Asset {
        path: "/dashboard/vendor/uPlot.LICENSE",
        content_type: TEXT,
        bytes: include_bytes!("../dashboard/vendor/uPlot.LICENSE"),
    },
    Asset {
        path: "/crier.js",
        content_type: JAVASCRIPT,
        bytes: include_bytes!("../clients/js/crier.js"),
    },
];

/// Each asset's `ETag`, in the order of [`ASSETS`], computed once.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| HeaderValue::from_str(&etag(asset.bytes)).expect("an ETag is printable ASCII"))
        .collect()
});

pub(crate) fn routes(cfg: &mut web::ServiceConfig) {
    for (index, asset) in ASSETS.iter().enumerate() {
        cfg.service(
            api::resource(asset.path)
                .route(web::get().to(move |req: HttpRequest| async move { serve(&req, index) })),
        );
    }
}

fn serve(req: &HttpRequest, index: usize) -> HttpResponse {
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let fresh = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .any(|value| value.to_str().is_ok_and(|tags| matches(tags, etag)));
    let mut response = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::ETAG, etag.clone()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if asset.content_type == HTML {
        response
            .insert_header((header::CONTENT_SECURITY_POLICY, PAGE_POLICY))
            .insert_header((header::REFERRER_POLICY, "no-referrer"));
    }
    if fresh {
        return response.finish();
    }
    response
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .body(asset.bytes)
}

/// Whether an `If-None-Match` value (`*` or a list of entity tags) names `etag`. The
/// comparison is the weak one RFC 9110 prescribes for it: `W/"x"` matches `"x"`.
fn matches(tags: &str, etag: &HeaderValue) -> bool {
    let ours = etag.as_bytes();
    tags.split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag).as_bytes() == ours)
}

/// A strong entity tag for `bytes`: their length and 64-bit FNV-1a hash, which changes with
/// any edit to a file (the tags only need to tell one build's files from another's).
fn etag(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("\"{:x}-{hash:016x}\"", bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_compares_weakly_and_takes_lists_and_a_star() {
        let etag = HeaderValue::from_static("\"5-abc\"");
        assert!(matches("\"5-abc\"", &etag));
        assert!(matches("W/\"5-abc\"", &etag));
        assert!(matches("\"x\", \"5-abc\"", &etag));
        assert!(matches("*", &etag));
        assert!(!matches("\"5-abd\"", &etag));
        assert!(!matches("", &etag));
    }

    #[test]
    fn etags_differ_with_the_bytes_and_every_path_is_distinct() {
        assert_ne!(etag(b"a"), etag(b"b"));
        assert_ne!(etag(b""), etag(b"\0"));
        let mut paths: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ASSETS.len());
    }
}
