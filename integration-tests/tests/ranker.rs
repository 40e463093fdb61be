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

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use adserve_integration_tests::{HungFile, Stack, binary, free_port, repo_root};
use adserve_proto::v1::{
    FeatureMatrix, GetModelRequest, ScoreLevel, ScoreRequest, ranker_service_client::RankerServiceClient,
};
use anyhow::Context as _;
use tonic::transport::Channel;

use adserve_integration_tests::ranker_command as ranker;

/// Callers scoring with `client` in a loop until `stop`: each returns the
/// versions that answered it (with counts) and every failure. An answer from
/// the fallback chain (the fallback model or the prior) counts as a failure:
/// "zero failed requests" through a swap means the served model answered.
type Callers = Vec<tokio::task::JoinHandle<(std::collections::BTreeMap<String, u64>, Vec<String>)>>;

fn callers(
    client: &RankerServiceClient<Channel>,
    n: usize,
    rows: fn(usize) -> usize,
    stop: &Arc<AtomicBool>,
) -> Callers {
    (0..n)
        .map(|i| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = std::collections::BTreeMap::<String, u64>::new();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.score(ScoreRequest { matrix: Some(matrix(rows(i))), ..Default::default() }).await {
                        Ok(r) => {
                            let r = r.into_inner();
                            if r.level() != ScoreLevel::Model || !r.fallback_reason.is_empty() {
                                failures.push(format!(
                                    "{} answered at {:?}: {}",
                                    r.model_version,
                                    r.level(),
                                    r.fallback_reason
                                ));
                            }
                            *seen.entry(r.model_version).or_default() += 1;
                        }
                        Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (seen, failures)
            })
        })
        .collect()
}

#[tokio::test]
async fn a_gpu_provider_list_falls_back_to_cpu_and_says_so() -> anyhow::Result<()> {
    let model = repo_root().join("models/ctr-baseline");
    let (mut command, grpc, metrics) =
        ranker(&model, &[("ADSERVE_MODEL__EXECUTION_PROVIDERS", r#"["tensorrt","cuda","cpu"]"#)]);
    let _child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    let model = client.get_model(GetModelRequest::default()).await?.into_inner();
    assert_eq!(model.execution_provider, "cpu", "no GPU here: the list must end on CPU");
    // It scores, on CPU.
    let scores = client.score(ScoreRequest { matrix: Some(matrix(2)), ..Default::default() }).await?.into_inner();
    assert_eq!(scores.pctr.len(), 2);
    // Each GPU provider that was tried and passed over is counted, by reason.
    let text = adserve_integration_tests::http_client()
        .get(format!("http://127.0.0.1:{metrics}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    // "unavailable", not "not_compiled": the providers are in this build and
    // it is ONNX Runtime (a CPU build, no GPU) that turned them down.
    for requested in ["tensorrt", "cuda"] {
        assert!(
            text.lines().any(|l| l.starts_with("adserve_ranker_provider_fallbacks_total")
                && l.contains(&format!("requested=\"{requested}\""))
                && l.contains("reason=\"unavailable\"")),
            "no fallback counted for {requested}:\n{text}"
        );
    }
    assert!(text.contains("adserve_ranker_sessions{") && text.contains("provider=\"cpu\""), "{text}");
    // The state an alert can hold on for as long as it lasts (the counters
    // above move once, at the load): this model runs on a later provider
    // than the first one asked for. The fallback model (its own load) too.
    for queue in ["model", "fallback"] {
        let fell_back = text
            .lines()
            .find(|l| l.starts_with("adserve_ranker_provider_fallback{") && l.contains(&format!("queue=\"{queue}\"")));
        assert!(fell_back.is_some_and(|l| l.ends_with(" 1")), "{queue}: {fell_back:?}\n{text}");
    }
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
            && c.get_model(GetModelRequest::default()).await.is_ok()
        {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the ranker did not serve on {url}")
}

/// `rows` rows as the feature-service serves them: every registry dense
/// feature at its default, and every categorical with an id in its buckets.
fn matrix(rows: usize) -> FeatureMatrix {
    let registry = adserve_features::registry();
    let defaults = registry.defaults();
    FeatureMatrix {
        feature_names: registry.names().iter().map(|s| s.to_string()).collect(),
        num_rows: rows as u32,
        values: (0..rows).flat_map(|_| defaults.iter().copied()).collect(),
        categorical_names: registry.categorical.iter().map(|f| f.name.clone()).collect(),
        categorical_ids: (0..rows)
            .flat_map(|r| registry.categorical.iter().map(move |f| (r as i64) % i64::from(f.buckets.unwrap_or(1))))
            .collect(),
        ..Default::default()
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
        if client.get_model(GetModelRequest::default()).await?.into_inner().model_version == version {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the ranker never served {version}")
}

/// Waits until the ranker whose metrics listen on `metrics` has refused a
/// registry version (`adserve_ranker_model_swaps_total{result="refused"}`)
/// and counted the load failure under `reason`.
async fn refused(metrics: u16, reason: &str) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let failure = format!("reason=\"{reason}\"");
    let mut text = String::new();
    for _ in 0..300 {
        text = adserve_integration_tests::bench::prom::scrape(&url).await?;
        if counter(&text, "adserve_ranker_model_swaps_total", "result=\"refused\"") >= 1.0
            && counter(&text, "adserve_ranker_model_load_failures_total", &failure) >= 1.0
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("never refused with reason {reason}:\n{text}")
}

/// (thread id, name, nice value) of every thread of process `pid`, from
/// /proc; the main thread's id is `pid`.
fn thread_nice(pid: u32) -> Vec<(u32, String, i32)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(t.path().join("comm")).ok()?.trim().to_string();
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // After "pid (comm)": state is field 3, nice field 19.
            let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()?;
            Some((tid, name, nice))
        })
        .collect()
}

fn counter(text: &str, name: &str, label: &str) -> f64 {
    adserve_integration_tests::bench::prom::counter(text, name, &[label])
}

/// A model registry of the test's own: a schema of its own in the stack's
/// PostgreSQL (dropped at the end), copies of the baseline model under the
/// test's versions, adservectl against it, and rankers that follow it.
struct TestRegistry {
    s: Stack,
    schema: String,
    name: &'static str,
    models: tempfile::TempDir,
}

impl TestRegistry {
    fn new(name: &'static str) -> anyhow::Result<Self> {
        let schema = format!("registry_{}_{}_{}", name.replace('-', "_"), std::process::id(), free_port());
        Ok(Self { s: Stack::from_env(), schema, name, models: tempfile::tempdir()? })
    }

    /// Copies the baseline as `version`, registers it, returns its directory.
    async fn register(&self, version: &str) -> anyhow::Result<std::path::PathBuf> {
        let dir = model_version(self.models.path(), version)?;
        let out = self.ok(&["models", "register", "--name", self.name, "--dir", dir.to_str().unwrap()]).await?;
        anyhow::ensure!(out.contains(&format!("registered {} {version}", self.name)), "{out}");
        Ok(dir)
    }

    async fn promote(&self, version: &str, to: &str) -> anyhow::Result<String> {
        self.ok(&["models", "promote", "--name", self.name, "--version", version, "--to", to]).await
    }

    async fn ctl(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        adservectl(&self.s, &self.schema, args).await
    }

    async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        ok(&self.s, &self.schema, args).await
    }

    /// A ranker following this registry through `url` (the stack's
    /// PostgreSQL unless a test puts a relay in between), plus `extra` env.
    fn ranker(&self, url: &str, extra: &[(&str, &str)]) -> (tokio::process::Command, u16, u16) {
        let mut env = vec![
            ("ADSERVE_REGISTRY__ENABLED", "true"),
            ("ADSERVE_REGISTRY__MODEL_NAME", self.name),
            ("ADSERVE_REGISTRY__POSTGRES__URL", url),
            ("ADSERVE_REGISTRY__POSTGRES__SCHEMA", &self.schema),
            // Only NOTIFY can bring a change in time, unless a test says otherwise.
            ("ADSERVE_REGISTRY__POLL_INTERVAL", "1h"),
        ];
        env.extend_from_slice(extra);
        ranker(&repo_root().join("models/ctr-baseline"), &env)
    }

    async fn drop_schema(self) -> anyhow::Result<()> {
        let registry = adserve_registry::Registry::connect_lazy(&adserve_registry::PostgresConfig {
            url: self.s.postgres.clone(),
            schema: self.schema.clone(),
            ..Default::default()
        })?;
        let drop = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        sqlx::query(sqlx::AssertSqlSafe(drop)).execute(registry.pool()).await?;
        Ok(())
    }
}

#[tokio::test]
async fn adservectl_swaps_and_rolls_back_a_running_ranker_under_load_without_a_failed_call() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-it")?;
    let (s, name) = (&reg.s, reg.name);
    let v1 = model_version(reg.models.path(), "ctr-it-v1")?;
    let v2 = model_version(reg.models.path(), "ctr-it-v2")?;
    let v3 = model_version(reg.models.path(), "ctr-it-v3")?;

    let (mut command, grpc, metrics) = reg.ranker(&s.postgres, &[]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    // An empty registry: the configured model serves.
    serves(&mut client, "ctr-baseline-v1").await?;

    // Load: 8 callers, until the end of the test. Every call must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let callers = callers(&client, 8, |i| 1 + i * 30, &stop);

    for (dir, version) in [(&v1, "ctr-it-v1"), (&v2, "ctr-it-v2"), (&v3, "ctr-it-v3")] {
        let out = reg.ok(&["models", "register", "--name", name, "--dir", dir.to_str().unwrap()]).await?;
        assert!(out.contains(&format!("registered {name} {version}")), "{out}");
    }
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-it-v1", "--to", "production"]).await?;
    serves(&mut client, "ctr-it-v1").await?;
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "canary"])
        .await
        .expect_err("a canary without a share is refused");
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "production"]).await?;
    serves(&mut client, "ctr-it-v2").await?;

    // Rollback: v1 again.
    let out = reg.ok(&["models", "rollback", "--name", name, "--reason", "test"]).await?;
    assert!(
        out.contains("ctr-it-v2: production -> retired") && out.contains("ctr-it-v1: retired -> production"),
        "{out}"
    );
    serves(&mut client, "ctr-it-v1").await?;
    // v1 was swapped out moments ago and kept warm (registry.keep_previous):
    // the rollback swapped it back in without loading it again.
    let text = adserve_integration_tests::bench::prom::scrape(&format!("http://127.0.0.1:{metrics}/metrics")).await?;
    assert_eq!(counter(&text, "adserve_ranker_model_reused_total", "from=\"previous\""), 1.0, "{text}");
    // v1 was the first production version: nothing earlier to go back to.
    let (success, _, stderr) = reg.ctl(&["models", "rollback", "--name", name]).await?;
    assert!(!success && stderr.contains("no earlier production version"), "{stderr}");

    // Illegal transitions are refused with the reason.
    let (success, _, stderr) =
        reg.ctl(&["models", "promote", "--name", name, "--version", "ctr-it-v1", "--to", "retired"]).await?;
    assert!(!success && stderr.contains("would leave nothing to serve"), "{stderr}");
    let (success, _, stderr) =
        reg.ctl(&["models", "promote", "--name", name, "--version", "ctr-it-v2", "--to", "production"]).await?;
    assert!(!success && stderr.contains("back to candidate first"), "{stderr}");

    // v3's file is damaged after registration: the ranker refuses it and
    // v1 keeps serving.
    let onnx = v3.join("model.onnx");
    let bytes = std::fs::read(&onnx)?;
    std::fs::write(&onnx, &bytes[..bytes.len() / 2])?;
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-it-v3", "--to", "production"]).await?;
    refused(metrics, "checksum").await.context("the torn v3")?;
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-it-v1");

    // The registry's own view.
    let list = reg.ok(&["models", "list", "--name", name, "--json"]).await?;
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
    let history = reg.ok(&["models", "history", "--name", name]).await?;
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

    reg.drop_schema().await?;
    Ok(())
}

