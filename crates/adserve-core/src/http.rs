//! Serves an HTTP router with the project's socket settings and the same
//! shutdown sequence as the gRPC servers ([`crate::lifecycle`]).
//!
//! A hyper accept loop rather than `axum::serve`, for two reasons:
//! `axum::serve` sets no timer on its HTTP/1 connections, so a client that
//! trickles its request headers (slowloris) holds a connection and a task for
//! as long as it likes; and its graceful shutdown waits for every connection,
//! including idle keep-alive ones, for as long as they stay open. Here each
//! connection's headers must arrive within `server.http_header_timeout`, and
//! shutdown tells every connection to finish its request and close, then
//! abandons what is left after `server.shutdown_grace`.

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

use crate::{Lifecycle, net, overload};

/// How long to wait before accepting again after `accept` failed (out of file
/// descriptors, say): long enough not to spin, short enough to recover fast.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The connection builder: HTTP/1.1 with keep-alive, and the header read
/// timeout armed (it needs a timer). hyper runs that timer whenever a
/// connection waits for a request's headers, so it also closes a connection
/// that never sends a byte and one left idle between requests. (HTTP/1 only:
/// hyper-util's auto-detecting builder reads the first bytes to tell HTTP/1
/// from HTTP/2 with no timeout at all. gRPC has its own HTTP/2 listener.)
fn builder(header_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    builder
}

/// Serves `router` on `listener` until shutdown: readiness drain, then the
/// listener closes, every connection is told to close after its current
/// request, and whatever is still running after the grace period is
/// abandoned. Requests go through the same admission control as gRPC
/// ([`crate::overload`]).
pub async fn serve(listener: TcpListener, router: axum::Router, lifecycle: &Lifecycle) -> std::io::Result<()> {
    // From here the process serves (see grpc::serve).
    lifecycle.readiness.started();
    let limits = overload::HttpLimits {
        gate: overload::Gate::new("http", lifecycle.max_concurrent_requests),
        timeout: lifecycle.request_timeout,
    };
    let router = router
        .layer(axum::middleware::from_fn_with_state(limits, overload::http_admission))
        // Outermost: a span per request, joined to the caller's trace.
        .layer(axum::middleware::from_fn(crate::trace_context::http_trace));
    let builder = builder(lifecycle.http_header_timeout);
    let graceful = GracefulShutdown::new();
    let stop = lifecycle.stop_accepting();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "http: accept failed; retrying");
                    metrics::counter!("adserve_server_accept_errors_total", "listener" => "http").increment(1);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        net::configure_accepted(&stream);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that hung up, sent garbage or was too slow with its
            // headers: the connection ends; nothing else to do.
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
    // Stop accepting: new connections are refused from here on.
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(lifecycle.grace) => {
            tracing::warn!(server = "http", grace_ms = lifecycle.grace.as_millis() as u64,
                "in-flight requests did not finish within the grace period; abandoning them");
        }
    }
    Ok(())
}
