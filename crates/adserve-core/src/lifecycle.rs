//! A server's life after SIGTERM, the same for every gRPC and HTTP server:
//!
//! 1. readiness goes NOT_SERVING at once (load balancers stop sending),
//! 2. the listener keeps serving for `readiness_drain` (requests already
//!    routed here by a balancer that has not yet seen the change still land),
//! 3. the listener closes and in-flight requests get up to `grace` to finish,
//! 4. whatever is still running after that is abandoned.

use std::{future::Future, time::Duration};

use crate::{Readiness, ServerConfig, Shutdown};

/// Shutdown signal, readiness and drain timings of one process.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Fires on SIGTERM / SIGINT.
    pub shutdown: Shutdown,
    /// What health checks report.
    pub readiness: Readiness,
    /// How long listeners keep accepting after readiness went NOT_SERVING.
    pub readiness_drain: Duration,
    /// How long in-flight requests may take once listeners closed.
    pub grace: Duration,
    /// Most requests in flight per listener (`server.max_concurrent_requests`).
    pub max_concurrent_requests: usize,
    /// Longest any request may run (`server.request_timeout`).
    pub request_timeout: Duration,
    /// Longest an HTTP/1 client may take to send its headers (`server.http_header_timeout`).
    pub http_header_timeout: Duration,
    /// Serve gRPC reflection (`server.reflection`).
    pub reflection: bool,
    /// TLS on the gRPC listener (`server.tls`).
    pub tls: Option<crate::tls::ServerTls>,
}

impl Lifecycle {
    /// The lifecycle `server` configures, on `shutdown`.
    pub fn new(server: &ServerConfig, shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            // Not ready until a listener serves (grpc::serve says so).
            readiness: Readiness::starting(),
            readiness_drain: server.readiness_drain,
            grace: server.shutdown_grace,
            max_concurrent_requests: server.max_concurrent_requests,
            request_timeout: server.request_timeout,
            http_header_timeout: server.http_header_timeout,
            reflection: server.reflection,
            tls: server.tls.clone(),
        }
    }

    /// Resolves when the listener should stop accepting: after shutdown
    /// fired, readiness was flipped, and the readiness drain passed.
    pub async fn stop_accepting(&self) {
        self.shutdown.wait().await;
        self.readiness.drain();
        tokio::time::sleep(self.readiness_drain).await;
    }

    /// Runs `server` (whose own graceful shutdown is driven by
    /// [`Self::stop_accepting`]) and abandons it `grace` after it stopped
    /// accepting. `what` names the server in the log.
    pub async fn bounded<T, E>(&self, what: &str, server: impl Future<Output = Result<T, E>>) -> Result<Option<T>, E> {
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => result.map(Some),
            _ = async { self.stop_accepting().await; tokio::time::sleep(self.grace).await } => {
                tracing::warn!(server = what, grace_ms = self.grace.as_millis() as u64,
                    "in-flight requests did not finish within the grace period; abandoning them");
                Ok(None)
            }
        }
    }
}
