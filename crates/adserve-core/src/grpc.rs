//! Serves a service's gRPC routes together with the standard
//! `grpc.health.v1.Health` service and server reflection, and drains on shutdown.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;

use crate::{Shutdown, net};

/// Serves `routes` plus health and reflection on `listener` until `shutdown`
/// fires, then marks every service NOT_SERVING, stops accepting and waits up to
/// `grace` for in-flight requests.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&'static str],
    shutdown: Shutdown,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in service_names {
        health.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    health.set_service_status("", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(adserve_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid");
    let routes = routes.add_service(health_service).add_service(reflection);

    let names: Vec<&'static str> = service_names.to_vec();
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.wait().await;
            for name in &names {
                health.set_service_status(*name, tonic_health::ServingStatus::NotServing).await;
            }
            health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        }
    };
    // Accepted sockets get TCP_NODELAY and keep-alive from `net`: the builder's
    // own tcp_nodelay applies only to sockets tonic binds itself.
    let server =
        net::grpc_server().add_routes(routes).serve_with_incoming_shutdown(net::grpc_incoming(listener), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        _ = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not drain in time");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::net::tests::wait_server_side_nodelay;

    #[tokio::test]
    async fn served_grpc_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let shutdown = Shutdown::default();
        // Health and reflection only: `serve` adds both to any service's routes.
        tokio::spawn(serve(listener, Routes::default(), &[], shutdown.clone(), Duration::from_secs(1)));
        let mut client = tokio::net::TcpStream::connect(server).await.unwrap();
        // HTTP/2 preface and an empty SETTINGS frame; the server answers with
        // its own SETTINGS, so the connection is being served by tonic.
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        let mut frame = [0u8; 9];
        client.read_exact(&mut frame).await.unwrap();
        assert_eq!(frame[3], 4, "the server's first frame is SETTINGS");
        assert!(wait_server_side_nodelay(server, client.local_addr().unwrap()).await);
        shutdown.trigger();
    }
}
