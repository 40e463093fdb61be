//! Stopping real service processes: services drain and exit cleanly on
//! SIGTERM, refuse misspelt config, shed load. (The label-joiner's SIGKILL
//! and rebalance tests are in label_joiner.rs.)

use std::{process::Stdio, time::Duration};

use adserve_integration_tests::{Stack, binary, free_port};
use adserve_proto::v1::{ScoreLevel, label_joiner_service_client::LabelJoinerServiceClient};
use anyhow::Context as _;

struct Joiner {
    child: tokio::process::Child,
}

async fn start_joiner(s: &Stack, group: &str, dir: &std::path::Path) -> anyhow::Result<Joiner> {
    let port = free_port();
    let child = tokio::process::Command::new(binary("adserve-label-joiner"))
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{port}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_KAFKA__BROKERS", &s.kafka)
        .env("ADSERVE_GROUP_ID", group)
        .env("ADSERVE_OUTPUT_DIR", dir)
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..100 {
        if LabelJoinerServiceClient::connect(format!("http://127.0.0.1:{port}")).await.is_ok() {
            return Ok(Joiner { child });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("label-joiner did not start on port {port}")
}

#[tokio::test]
async fn services_drain_and_exit_cleanly_on_sigterm() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_path_buf();
    let joiner = start_joiner(&s, &format!("adserve-term-{}", uuid::Uuid::new_v4()), &dir).await?;
    let port = free_port();
    let auction = tokio::process::Command::new(binary("adserve-auction"))
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{port}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for mut child in [joiner.child, auction] {
        let pid = child.id().expect("running");
        std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
        assert!(status.success(), "exit status {status}");
    }
    Ok(())
}

/// A gateway of its own whose feature-service accepts connections and never
/// answers (a hung peer, not a refused port): every ad request waits out the
/// 3 s features deadline and is then served degraded.
struct HungGateway {
    child: tokio::process::Child,
    http: String,
    grpc: String,
    holder: tokio::task::JoinHandle<()>,
}

async fn gateway_with_hung_features(s: &Stack, env: &[(&str, &str)]) -> anyhow::Result<HungGateway> {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hung_addr = hung.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = hung.accept().await {
            held.push(conn);
        }
    });
    let (http_port, grpc_port) = (free_port(), free_port());
    let mut command = tokio::process::Command::new(binary("adserve-gateway"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADSERVE_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("ADSERVE_POSTGRES__URL", &s.postgres)
        .env("ADSERVE_KAFKA__BROKERS", &s.kafka)
        .env("ADSERVE_UPSTREAMS__FEATURE_SERVICE", format!("http://{hung_addr}"))
        .env("ADSERVE_UPSTREAMS__RANKER", &s.ranker)
        .env("ADSERVE_UPSTREAMS__AUCTION", &s.auction)
        .env("ADSERVE_DEADLINES__FEATURES", "3s")
        // Room for the 3 s features deadline in the request's budget.
        .env("ADSERVE_DEADLINES__REQUEST", "4s")
        // Keys as the Helm chart passes them (a TOML list from a Secret).
        .env("ADSERVE_CLICK_TOKENS__KEYS", format!("[\"{}\", \"{}\"]", "ab".repeat(32), "cd".repeat(32)))
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn");
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command.stdout(Stdio::null()).kill_on_drop(true).spawn()?;
    let http = format!("http://127.0.0.1:{http_port}");
    for _ in 0..100 {
        if adserve_integration_tests::http_client()
            .get(format!("{http}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(HungGateway { child, http, grpc: format!("http://127.0.0.1:{grpc_port}"), holder });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the gateway did not become ready")
}

fn ad_request() -> serde_json::Value {
    serde_json::json!({"user_id": "demo-user-1", "context": {"placement": "feed_top", "device": "mobile"}, "slots": 1})
}

#[tokio::test]
async fn sigterm_flips_readiness_first_then_finishes_requests_in_flight() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    // The request below waits out its whole 3 s deadline, so it is in flight
    // when SIGTERM arrives.
    let env = [("ADSERVE_SERVER__READINESS_DRAIN", "1500ms"), ("ADSERVE_SERVER__SHUTDOWN_GRACE", "10s")];
    let HungGateway { child: mut gateway, http: base, holder, .. } = gateway_with_hung_features(&s, &env).await?;
    let http_port: u16 = base.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");

    let in_flight = tokio::spawn({
        let url = format!("{base}/v1/ads");
        async move {
            let r = adserve_integration_tests::http_client().post(url).json(&ad_request()).send().await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.json::<serde_json::Value>().await?))
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = gateway.id().expect("running");
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;

    // Readiness flips at once, while the listener still accepts new
    // connections (the readiness drain): a fresh client is told 503, draining.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = adserve_integration_tests::http_client().get(format!("{base}/healthz")).send().await?;
    assert_eq!(r.status(), 503, "readiness must flip as soon as SIGTERM arrives");
    let v: serde_json::Value = r.json().await?;
    assert!(v["reasons"].to_string().contains("draining"), "{v}");

    // The request that was in flight is answered (degraded), not cut off.
    let (status, v) = in_flight.await??;
    assert_eq!(status, 200, "{v}");
    assert!(v["degraded"].to_string().contains("feature-service"), "{v}");
    // Then the process exits cleanly, and nothing listens any more.
    let exit = tokio::time::timeout(Duration::from_secs(30), gateway.wait()).await??;
    assert!(exit.success(), "exit status {exit}");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await.is_err());
    holder.abort();
    Ok(())
}

/// Strict config across the process boundary: every service refuses to
/// start on a misspelt key (here the classic one underscore instead of two)
/// or an untyped duration, names the key, and exits non-zero without serving.
#[tokio::test]
async fn a_misspelt_config_key_stops_every_service_at_start_naming_the_key() -> anyhow::Result<()> {
    let services =
        ["adserve-gateway", "adserve-feature-service", "adserve-ranker", "adserve-auction", "adserve-label-joiner"];
    for (key, value, named) in [
        ("ADSERVE_SERVER_GRPC_ADDR", "127.0.0.1:1".to_string(), "server_grpc_addr"),
        ("ADSERVE_SERVER__SHUTDOWN_GRACE", "10000".to_string(), "server.shutdown_grace"),
    ] {
        for service in services {
            let out = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::process::Command::new(binary(service))
                    .env(key, &value)
                    .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
                    .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| anyhow::anyhow!("{service} with {key}={value} did not exit within 30 s"))??;
            // figment names env keys in upper case.
            let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(!out.status.success(), "{service} started with {key}={value}");
            assert!(stderr.contains(named), "{service}: {key}={value} not named in: {stderr}");
            // --check-config says the same without starting anything.
            let check =
                tokio::process::Command::new(binary(service)).arg("--check-config").env(key, &value).output().await?;
            assert_eq!(check.status.code(), Some(1), "{service} --check-config with {key}={value}");
            assert!(String::from_utf8_lossy(&check.stderr).to_lowercase().contains(named));
        }
    }
    // A valid configuration checks out (exit 0) without binding a port: the
    // defaults' ports are the running stack's, so a start would fail. (From
    // the repository root: the ranker's default model.dir is relative.)
    for service in services {
        let check = tokio::process::Command::new(binary(service))
            .arg("--check-config")
            .current_dir(adserve_integration_tests::repo_root())
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(0), "{service} --check-config on its defaults: {stderr}");
        assert!(stderr.contains("config ok"), "{stderr}");
    }
    Ok(())
}

/// scripts/start.sh reuses a service only when it is this checkout's build:
/// the running stack (started by `make test` from this checkout) is reused as
/// is, and a port held by something that is not the service is refused with
/// a message naming it, instead of being "reused" and tested.
#[tokio::test]
async fn start_script_reuses_only_our_build_and_refuses_foreign_port_holders() -> anyhow::Result<()> {
    let script = adserve_integration_tests::repo_root().join("scripts/start.sh");
    let run = |envs: Vec<(&str, String)>| {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg(&script).arg("services").env("ADSTACK_SKIP_BUILD", "1").kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        tokio::time::timeout(Duration::from_secs(120), cmd.output())
    };

    // The stack this test runs against is this checkout's build: all reused.
    let out = run(vec![]).await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "start.sh services on the running stack failed: {log}");
    assert!(!log.contains("runs another build"), "this checkout's services were restarted: {log}");

    // A foreign listener (accepts, never answers) on the auction's port.
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = foreign.local_addr()?.port();
    let run_dir = tempfile::tempdir()?;
    let out = run(vec![
        ("ADSTACK_RUN", run_dir.path().display().to_string()),
        ("AUCTION_GRPC_PORT", port.to_string()),
        ("AUCTION_METRICS_PORT", free_port().to_string()),
    ])
    .await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start.sh reused a foreign port holder: {log}");
    assert!(log.contains(&format!("127.0.0.1:{port} is held by a process that is not adserve-auction")), "{log}");
    Ok(())
}

