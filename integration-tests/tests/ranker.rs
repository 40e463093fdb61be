//! The ranker binary as a process: the GPU provider list falls back to CPU on
//! this machine (the default build compiles the CUDA and TensorRT providers
//! in); a model that does not match its manifest stops the start with the
//! reason instead of failing every Score behind a SERVING health check; and
//! `adservectl` drives a running ranker through the model registry in
//! PostgreSQL (promote, rollback, a corrupt artifact refused) while calls
//! keep flowing, none of them failing.

use std::{
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use adserve_integration_tests::{Stack, binary, free_port, repo_root};
use adserve_proto::v1::{FeatureMatrix, GetModelRequest, ScoreRequest, ranker_service_client::RankerServiceClient};
use tonic::transport::Channel;

fn ranker(model_dir: &Path, env: &[(&str, &str)]) -> (tokio::process::Command, u16, u16) {
    let dylib = std::env::var("ORT_DYLIB_PATH")
        .expect("ORT_DYLIB_PATH is unset: run the tests through `make test` (scripts/env.sh)");
    let (grpc, metrics) = (free_port(), free_port());
    let mut command = tokio::process::Command::new(binary("adserve-ranker"));
    command
        .env("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{grpc}"))
        .env("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{metrics}"))
        .env("ADSERVE_ONNXRUNTIME_DYLIB", dylib)
        .env("ADSERVE_MODEL__DIR", model_dir)
        .env("ADSERVE_TELEMETRY__LOG_FILTER", "warn")
        // These rankers do not follow the stack's registry unless a test says so.
        .env("ADSERVE_REGISTRY__ENABLED", "false")
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    (command, grpc, metrics)
}

