//! Serves a service's gRPC routes together with the standard
//! `grpc.health.v1.Health` service and server reflection, and drains on shutdown.

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::{Lifecycle, net, overload};

/// Serves `routes` plus health and reflection on `listener`, called by
/// `callers` (see [`net::Callers`]). The health of
/// each of `service_names` follows the process's readiness (the overall `""`
/// is liveness and stays SERVING); on shutdown readiness goes NOT_SERVING,
/// the listener keeps serving for the readiness drain, then closes, and
/// in-flight calls get the grace period.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&'static str],
    lifecycle: &Lifecycle,
    callers: net::Callers,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // The overall status "" is liveness: SERVING while the process serves at
    // all (a not-ready process must not be restarted for it). Each service's
    // own name is readiness.
    health.set_service_status("", ServingStatus::Serving).await;
    let names: Vec<&'static str> = service_names.to_vec();
    // From here the process serves: the start is over (a service may still
    // hold readiness for reasons of its own).
    lifecycle.readiness.started();
    let mut readiness = lifecycle.readiness.subscribe();
    let status = |ready: bool| if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
    let initial = status(readiness.borrow_and_update().is_ready());
    for name in &names {
        health.set_service_status(*name, initial).await;
    }
    tokio::spawn(async move {
        while readiness.changed().await.is_ok() {
            let s = status(readiness.borrow_and_update().is_ready());
            for name in &names {
                health.set_service_status(*name, s).await;
            }
        }
    });
    let mut routes = routes.add_service(health_service);
    if lifecycle.reflection {
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(adserve_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("the compiled-in descriptor sets are valid");
        routes = routes.add_service(reflection);
    }

    // Accepted sockets get TCP_NODELAY and keep-alive from `net`: the builder's
    // own tcp_nodelay applies only to sockets tonic binds itself.
    // Admission control (shed beyond max_concurrent_requests, health exempt)
    // and the server-side bound on every call.
    let gate = overload::GrpcGateLayer(overload::Gate::new("grpc", lifecycle.max_concurrent_requests));
    let mut builder = net::grpc_server(callers);
    if let Some(tls) = &lifecycle.tls {
        // Validated with the config; read again here, at the listener's start.
        builder = builder.tls_config(tls.load("server.tls")?)?;
    }
    let server = builder
        .timeout(lifecycle.request_timeout)
        .layer(gate)
        // A span per call, joined to the caller's trace.
        .layer(crate::trace_context::GrpcTraceLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(net::grpc_incoming(listener), {
            let lifecycle = lifecycle.clone();
            async move { lifecycle.stop_accepting().await }
        });
    lifecycle.bounded("grpc", server).await.map(|_| ())?;
    Ok(())
}

/// Why a gRPC listener stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// `server.tls` names a file that cannot be read or parsed.
    #[error(transparent)]
    Tls(#[from] crate::config::Invalid),
}

/// The caller's `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit
/// `H`, `M`, `S`, `m`, `u` or `n`), if it sent a valid one. A handler that
/// queues work uses it to drop the work once nobody waits for it; tonic's
/// server has already bounded the call by it and `server.request_timeout`.
pub fn caller_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn caller_timeouts_parse_as_the_grpc_spec_writes_them() {
        let timeout = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            caller_timeout(&m)
        };
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-5m", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(caller_timeout(&tonic::metadata::MetadataMap::new()), None);
        // What tonic's client sends for Request::set_timeout.
        let mut request = tonic::Request::new(());
        request.set_timeout(Duration::from_millis(250));
        assert_eq!(caller_timeout(request.metadata()), Some(Duration::from_millis(250)));
    }
    use crate::net::tests::wait_server_side_nodelay;

    /// Whether a server started with `server.reflection = enabled` answers a
    /// reflection ListServices call (false: UNIMPLEMENTED).
    async fn reflection_answers(enabled: bool) -> bool {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = crate::ServerConfig { reflection: enabled, ..crate::ServerConfig::default() };
        let lifecycle = Lifecycle::new(&config, crate::Shutdown::default());
        let shutdown = lifecycle.shutdown.clone();
        tokio::spawn(async move { serve(listener, Routes::default(), &[], &lifecycle, net::Callers::Internal).await });
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let answered =
            match ServerReflectionClient::new(channel).server_reflection_info(futures::stream::iter([request])).await {
                Ok(stream) => stream.into_inner().message().await.unwrap().is_some(),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status}");
                    false
                }
            };
        shutdown.trigger();
        answered
    }

    #[tokio::test]
    async fn reflection_is_served_only_when_configured() {
        assert!(reflection_answers(true).await);
        assert!(!reflection_answers(false).await);
    }

    /// The answer to one patient call on a connection whose server (a
    /// listener for `callers`) has its only thread frozen while the caller
    /// sends and cancels 200 calls on the same connection.
    async fn patient_call_beside_200_resets(
        callers: net::Callers,
    ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (freeze, mut frozen) = tokio::sync::mpsc::unbounded_channel::<Duration>();
        let config = crate::ServerConfig::default();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = TcpListener::from_std(listener).unwrap();
                let lifecycle = Lifecycle::new(&config, crate::Shutdown::default());
                let shutdown = lifecycle.shutdown.clone();
                tokio::spawn(async move { serve(listener, Routes::default(), &[], &lifecycle, callers).await });
                // Blocks the runtime's only thread when asked: the
                // connection's frames queue up unread, as on a starved server.
                while let Some(d) = frozen.recv().await {
                    std::thread::sleep(d);
                }
                shutdown.trigger();
            })
        });
        let channel = crate::net::grpc_endpoint(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let client = HealthClient::new(channel);
        let check = || HealthCheckRequest { service: String::new() };
        client.clone().check(check()).await.expect("the server answers before the freeze");

        freeze.send(Duration::from_secs(2)).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let patient = tokio::spawn({
            let mut client = client.clone();
            async move { client.check(check()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let impatient: Vec<_> = (0..200)
            .map(|_| {
                let mut client = client.clone();
                // Dropped at its deadline: the client resets the stream.
                tokio::spawn(
                    async move { tokio::time::timeout(Duration::from_millis(30), client.check(check())).await },
                )
            })
            .collect();
        for call in impatient {
            assert!(call.await.unwrap().is_err(), "answered by a frozen server");
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), patient).await.expect("answered in time").unwrap();
        if answer.is_ok() {
            // And the connection still serves.
            client.clone().check(check()).await.expect("the server answers after the freeze");
        }
        drop(freeze);
        server.join().unwrap();
        answer
    }

    /// Under overload a caller gives up on calls the server has not even
    /// picked up yet (their deadline passed while the server's threads were
    /// busy) and resets their streams. h2's defence against "rapid reset"
    /// floods answers more than 20 such resets queued at once with
    /// GOAWAY(ENHANCE_YOUR_CALM), which fails every call on the connection
    /// with RESOURCE_EXHAUSTED, calls that would have been answered included:
    /// overload turned into an outage. An internal listener tolerates them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_cancelled_before_an_internal_server_reads_them_do_not_fail_the_connection() {
        if let Err(status) = patient_call_beside_200_resets(net::Callers::Internal).await {
            panic!("the patient call failed with the cancelled ones: {status}");
        }
    }

    /// The gateway's public listener keeps h2's defence: the same burst of
    /// resets closes the connection, the patient call with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_public_server_keeps_h2s_rapid_reset_defence() {
        assert!(patient_call_beside_200_resets(net::Callers::Public).await.is_err());
    }

    /// A ranker stand-in whose `Score` calls wait until the test releases
    /// them; a call with `routing_key = "patient"` waits for its own release.
    #[derive(Clone)]
    struct HeldRanker {
        waiting: Arc<std::sync::atomic::AtomicUsize>,
        /// Bumped to release every call waiting at the time (a call whose
        /// caller went first leaves nothing behind for the next round).
        release: Arc<tokio::sync::watch::Sender<usize>>,
        patient: Arc<tokio::sync::Notify>,
    }

    impl Default for HeldRanker {
        fn default() -> Self {
            Self {
                waiting: Arc::default(),
                release: Arc::new(tokio::sync::watch::channel(0).0),
                patient: Arc::default(),
            }
        }
    }

    use std::sync::Arc;

    use adserve_proto::v1::{
        GetModelRequest, GetModelResponse, ScoreRequest, ScoreResponse,
        ranker_service_client::RankerServiceClient,
        ranker_service_server::{RankerService, RankerServiceServer},
    };

    #[tonic::async_trait]
    impl RankerService for HeldRanker {
        async fn score(
            &self,
            request: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreResponse>, tonic::Status> {
            if request.get_ref().routing_key == "patient" {
                self.patient.notified().await;
            } else {
                let mut released = self.release.subscribe();
                self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                released.changed().await.expect("the test holds the sender");
            }
            Ok(tonic::Response::new(ScoreResponse { pctr: vec![0.5], ..Default::default() }))
        }

        async fn get_model(
            &self,
            _: tonic::Request<GetModelRequest>,
        ) -> Result<tonic::Response<GetModelResponse>, tonic::Status> {
            Ok(tonic::Response::new(GetModelResponse::default()))
        }
    }

    /// A caller gives up on calls at the moment the server answers them, so
    /// answers arrive for streams the caller has just reset. Each such frame
    /// on a stream h2 no longer remembers (by default only the last 50
    /// resets) counted toward h2's *lifetime* limit of 1024 "local error
    /// resets" per connection, past which the caller's own h2 closed the
    /// connection with GOAWAY(ENHANCE_YOUR_CALM): every call in flight on it
    /// failed with RESOURCE_EXHAUSTED ("h2 protocol error"), as the ranker
    /// bench's overload case showed. Here 4000 calls are given up on as they
    /// are answered, in rounds of 200, beside one patient call on the same
    /// channel, which must be answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_to_calls_the_caller_gave_up_on_do_not_fail_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lifecycle = Lifecycle::new(&crate::ServerConfig::default(), crate::Shutdown::default());
        let shutdown = lifecycle.shutdown.clone();
        let ranker = HeldRanker::default();
        let routes = Routes::new(RankerServiceServer::new(ranker.clone()));
        tokio::spawn(async move { serve(listener, routes, &[], &lifecycle, net::Callers::Internal).await });
        let channel = crate::net::grpc_endpoint(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let client = RankerServiceClient::new(channel);
        client.clone().get_model(GetModelRequest::default()).await.expect("served");

        let patient = tokio::spawn({
            let mut client = client.clone();
            async move { client.score(ScoreRequest { routing_key: "patient".into(), ..Default::default() }).await }
        });
        const ROUND: usize = 200;
        for round in 1..=20 {
            let calls: Vec<_> = (0..ROUND)
                .map(|_| {
                    let mut client = client.clone();
                    tokio::spawn(async move { client.score(ScoreRequest::default()).await })
                })
                .collect();
            // All of them held by the server (or some failed on the way).
            for _ in 0..15_000 {
                if ranker.waiting.load(std::sync::atomic::Ordering::SeqCst) >= round * ROUND
                    || calls.iter().any(|c| c.is_finished())
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Answered and given up on at once: the answers cross the resets.
            ranker.release.send_modify(|r| *r += 1);
            for call in &calls {
                call.abort();
            }
            for call in calls {
                if let Ok(Err(status)) = call.await {
                    panic!("round {round}: a call failed: {status}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ranker.patient.notify_one();
        let answer = tokio::time::timeout(Duration::from_secs(10), patient).await.expect("answered in time").unwrap();
        if let Err(status) = answer {
            panic!("the patient call failed with the abandoned ones: {status}");
        }
        shutdown.trigger();
    }

    /// The most calls a listener for `callers` holds at once when one
    /// connection sends 300, each held by the server until released.
    async fn calls_held_at_once_from_one_connection(callers: net::Callers) -> usize {
        use std::sync::atomic::Ordering::SeqCst;
        const CALLS: usize = 300;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lifecycle = Lifecycle::new(&crate::ServerConfig::default(), crate::Shutdown::default());
        assert!(lifecycle.max_concurrent_requests > CALLS, "the admission gate must not be what limits");
        let shutdown = lifecycle.shutdown.clone();
        let ranker = HeldRanker::default();
        let routes = Routes::new(RankerServiceServer::new(ranker.clone()));
        tokio::spawn(async move { serve(listener, routes, &[], &lifecycle, callers).await });
        let channel = crate::net::grpc_endpoint(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let client = RankerServiceClient::new(channel);
        client.clone().get_model(GetModelRequest::default()).await.expect("served");
        let calls: Vec<_> = (0..CALLS)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { client.score(ScoreRequest::default()).await })
            })
            .collect();
        let settle = |at_least: usize| {
            let ranker = ranker.clone();
            async move {
                // Until `at_least` are held, then as long again for more to come.
                let start = tokio::time::Instant::now();
                while ranker.waiting.load(SeqCst) < at_least && start.elapsed() < Duration::from_secs(20) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(start.elapsed().max(Duration::from_millis(300))).await;
                ranker.waiting.load(SeqCst)
            }
        };
        let expected = match callers {
            net::Callers::Public => HTTP2_LIMIT.min(CALLS),
            net::Callers::Internal => CALLS,
        };
        // Every call the listener takes has arrived, and more had the time to.
        let held = settle(expected).await;
        // Release them; the calls queued on the client's side arrive and are
        // held in turn, then released too. Every call is answered.
        ranker.release.send_modify(|r| *r += 1);
        assert_eq!(settle(CALLS).await, CALLS, "every call reached the server");
        ranker.release.send_modify(|r| *r += 1);
        for call in calls {
            call.await.unwrap().expect("answered");
        }
        shutdown.trigger();
        held
    }

    const HTTP2_LIMIT: usize = net::HTTP2_PUBLIC_MAX_CONCURRENT_STREAMS as usize;

    /// One connection to the gateway's public listener cannot hold more than
    /// its share of the listener's slots; its other calls wait on its side
    /// and are served as slots free up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_public_server_limits_the_calls_one_connection_has_open() {
        assert_eq!(calls_held_at_once_from_one_connection(net::Callers::Public).await, HTTP2_LIMIT);
    }

    /// An internal listener does not: the gateway's one channel to a service
    /// carries all its calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_internal_server_takes_every_call_one_connection_sends() {
        assert_eq!(calls_held_at_once_from_one_connection(net::Callers::Internal).await, 300);
    }

    #[tokio::test]
    async fn served_grpc_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let lifecycle = Lifecycle::new(&crate::ServerConfig::default(), crate::Shutdown::default());
        let shutdown = lifecycle.shutdown.clone();
        // Health and reflection only: `serve` adds both to any service's routes.
        tokio::spawn(async move { serve(listener, Routes::default(), &[], &lifecycle, net::Callers::Internal).await });
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