/// Admission control across the process boundary: with
/// server.max_concurrent_requests = 1 and one request in flight (held by a
/// hung upstream), a second one is shed at once, HTTP 503 `overloaded` and
/// gRPC RESOURCE_EXHAUSTED, answered while the first is still running;
/// health checks are never shed; the first is served; capacity comes back.
#[tokio::test]
async fn requests_beyond_the_concurrency_limit_are_shed_not_queued() -> anyhow::Result<()> {
    use adserve_proto::v1::{GetAdsRequest, RequestContext, gateway_service_client::GatewayServiceClient};
    let s = Stack::ready().await?;
    let g = gateway_with_hung_features(&s, &[("ADSERVE_SERVER__MAX_CONCURRENT_REQUESTS", "1")]).await?;
    let client = adserve_integration_tests::http_client();

    // HTTP.
    let first = tokio::spawn(client.post(format!("{}/v1/ads", g.http)).json(&ad_request()).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shed = client.post(format!("{}/v1/ads", g.http)).json(&ad_request()).send().await?;
    assert!(!first.is_finished(), "the shed request was answered only after the first finished: it queued");
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]), "shed without Retry-After");
    let v: serde_json::Value = shed.json().await?;
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    let health = client.get(format!("{}/healthz", g.http)).send().await?;
    assert_eq!(health.status(), 200, "health checks are never shed");
    let first = first.await??;
    assert_eq!(first.status(), 200);
    let after = client.post(format!("{}/v1/ads", g.http)).json(&ad_request()).send();
    let after = tokio::spawn(after);

    // gRPC (its own budget): one GetAds in flight, the second shed.
    let request = GetAdsRequest {
        user_id: "demo-user-1".into(),
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
        slots: 1,
        ..Default::default()
    };
    let mut grpc = GatewayServiceClient::connect(g.grpc.clone()).await?;
    let grpc_first = tokio::spawn({
        let mut grpc = grpc.clone();
        let request = request.clone();
        async move { grpc.get_ads(request).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = grpc.get_ads(request).await.expect_err("shed");
    assert!(!grpc_first.is_finished(), "the shed call queued behind the first");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("max_concurrent_requests"), "{status:?}");
    grpc_first.await?.expect("the admitted call is served");

    // Capacity came back on HTTP once the first finished.
    assert_eq!(after.await??.status(), 200);
    g.holder.abort();
    Ok(())
}

/// The ranker's fallback chain across the gateway: a ranker whose model
/// never gets time answers with its fallback model, or with its prior when
/// that is off; the gateway serves the ad, says the ranker degraded (instead
/// of calling its own fallback), and logs the level with the impression:
/// the fallback model carries the production model's version, so only the
/// level tells its training rows from the model's.
#[tokio::test]
async fn the_gateway_reports_scores_from_the_rankers_fallback_chain_as_degraded() -> anyhow::Result<()> {
    let s = Stack::ready().await?;
    let (answer, event) = served_by_the_rankers_fallback(&s, "false", "scored by the prior").await?;
    let degraded = answer["degraded"].to_string();
    assert!(
        degraded.contains("scored by the prior (fallback-prior)") && degraded.contains("no time for the model"),
        "{answer}"
    );
    assert_eq!(answer["model_version"], "fallback-prior", "{answer}");
    assert_eq!((event.model_version.as_str(), event.score_level()), ("fallback-prior", ScoreLevel::Prior));

    let (answer, event) = served_by_the_rankers_fallback(&s, "true", "scored by the fallback model").await?;
    let degraded = answer["degraded"].to_string();
    assert!(degraded.contains("scored by the fallback model (ctr-baseline-v1)"), "{answer}");
    assert_eq!(answer["model_version"], "ctr-baseline-v1", "the production model's version: {answer}");
    assert_eq!((event.model_version.as_str(), event.score_level()), ("ctr-baseline-v1", ScoreLevel::FallbackModel));
    Ok(())
}

/// An ad served through a gateway whose ranker keeps 5 s for its fallback
/// chain (so its model never gets time), the fallback model on or off, once
/// the degradation names `level`; and the impression it logged.
async fn served_by_the_rankers_fallback(
    s: &Stack,
    fallback_model: &str,
    level: &str,
) -> anyhow::Result<(serde_json::Value, adserve_proto::v1::ImpressionEvent)> {
    let (mut ranker, ranker_port, _) = adserve_integration_tests::ranker_command(
        &adserve_integration_tests::repo_root().join("models/ctr-baseline"),
        &[("ADSERVE_FALLBACK__ENABLED", fallback_model), ("ADSERVE_FALLBACK__RESERVE", "5s")],
    );
    let _ranker = ranker.stdout(Stdio::null()).spawn()?;
    let ranker_url = format!("http://127.0.0.1:{ranker_port}");
    let HungGateway { child: _gateway, http, holder, .. } =
        gateway_with_hung_features(s, &[("ADSERVE_UPSTREAMS__RANKER", ranker_url.as_str())]).await?;
    let mut answer = serde_json::Value::Null;
    for _ in 0..50 {
        let r =
            adserve_integration_tests::http_client().post(format!("{http}/v1/ads")).json(&ad_request()).send().await?;
        answer = r.json().await?;
        // Until the ranker listens, the gateway's own fallback answers.
        if answer["degraded"].to_string().contains(level) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    holder.abort();
    let impression = answer["winners"][0]["impression_id"].as_str().with_context(|| format!("no winner: {answer}"))?;
    let event = s.impression_event(impression).await?;
    Ok((answer, event))
}

/// Slow clients across the process boundary: a client that trickles its
/// request headers one line at a time (slowloris) is cut off after
/// server.http_header_timeout, however long it keeps trickling; so is a
/// client that connects and sends nothing. A prompt client on the same
/// listener is served meanwhile.
#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Stack::ready().await?;
    let g = gateway_with_hung_features(&s, &[("ADSERVE_SERVER__HTTP_HEADER_TIMEOUT", "300ms")]).await?;
    let addr = g.http.trim_start_matches("http://").to_string();

    // Trickles a header line every 100 ms for up to 20 s; returns how many
    // lines it sent before the server closed the connection, or None if it
    // never did.
    let trickle = |first: &'static [u8]| {
        let addr = addr.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(&addr).await?;
            let (mut read, mut write) = stream.into_split();
            let closed = tokio::spawn(async move {
                let mut buf = [0u8; 512];
                // EOF, a reset or an error answer: the server is done with us.
                let _ = read.read(&mut buf).await;
            });
            write.write_all(first).await?;
            for line in 0..200u32 {
                if closed.is_finished() {
                    return anyhow::Ok(Some(line));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !first.is_empty() && write.write_all(b"X-Slow: 1\r\n").await.is_err() {
                    return anyhow::Ok(Some(line));
                }
            }
            anyhow::Ok(None)
        }
    };
    let (slowloris, silent) = tokio::join!(trickle(b"POST /v1/ads HTTP/1.1\r\nHost: x\r\n"), trickle(b""));
    let lines = slowloris?.expect("a client trickling headers for 20 s was never cut off");
    assert!(lines < 100, "cut off only after {lines} header lines");
    silent?.expect("a connection that never sent a byte was held for 20 s");

    // The listener is fine: a prompt client is served.
    let r = adserve_integration_tests::http_client().get(format!("{}/livez", g.http)).send().await?;
    assert_eq!(r.status(), 200);
    g.holder.abort();
    Ok(())
}

