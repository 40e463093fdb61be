//! Serves an HTTP router with the project's socket settings and the same
//! shutdown sequence as the gRPC servers ([`crate::lifecycle`]).

use tokio::net::TcpListener;

use crate::{Lifecycle, net, overload};

/// Serves `router` on `listener` until shutdown: readiness drain, then the
/// listener closes and in-flight requests get the grace period. Requests go
/// through the same admission control as gRPC ([`crate::overload`]).
pub async fn serve(listener: TcpListener, router: axum::Router, lifecycle: &Lifecycle) -> std::io::Result<()> {
    let limits = overload::HttpLimits {
        gate: overload::Gate::new("http", lifecycle.max_concurrent_requests),
        timeout: lifecycle.request_timeout,
    };
    let router = router.layer(axum::middleware::from_fn_with_state(limits, overload::http_admission));
    let stop = {
        let lifecycle = lifecycle.clone();
        async move { lifecycle.stop_accepting().await }
    };
    let server = axum::serve(net::http_listener(listener), router).with_graceful_shutdown(stop);
    lifecycle.bounded("http", std::future::IntoFuture::into_future(server)).await.map(|_| ())
}
