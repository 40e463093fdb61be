//! Admission control for every server: at most `server.max_concurrent_requests`
//! requests in flight per listener, the rest shed at once (gRPC
//! RESOURCE_EXHAUSTED, HTTP 503) instead of queueing behind the ones already
//! late; and `server.request_timeout`, the longest any request may run
//! whatever deadline its caller sent. Health checks (gRPC health, `/healthz`,
//! `/livez`) and reflection are never shed: an overloaded process is busy,
//! not dead, and must not be restarted for it.
//!
//! The gRPC side is a tower [`Layer`] on the tonic server; the HTTP side is
//! axum middleware over the same [`Gate`].

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

/// Requests served without admission control.
pub fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.")
        || path == "/healthz"
        || path == "/livez"
        || path == "/metrics"
        || path == "/buildinfo"
}

/// The in-flight budget of one listener.
#[derive(Debug, Clone)]
pub struct Gate {
    permits: Arc<Semaphore>,
    limit: usize,
    listener: &'static str,
}

impl Gate {
    /// A gate admitting `limit` requests at once on `listener` ("grpc", "http").
    pub fn new(listener: &'static str, limit: usize) -> Self {
        Self { permits: Arc::new(Semaphore::new(limit)), limit, listener }
    }

    /// A permit for one request, or `None` (counted) when the budget is spent.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            metrics::counter!("adserve_server_shed_total", "listener" => self.listener).increment(1);
        }
        permit
    }

    /// Why a request was shed.
    pub fn overloaded_message(&self) -> String {
        format!(
            "overloaded: {} requests already in flight (server.max_concurrent_requests); retry with backoff",
            self.limit
        )
    }
}

/// Tower layer applying a [`Gate`] to a tonic server.
#[derive(Debug, Clone)]
pub struct GrpcGateLayer(pub Gate);

impl<S> Layer<S> for GrpcGateLayer {
    type Service = GrpcGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcGate { inner, gate: self.0.clone() }
    }
}

/// See [`GrpcGateLayer`].
#[derive(Debug, Clone)]
pub struct GrpcGate<S> {
    inner: S,
    gate: Gate,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> Service<http::Request<B>> for GrpcGate<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if exempt(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        match self.gate.admit() {
            Some(permit) => {
                let call = self.inner.call(req);
                Box::pin(async move {
                    let response = call.await;
                    drop(permit);
                    response
                })
            }
            None => {
                let status = tonic::Status::resource_exhausted(self.gate.overloaded_message());
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// `Retry-After` of a shed HTTP request, in seconds.
pub const RETRY_AFTER_SECONDS: &str = "1";

/// State of [`http_admission`].
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// The in-flight budget.
    pub gate: Gate,
    /// Longest a request may run.
    pub timeout: Duration,
}

fn json_error(status: axum::http::StatusCode, code: &str, message: String) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, axum::Json(body)).into_response()
}

/// Axum middleware: admission through the gate (503 `overloaded` when the
/// budget is spent) and the request timeout (504 `timeout`), both in the
/// API's JSON error format.
pub async fn http_admission(
    axum::extract::State(limits): axum::extract::State<HttpLimits>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let Some(permit) = limits.gate.admit() else {
        let mut shed =
            json_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, "overloaded", limits.gate.overloaded_message());
        // Shedding is momentary: say when to come back, so clients back off
        // instead of retrying at once into the same full gate.
        shed.headers_mut()
            .insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(RETRY_AFTER_SECONDS));
        return shed;
    };
    let response = tokio::time::timeout(limits.timeout, next.run(req)).await;
    drop(permit);
    response.unwrap_or_else(|_| {
        metrics::counter!("adserve_server_timeouts_total", "listener" => "http").increment(1);
        json_error(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer within {} ms (server.request_timeout)", limits.timeout.as_millis()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_up_to_its_limit_and_frees_on_drop() {
        let gate = Gate::new("test", 2);
        let a = gate.admit().expect("first");
        let _b = gate.admit().expect("second");
        assert!(gate.admit().is_none(), "the third is shed");
        drop(a);
        assert!(gate.admit().is_some(), "a finished request frees its slot");
    }

    #[test]
    fn probes_are_exempt_and_api_calls_are_not() {
        assert!(exempt("/grpc.health.v1.Health/Check"));
        assert!(exempt("/healthz"));
        assert!(!exempt("/adserve.v1.RankerService/Score"));
        assert!(!exempt("/v1/ads"));
    }
}