/// A TCP relay to PostgreSQL that can be frozen: while frozen, no byte moves
/// in either direction and every connection stays open, which is what a
/// SIGSTOPped database looks like from the ranker (a hung peer, not a dead
/// one). The shared test database itself keeps serving the other tests.
struct FreezableRelay {
    addr: std::net::SocketAddr,
    frozen: watch::Sender<bool>,
}

impl FreezableRelay {
    async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, thawed) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, thawed.clone()));
                tokio::spawn(pump(sr, cw, thawed.clone()));
            }
        });
        Ok(Self { addr, frozen })
    }

    fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
            // Frozen while waiting to read: stop reading until thawed.
            _ = frozen.wait_for(|f| *f) => continue,
        };
        if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_manifest_edited_after_registration_is_refused_and_the_old_model_keeps_serving() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-edit")?;
    reg.register("ctr-edit-v1").await?;
    let v2 = reg.register("ctr-edit-v2").await?;
    reg.promote("ctr-edit-v1", "production").await?;
    let (mut command, grpc, metrics) = reg.ranker(&reg.s.postgres, &[]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-edit-v1").await?;

    // v2's calibration is changed on disk after registration; model.onnx is
    // untouched, so its checksum still matches.
    let path = v2.join("manifest.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    manifest["calibration"] = serde_json::json!({"keep_rate": 0.25});
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
    reg.promote("ctr-edit-v2", "production").await?;

    refused(metrics, "mismatch").await.context("the edited manifest")?;
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-edit-v1");
    reg.drop_schema().await?;
    Ok(())
}

/// Waits until the sum of the series of `name` with every label in
/// `labels` is `want` on the ranker whose metrics listen on `metrics`.
async fn metric_is(metrics: u16, name: &str, labels: &[&str], want: f64) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let mut text = String::new();
    for _ in 0..300 {
        text = adserve_integration_tests::bench::prom::scrape(&url).await?;
        if adserve_integration_tests::bench::prom::counter(&text, name, labels) == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{name}{labels:?} never {want}:\n{text}")
}

#[tokio::test]
async fn a_rollback_does_not_wait_for_a_hung_shadow_load_and_the_shadow_loads_once_its_file_returns()
-> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-hang")?;
    reg.register("ctr-hang-v1").await?;
    reg.register("ctr-hang-v2").await?;
    let v3 = reg.register("ctr-hang-v3").await?;
    reg.promote("ctr-hang-v1", "production").await?;
    let (mut command, grpc, metrics) = reg.ranker(&reg.s.postgres, &[]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-hang-v1").await?;

    // The shadow's model file hangs: its load blocks until the test ends it.
    let hung = HungFile::new(&v3.join("model.onnx"))?;
    reg.promote("ctr-hang-v3", "shadow").await?;
    let shadow_loading = ["role=\"shadow\"", "model_version=\"ctr-hang-v3\""];
    metric_is(metrics, "adserve_ranker_model_loading", &shadow_loading, 1.0).await.context("the shadow load")?;

    // Meanwhile a promotion loads and swaps, and a rollback takes effect,
    // both through NOTIFY (the poll is an hour), under load: none waits
    // for the shadow's load, and no call fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load = callers(&client, 4, |i| 1 + i * 30, &stop);
    reg.promote("ctr-hang-v2", "production").await?;
    serves(&mut client, "ctr-hang-v2").await?;
    reg.ok(&["models", "rollback", "--name", reg.name, "--reason", "test"]).await?;
    serves(&mut client, "ctr-hang-v1").await?;
    stop.store(true, Ordering::Relaxed);
    for caller in load {
        let (_, failures) = caller.await?;
        assert!(failures.is_empty(), "calls failed while a shadow load hung: {failures:?}");
    }
    // The shadow load is still in flight, and nothing half-loaded is served.
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().shadow_model_version, "");
    metric_is(metrics, "adserve_ranker_model_loading", &shadow_loading, 1.0).await?;

    // The file system comes back: the same load finishes and the shadow
    // scores, with no further registry change.
    hung.release(Duration::from_secs(60)).await?;
    metric_is(metrics, "adserve_ranker_model_loading", &shadow_loading, 0.0).await?;
    metric_is(metrics, "adserve_ranker_model_info", &["role=\"shadow\"", "model_version=\"ctr-hang-v3\""], 1.0).await?;
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().shadow_model_version, "ctr-hang-v3");
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-hang-v1");
    reg.drop_schema().await?;
    Ok(())
}

