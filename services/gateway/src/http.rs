//! HTTP/JSON API: `POST /v1/ads`, `POST /v1/clicks`, `POST
//! /openrtb2/auction` (OpenRTB 2.5/2.6, [`crate::openrtb`]), `GET /healthz`
//! (readiness), `GET /livez` (liveness).
//!
//! Bodies are the gRPC messages' JSON form (one contract). Unknown fields,
//! wrong types, oversized bodies and malformed JSON get a 4xx whose message
//! names the field; nothing on this path panics or answers 500.

use adserve_core::Readiness;
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use serde::de::DeserializeOwned;

use crate::{
    AdServer, ServeError,
    error::{Api, record},
};

/// The HTTP router.
pub fn router(server: AdServer, body: BodyLimits, readiness: Readiness) -> Router {
    let state = HttpState { server, body, readiness };
    Router::new()
        .route("/v1/ads", post(get_ads))
        .route("/v1/clicks", post(record_click))
        .route("/openrtb2/auction", post(openrtb_auction))
        .route("/v1/clicks/redirect", get(click_redirect))
        .route("/openrtb2/billing", get(openrtb_billing))
        .route("/healthz", get(healthz))
        // Liveness: the process answers at all. Not ready is not dead.
        .route("/livez", get(|| async { "ok" }))
        // The handlers enforce the limit themselves, to answer 413 in the API's error format.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

#[derive(Clone)]
struct HttpState {
    server: AdServer,
    body: BodyLimits,
    readiness: Readiness,
}

/// 200 `ok` when ready for traffic; 503 with the reasons otherwise (a
/// dependency down, or draining for shutdown).
async fn healthz(State(state): State<HttpState>) -> axum::response::Response {
    state.readiness.healthz()
}

/// How much body a request may send, and how fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest body (`max_body_bytes`); more is 413.
    pub max_bytes: usize,
    /// Longest the whole body may take to arrive (`body_timeout`); slower is 408.
    pub timeout: std::time::Duration,
}

impl BodyLimits {
    /// The limits `config` sets.
    pub fn of(config: &crate::GatewayConfig) -> Self {
        Self { max_bytes: config.max_body_bytes, timeout: config.body_timeout }
    }
}

/// Reads the body within `limits`: more than `max_bytes` is 413; a body that
/// has not arrived within `timeout` (a trickling or stalled client holding a
/// connection) is 408; a body that cannot be read (the client broke off, a
/// malformed chunk) is 400, not 413.
async fn read_body(body: Body, limits: BodyLimits) -> Result<Bytes, ServeError> {
    use futures::StreamExt as _;
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ServeError::InvalidArgument(format!("body: could not be read: {e}")))?;
            if buf.len() + chunk.len() > limits.max_bytes {
                return Err(ServeError::TooLarge(limits.max_bytes));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(limits.timeout, read).await.map_err(|_| ServeError::BodyTimeout(limits.timeout))?
}

/// Parses a JSON body; errors name the offending field path.
fn parse<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ServeError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !json {
        return Err(ServeError::InvalidArgument("content-type: must be application/json".into()));
    }
    if body.is_empty() {
        return Err(ServeError::InvalidArgument("body: a JSON object is required".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if path == "." { inner.to_string() } else { format!("{path}: {inner}") };
        ServeError::InvalidArgument(message)
    })?;
    // One JSON value, then only whitespace: `{...}garbage` or two objects
    // back to back is a malformed request, not the first object.
    de.end().map_err(|e| ServeError::InvalidArgument(format!("body: after the JSON value: {e}")))?;
    Ok(value)
}

/// The API key the request presents (see [`crate::auth`]).
fn api_key(headers: &HeaderMap) -> Option<&str> {
    crate::auth::presented(|name| headers.get(name).and_then(|v| v.to_str().ok()))
}

/// Admits the caller, then reads and parses the body. An unknown or
/// throttled caller is refused before its body is read: it costs nothing.
async fn admitted<T: DeserializeOwned>(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
    limits: BodyLimits,
) -> Result<T, ServeError> {
    state.server.admit(api_key(headers))?;
    let bytes = read_body(body, limits).await?;
    parse(headers, &bytes)
}

