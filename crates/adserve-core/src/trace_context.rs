//! One trace per ad request across every service: W3C `traceparent` in, a
//! server span per request, `traceparent` out on every gRPC call made inside
//! it.
//!
//! Every gRPC server (through [`GrpcTraceLayer`], in [`crate::grpc::serve`])
//! and the gateway's HTTP router ([`http_trace`]) open a span per request
//! whose parent is the caller's `traceparent`, if it sent one. A client
//! stamps its current span onto an outgoing call with [`inject`]. With
//! `telemetry.otlp_endpoint` set, the spans are exported over OTLP, so a
//! collector sees the gateway's request, its hops, and the feature-service,
//! ranker and auction calls as one trace. Without it the spans are only
//! log context, and the cost is a span per request.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use opentelemetry::propagation::{Extractor, Injector};
use tower::{Layer, Service};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Reads propagation headers from an HTTP header map (gRPC metadata travels
/// as HTTP/2 headers, so this serves both).
struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes propagation headers into gRPC metadata.
struct MetadataWriter<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(&value))
        {
            self.0.insert(key, value);
        }
    }
}

/// Installs the W3C trace-context propagator (once per process).
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
}

/// A server span for a request with `headers`, child of the caller's
/// `traceparent` when there is one.
fn server_span(kind: &'static str, name: &str, headers: &http::HeaderMap) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderReader(headers)));
    let span = tracing::info_span!("request", otel.name = %name, otel.kind = "server", rpc.system = kind);
    // Fails only without an OpenTelemetry layer (no export configured).
    let _ = span.set_parent(parent);
    span
}

/// Stamps the current span's context onto `request`'s metadata, so the
/// server's span joins this trace.
pub fn inject<T>(request: &mut tonic::Request<T>) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataWriter(request.metadata_mut()));
    });
}

/// Axum middleware: a server span per HTTP request (health checks and
/// metrics excepted), child of the caller's `traceparent`.
pub async fn http_trace(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    if crate::overload::exempt(req.uri().path()) {
        return next.run(req).await;
    }
    let name = format!("{} {}", req.method(), req.uri().path());
    let span = server_span("http", &name, req.headers());
    next.run(req).instrument(span).await
}

/// Tower layer for tonic servers: a server span per call (health checks and
/// reflection excepted), named by its gRPC path.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

/// See [`GrpcTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for GrpcTrace<S>
where
    S: Service<http::Request<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if crate::overload::exempt(path) {
            return Box::pin(self.inner.call(req));
        }
        let span = server_span("grpc", path.trim_start_matches('/'), req.headers());
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(future.instrument(span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_through_metadata_and_headers() {
        use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
        install_propagator();
        let trace_id = TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
        let span_context = SpanContext::new(
            trace_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let context = opentelemetry::Context::new().with_remote_span_context(span_context);
        let mut request = tonic::Request::new(());
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&context, &mut MetadataWriter(request.metadata_mut()));
        });
        let sent = request.metadata().get("traceparent").unwrap().to_str().unwrap().to_string();
        assert_eq!(sent, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let headers = request.into_parts().0.into_headers();
        let extracted = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderReader(&headers)));
        assert_eq!(extracted.span().span_context().trace_id(), trace_id);
    }
}
