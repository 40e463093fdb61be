//! TLS between services, across processes: a ranker and an auction started
//! with `server.tls` (mutual TLS: a `client_ca`) answer only clients that
//! present a certificate of that CA; a plaintext client, a client without a
//! certificate and one with another CA's certificate are refused at the
//! handshake; their metrics port answers the HTTP health checks a kubelet
//! probes instead; and a gateway whose `upstreams.tls` holds the CA and its
//! own certificate scores and auctions through both.

use std::{process::Stdio, time::Duration};

use adserve_gateway::pipeline::ServeOptions;
use adserve_integration_tests::{Stack, ad_request, binary, free_port, pki::Pki, ranker_command, repo_root};
use adserve_proto::v1::{GetModelRequest, ranker_service_client::RankerServiceClient};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

async fn channel(url: String, tls: Option<ClientTlsConfig>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url)?.connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

/// `GetModel` through a channel to `port` built as given: Ok(version), or
/// why it failed (connect or call).
async fn get_model(port: u16, tls: Option<ClientTlsConfig>) -> Result<String, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let channel = channel(format!("{scheme}://127.0.0.1:{port}"), tls).await.map_err(|e| format!("connect: {e:?}"))?;
    let mut client = RankerServiceClient::new(channel);
    match tokio::time::timeout(Duration::from_secs(5), client.get_model(GetModelRequest::default())).await {
        Ok(Ok(r)) => Ok(r.into_inner().model_version),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no answer in 5 s".into()),
    }
}

/// Waits until the ranker on `port` answers a client with `tls`.
async fn wait_serving(port: u16, tls: &ClientTlsConfig) -> anyhow::Result<String> {
    let mut last = String::new();
    for _ in 0..300 {
        match get_model(port, Some(tls.clone())).await {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the TLS ranker never answered: {last}")
}

fn spawn(mut command: tokio::process::Command, env: &[(String, String)]) -> anyhow::Result<tokio::process::Child> {
    for (k, v) in env {
        command.env(k, v);
    }
    Ok(command.stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(true).spawn()?)
}

fn auction_command(grpc: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary("adserve-auction"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn");
    command
}

#[tokio::test]
async fn services_with_mutual_tls_answer_only_clients_of_their_ca_and_the_gateway_reaches_them() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.ca("internal", &["ranker", "auction", "gateway"])?;
    pki.ca("stranger", &["intruder"])?;

    let model = repo_root().join("models/ctr-baseline");
    let (command, ranker_port, ranker_metrics) = ranker_command(&model, &[]);
    let _ranker = spawn(command, &pki.server_env("ranker", "internal"))?;
    let auction_port = free_port();
    let _auction = spawn(auction_command(auction_port), &pki.server_env("auction", "internal"))?;

    let trusted = pki.client("internal", Some("gateway"))?;
    assert_eq!(wait_serving(ranker_port, &trusted).await?, "ctr-baseline-v1");
    // What a kubelet probes when the gRPC port speaks TLS: plain HTTP on
    // the metrics port, the same readiness as the gRPC health service.
    let http = adserve_integration_tests::http_client();
    for path in ["livez", "healthz"] {
        let r = http.get(format!("http://127.0.0.1:{ranker_metrics}/{path}")).send().await?;
        assert_eq!(r.status(), 200, "/{path}");
    }

    // A plaintext client, one without a certificate, and one whose
    // certificate another CA signed: refused, never answered.
    let plaintext = get_model(ranker_port, None).await;
    assert!(plaintext.is_err(), "a plaintext client was answered: {plaintext:?}");
    let anonymous = get_model(ranker_port, Some(pki.client("internal", None)?)).await;
    assert!(anonymous.is_err(), "a client without a certificate was answered: {anonymous:?}");
    let intruder = get_model(ranker_port, Some(pki.client("internal", Some("intruder"))?)).await;
    assert!(intruder.is_err(), "a client of another CA was answered: {intruder:?}");
    // A client that does not trust the server's CA refuses it in turn.
    let wrong_ca = get_model(ranker_port, Some(pki.client("stranger", Some("intruder"))?)).await;
    assert!(wrong_ca.is_err(), "a client trusting another CA accepted the ranker: {wrong_ca:?}");

    // The auction over mutual TLS, directly.
    let auction = channel(format!("https://127.0.0.1:{auction_port}"), Some(trusted.clone())).await?;
    let health = tonic_health::pb::health_client::HealthClient::new(auction.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?;
    assert_eq!(health.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // A gateway of this test whose upstreams are TLS: the ranker and the
    // auction above; the feature-service URL is a TLS port nobody serves, so
    // features degrade to defaults and the answer says so, but the model
    // scores and the auction ranks through TLS.
    let s = Stack::ready().await?;
    let tls = adserve_core::tls::ClientTls {
        ca: pki.path("internal-ca.pem"),
        cert: Some(pki.path("gateway.pem")),
        key: Some(pki.path("gateway.key")),
        domain: Some("localhost".into()),
    };
    let server = s
        .in_process_server(|c| {
            c.upstreams.ranker = format!("https://127.0.0.1:{ranker_port}");
            c.upstreams.auction = format!("https://127.0.0.1:{auction_port}");
            c.upstreams.feature_service = format!("https://127.0.0.1:{}", free_port());
            c.upstreams.tls = Some(tls);
            c.prediction_cache.enabled = false;
        })
        .await?;
    // A floor above any price: nothing is served or logged; the ranker and
    // the auction still answer (or the answer would name them degraded).
    let options = ServeOptions { floor_ecpm_micros: i64::MAX / 4, ..Default::default() };
    let served =
        tokio::time::timeout(Duration::from_secs(20), server.serve_with(ad_request("tls-user"), None, options))
            .await??;
    let answer = served.response;
    assert_eq!(answer.model_version, "ctr-baseline-v1", "the ranker scored over TLS: {answer:?}");
    let degraded: Vec<&str> = answer.degraded.iter().map(|d| d.component.as_str()).collect();
    assert_eq!(degraded, ["feature-service"], "only the unserved feature-service degrades: {answer:?}");

    // A gateway config that mixes TLS and plaintext upstreams is refused, named.
    let mixed = s
        .in_process_server(|c| {
            c.upstreams.ranker = format!("https://127.0.0.1:{ranker_port}");
            c.upstreams.tls = Some(adserve_core::tls::ClientTls {
                ca: pki.path("internal-ca.pem"),
                cert: None,
                key: None,
                domain: None,
            });
        })
        .await;
    let err = mixed.map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("upstreams.feature_service") && err.contains("must be https://"), "{err}");
    Ok(())
}