/// The end-to-end budget across the process boundary, against a black hole
/// (a feature-service that accepts connections and never answers) behind a
/// generous 3 s features deadline: a request with tmax_ms = 400 is answered
/// within its budget, degraded, with the features call cut at what was left
/// of it; a gRPC deadline does the same; a tmax too short to log the
/// impression is refused naming the field.
#[tokio::test]
async fn a_black_hole_upstream_costs_at_most_the_requests_budget() -> anyhow::Result<()> {
    use adserve_proto::v1::{GetAdsRequest, RequestContext, gateway_service_client::GatewayServiceClient};
    let s = Stack::ready().await?;
    let g = gateway_with_hung_features(&s, &[]).await?;
    let client = adserve_integration_tests::http_client();

    let mut body = ad_request();
    body["tmax_ms"] = 400.into();
    let r = client.post(format!("{}/v1/ads", g.http)).json(&body).send().await?;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await?;
    let degraded = v["degraded"].to_string();
    assert!(degraded.contains("feature-service"), "{v}");
    // Cut at what the budget left (400 ms less the 150 ms log reserve, less
    // the catalog's share), not at the 3 s features deadline.
    let cut: u64 = degraded
        .split("no answer within ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no features timeout in {degraded}"));
    assert!(cut <= 250, "the features call got {cut} ms of a 400 ms budget");
    // The click token was signed with the configured key (from the
    // environment, as the chart passes it): the click is accepted.
    if let Some(w) = v["winners"].get(0) {
        let click = serde_json::json!({"impression_id": w["impression_id"], "click_token": w["click_token"]});
        let r = client.post(format!("{}/v1/clicks", g.http)).json(&click).send().await?;
        assert_eq!(r.status(), 202);
    }

    // A budget too short to log the impression: refused, naming the field.
    body["tmax_ms"] = 50.into();
    let r = client.post(format!("{}/v1/ads", g.http)).json(&body).send().await?;
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await?;
    assert!(v["error"]["message"].as_str().unwrap_or("").starts_with("tmax_ms"), "{v}");

    // gRPC: the caller's deadline is the budget.
    let mut grpc = GatewayServiceClient::connect(g.grpc.clone()).await?;
    let mut request = tonic::Request::new(GetAdsRequest {
        user_id: "demo-user-1".into(),
        context: Some(RequestContext { placement: "feed_top".into(), device: "mobile".into(), ..Default::default() }),
        slots: 1,
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(600));
    let answer = grpc.get_ads(request).await.expect("answered within the caller's deadline").into_inner();
    assert!(answer.degraded.iter().any(|d| d.component == "feature-service"), "{answer:?}");
    g.holder.abort();
    Ok(())
}