/// Makes a registry change (`change`) and waits until the ranker whose
/// metrics listen on `metrics` has read the registry after it
/// (`adserve_ranker_registry_read_timestamp_seconds`).
async fn read_after(
    metrics: u16,
    change: impl std::future::Future<Output = anyhow::Result<String>>,
) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let read_at = |text: &str| counter(text, "adserve_ranker_registry_read_timestamp_seconds", "");
    // The clock is read before the change: the ranker may read the registry
    // before adservectl has exited.
    let changed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    change.await?;
    let mut text = String::new();
    for _ in 0..300 {
        text = adserve_integration_tests::bench::prom::scrape(&url).await?;
        if read_at(&text) > changed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the ranker never read the registry after the change:\n{text}")
}

#[tokio::test]
async fn a_load_that_outlives_its_time_limit_is_refused_then_served_once_its_file_returns() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-slow")?;
    reg.register("ctr-slow-v1").await?;
    let v2 = reg.register("ctr-slow-v2").await?;
    reg.promote("ctr-slow-v1", "production").await?;
    // Long enough for a real load of the baseline on a busy CI box, short
    // enough to wait for.
    let (mut command, grpc, metrics) = reg.ranker(&reg.s.postgres, &[("ADSERVE_REGISTRY__LOAD_TIMEOUT", "5s")]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-slow-v1").await?;

    let hung = HungFile::new(&v2.join("model.onnx"))?;
    reg.ok(&[
        "models",
        "promote",
        "--name",
        reg.name,
        "--version",
        "ctr-slow-v2",
        "--to",
        "canary",
        "--canary-share",
        "0.5",
    ])
    .await?;
    refused(metrics, "timeout").await.context("the hung canary")?;
    // The load cannot be cancelled: its thread is still blocked on the file,
    // and the gauge says so.
    let canary_loading = ["role=\"canary\"", "model_version=\"ctr-slow-v2\""];
    metric_is(metrics, "adserve_ranker_model_loading", &canary_loading, 1.0).await?;
    let model = client.get_model(GetModelRequest::default()).await?.into_inner();
    assert_eq!((model.model_version.as_str(), model.canary_model_version.as_str()), ("ctr-slow-v1", ""));
    // A notification meanwhile starts no second load beside the blocked one:
    // wait until the ranker has read the registry after the change (the poll
    // is an hour: the NOTIFY's read), then nothing more has loaded or failed.
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    read_after(
        metrics,
        reg.ok(&["models", "set-share", "--name", reg.name, "--version", "ctr-slow-v2", "--share", "0.6"]),
    )
    .await?;
    // A second load would block on the same file and run out of its 5 s
    // too: past that, only the first one has.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    assert_eq!(counter(&text, "adserve_ranker_model_load_failures_total", "reason=\"timeout\""), 1.0, "{text}");
    let load_seconds =
        |text: &str, what: &str| counter(text, &format!("adserve_ranker_model_load_seconds_{what}"), "role=\"canary\"");
    assert_eq!(load_seconds(&text, "count"), 0.0, "nothing finished loading beside the blocked load: {text}");
    assert_eq!(counter(&text, "adserve_ranker_model_loading", "role=\"canary\""), 1.0, "{text}");

    // The file returns: the timed-out load's thread reads it and ends, and
    // what it built serves as the canary, at the share set meanwhile,
    // without any further registry change and without a second load.
    hung.release(Duration::from_secs(60)).await?;
    metric_is(metrics, "adserve_ranker_model_info", &["role=\"canary\"", "model_version=\"ctr-slow-v2\""], 1.0)
        .await
        .context("the canary after its file returned")?;
    metric_is(metrics, "adserve_ranker_model_loading", &canary_loading, 0.0).await?;
    let model = client.get_model(GetModelRequest::default()).await?.into_inner();
    assert_eq!((model.canary_model_version.as_str(), model.canary_share), ("ctr-slow-v2", 0.6));
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    assert_eq!(counter(&text, "adserve_ranker_model_load_failures_total", "reason=\"timeout\""), 1.0, "{text}");
    assert_eq!(load_seconds(&text, "count"), 1.0, "one load built the canary: {text}");
    assert!(load_seconds(&text, "sum") >= 5.0, "and it is the load that ran past its 5 s limit: {text}");
    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_start_whose_production_load_hangs_serves_model_dir_then_the_registry_model_once_its_file_returns()
-> anyhow::Result<()> {
    // The registry's production artifact sits on a file system that stops
    // answering (a FIFO): the start waits registry.load_timeout for it, not
    // forever (a startup probe's crash loop), serves model.dir, and serves
    // the registry's version from that same load once the file returns.
    let reg = TestRegistry::new("ctr-cold")?;
    let v1 = reg.register("ctr-cold-v1").await?;
    reg.promote("ctr-cold-v1", "production").await?;
    let hung = HungFile::new(&v1.join("model.onnx"))?;
    let (mut command, grpc, metrics) = reg.ranker(&reg.s.postgres, &[("ADSERVE_REGISTRY__LOAD_TIMEOUT", "3s")]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    let model = client.get_model(GetModelRequest::default()).await?.into_inner();
    assert_eq!(model.model_version, "ctr-baseline-v1", "model.dir serves while the registry's load hangs");
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    assert_eq!(counter(&text, "adserve_ranker_model_load_failures_total", "reason=\"timeout\""), 1.0, "{text}");
    let loading = ["role=\"production\"", "model_version=\"ctr-cold-v1\""];
    metric_is(metrics, "adserve_ranker_model_loading", &loading, 1.0).await?;
    // The follower's reads (a NOTIFY here) start no second load on the hung
    // file beside the start's: a second one would run out of its 3 s too.
    let v2 = model_version(reg.models.path(), "ctr-cold-v2")?;
    read_after(metrics, reg.ok(&["models", "register", "--name", reg.name, "--dir", v2.to_str().unwrap()])).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    assert_eq!(counter(&text, "adserve_ranker_model_load_failures_total", "reason=\"timeout\""), 1.0, "{text}");
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-baseline-v1");

    // The file system answers: the start's own load ends and its model
    // swaps in, with no further registry change.
    hung.release(Duration::from_secs(60)).await?;
    serves(&mut client, "ctr-cold-v1").await?;
    metric_is(metrics, "adserve_ranker_model_loading", &loading, 0.0).await?;
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    let load_seconds =
        |what: &str| counter(&text, &format!("adserve_ranker_model_load_seconds_{what}"), "role=\"production\"");
    assert_eq!(load_seconds("count"), 1.0, "one load built it: {text}");
    assert!(load_seconds("sum") >= 3.0, "the start's, which ran past its 3 s: {text}");
    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn the_ranker_is_not_ready_until_its_model_is_loaded() -> anyhow::Result<()> {
    // The registry hangs from the start (a frozen relay), so the ranker's
    // start waits for it (bounded: 2 × 3 s + 1 s) before it serves model.dir:
    // a load long enough to watch, as a TensorRT engine build would be.
    let reg = TestRegistry::new("ctr-ready")?;
    let pg: url_parts::Pg = url_parts::parse(&reg.s.postgres)?;
    let relay = FreezableRelay::start(format!("{}:{}", pg.host, pg.port)).await?;
    relay.freeze(true);
    let relayed = pg.with_addr(&relay.addr.to_string());
    let (mut command, grpc, metrics) = reg.ranker(&relayed, &[("ADSERVE_REGISTRY__POSTGRES__TIMEOUT", "3s")]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;

    // /healthz (what the chart probes when gRPC speaks TLS) answers 503
    // naming the model from the moment it answers at all, never 200 early.
    let url = format!("http://127.0.0.1:{metrics}/healthz");
    let http = adserve_integration_tests::http_client();
    let mut loading = None;
    for _ in 0..600 {
        if let Ok(r) = http.get(&url).send().await {
            let status = r.status().as_u16();
            let body = r.text().await?;
            assert_eq!(status, 503, "answered {status} before the model was loaded: {body}");
            if body.contains("model: loading") {
                loading = Some(body);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let loading = loading.expect("/healthz never said the model was loading");
    let v: serde_json::Value = serde_json::from_str(&loading)?;
    assert_eq!(v["status"], "not_ready", "{v}");

    // Then the registry is given up on, model.dir loads, and the ranker is
    // ready and serving.
    let mut ready = false;
    for _ in 0..300 {
        let r = http.get(&url).send().await?;
        if r.status() == 200 {
            assert_eq!(r.text().await?, "ok");
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the ranker never became ready");
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-baseline-v1").await?;
    relay.freeze(false);
    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_frozen_registry_keeps_the_model_serving_and_following_resumes_when_it_thaws() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-freeze")?;
    let (s, name) = (&reg.s, reg.name);
    reg.register("ctr-freeze-v1").await?;
    reg.register("ctr-freeze-v2").await?;
    reg.promote("ctr-freeze-v1", "production").await?;

    // The ranker reaches the registry only through the relay.
    let pg: url_parts::Pg = url_parts::parse(&s.postgres)?;
    let relay = FreezableRelay::start(format!("{}:{}", pg.host, pg.port)).await?;
    let relayed = pg.with_addr(&relay.addr.to_string());
    let (mut command, grpc, metrics) = reg.ranker(
        &relayed,
        &[("ADSERVE_REGISTRY__POSTGRES__TIMEOUT", "500ms"), ("ADSERVE_REGISTRY__POLL_INTERVAL", "1s")],
    );
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-freeze-v1").await?;

    let stop = Arc::new(AtomicBool::new(false));
    let callers = callers(&client, 4, |_| 10, &stop);

    // Freeze the registry's path, then promote v2 (straight to PostgreSQL).
    relay.freeze(true);
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-freeze-v2", "--to", "production"]).await?;
    // Polls now time out on the client side; serving goes on with v1.
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let mut errors = 0.0;
    for _ in 0..300 {
        errors = counter(
            &adserve_integration_tests::http_client().get(&url).send().await?.text().await?,
            "adserve_ranker_registry_errors_total",
            "",
        );
        if errors >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(errors >= 1.0, "no registry call was cut short while it hung");
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-freeze-v1");

    // Thaw: the ranker catches up on its own.
    relay.freeze(false);
    serves(&mut client, "ctr-freeze-v2").await?;

    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        let (_, failures) = caller.await?;
        assert!(failures.is_empty(), "calls failed while the registry hung: {failures:?}");
    }
    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_load_that_finishes_while_the_registry_hangs_waits_for_it_and_a_rollback_meanwhile_holds()
-> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-pend")?;
    reg.register("ctr-pend-v1").await?;
    let v2 = reg.register("ctr-pend-v2").await?;
    reg.promote("ctr-pend-v1", "production").await?;
    // The ranker reaches the registry only through the relay (notifications
    // included); the poll is an hour.
    let pg: url_parts::Pg = url_parts::parse(&reg.s.postgres)?;
    let relay = FreezableRelay::start(format!("{}:{}", pg.host, pg.port)).await?;
    let relayed = pg.with_addr(&relay.addr.to_string());
    let (mut command, grpc, metrics) = reg.ranker(&relayed, &[("ADSERVE_REGISTRY__POSTGRES__TIMEOUT", "500ms")]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-pend-v1").await?;
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let scrape = || adserve_integration_tests::bench::prom::scrape(&url);
    let swapped = |text: &str| counter(text, "adserve_ranker_model_swaps_total", "result=\"swapped\"");
    let before = swapped(&scrape().await?);

    // v2 is promoted; its model file hangs, so its load stays in flight.
    let hung = HungFile::new(&v2.join("model.onnx"))?;
    reg.promote("ctr-pend-v2", "production").await?;
    let v2_loading = ["role=\"production\"", "model_version=\"ctr-pend-v2\""];
    metric_is(metrics, "adserve_ranker_model_loading", &v2_loading, 1.0).await?;
    // The registry hangs for the ranker (SIGSTOP-like: connections open, no
    // byte moves), and the operator rolls v2 back, a change it cannot read.
    relay.freeze(true);
    reg.ok(&["models", "rollback", "--name", reg.name, "--reason", "test"]).await?;
    let errors = |text: &str| counter(text, "adserve_ranker_registry_errors_total", "");
    let errors_before = errors(&scrape().await?);
    // The file returns: v2's load finishes, and the read after it fails.
    hung.release(Duration::from_secs(60)).await?;
    let mut text = String::new();
    for _ in 0..300 {
        text = scrape().await?;
        if errors(&text) > errors_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::ensure!(errors(&text) > errors_before, "no registry read failed after the load:\n{text}");
    // A few retries later (one a second, each cut short), v2 still does not
    // serve on the rows read before the rollback.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-pend-v1");
    let text = scrape().await?;
    assert_eq!(swapped(&text), before, "v2 was swapped in while the registry hung: {text}");
    assert_eq!(counter(&text, "adserve_ranker_model_loading", v2_loading[1]), 1.0, "waiting, not applied: {text}");

    // Thawed: the next read sees the rollback, and v2 is dropped.
    relay.freeze(false);
    metric_is(metrics, "adserve_ranker_model_loading", &v2_loading, 0.0).await.context("v2's load never applied")?;
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().model_version, "ctr-pend-v1");
    assert_eq!(swapped(&scrape().await?), before, "v2 was served after the rollback");
    reg.drop_schema().await?;
    Ok(())
}

/// Just enough URL handling to point a postgres:// URL at the relay.
mod url_parts {
    pub struct Pg {
        pub scheme_user: String,
        pub host: String,
        pub port: u16,
        pub rest: String,
    }

    impl Pg {
        pub fn with_addr(&self, addr: &str) -> String {
            format!("{}{addr}{}", self.scheme_user, self.rest)
        }
    }

    /// `postgres://user:pw@host:port/db?x` into its parts.
    pub fn parse(url: &str) -> anyhow::Result<Pg> {
        let at = url.rfind('@').map_or_else(|| url.find("://").map(|i| i + 3), |i| Some(i + 1));
        let at = at.ok_or_else(|| anyhow::anyhow!("not a URL: {url}"))?;
        let (scheme_user, hostpart) = url.split_at(at);
        let end = hostpart.find('/').unwrap_or(hostpart.len());
        let (hostport, rest) = hostpart.split_at(end);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse()?),
            None => (hostport.to_string(), 5432),
        };
        Ok(Pg { scheme_user: scheme_user.into(), host, port, rest: rest.into() })
    }
}

#[tokio::test]
async fn a_canary_serves_its_share_of_users_and_then_takes_over_production() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-canary")?;
    let (s, name) = (&reg.s, reg.name);
    reg.register("ctr-canary-v1").await?;
    reg.register("ctr-canary-v2").await?;
    reg.promote("ctr-canary-v1", "production").await?;
    let (mut command, grpc, metrics) = reg.ranker(&s.postgres, &[]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-canary-v1").await?;

    reg.ok(&[
        "models",
        "promote",
        "--name",
        name,
        "--version",
        "ctr-canary-v2",
        "--to",
        "canary",
        "--canary-share",
        "0.3",
    ])
    .await?;
    let mut model = client.get_model(GetModelRequest::default()).await?.into_inner();
    for _ in 0..300 {
        if model.canary_model_version == "ctr-canary-v2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        model = client.get_model(GetModelRequest::default()).await?.into_inner();
    }
    assert_eq!((model.model_version.as_str(), model.canary_model_version.as_str()), ("ctr-canary-v1", "ctr-canary-v2"));
    assert_eq!(model.canary_share, 0.3);

    // Each user goes where its bucket says, every time; anonymous calls stay
    // on production.
    let mut on_canary = 0;
    for i in 0..200 {
        let key = format!("user-{i}");
        let want = if adserve_registry::in_canary(&key, 0.3) { "ctr-canary-v2" } else { "ctr-canary-v1" };
        for _ in 0..2 {
            let request = ScoreRequest { matrix: Some(matrix(3)), routing_key: key.clone(), ..Default::default() };
            assert_eq!(client.score(request).await?.into_inner().model_version, want, "{key}");
        }
        on_canary += usize::from(want == "ctr-canary-v2");
    }
    assert!((30..=90).contains(&on_canary), "a 30% canary served {on_canary} of 200 users");
    let anonymous = client.score(ScoreRequest { matrix: Some(matrix(1)), ..Default::default() }).await?;
    assert_eq!(anonymous.into_inner().model_version, "ctr-canary-v1");

    // Ramp the canary to 60 %: the ranker re-routes without reloading it,
    // and every user already on it stays on it.
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let canary_loads = || async {
        let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
        anyhow::Ok(counter(&text, "adserve_ranker_model_swaps_total", "result=\"canary\""))
    };
    let loads_before = canary_loads().await?;
    let out = reg
        .ok(&[
            "models",
            "set-share",
            "--name",
            name,
            "--version",
            "ctr-canary-v2",
            "--share",
            "0.6",
            "--reason",
            "ramp",
        ])
        .await?;
    assert!(out.contains("canary share now 0.6"), "{out}");
    let mut share = 0.0;
    for _ in 0..300 {
        share = client.get_model(GetModelRequest::default()).await?.into_inner().canary_share;
        if share == 0.6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(share, 0.6, "the ranker never took the new share");
    let mut ramped = 0;
    for i in 0..200 {
        let key = format!("user-{i}");
        let want = if adserve_registry::in_canary(&key, 0.6) { "ctr-canary-v2" } else { "ctr-canary-v1" };
        assert!(!adserve_registry::in_canary(&key, 0.3) || want == "ctr-canary-v2", "{key} left the canary");
        let request = ScoreRequest { matrix: Some(matrix(1)), routing_key: key.clone(), ..Default::default() };
        assert_eq!(client.score(request).await?.into_inner().model_version, want, "{key}");
        ramped += usize::from(want == "ctr-canary-v2");
    }
    assert!(ramped > on_canary, "a 60% canary served {ramped} of 200 users, the 30% one {on_canary}");
    assert_eq!(canary_loads().await?, loads_before, "the share change reloaded the canary");
    // Only a canary has a share; the history says who changed it, from what.
    let (success, _, stderr) =
        reg.ctl(&["models", "set-share", "--name", name, "--version", "ctr-canary-v1", "--share", "0.5"]).await?;
    assert!(!success && stderr.contains("is production, not canary"), "{stderr}");
    let (success, _, stderr) =
        reg.ctl(&["models", "set-share", "--name", name, "--version", "ctr-canary-v2", "--share", "1.5"]).await?;
    assert!(!success && stderr.contains("--share must be in (0, 1]"), "{stderr}");
    let history = reg.ok(&["models", "history", "--name", name]).await?;
    assert!(history.contains("canary -> canary") && history.contains("canary share 0.3 -> 0.6: ramp"), "{history}");

    // Promote the canary: everyone moves to it, and the canary slot empties.
    reg.ok(&["models", "promote", "--name", name, "--version", "ctr-canary-v2", "--to", "production"]).await?;
    serves(&mut client, "ctr-canary-v2").await?;
    let model = client.get_model(GetModelRequest::default()).await?.into_inner();
    assert_eq!((model.canary_model_version.as_str(), model.canary_share), ("", 0.0));
    for i in 0..50 {
        let request = ScoreRequest { matrix: Some(matrix(1)), routing_key: format!("user-{i}"), ..Default::default() };
        assert_eq!(client.score(request).await?.into_inner().model_version, "ctr-canary-v2");
    }

    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_shadow_scores_calls_after_the_answer_and_publishes_both_scores() -> anyhow::Result<()> {
    use prost::Message as _;
    let reg = TestRegistry::new("ctr-shadow")?;
    let s = &reg.s;
    reg.register("ctr-shadow-v1").await?;
    reg.register("ctr-shadow-v2").await?;
    reg.promote("ctr-shadow-v1", "production").await?;
    reg.promote("ctr-shadow-v2", "shadow").await?;
    let (mut command, grpc, metrics) = reg.ranker(&s.postgres, &[("ADSERVE_KAFKA__BROKERS", &s.kafka)]);
    let process = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-shadow-v1").await?;
    let url = format!("http://127.0.0.1:{metrics}/metrics");
    let mut loaded = false;
    for _ in 0..300 {
        let text = adserve_integration_tests::http_client().get(&url).send().await?.text().await?;
        if counter(&text, "adserve_ranker_model_info", "role=\"shadow\"") >= 1.0 {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(loaded, "the shadow version was never loaded");
    // The shadow's session threads run at nice 19, the served model's and
    // the fallback's at the process's own priority: shadowing takes only the
    // CPU the answers leave idle.
    // (Relative to the process's own nice: a test runner may itself be niced.)
    let pid = process.id().expect("running");
    let threads = thread_nice(pid);
    let base = threads.iter().find(|(tid, _, _)| *tid == pid).map(|(_, _, n)| *n).expect("the main thread");
    let nice = |prefix: &str| -> Vec<i32> {
        threads.iter().filter(|(_, name, _)| name.starts_with(prefix)).map(|(_, _, n)| *n).collect()
    };
    assert!(!nice("rank-shadow-").is_empty() && nice("rank-shadow-").iter().all(|n| *n == 19), "{threads:?}");
    assert!(!nice("rank-model-").is_empty() && nice("rank-model-").iter().all(|n| *n == base), "{threads:?}");
    assert!(nice("rank-fallbk-").iter().all(|n| *n == base), "{threads:?}");

    // The gateway learns of the shadow from GetModel.
    assert_eq!(client.get_model(GetModelRequest::default()).await?.into_inner().shadow_model_version, "ctr-shadow-v2");

    let request_id = format!("shadow-test-{}", uuid::Uuid::new_v4());
    let request = ScoreRequest {
        matrix: Some(matrix(4)),
        routing_key: "user-1".into(),
        request_id: request_id.clone(),
        ad_ids: vec![11, 12, 13, 14],
        whole_request: true,
        ..Default::default()
    };
    // Ad ids are one per row, or none.
    let mut short = request.clone();
    short.ad_ids.pop();
    let err = client.score(short).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("ad_ids: must be empty or one per row (4), got 3"), "{}", err.message());
    let answer = client.score(request).await?.into_inner();
    assert_eq!(answer.model_version, "ctr-shadow-v1", "the shadow is never served");

    let (payload, _, _) = s.keyed_message(adserve_events::SHADOW_SCORES_TOPIC, &request_id).await?;
    let event = adserve_proto::v1::ShadowScoreEvent::decode(payload.as_slice())?;
    assert_eq!(event.request_id, request_id);
    assert_eq!(
        (event.production_model_version.as_str(), event.shadow_model_version.as_str()),
        ("ctr-shadow-v1", "ctr-shadow-v2")
    );
    assert_eq!(event.production_pctr, answer.pctr, "the production scores are the ones served");
    // Same graph under two versions: the shadow scores the same rows alike.
    assert_eq!(event.shadow_pctr, answer.pctr);
    assert!(event.scored_at.is_some());
    assert_eq!((event.ad_ids.as_slice(), event.whole_request), (&[11, 12, 13, 14][..], true));

    // Through a gateway whose prediction cache holds every row of a repeated
    // request: with shadow_share 1, the repeat still reaches the ranker whole
    // (without it, the cache would answer and the shadow see nothing), and
    // its event names the request's ads.
    let stack = Stack::ready().await?;
    let gateway_with = |share: f64| {
        stack.in_process_server(move |c| {
            c.upstreams.ranker = format!("http://127.0.0.1:{grpc}");
            c.prediction_cache.refresh = Duration::from_millis(100);
            c.prediction_cache.shadow_share = share;
        })
    };
    let (unsampled, gateway) = (gateway_with(0.0).await?, gateway_with(1.0).await?);
    let shadow_event = async |request_id: &str| -> anyhow::Result<adserve_proto::v1::ShadowScoreEvent> {
        let (payload, _, _) = s.keyed_message(adserve_events::SHADOW_SCORES_TOPIC, request_id).await?;
        Ok(adserve_proto::v1::ShadowScoreEvent::decode(payload.as_slice())?)
    };
    // Both caches have read GetModel (every 100 ms): they are not bypassed.
    for _ in 0..100 {
        if [&unsampled, &gateway].iter().all(|g| g.prediction_cache().version_for("").is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for g in [&unsampled, &gateway] {
        assert_eq!(
            g.prediction_cache().version_for("").as_deref(),
            Some("ctr-shadow-v1"),
            "the cache follows the ranker"
        );
    }
    // With share 0 a request's rows go to the ranker as cache misses: not a
    // whole request.
    let answer = unsampled.serve(adserve_integration_tests::ad_request("shadow-user-0"), None).await?;
    assert!(!shadow_event(&answer.request_id).await?.whole_request);
    let user = format!("shadow-user-{}", uuid::Uuid::new_v4());
    for attempt in 0..2 {
        let answer = gateway.serve(adserve_integration_tests::ad_request(&user), None).await?;
        assert!(answer.degraded.is_empty(), "{:?}", answer.degraded);
        let event = shadow_event(&answer.request_id).await?;
        assert!(event.whole_request, "request {attempt}");
        assert_eq!(event.ad_ids.len(), answer.candidates as usize, "every candidate, request {attempt}");
        for w in &answer.winners {
            let row = event.ad_ids.iter().position(|a| *a == w.ad_id).expect("the winner's row is in the event");
            assert_eq!(event.production_pctr[row], w.pctr, "the served score, by ad id");
        }
    }

    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_shadow_at_a_sample_share_scores_the_requests_in_its_share_only() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-sample")?;
    let s = &reg.s;
    reg.register("ctr-sample-v1").await?;
    reg.register("ctr-sample-v2").await?;
    reg.promote("ctr-sample-v1", "production").await?;
    reg.promote("ctr-sample-v2", "shadow").await?;
    let (mut command, grpc, metrics) =
        reg.ranker(&s.postgres, &[("ADSERVE_KAFKA__BROKERS", &s.kafka), ("ADSERVE_SHADOW__SAMPLE_SHARE", "0.3")]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-sample-v1").await?;
    metric_is(metrics, "adserve_ranker_model_info", &["role=\"shadow\"", "model_version=\"ctr-sample-v2\""], 1.0)
        .await?;

    // Sampled by request id with the canary's hash: the gateway's cache
    // sends the same requests whole at the same share.
    let run = uuid::Uuid::new_v4();
    let ids: Vec<String> = (0..60).map(|i| format!("sample-{run}-{i}")).collect();
    let sampled: Vec<&String> = ids.iter().filter(|id| adserve_registry::in_canary(id, 0.3)).collect();
    anyhow::ensure!(!sampled.is_empty() && sampled.len() < ids.len(), "{} of 60 sampled", sampled.len());
    for id in &ids {
        let request = ScoreRequest { matrix: Some(matrix(2)), request_id: id.clone(), ..Default::default() };
        assert_eq!(client.score(request).await?.into_inner().level(), ScoreLevel::Model);
    }
    let unsampled = (ids.len() - sampled.len()) as f64;
    metric_is(metrics, "adserve_ranker_shadow_total", &["result=\"unsampled\""], unsampled).await?;
    metric_is(metrics, "adserve_ranker_shadow_total", &["result=\"published\""], sampled.len() as f64).await?;
    s.keyed_message(adserve_events::SHADOW_SCORES_TOPIC, sampled[0]).await.context("a sampled request's event")?;
    reg.drop_schema().await?;
    Ok(())
}

#[tokio::test]
async fn a_call_the_model_cannot_answer_in_time_is_scored_by_the_fallback_chain_and_says_so() -> anyhow::Result<()> {
    use adserve_proto::v1::ScoreLevel;
    let model_dir = repo_root().join("models/ctr-baseline");
    // A reserve longer than any call's budget: the model never gets time.
    let (mut with_model, grpc_a, metrics_a) = ranker(&model_dir, &[("ADSERVE_FALLBACK__RESERVE", "2s")]);
    let (mut prior_only, grpc_b, _) =
        ranker(&model_dir, &[("ADSERVE_FALLBACK__RESERVE", "2s"), ("ADSERVE_FALLBACK__ENABLED", "false")]);
    let _a = with_model.stdout(Stdio::null()).spawn()?;
    let _b = prior_only.stdout(Stdio::null()).spawn()?;
    let (mut a, mut b) = (connect(grpc_a).await?, connect(grpc_b).await?);
    let call = |m: FeatureMatrix| {
        let mut request = tonic::Request::new(ScoreRequest { matrix: Some(m), ..Default::default() });
        request.set_timeout(Duration::from_millis(500));
        request
    };
    let mut m = matrix(3);
    let col = m.feature_names.iter().position(|n| n == "ad_ctr_7d").expect("registry feature");
    let cols = m.feature_names.len();
    for (r, v) in [0.05f32, 2.0, -0.5].into_iter().enumerate() {
        m.values[r * cols + col] = v;
    }
    // The lightweight fallback model (here the baseline itself).
    let fb = a.score(call(matrix(3))).await?.into_inner();
    assert_eq!(fb.level(), ScoreLevel::FallbackModel);
    assert_eq!(fb.model_version, "ctr-baseline-v1");
    assert!(fb.fallback_reason.contains("no time for the model"), "{}", fb.fallback_reason);
    assert_eq!(fb.pctr.len(), 3);
    // No fallback model: the prior per ad, the ad_ctr_7d column clamped to
    // [1e-7, 1]. (A NaN never gets this far: it is refused as InvalidArgument.)
    let prior = b.score(call(m.clone())).await?.into_inner();
    assert_eq!(prior.level(), ScoreLevel::Prior);
    assert_eq!(prior.model_version, "fallback-prior");
    assert_eq!(prior.pctr, vec![0.05, 1.0, 1e-7]);
    // Without a deadline the model has time: level MODEL, no reason.
    let normal = b.score(ScoreRequest { matrix: Some(matrix(2)), ..Default::default() }).await?.into_inner();
    assert_eq!((normal.level(), normal.fallback_reason.as_str()), (ScoreLevel::Model, ""));

    // The model and the fallback model are the same version here, and each
    // queue's metrics are its own: the `queue` label tells them apart.
    let normal = a.score(ScoreRequest { matrix: Some(matrix(4)), ..Default::default() }).await?.into_inner();
    assert_eq!(normal.level(), ScoreLevel::Model);
    let text = adserve_integration_tests::bench::prom::scrape(&format!("http://127.0.0.1:{metrics_a}/metrics")).await?;
    let series = |name: &str, queue: &str| -> Vec<&str> {
        let (q, v) = (format!("queue=\"{queue}\""), "model_version=\"ctr-baseline-v1\"");
        text.lines().filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&q) && l.contains(v)).collect()
    };
    let value = |name: &str, queue: &str| -> f64 {
        let lines = series(name, queue);
        assert_eq!(lines.len(), 1, "{name} for queue {queue}: {lines:?}");
        lines[0].rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a value")
    };
    // Calls per session.run: one call each, one batch each.
    assert_eq!(value("adserve_ranker_batch_calls_sum", "model"), 1.0, "{text}");
    assert_eq!(value("adserve_ranker_batch_calls_sum", "fallback"), 1.0, "{text}");
    // Rows: the fallback model scored the 3 rows, the model the 4.
    assert_eq!(value("adserve_ranker_batch_rows_sum", "fallback"), 3.0, "{text}");
    assert_eq!(value("adserve_ranker_batch_rows_sum", "model"), 4.0, "{text}");
    // Both queues export their depth, labelled (empty now).
    assert_eq!(value("adserve_ranker_queue_rows", "model"), 0.0, "{text}");
    assert_eq!(value("adserve_ranker_queue_rows", "fallback"), 0.0, "{text}");
    // Each call's wait in the queue and each batch's session run: one of each.
    for name in ["adserve_ranker_queue_wait_seconds_count", "adserve_ranker_inference_seconds_count"] {
        assert_eq!(value(name, "model"), 1.0, "{name}: {text}");
        assert_eq!(value(name, "fallback"), 1.0, "{name}: {text}");
    }
    // Which level answered, counted: one call by the fallback model.
    assert_eq!(counter(&text, "adserve_ranker_fallbacks_total", "level=\"fallback_model\""), 1.0, "{text}");
    assert_eq!(counter(&text, "adserve_ranker_fallbacks_total", "level=\"prior\""), 0.0, "{text}");
    Ok(())
}

/// A model directory whose session fails at run time on rows with
/// `user_sessions_7d` >= 1000 (and scores every other row), written by
/// integration-tests/fixtures/model_that_fails_at_run_time.py.
async fn model_that_fails_at_run_time(under: &Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = under.join("ctr-fails-at-run-time");
    let out = tokio::process::Command::new(adserve_integration_tests::adstack_home().join("venv/bin/python"))
        .arg(repo_root().join("integration-tests/fixtures/model_that_fails_at_run_time.py"))
        .arg(repo_root().join("models/ctr-baseline"))
        .arg(&dir)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "the fixture model: {}", String::from_utf8_lossy(&out.stderr));
    Ok(dir)
}

#[tokio::test]
async fn a_call_the_model_fails_on_is_answered_by_the_fallback_chain_and_fails_no_call_batched_with_it()
-> anyhow::Result<()> {
    use adserve_proto::v1::ScoreLevel;
    let models = tempfile::tempdir()?;
    let failing = model_that_fails_at_run_time(models.path()).await?;
    let baseline = repo_root().join("models/ctr-baseline");
    // One session that waits up to 100 ms for more calls, or for 9 rows:
    // three calls of 3 rows sent together run as one batch.
    let batching = [
        ("ADSERVE_BATCHING__SESSIONS", "1"),
        ("ADSERVE_BATCHING__MAX_QUEUE_DELAY", "100ms"),
        ("ADSERVE_BATCHING__MAX_BATCH_ROWS", "9"),
    ];
    let with_fallback = [&batching[..], &[("ADSERVE_FALLBACK__MODEL_DIR", baseline.to_str().unwrap())]].concat();
    let (mut a_cmd, grpc_a, metrics_a) = ranker(&failing, &with_fallback);
    let (mut b_cmd, grpc_b, _) = ranker(&failing, &[("ADSERVE_FALLBACK__ENABLED", "false")]);
    let _a = a_cmd.stdout(Stdio::null()).spawn()?;
    let _b = b_cmd.stdout(Stdio::null()).spawn()?;
    let (mut a, mut b) = (connect(grpc_a).await?, connect(grpc_b).await?);
    let good = matrix(3);
    let mut bad = matrix(3);
    let cols = bad.feature_names.len();
    let col = bad.feature_names.iter().position(|n| n == "user_sessions_7d").expect("registry feature");
    bad.values[cols + col] = 5000.0;
    let call = |m: &FeatureMatrix| ScoreRequest { matrix: Some(m.clone()), ..Default::default() };

    // The model's session error (not a refused input, not a late answer):
    // the fallback model answers, and says why.
    let fb = a.score(call(&bad)).await?.into_inner();
    assert_eq!((fb.level(), fb.model_version.as_str()), (ScoreLevel::FallbackModel, "ctr-baseline-v1"));
    assert!(fb.fallback_reason.contains("out of data bounds"), "{}", fb.fallback_reason);
    assert_eq!(fb.pctr.len(), 3);
    // No fallback model: the prior.
    let prior = b.score(call(&bad)).await?.into_inner();
    assert_eq!((prior.level(), prior.model_version.as_str()), (ScoreLevel::Prior, "fallback-prior"));

    // Good calls batched with the bad one are scored by the model: the
    // failed batch is halved and run again until the bad call is alone.
    // (Sent together; on a busy box they may miss each other's batch, so
    // until one batch held them.)
    let url = format!("http://127.0.0.1:{metrics_a}/metrics");
    let splits = |text: &str| counter(text, "adserve_ranker_batch_splits_total", "queue=\"model\"");
    let mut split = 0.0;
    for _ in 0..10 {
        let (mut a1, mut a2, mut a3) = (a.clone(), a.clone(), a.clone());
        let (first, failed, last) = tokio::join!(a1.score(call(&good)), a2.score(call(&bad)), a3.score(call(&good)));
        for ok in [first?.into_inner(), last?.into_inner()] {
            assert_eq!((ok.level(), ok.model_version.as_str()), (ScoreLevel::Model, "ctr-fails-at-run-time-v1"));
        }
        assert_eq!(failed?.into_inner().level(), ScoreLevel::FallbackModel);
        split = splits(&adserve_integration_tests::bench::prom::scrape(&url).await?);
        if split >= 1.0 {
            break;
        }
    }
    assert!(split >= 1.0, "the calls never shared a batch");
    let text = adserve_integration_tests::bench::prom::scrape(&url).await?;
    assert!(counter(&text, "adserve_ranker_fallbacks_total", "level=\"fallback_model\"") >= 2.0, "{text}");
    assert_eq!(counter(&text, "adserve_ranker_fallbacks_total", "level=\"prior\""), 0.0, "{text}");
    Ok(())
}

/// Runs the trainer's promotion gate (Python) on `candidate` against the
/// test registry's production model: (exit code, stdout, stderr).
async fn gate(reg: &TestRegistry, candidate: &Path) -> anyhow::Result<(i32, String, String)> {
    let home = adserve_integration_tests::adstack_home();
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(home.join("venv/bin/python"))
            .args(["-m", "adserve_trainer.gate", "--name", reg.name, "--synthetic", "20000", "--seed", "11"])
            .arg("--candidate")
            .arg(candidate)
            .arg("--adservectl")
            .arg(binary("adservectl"))
            .current_dir(repo_root().join("training"))
            .env("ADSERVE_REGISTRY__POSTGRES__URL", &reg.s.postgres)
            .env("ADSERVE_REGISTRY__POSTGRES__SCHEMA", &reg.schema)
            .env("USER", "integration-test")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the gate did not finish"))??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The stage of `version` in the test registry.
async fn stage_of(reg: &TestRegistry, version: &str) -> anyhow::Result<String> {
    let list = reg.ok(&["models", "list", "--name", reg.name, "--json"]).await?;
    for line in list.lines() {
        let record: serde_json::Value = serde_json::from_str(line)?;
        if record["version"] == version {
            return Ok(record["stage"].as_str().unwrap_or_default().to_string());
        }
    }
    anyhow::bail!("{version} is not in the registry: {list}")
}

#[tokio::test]
async fn the_promotion_gate_shadows_a_good_candidate_and_retires_a_miscalibrated_one() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-gate")?;
    reg.register("ctr-gate-v1").await?;
    reg.promote("ctr-gate-v1", "production").await?;

    // The same model under a new version: equal AUC, calibrated as well as production.
    let v2 = reg.register("ctr-gate-v2").await?;
    let (code, stdout, stderr) = gate(&reg, &v2).await?;
    assert_eq!(code, 0, "a candidate as good as production passes:\n{stdout}\n{stderr}");
    assert_eq!(stage_of(&reg, "ctr-gate-v2").await?, "shadow");
    let decision: serde_json::Value = serde_json::from_slice(&std::fs::read(v2.join("gate.json"))?)?;
    assert_eq!(decision["passed"], true, "{decision}");

    // Same ranking, but a Platt mapping that doubles the odds (b = ln 2): refused on ECE.
    reg.promote("ctr-gate-v2", "retired").await?;
    let v3 = model_version(reg.models.path(), "ctr-gate-v3")?;
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(v3.join("manifest.json"))?)?;
    manifest["calibration"] =
        serde_json::json!({"keep_rate": 1.0, "mapping": {"method": "platt", "a": 1.0, "b": std::f64::consts::LN_2}});
    std::fs::write(v3.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;
    reg.ok(&["models", "register", "--name", reg.name, "--dir", v3.to_str().unwrap_or_default()]).await?;
    let (code, stdout, stderr) = gate(&reg, &v3).await?;
    assert_eq!(code, 1, "a miscalibrated candidate is refused:\n{stdout}\n{stderr}");
    assert_eq!(stage_of(&reg, "ctr-gate-v3").await?, "retired");

    // Both decisions, with their numbers, are in the registry's history.
    let history = reg.ok(&["models", "history", "--name", reg.name]).await?;
    assert!(history.contains("gate: passed") && history.contains("gate: refused (ece)"), "{history}");
    assert!(history.contains("ece "), "the numbers are recorded: {history}");
    reg.drop_schema().await?;
    Ok(())
}

/// A model that takes the registry's categorical ids as an int64 input
/// replaces a dense-only one under load: no call fails across the swap, and
/// over gRPC it scores the trainer's reference rows as the trainer's
/// onnxruntime did, and refuses an id outside its buckets by name.
#[tokio::test]
async fn a_typed_model_swaps_in_under_load_and_scores_over_grpc_as_the_trainer_did() -> anyhow::Result<()> {
    let reg = TestRegistry::new("ctr-typed")?;
    let name = reg.name;
    let (mut command, grpc, _) = reg.ranker(&reg.s.postgres, &[]);
    let _ranker = command.stdout(Stdio::null()).spawn()?;
    let mut client = connect(grpc).await?;
    serves(&mut client, "ctr-baseline-v1").await?;
    assert!(client.get_model(GetModelRequest::default()).await?.into_inner().typed_inputs.is_empty());
    let stop = Arc::new(AtomicBool::new(false));
    let callers = callers(&client, 4, |i| 1 + i * 50, &stop);

    let typed = repo_root().join("models/ctr-dcnv2-typed");
    let manifest = adserve_registry::read_manifest(&typed.join("manifest.json"))?;
    let version = manifest.model_version.clone();
    // A copy whose reference.json is for another model.onnx (a stale copy):
    // refused at registration, before anyone can promote what the ranker
    // would refuse at load.
    let stale = reg.models.path().join("typed-stale-reference");
    std::fs::create_dir_all(&stale)?;
    for file in ["model.onnx", "manifest.json", "reference.json"] {
        std::fs::copy(typed.join(file), stale.join(file))?;
    }
    let mut reference: serde_json::Value = serde_json::from_slice(&std::fs::read(stale.join("reference.json"))?)?;
    reference["onnx_sha256"] = "ab".repeat(32).into();
    std::fs::write(stale.join("reference.json"), serde_json::to_vec(&reference)?)?;
    let (success, _, stderr) =
        reg.ctl(&["models", "register", "--name", name, "--dir", stale.to_str().unwrap()]).await?;
    assert!(!success && stderr.contains("reference.json: scored model.onnx abab"), "{stderr}");
    let (_, listed, _) = reg.ctl(&["models", "list", "--name", name]).await?;
    assert!(!listed.contains(&version), "nothing was registered: {listed}");
    let out = reg.ok(&["models", "register", "--name", name, "--dir", typed.to_str().unwrap()]).await?;
    assert!(out.contains(&format!("registered {name} {version}")), "{out}");
    reg.ok(&["models", "promote", "--name", name, "--version", &version, "--to", "production"]).await?;
    serves(&mut client, &version).await?;
    // GetModel says what the model reads besides the dense columns.
    let served = client.get_model(GetModelRequest::default()).await?.into_inner();
    let inputs: Vec<(String, String, Vec<String>)> =
        served.typed_inputs.into_iter().map(|t| (t.name, t.dtype, t.features)).collect();
    let registry = adserve_features::registry();
    let categoricals: Vec<String> = registry.categorical.iter().map(|f| f.name.clone()).collect();
    assert_eq!(inputs, [("categorical".to_string(), "int64".to_string(), categoricals)]);
    // Calls keep flowing on the typed model for a while.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for caller in callers {
        let (versions, failures) = caller.await?;
        assert!(failures.is_empty(), "calls failed across the swap: {failures:?}");
        for (v, n) in versions {
            *seen.entry(v).or_default() += n;
        }
    }
    assert!(seen.get(&version).is_some_and(|n| *n > 0), "the typed model never answered: {seen:?}");

    let reference = adserve_ranker::Reference::read(&typed, &manifest)
        .map_err(anyhow::Error::msg)?
        .expect("the typed model has a reference");
    let scored = client
        .score(ScoreRequest { matrix: Some(adserve_ranker::reference_matrix(&reference)), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!((scored.model_version.as_str(), scored.level), (version.as_str(), ScoreLevel::Model as i32));
    for (i, (got, want)) in scored.raw_pctr.iter().zip(&reference.raw).enumerate() {
        assert!(
            (got - want).abs() <= adserve_ranker::Reference::TOLERANCE,
            "row {i}: {got} over gRPC, {want} in Python"
        );
    }

    let mut bad = adserve_ranker::reference_matrix(&reference);
    let width = bad.categorical_names.len();
    let k = bad.categorical_names.iter().position(|n| n == "ctx_placement_x_device").expect("cross");
    bad.categorical_ids[width + k] = 1 << 30;
    let err = client.score(ScoreRequest { matrix: Some(bad), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("row 1 feature \"ctx_placement_x_device\" is 1073741824"), "{}", err.message());
    // A dense value that is NaN or infinite: InvalidArgument naming the row
    // and the column, never a score computed from it.
    let read = &manifest.feature_order[0];
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let mut bad = adserve_ranker::reference_matrix(&reference);
        let width = bad.feature_names.len();
        let c = bad.feature_names.iter().position(|n| n == read).expect("the model reads it");
        bad.values[width + c] = value;
        let err = client.score(ScoreRequest { matrix: Some(bad), ..Default::default() }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let want = format!("matrix.values row 1 feature {read:?} is {shown}");
        assert!(err.message().contains(&want), "{} (wanted {want})", err.message());
    }
    // A categorical column sent as a dense float column (the wrong dtype:
    // the model reads it as int64 ids): InvalidArgument naming it.
    let mut bad = adserve_ranker::reference_matrix(&reference);
    let (rows, width) = (bad.num_rows as usize, bad.categorical_names.len());
    let name = bad.categorical_names.remove(k);
    let ids: Vec<i64> = (0..rows).map(|r| bad.categorical_ids[r * width + k]).collect();
    bad.categorical_ids = (0..rows * width).filter(|i| i % width != k).map(|i| bad.categorical_ids[i]).collect();
    let dense = bad.feature_names.len();
    bad.values =
        (0..rows).flat_map(|r| bad.values[r * dense..(r + 1) * dense].iter().copied().chain([ids[r] as f32])).collect();
    bad.feature_names.push(name.clone());
    let err = client.score(ScoreRequest { matrix: Some(bad), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains(&format!("matrix.categorical_names lacks {name:?}")), "{}", err.message());
    reg.drop_schema().await
}