async fn get_ads(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> impl IntoResponse {
    let parsed = admitted(&state, &headers, body, state.body).await;
    let result = match parsed {
        Ok(req) => state.server.serve(req, None).await.map(Json),
        Err(e) => Err(e),
    };
    record(Api::Http, "ads", &result);
    result
}

/// OpenRTB: 200 with a BidResponse, or 204 (no bid); both carry
/// `x-openrtb-version: 2.6`.
async fn openrtb_auction(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> axum::response::Response {
    // Exchanges' requests carry more than ours (eids, schain, ext): a limit of their own.
    let limits = BodyLimits { max_bytes: state.server.config().openrtb.max_body_bytes, ..state.body };
    let parsed = admitted(&state, &headers, body, limits).await;
    let result = match parsed {
        Ok(req) => state.server.openrtb(req).await,
        Err(e) => Err(e),
    };
    record(Api::Http, "openrtb", &result);
    let version = (header::HeaderName::from_static("x-openrtb-version"), header::HeaderValue::from_static("2.6"));
    match result {
        Ok(Some(bids)) => ([version], Json(bids)).into_response(),
        Ok(None) => (StatusCode::NO_CONTENT, [version]).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A click through a creative's link: 302 to the landing page. No API key
/// (a browser follows it): the click token is the credential.
async fn click_redirect(
    State(state): State<HttpState>,
    method: axum::http::Method,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let user_agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok());
    let purpose = ["sec-purpose", "purpose", "x-purpose", "x-moz"]
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .any(crate::click_filter::is_prefetch_purpose);
    let fetch = crate::click_filter::Fetch { user_agent, prefetch: method == axum::http::Method::HEAD || purpose };
    let result = match query::<adserve_proto::v1::RecordClickRequest>(&uri) {
        Ok(req) => state.server.click_through(req, fetch).await,
        Err(e) => Err(e),
    };
    record(Api::Http, "click_redirect", &result);
    match result {
        Ok(landing) => match header::HeaderValue::from_str(&landing) {
            Ok(location) => (
                StatusCode::FOUND,
                [(header::LOCATION, location), (header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"))],
            )
                .into_response(),
            Err(_) => ServeError::NotFound("the ad's landing URL is not a valid header value".into()).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// A GET route's query string, or a 400 naming what is wrong with it.
fn query<T: serde::de::DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, ServeError> {
    axum::extract::Query::<T>::try_from_uri(uri)
        .map(|axum::extract::Query(q)| q)
        .map_err(|e| ServeError::InvalidArgument(format!("query: {}", e.body_text())))
}

/// An exchange's billing notice (a bid's `burl`): 204 once logged.
async fn openrtb_billing(State(state): State<HttpState>, uri: axum::http::Uri) -> axum::response::Response {
    let result = match query::<crate::openrtb::BillingNotice>(&uri) {
        Ok(notice) => state.server.openrtb_billing(notice).await,
        Err(e) => Err(e),
    };
    record(Api::Http, "openrtb_billing", &result);
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn record_click(State(state): State<HttpState>, headers: HeaderMap, body: Body) -> impl IntoResponse {
    let parsed = admitted(&state, &headers, body, state.body).await;
    let result = match parsed {
        Ok(req) => state.server.click(req).await.map(|r| (StatusCode::ACCEPTED, Json(r))),
        Err(e) => Err(e),
    };
    record(Api::Http, "clicks", &result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    #[derive(Debug, serde::Deserialize)]
    struct Thing {
        #[allow(dead_code)]
        a: i32,
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_a_400_not_a_413() {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            vec![Ok(Bytes::from_static(b"{\"a\":")), Err(std::io::Error::other("connection reset"))];
        let body = Body::from_stream(futures::stream::iter(chunks));
        let err = read_body(body, limits(1024)).await.unwrap_err();
        assert!(matches!(&err, ServeError::InvalidArgument(m) if m.starts_with("body: could not be read")), "{err}");
        let big = Body::from(vec![b' '; 2048]);
        assert!(matches!(read_body(big, limits(1024)).await.unwrap_err(), ServeError::TooLarge(1024)));
        assert_eq!(read_body(Body::from("{}"), limits(2)).await.unwrap(), Bytes::from_static(b"{}"));
    }

    fn limits(max_bytes: usize) -> BodyLimits {
        BodyLimits { max_bytes, timeout: std::time::Duration::from_secs(5) }
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_a_408_after_the_body_timeout() {
        let first: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from_static(b"{\"a\":"))];
        let stalled = futures::stream::iter(first).chain(futures::stream::pending());
        let limits = BodyLimits { max_bytes: 1024, timeout: std::time::Duration::from_millis(50) };
        let err = read_body(Body::from_stream(stalled), limits).await.unwrap_err();
        assert!(matches!(err, ServeError::BodyTimeout(t) if t == limits.timeout), "{err}");
        assert_eq!(err.kind().http_status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.to_string(), "body: not received within 50 ms");
    }

    #[test]
    fn bytes_after_the_json_value_are_refused() {
        let h = HeaderMap::new();
        assert!(parse::<Thing>(&h, &Bytes::from_static(b" {\"a\": 1}\n ")).is_ok());
        for bad in [&b"{\"a\": 1}x"[..], b"{\"a\": 1}{\"a\": 2}", b"{\"a\": 1} 7"] {
            let err = parse::<Thing>(&h, &Bytes::copy_from_slice(bad)).unwrap_err();
            assert!(err.to_string().starts_with("body: after the JSON value"), "{err}");
        }
    }
}