#[tokio::test]
async fn a_gpu_provider_list_falls_back_to_cpu_and_says_so() -> anyhow::Result<()> {
    let model = repo_root().join("models/ctr-baseline");
    let (mut command, grpc, metrics) =
        ranker(&model, &[("ADSERVE_MODEL__EXECUTION_PROVIDERS", r#"["tensorrt","cuda","cpu"]"#)]);
    let _child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    let model = client.get_model(GetModelRequest {}).await?.into_inner();
    assert_eq!(model.execution_provider, "cpu", "no GPU here: the list must end on CPU");
    // It scores, on CPU.
    let scores = client.score(ScoreRequest { matrix: Some(matrix(2)) }).await?.into_inner();
    assert_eq!(scores.pctr.len(), 2);
    // Each GPU provider that was tried and passed over is counted, by reason.
    let text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await?.text().await?;
    for requested in ["tensorrt", "cuda"] {
        assert!(
            text.lines().any(|l| l.starts_with("adserve_ranker_provider_fallbacks_total")
                && l.contains(&format!("requested=\"{requested}\""))),
            "no fallback counted for {requested}:\n{text}"
        );
    }
    assert!(text.contains("adserve_ranker_sessions{") && text.contains("provider=\"cpu\""), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_model_that_fails_its_checks_stops_the_start_with_the_reason() -> anyhow::Result<()> {
    let base = repo_root().join("models/ctr-baseline");
    let dir = tempfile::tempdir()?;
    std::fs::copy(base.join("manifest.json"), dir.path().join("manifest.json"))?;
    // A torn copy: the manifest's checksum no longer matches.
    let mut bytes = std::fs::read(base.join("model.onnx"))?;
    bytes.truncate(bytes.len() / 2);
    std::fs::write(dir.path().join("model.onnx"), bytes)?;
    let (mut command, _, _) = ranker(dir.path(), &[]);
    let out = tokio::time::timeout(Duration::from_secs(60), command.stdout(Stdio::null()).output())
        .await
        .map_err(|_| anyhow::anyhow!("the ranker kept running on a torn model"))??;
    assert!(!out.status.success(), "the ranker started on a torn model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sha256") && stderr.contains("torn"), "reason not given: {stderr}");
    Ok(())
}

async fn connect(port: u16) -> anyhow::Result<RankerServiceClient<Channel>> {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(mut c) = RankerServiceClient::connect(url.clone()).await
            && c.get_model(GetModelRequest {}).await.is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the ranker did not serve on {url}")
}

fn matrix(rows: usize) -> FeatureMatrix {
    let registry = adserve_features::registry();
    let defaults = registry.defaults();
    FeatureMatrix {
        feature_names: registry.names().iter().map(|s| s.to_string()).collect(),
        num_rows: rows as u32,
        values: (0..rows).flat_map(|_| defaults.iter().copied()).collect(),
    }
}

/// A copy of the baseline model under another version.
fn model_version(root: &Path, version: &str) -> anyhow::Result<std::path::PathBuf> {
    let base = repo_root().join("models/ctr-baseline");
    let dir = root.join(version);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(base.join("model.onnx"), dir.join("model.onnx"))?;
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("manifest.json"))?)?;
    manifest["model_version"] = version.into();
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;
    Ok(dir)
}

/// Runs adservectl against the test's registry schema.
async fn adservectl(s: &Stack, schema: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary("adservectl"))
            .args(args)
            .env("ADSERVE_REGISTRY__POSTGRES__URL", &s.postgres)
            .env("ADSERVE_REGISTRY__POSTGRES__SCHEMA", schema)
            .env("USER", "integration-test")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("adservectl {args:?} did not finish"))??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn ok(s: &Stack, schema: &str, args: &[&str]) -> anyhow::Result<String> {
    let (success, stdout, stderr) = adservectl(s, schema, args).await?;
    anyhow::ensure!(success, "adservectl {args:?} failed: {stderr}");
    Ok(stdout)
}

/// Waits until the ranker serves `version`. The registry's poll interval is
/// an hour in this test, so only LISTEN/NOTIFY can get it there in time.
async fn serves(client: &mut RankerServiceClient<Channel>, version: &str) -> anyhow::Result<()> {
    for _ in 0..300 {
        if client.get_model(GetModelRequest {}).await?.into_inner().model_version == version {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the ranker never served {version}")
}

fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn adservectl_swaps_and_rolls_back_a_running_ranker_under_load_without_a_failed_call() -> anyhow::Result<()> {
    let s = Stack::from_env();
    let schema = format!("registry_test_{}_{}", std::process::id(), free_port());
    let name = "ctr-it";
    let models = tempfile::tempdir()?;
    let v1 = model_version(models.path(), "ctr-it-v1")?;
    let v2 = model_version(models.path(), "ctr-it-v2")?;
    let v3 = model_version(models.path(), "ctr-it-v3")?;

    let (mut command, grpc, metrics) = ranker(
        &repo_root().join("models/ctr-baseline"),
        &[
            ("ADSERVE_REGISTRY__ENABLED", "true"),
            ("ADSERVE_REGISTRY__MODEL_NAME", name),
            ("ADSERVE_REGISTRY__POSTGRES__URL", &s.postgres),
            ("ADSERVE_REGISTRY__POSTGRES__SCHEMA", &schema),
            ("ADSERVE_REGISTRY__POLL_INTERVAL", "1h"),
        ],
    );
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    // An empty registry: the configured model serves.
    serves(&mut client, "ctr-baseline-v1").await?;

    // Load: 8 callers, until the end of the test. Every call must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|i| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = std::collections::BTreeMap::<String, u64>::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.score(ScoreRequest { matrix: Some(matrix(1 + i * 30)) }).await {
                        Ok(r) => *seen.entry(r.into_inner().model_version).or_default() += 1,
                        Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (seen, failures)
            })
        })
        .collect();

    for (dir, version) in [(&v1, "ctr-it-v1"), (&v2, "ctr-it-v2"), (&v3, "ctr-it-v3")] {
        let out = ok(&s, &schema, &["models", "register", "--name", name, "--dir", dir.to_str().unwrap()]).await?;
        assert!(out.contains(&format!("registered {name} {version}")), "{out}");
    }
    ok(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v1", "--to", "production"]).await?;
    serves(&mut client, "ctr-it-v1").await?;
    ok(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "canary"])
        .await
        .expect_err("a canary without a share is refused");
    ok(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "production"]).await?;
    serves(&mut client, "ctr-it-v2").await?;

    // Rollback: v1 again.
    let out = ok(&s, &schema, &["models", "rollback", "--name", name, "--reason", "test"]).await?;
    assert!(
        out.contains("ctr-it-v2: production -> retired") && out.contains("ctr-it-v1: retired -> production"),
        "{out}"
    );
    serves(&mut client, "ctr-it-v1").await?;

    // Illegal transitions are refused with the reason.
    let (success, _, stderr) =
        adservectl(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v1", "--to", "retired"])
            .await?;
    assert!(!success && stderr.contains("would leave nothing to serve"), "{stderr}");
    let (success, _, stderr) =
        adservectl(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "production"])
            .await?;
    assert!(!success && stderr.contains("back to candidate first"), "{stderr}");

    // v3's file is damaged after registration: the ranker refuses it and
    // v1 keeps serving.
    let onnx = v3.join("model.onnx");
    let bytes = std::fs::read(&onnx)?;
    std::fs::write(&onnx, &bytes[..bytes.len() / 2])?;
    ok(&s, &schema, &["models", "promote", "--name", name, "--version", "ctr-it-v3", "--to", "production"]).await?;
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let mut refused = 0.0;
    for _ in 0..300 {
        let text = reqwest::get(&url).await?.text().await?;
        refused = counter(&text, "adserve_ranker_model_swaps_total", "result=\"refused\"");
        if refused >= 1.0 {
            assert!(counter(&text, "adserve_ranker_model_load_failures_total", "reason=\"checksum\"") >= 1.0, "{text}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused >= 1.0, "the torn v3 was never refused");
    assert_eq!(client.get_model(GetModelRequest {}).await?.into_inner().model_version, "ctr-it-v1");

    // The registry's own view.
    let list = ok(&s, &schema, &["models", "list", "--name", name, "--json"]).await?;
    let stages: Vec<(String, String)> = list
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json line");
            (v["version"].as_str().unwrap_or_default().into(), v["stage"].as_str().unwrap_or_default().into())
        })
        .collect();
    for (version, stage) in [("ctr-it-v1", "retired"), ("ctr-it-v2", "retired"), ("ctr-it-v3", "production")] {
        assert!(stages.contains(&(version.into(), stage.into())), "{version} not {stage}: {stages:?}");
    }
    let history = ok(&s, &schema, &["models", "history", "--name", name]).await?;
    assert_eq!(history.lines().count(), 3 + 1 + 2 + 2 + 2, "{history}");

    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for caller in callers {
        let (versions, failures) = caller.await?;
        assert!(failures.is_empty(), "calls failed during swaps: {failures:?}");
        for (v, n) in versions {
            *seen.entry(v).or_default() += n;
        }
    }
    for version in ["ctr-baseline-v1", "ctr-it-v1", "ctr-it-v2"] {
        assert!(seen.contains_key(version), "no call was served by {version}: {seen:?}");
    }
    assert!(!seen.contains_key("ctr-it-v3"), "the torn model served: {seen:?}");

    let registry = adserve_registry::Registry::connect_lazy(&adserve_registry::PostgresConfig {
        url: s.postgres.clone(),
        schema: schema.clone(),
        ..Default::default()
    })?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE"))).execute(registry.pool()).await?;
    Ok(())
}
