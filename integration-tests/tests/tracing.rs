//! One trace per ad request across all five hops' services, exported over
//! OTLP to a receiver this test runs (the OpenTelemetry collector's gRPC
//! trace service, from opentelemetry-proto): a gateway, feature-service,
//! ranker and auction of the test's own, each exporting to it.

use std::{
    collections::{HashMap, HashSet},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use adserve_integration_tests::{Stack, binary, free_port, ranker_command, repo_root};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};

/// (service.name, trace id hex, span name) of every span received.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    spans.push((service.clone(), hex(&span.trace_id), span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The environment every service of the test shares: its own ports, trace
/// export to the receiver (flushed every 200 ms), spans enabled (info).
fn traced(command: &mut tokio::process::Command, otlp: &str) {
    command
        .env("ADSERVE_TELEMETRY__OTLP_ENDPOINT", otlp)
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "info,ort=warn")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stdout(Stdio::null())
        .kill_on_drop(true);
}

#[tokio::test]
async fn one_ad_request_is_one_trace_across_gateway_features_ranker_and_auction() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let (features, auction, http, grpc) = (free_port(), free_port(), free_port(), free_port());
    let mut children = Vec::new();
    let mut command = tokio::process::Command::new(binary("adserve-feature-service"));
    command
        .env("ADSERVE_MODE", "serve")
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{features}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_REDIS__URL", &s.redis)
        .env("ADSERVE_DYNAMODB__ENDPOINT", &s.dynamodb);
    traced(&mut command, &otlp);
    children.push(command.spawn()?);
    let mut command = tokio::process::Command::new(binary("adserve-auction"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{auction}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()));
    traced(&mut command, &otlp);
    children.push(command.spawn()?);
    let (mut command, ranker, _) = ranker_command(&repo_root().join("models/ctr-baseline"), &[]);
    traced(&mut command, &otlp);
    children.push(command.spawn()?);
    let mut command = tokio::process::Command::new(binary("adserve-gateway"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_HTTP_ADDR", format!("127.0.0.1:{http}"))
        .env("ADSERVE_POSTGRES__URL", &s.postgres)
        .env("ADSERVE_KAFKA__BROKERS", &s.kafka)
        .env("ADSERVE_KAFKA__PUBLISH_TIMEOUT", "1s")
        .env("ADSERVE_DEADLINES__REQUEST", "1500ms")
        .env("ADSERVE_COUNTERS__URL", &s.redis)
        .env("ADSERVE_UPSTREAMS__FEATURE_SERVICE", format!("http://127.0.0.1:{features}"))
        .env("ADSERVE_UPSTREAMS__RANKER", format!("http://127.0.0.1:{ranker}"))
        .env("ADSERVE_UPSTREAMS__AUCTION", format!("http://127.0.0.1:{auction}"));
    traced(&mut command, &otlp);
    children.push(command.spawn()?);

    // The caller's own trace: the gateway joins it (W3C traceparent in).
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let client = adserve_integration_tests::http_client();
    let body = serde_json::json!({"user_id": "demo-user-3", "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1});
    let mut answered = None;
    for _ in 0..150 {
        // Until every upstream is up: an answer with nothing degraded.
        if let Ok(r) = client
            .post(format!("http://127.0.0.1:{http}/v1/ads"))
            .header("traceparent", &traceparent)
            .json(&body)
            .send()
            .await
            && r.status() == 200
        {
            let v: serde_json::Value = r.json().await?;
            if v["degraded"] == serde_json::json!([]) {
                answered = Some(v);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let answer = answered.expect("the test's gateway answered with every upstream up");
    assert_eq!(answer["winners"].as_array().map(Vec::len), Some(1), "{answer}");

    // Every service reports a span of that trace.
    let services = ["adserve-gateway", "adserve-feature-service", "adserve-ranker", "adserve-auction"];
    let mut seen: HashMap<String, HashSet<String>> = HashMap::new();
    for _ in 0..100 {
        seen.clear();
        for (service, trace, name) in receiver.spans.lock().expect("spans").iter() {
            if *trace == trace_id {
                seen.entry(service.clone()).or_default().insert(name.clone());
            }
        }
        if services.iter().all(|s| seen.contains_key(*s)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for service in services {
        assert!(seen.contains_key(service), "no span of trace {trace_id} from {service}: {seen:?}");
    }
    let gateway = &seen["adserve-gateway"];
    for span in ["POST /v1/ads", "features", "ranker", "auction"] {
        assert!(gateway.contains(span), "gateway spans {gateway:?} lack {span:?}");
    }
    assert!(seen["adserve-ranker"].contains("adserve.v1.RankerService/Score"), "{seen:?}");
    drop(children);
    Ok(())
}
