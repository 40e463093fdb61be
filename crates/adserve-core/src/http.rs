//! Serves an HTTP router with the project's socket settings and the same
//! shutdown sequence as the gRPC servers ([`crate::lifecycle`]).

use tokio::net::TcpListener;

use crate::{Lifecycle, net};

/// Serves `router` on `listener` until shutdown: readiness drain, then the
/// listener closes and in-flight requests get the grace period.
pub async fn serve(listener: TcpListener, router: axum::Router, lifecycle: &Lifecycle) -> std::io::Result<()> {
    let stop = {
        let lifecycle = lifecycle.clone();
        async move { lifecycle.stop_accepting().await }
    };
    let server = axum::serve(net::http_listener(listener), router).with_graceful_shutdown(stop);
    lifecycle.bounded("http", std::future::IntoFuture::into_future(server)).await.map(|_| ())
}
