//! Ranker: `Score` over gRPC at 1, 100 and 1000 rows and concurrency 1, 8
//! and 32, next to the same ranker binary with dynamic batching off
//! (`batching.max_batch_rows = 1`, an instance of the bench's own), a bare
//! ONNX Runtime `session.run` loop on the same model and thread settings
//! (the floor: what scoring costs with no server at all) and a FastAPI +
//! onnxruntime server (the peer users would otherwise write).

use std::{borrow::Cow, sync::Arc, time::Duration};

use adserve_proto::v1::{FeatureMatrix, ScoreRequest, ranker_service_client::RankerServiceClient};
use adserve_ranker::{Block, Input, ModelManifest};
use anyhow::Context;
use ort::{
    session::{Session, SessionInputValue},
    value::TensorRef,
};

use super::{
    Settings, criterion,
    load::{self, Outcome},
    peers::Child,
    report::{Comparison, Metric, Role},
};

/// Rows per Score call.
pub const ROWS: [usize; 3] = [1, 100, 1000];
/// Concurrent callers.
pub const CONCURRENCY: [usize; 3] = [1, 8, 32];
/// The ranker's ONNX Runtime intra-op threads (its config default), used by
/// the floor and the peer too.
pub const INTRA_THREADS: usize = 1;

/// A matrix of `rows` rows over every registry feature, as the
/// feature-service serves it ([`adserve_features::FeatureRegistry::sample_matrix`]).
pub fn matrix(rows: usize) -> FeatureMatrix {
    adserve_features::registry().sample_matrix(rows)
}

/// Runs the ranker part.
pub async fn run(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    load::ensure_loopback(&s.stack.ranker)?;
    let manifest = adserve_registry::read_manifest(&s.model_dir.join("manifest.json"))?;
    let env = ort::init_from(&s.ort_dylib)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", s.ort_dylib.display()))?
        .with_name("adserve-bench")
        .with_telemetry(false)
        .build()?;
    let env = Arc::new(env);

    let port = crate::free_port();
    let mut fastapi = Child::spawn(
        "FastAPI + onnxruntime peer",
        &[
            s.peer_python.to_str().context("peer python path")?,
            "integration-tests/peers/ort_fastapi.py",
            "--port",
            &port.to_string(),
            "--model-dir",
            s.model_dir.to_str().context("model dir")?,
            "--intra-threads",
            &INTRA_THREADS.to_string(),
        ],
        &[],
        &crate::repo_root(),
        s.work_dir.join("logs/ort_fastapi.log"),
    )?;
    fastapi.wait_ready(&format!("http://127.0.0.1:{port}/healthz"), Duration::from_secs(60)).await?;
    let peer_url = format!("http://127.0.0.1:{port}/score");
    let http = crate::http_client();

    // The same binary and config as the stack's ranker, batching off.
    let (_unbatched, unbatched) = bench_ranker(
        s,
        &manifest,
        "adserve-ranker, batching off (bench instance)",
        "ranker-unbatched",
        &[("ADSERVE_BATCHING__MAX_BATCH_ROWS".into(), "1".into())],
        None,
    )
    .await?;

    let client = connect_ranker(&s.stack.ranker, None, Duration::from_secs(10)).await?;
    ensure_serves(&client, &manifest, s).await?;
    let timeout = Duration::from_secs(5);
    let mut out = Vec::new();
    for rows in ROWS {
        let m = matrix(rows);
        // The peer takes the same matrix in its JSON form.
        let body = Arc::new(serde_json::to_vec(&serde_json::json!({
            "feature_names": m.feature_names,
            "num_rows": m.num_rows,
            "values": m.values,
            "categorical_names": m.categorical_names,
            "categorical_ids": m.categorical_ids,
        }))?);
        // The floor scores the rows already gathered, as the ranker binds them.
        let input = Arc::new(adserve_ranker::model::gather(&m, &manifest).map_err(anyhow::Error::msg)?);
        for c in CONCURRENCY {
            let ours = score_loop(s, &client, &m, c, timeout).await;
            let off = score_loop(s, &unbatched, &m, c, timeout).await;
            let bare = {
                let (env, manifest, input, model) = (env.clone(), manifest.clone(), input.clone(), s.model_dir.clone());
                let window = (s.warmup(), s.window());
                tokio::task::spawn_blocking(move || {
                    let make = || -> Session {
                        Session::builder(&env)
                            .and_then(|b| b.with_intra_threads(INTRA_THREADS).map_err(Into::into))
                            .and_then(|mut b| b.commit_from_file(model.join("model.onnx")))
                            .expect("the served model loads in a bare session")
                    };
                    load::threads_loop(c, window.0, window.1, rows as u64, make, move |session| {
                        bare_run(session, &manifest, &input)
                    })
                })
                .await?
            };
            let peer = {
                let (http, url, body) = (http.clone(), peer_url.clone(), body.clone());
                load::closed_loop(c, s.warmup(), s.window(), timeout, rows as u64, move |_| {
                    let (http, url, body) = (http.clone(), url.clone(), body.clone());
                    async move {
                        let request = http.post(url).header("content-type", "application/json").body((*body).clone());
                        match load::json_answer(request).await {
                            Ok(v) if v["pctr"].as_array().is_some_and(|a| a.len() == rows) => Outcome::Ok,
                            Ok(v) => Outcome::Error(format!("unexpected body {v}")),
                            Err(e) => e,
                        }
                    }
                })
                .await
            };
            let metric = if c == 1 { Metric::P50 } else { Metric::Rate };
            out.push(
                Comparison::new(
                    "ranker",
                    format!("Score {rows} rows, concurrency {c}"),
                    metric,
                    "adserve-ranker (gRPC)",
                    &ours,
                )
                .with("adserve-ranker, batching off (max_batch_rows = 1)", Role::Ours, &off)
                .with(&format!("bare session.run x{c} threads"), Role::Floor, &bare)
                .with("FastAPI + onnxruntime (HTTP/JSON)", Role::Peer, &peer)
                .note(if c == 1 {
                    "ratio on p50: the ranker's overhead over scoring alone"
                } else {
                    "ratio on rows/s; the floor runs one session per thread"
                }),
            );
            tracing::info!(rows, c, "ranker case done");
        }
    }
    drop(fastapi);
    // The gather (a call's matrix into the model's inputs) in-process, from
    // criterion, next to copying the matrix's blocks as they are.
    for rows in ROWS {
        let missing = "criterion estimates missing: run `cargo bench -p adserve-ranker --bench gather` first";
        let ours = criterion::median(&s.target_dir, "gather", "gather", rows).context(missing)?;
        let floor = criterion::median(&s.target_dir, "gather", "copy_blocks", rows).context(missing)?;
        let c = criterion::comparison(
            "ranker",
            format!("gather {rows} rows into the DCN-v2's inputs, in-process"),
            "gather: lookup, reorder, checks (criterion)",
            ours,
            rows,
            "in-process medians from criterion, the committed DCN-v2 manifest",
        );
        out.push(c.with_summary(
            "copying the matrix's blocks (criterion)",
            Role::Floor,
            criterion::summary(floor.0, rows),
        ));
    }
    Ok(out)
}

/// Callers beyond the ranker's capacity, each call carrying a deadline.
pub const OVERLOAD_CONCURRENCY: usize = 64;
/// Rows per call in the overload case.
pub const OVERLOAD_ROWS: usize = 1000;
/// The deadline each overload call carries (`grpc-timeout`), as a gateway's
/// ranker hop would.
pub const OVERLOAD_DEADLINE: Duration = Duration::from_millis(25);

/// The ranker past saturation (`make bench-ranker-overload`): closed-loop
/// callers that each want 1000 rows scored within 25 ms, more than two cores
/// can score in time. The stack's ranker (`batching.predict_misses = true`,
/// the default: a call the queue predicts would finish late goes straight to
/// the fallback chain) next to the same binary and config with it off (the
/// call waits in the queue and is dropped at its deadline). An answer the
/// model scored counts as ok, a fallback's as degraded: the model's rows/s is
/// the goodput.
pub async fn overload(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    load::ensure_loopback(&s.stack.ranker)?;
    let manifest = adserve_registry::read_manifest(&s.model_dir.join("manifest.json"))?;
    let (_off, off) = bench_ranker(
        s,
        &manifest,
        "adserve-ranker, predict_misses off (bench instance)",
        "ranker-predict-off",
        &[("ADSERVE_BATCHING__PREDICT_MISSES".into(), "false".into())],
        None,
    )
    .await?;
    let on = connect_ranker(&s.stack.ranker, None, Duration::from_secs(10)).await?;
    ensure_serves(&on, &manifest, s).await?;
    let m = matrix(OVERLOAD_ROWS);
    let measure =
        |client| model_loop(client, &m, OVERLOAD_CONCURRENCY, s.warmup(), s.window(), Some(OVERLOAD_DEADLINE));
    let predicted = measure(&on).await;
    let waited = measure(&off).await;
    let case = format!(
        "Score {OVERLOAD_ROWS} rows, concurrency {OVERLOAD_CONCURRENCY}, {} ms deadline",
        OVERLOAD_DEADLINE.as_millis()
    );
    Ok(vec![
        Comparison::new("ranker", case, Metric::P99, "adserve-ranker, predict_misses on (default)", &predicted)
            .with("adserve-ranker, predict_misses off", Role::Ours, &waited)
            .note("ratio on p99; ok = scored by the model, degraded = answered by the fallback chain"),
    ])
}

/// A ranker instance of the bench's own: the stack ranker's binary on the
/// benched model (never the registry's), with the settings `tweaks`
/// changed; returned once it serves that model, through a channel with
/// `tls` when given (the instance must then serve TLS). Logs to
/// `logs/<log>.log`.
async fn bench_ranker(
    s: &Settings,
    manifest: &ModelManifest,
    label: &str,
    log: &str,
    tweaks: &[(String, String)],
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<(Child, RankerServiceClient<tonic::transport::Channel>)> {
    let port = crate::free_port();
    let mut env: Vec<(&str, String)> = vec![
        ("ADSERVE_SERVER__GRPC_ADDR", format!("127.0.0.1:{port}")),
        ("ADSERVE_SERVER__METRICS_ADDR", format!("127.0.0.1:{}", crate::free_port())),
        ("ADSERVE_ONNXRUNTIME_DYLIB", s.ort_dylib.display().to_string()),
        ("ADSERVE_MODEL__DIR", s.model_dir.display().to_string()),
        ("ADSERVE_REGISTRY__ENABLED", "false".into()),
        ("ADSERVE_TELEMETRY__LOG_FILTER", "warn".into()),
    ];
    env.extend(tweaks.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let child = Child::spawn(
        label,
        &[s.bin_dir.join("adserve-ranker").to_str().context("binary path")?],
        &env,
        &crate::repo_root(),
        s.work_dir.join(format!("logs/{log}.log")),
    )?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client = connect_ranker(&format!("{scheme}://127.0.0.1:{port}"), tls, Duration::from_secs(60)).await?;
    ensure_serves(&client, manifest, s).await?;
    Ok((child, client))
}

/// Rows per call in the TLS cases.
pub const TLS_ROWS: [usize; 2] = [1, 100];
/// Callers in the TLS cases.
pub const TLS_CONCURRENCY: [usize; 2] = [1, 8];

/// What mutual TLS between services costs (`make bench-tls`): two bench
/// rankers, the same binary, model and config, one serving plaintext and
/// one mutual TLS (`server.tls` with a client CA, the client presenting a
/// certificate of it, as the gateway does with `upstreams.tls`), scoring
/// the same calls through one long-lived channel each (a gateway keeps
/// its channels: the handshake is paid once, the per-call cost is
/// encryption and framing).
pub async fn tls(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    let manifest = adserve_registry::read_manifest(&s.model_dir.join("manifest.json"))?;
    let pki = crate::pki::Pki::new()?;
    pki.ca("bench", &["ranker", "gateway"])?;
    let server: Vec<(String, String)> = pki.server_env("ranker", "bench");
    let (_secure, secure) = bench_ranker(
        s,
        &manifest,
        "adserve-ranker, mutual TLS (bench instance)",
        "ranker-tls",
        &server,
        Some(pki.client("bench", Some("gateway"))?),
    )
    .await?;
    let (_plain, plain) =
        bench_ranker(s, &manifest, "adserve-ranker, plaintext (bench instance)", "ranker-plain", &[], None).await?;
    let timeout = Duration::from_secs(5);
    let mut out = Vec::new();
    for rows in TLS_ROWS {
        let m = matrix(rows);
        for c in TLS_CONCURRENCY {
            let with_tls = score_loop(s, &secure, &m, c, timeout).await;
            let without = score_loop(s, &plain, &m, c, timeout).await;
            let metric = if c == 1 { Metric::P50 } else { Metric::Rate };
            out.push(
                Comparison::new(
                    "tls",
                    format!("Score {rows} rows, concurrency {c}"),
                    metric,
                    "adserve-ranker over mutual TLS",
                    &with_tls,
                )
                .with("adserve-ranker, plaintext", Role::Floor, &without)
                .note(if c == 1 { "ratio on p50: TLS's cost per call" } else { "ratio on rows/s" }),
            );
            tracing::info!(rows, c, "tls case done");
        }
    }
    Ok(out)
}

/// Every subject must score the same model: a stack ranker following the
/// model registry may serve another (scripts/bench.sh turns that off when
/// ADSTACK_MODEL_DIR names the model).
async fn ensure_serves(
    client: &RankerServiceClient<tonic::transport::Channel>,
    manifest: &ModelManifest,
    s: &Settings,
) -> anyhow::Result<()> {
    let served = client.clone().get_model(adserve_proto::v1::GetModelRequest::default()).await?.into_inner();
    anyhow::ensure!(
        served.model_version == manifest.model_version,
        "the stack's ranker serves {}, the bench measures {} ({}): restart the stack with that model",
        served.model_version,
        manifest.model_version,
        s.model_dir.display()
    );
    Ok(())
}

/// `Score` calls of `m` by `concurrency` closed-loop callers through `client`.
async fn score_loop(
    s: &Settings,
    client: &RankerServiceClient<tonic::transport::Channel>,
    m: &FeatureMatrix,
    concurrency: usize,
    timeout: Duration,
) -> load::Measurement {
    let (client, m, rows) = (client.clone(), Arc::new(m.clone()), m.num_rows as usize);
    load::closed_loop(concurrency, s.warmup(), s.window(), timeout, rows as u64, move |_| {
        let (mut client, m) = (client.clone(), m.clone());
        async move {
            match client.score(ScoreRequest { matrix: Some((*m).clone()), ..Default::default() }).await {
                Ok(r) if r.get_ref().pctr.len() == rows => Outcome::Ok,
                Ok(r) => Outcome::Error(format!("{} scores for {rows} rows", r.get_ref().pctr.len())),
                Err(e) => Outcome::Error(format!("{:?}: {}", e.code(), e.message())),
            }
        }
    })
    .await
}

/// A ranker client once the service answers `GetModel` (it serves only
/// after its model is loaded and warmed up).
async fn connect_ranker(
    url: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    patience: Duration,
) -> anyhow::Result<RankerServiceClient<tonic::transport::Channel>> {
    let deadline = std::time::Instant::now() + patience;
    let mut endpoint = adserve_core::net::grpc_endpoint(url.to_string())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut client = RankerServiceClient::new(channel);
            if client.get_model(adserve_proto::v1::GetModelRequest::default()).await.is_ok() {
                return Ok(client);
            }
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "the ranker at {url} did not answer within {patience:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One bare `session.run` on a pre-gathered input (each block bound by
/// name, as views: no copy), reading the output back.
fn bare_run(session: &mut Session, manifest: &ModelManifest, input: &Input) -> Outcome {
    let rows = input.rows;
    let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(1 + input.typed.len());
    let dense = match TensorRef::from_array_view(([rows, manifest.feature_order.len()], input.dense.as_slice())) {
        Ok(t) => t,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    values.push((manifest.input_name.as_str().into(), dense.into()));
    for (spec, block) in manifest.typed_inputs.iter().zip(&input.typed) {
        let shape = [rows, spec.width()];
        let value: Result<SessionInputValue<'_>, _> = match block {
            Block::Int64(v) => TensorRef::from_array_view((shape, v.as_slice())).map(Into::into),
            Block::Float32(v) => TensorRef::from_array_view((shape, v.as_slice())).map(Into::into),
        };
        match value {
            Ok(v) => values.push((spec.name.as_str().into(), v)),
            Err(e) => return Outcome::Error(e.to_string()),
        }
    }
    let outputs = match session.run(values) {
        Ok(o) => o,
        Err(e) => return Outcome::Error(e.to_string()),
    };
    match outputs.get(manifest.output_name.as_str()).map(|o| o.try_extract_tensor::<f32>()) {
        Some(Ok((_, v))) if v.len() == rows => {
            std::hint::black_box(v.to_vec());
            Outcome::Ok
        }
        _ => Outcome::Error("bad output".into()),
    }
}

/// Rows per call in the swap bench.
pub const SWAP_ROWS: usize = 100;
/// Callers in the swap bench.
pub const SWAP_CONCURRENCY: usize = 8;
/// Model name the swap bench registers its versions under.
const SWAP_MODEL: &str = "bench-swap";

/// Hot swaps under load (`make bench-ranker-swap`). A ranker instance of
/// the bench's own follows a model registry of the bench's own (a schema in
/// the stack's PostgreSQL, dropped at the end) and is scored by
/// [`SWAP_CONCURRENCY`] callers of [`SWAP_ROWS`] rows: once steady, and once
/// while a driver promotes a new version (a copy of the benched model, so
/// loaded, checked and warmed up beside the serving one) and rolls it back
/// (a pointer swap to the model kept warm), over and over. Reported: the
/// callers' p99 during swaps against steady (a load competes for the same
/// cores), and how long a registry change takes to serve, from the registry call
/// until `GetModel` names the version (through NOTIFY): a rollback, a
/// rollback while a shadow version's load hangs (its model file a FIFO
/// nobody writes, as on a frozen network file system; released at the end,
/// when the shadow must load), and a promotion.
pub async fn swap(s: &Settings) -> anyhow::Result<Vec<Comparison>> {
    let schema = format!("bench_swap_{}", std::process::id());
    let registry = adserve_registry::Registry::connect_lazy(&adserve_registry::PostgresConfig {
        url: s.stack.postgres.clone(),
        schema: schema.clone(),
        ..Default::default()
    })?;
    registry.migrate().await.context("the swap bench's registry schema")?;
    let result = swap_in(s, &registry, &schema).await;
    let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop)).execute(registry.pool()).await {
        tracing::warn!(%schema, error = %e, "could not drop the swap bench's registry schema");
    }
    result
}

async fn swap_in(s: &Settings, registry: &adserve_registry::Registry, schema: &str) -> anyhow::Result<Vec<Comparison>> {
    use adserve_registry::Stage;
    let manifest = adserve_registry::read_manifest(&s.model_dir.join("manifest.json"))?;
    let models = s.work_dir.join("swap-models");
    let _ = std::fs::remove_dir_all(&models);
    // Copies of the benched model under versions of their own: a version
    // rolled back from is retired, so every promotion needs a new one.
    let copy = async |version: &str| -> anyhow::Result<std::path::PathBuf> {
        let dir = models.join(version);
        std::fs::create_dir_all(&dir)?;
        for file in ["model.onnx", "reference.json"] {
            if s.model_dir.join(file).exists() {
                std::fs::copy(s.model_dir.join(file), dir.join(file))?;
            }
        }
        let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(s.model_dir.join("manifest.json"))?)?;
        m["model_version"] = version.into();
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&m)?)?;
        registry.register(SWAP_MODEL, &dir, "bench").await.with_context(|| format!("registering {version}"))?;
        Ok(dir)
    };
    // Enough for a promotion and a rollback every 0.2 s of each window (a
    // cycle of the benched model takes about 0.25 s: 100 ms pauses, a load).
    let window = s.window() * 2;
    let per_phase = window.as_secs() as usize * 5;
    let versions: Vec<String> = (1..=2 * per_phase).map(|i| format!("swap-{i}")).collect();
    for v in std::iter::once("swap-base").chain(versions.iter().map(String::as_str)) {
        copy(v).await?;
    }
    let shadow_dir = copy("swap-shadow").await?;
    let metrics_port = crate::free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");

    let tweaks: Vec<(String, String)> = [
        ("ADSERVE_REGISTRY__ENABLED", "true"),
        ("ADSERVE_REGISTRY__MODEL_NAME", SWAP_MODEL),
        ("ADSERVE_REGISTRY__POSTGRES__URL", s.stack.postgres.as_str()),
        ("ADSERVE_REGISTRY__POSTGRES__SCHEMA", schema),
        // Only NOTIFY brings a change: the figures are its path.
        ("ADSERVE_REGISTRY__POLL_INTERVAL", "1h"),
        // Shadow scores are published, as in production.
        ("ADSERVE_KAFKA__BROKERS", s.stack.kafka.as_str()),
        ("ADSERVE_SERVER__METRICS_ADDR", metrics_addr.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (ranker, client) = bench_ranker(
        s,
        &manifest,
        "adserve-ranker following a registry (bench instance)",
        "ranker-swap",
        &tweaks,
        None,
    )
    .await?;
    let actor = "bench";
    registry.promote(SWAP_MODEL, "swap-base", Stage::Production, None, actor, "swap bench").await?;
    served_after(&client, "swap-base", std::time::Instant::now()).await?;

    let m = matrix(SWAP_ROWS);
    let steady = model_loop(&client, &m, SWAP_CONCURRENCY, s.warmup(), window, None).await;
    // Callers for one window while the driver promotes and rolls back,
    // back to back, until the window ends.
    let under_load = async |versions: &[String]| {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let callers = async {
            let m = model_loop(&client, &m, SWAP_CONCURRENCY, s.warmup(), window, None).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            m
        };
        let driver = async {
            // Swaps start once the callers record.
            tokio::time::sleep(s.warmup()).await;
            swaps(registry, &client, versions, Some(&stop)).await
        };
        let (during, swapped) = tokio::join!(callers, driver);
        swapped.map(|(promoted, rolled_back)| (during, promoted, rolled_back))
    };
    let (during, promoted, rolled_back) = under_load(&versions[..per_phase]).await?;

    // A shadow version whose model file hangs: its load stays in flight
    // while production is promoted and rolled back, under the same load.
    let hung = crate::HungFile::new(&shadow_dir.join("model.onnx"))?;
    registry.promote(SWAP_MODEL, "swap-shadow", Stage::Shadow, None, actor, "swap bench").await?;
    let url = format!("http://{metrics_addr}/metrics");
    let since = std::time::Instant::now();
    while super::prom::counter(&super::prom::scrape(&url).await?, "adserve_ranker_model_loading", &["role=\"shadow\""])
        < 1.0
    {
        anyhow::ensure!(since.elapsed() < Duration::from_secs(30), "the shadow's load never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (during_hung, promoted_hung, rolled_back_hung) = under_load(&versions[per_phase..]).await?;
    let shadow = client.clone().get_model(adserve_proto::v1::GetModelRequest::default()).await?.into_inner();
    anyhow::ensure!(shadow.shadow_model_version.is_empty(), "the hung shadow served: {shadow:?}");
    // The file system comes back: the shadow loads.
    hung.release(Duration::from_secs(60)).await.context("the hung shadow file")?;
    let since = std::time::Instant::now();
    loop {
        let m = client.clone().get_model(adserve_proto::v1::GetModelRequest::default()).await?.into_inner();
        if m.shadow_model_version == "swap-shadow" {
            break;
        }
        anyhow::ensure!(since.elapsed() < Duration::from_secs(60), "the shadow never loaded once its file returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What the shadow costs the answers: it scores every call (sample_share
    // 1, the default) after the answer, on its own low-priority sessions.
    let shadowed = model_loop(&client, &m, SWAP_CONCURRENCY, s.warmup(), window, None).await;
    // And at a share of 0.1 (the gateways' default prediction_cache
    // shadow_share): a second instance on the same registry, the first one
    // stopped so that the two never share the cores.
    drop(ranker);
    let mut sampled_tweaks = tweaks.clone();
    sampled_tweaks.retain(|(k, _)| k != "ADSERVE_SERVER__METRICS_ADDR");
    sampled_tweaks.push(("ADSERVE_SHADOW__SAMPLE_SHARE".into(), "0.1".into()));
    let mut base = manifest.clone();
    base.model_version = "swap-base".into();
    let (_sampling, sampling_client) = bench_ranker(
        s,
        &base,
        "adserve-ranker, shadow sampled at 0.1 (bench instance)",
        "ranker-swap-sampled",
        &sampled_tweaks,
        None,
    )
    .await?;
    // Its own floor, the same instance without the shadow, measured in
    // turns with it (with, without, with, without; half a window each), so
    // that neither side gets the quieter minute of a shared box.
    let shadow_is = async |want: &str| -> anyhow::Result<()> {
        let since = std::time::Instant::now();
        loop {
            let asked = sampling_client.clone().get_model(adserve_proto::v1::GetModelRequest::default()).await?;
            if asked.into_inner().shadow_model_version == want {
                return Ok(());
            }
            anyhow::ensure!(
                since.elapsed() < Duration::from_secs(60),
                "the sampling instance's shadow never became {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    shadow_is("swap-shadow").await?;
    let (mut sampled, mut unshadowed) = (None, None);
    let join = |total: Option<load::Measurement>, next: load::Measurement| match total {
        Some(t) => t.then(next),
        None => next,
    };
    for turn in 0..2 {
        if turn > 0 {
            // A retired version goes back through candidate.
            for stage in [Stage::Candidate, Stage::Shadow] {
                registry.promote(SWAP_MODEL, "swap-shadow", stage, None, actor, "swap bench").await?;
            }
            shadow_is("swap-shadow").await?;
        }
        let with = model_loop(&sampling_client, &m, SWAP_CONCURRENCY, s.warmup(), window / 2, None).await;
        sampled = Some(join(sampled, with));
        registry.promote(SWAP_MODEL, "swap-shadow", Stage::Retired, None, actor, "swap bench").await?;
        shadow_is("").await?;
        let without = model_loop(&sampling_client, &m, SWAP_CONCURRENCY, s.warmup(), window / 2, None).await;
        unshadowed = Some(join(unshadowed, without));
    }
    let (sampled, unshadowed) = (sampled.expect("measured"), unshadowed.expect("measured"));

    let case =
        format!("Score {SWAP_ROWS} rows, concurrency {SWAP_CONCURRENCY}, while versions are promoted and rolled back");
    Ok(vec![
        Comparison::new("ranker", case, Metric::P99, "adserve-ranker during swaps", &during)
            .with("adserve-ranker steady (no swap)", Role::Floor, &steady)
            .with("adserve-ranker during swaps, a shadow's load hung", Role::Ours, &during_hung)
            .note(format!(
                "{} promotions (load, checks, warm-up beside the serving model) and {} rollbacks in the window, \
                 back to back ({} and {} with the hung shadow load); ok = scored by the model, degraded = by the \
                 fallback chain",
                promoted.calls(),
                rolled_back.calls(),
                promoted_hung.calls(),
                rolled_back_hung.calls()
            )),
        Comparison::new(
            "ranker",
            "registry change -> served (registry call to GetModel, through NOTIFY)",
            Metric::P50,
            "rollback (to the model kept warm)",
            &rolled_back,
        )
        .with("rollback while a shadow load hangs", Role::Ours, &rolled_back_hung)
        .with("promotion of a new version (load, checks, warm-up)", Role::Ours, &promoted)
        .note("one call = one registry change, timed from the registry call (its transaction included); GetModel polled every 2 ms"),
        Comparison::new(
            "ranker",
            format!("Score {SWAP_ROWS} rows, concurrency {SWAP_CONCURRENCY}, with a shadow model scoring every call"),
            Metric::P99,
            "adserve-ranker with a shadow (shadow.sample_share 1)",
            &shadowed,
        )
        .with("adserve-ranker without a shadow", Role::Floor, &steady)
        .note("the shadow (the same graph) scores each answered call afterwards on its own sessions at nice 19 and publishes both scores to Kafka"),
        Comparison::new(
            "ranker",
            format!("Score {SWAP_ROWS} rows, concurrency {SWAP_CONCURRENCY}, with a shadow scoring a tenth of the calls"),
            Metric::P99,
            "adserve-ranker with a shadow at shadow.sample_share 0.1",
            &sampled,
        )
        .with("the same instance once the shadow is retired", Role::Floor, &unshadowed)
        .note("a second instance of the same binary on the same registry (the first one stopped), sampling by request id as the gateways' prediction cache does at its default shadow_share; with and without the shadow measured in turns, twice, half a window each"),
    ])
}

/// Promotes each of `versions` to production and rolls it back, timing
/// each change from the registry call until the ranker serves it; stops early
/// when `stop` is set. Returns (promotions, rollbacks).
async fn swaps(
    registry: &adserve_registry::Registry,
    client: &RankerServiceClient<tonic::transport::Channel>,
    versions: &[String],
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(load::Measurement, load::Measurement)> {
    let (mut promoted, mut rolled_back) = (load::Measurement::new(1), load::Measurement::new(1));
    for v in versions {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            break;
        }
        let before = client.clone().get_model(adserve_proto::v1::GetModelRequest::default()).await?.into_inner();
        // Both kinds of change are timed from the registry call (its
        // transaction included) until the ranker serves the version.
        let t = std::time::Instant::now();
        registry.promote(SWAP_MODEL, v, adserve_registry::Stage::Production, None, "bench", "swap bench").await?;
        promoted.record(Outcome::Ok, served_after(client, v, t).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = std::time::Instant::now();
        registry.rollback(SWAP_MODEL, "bench", "swap bench").await?;
        rolled_back.record(Outcome::Ok, served_after(client, &before.model_version, t).await?);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((promoted, rolled_back))
}

/// How long after `since` the ranker first names `version` in `GetModel`.
async fn served_after(
    client: &RankerServiceClient<tonic::transport::Channel>,
    version: &str,
    since: std::time::Instant,
) -> anyhow::Result<Duration> {
    let mut client = client.clone();
    loop {
        if client.get_model(adserve_proto::v1::GetModelRequest::default()).await?.into_inner().model_version == version
        {
            return Ok(since.elapsed());
        }
        anyhow::ensure!(since.elapsed() < Duration::from_secs(120), "the ranker never served {version}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `Score` calls of `m` by `concurrency` closed-loop callers, each with
/// `deadline` as its `grpc-timeout` when given: an answer the model scored
/// is ok, the fallback chain's degraded.
async fn model_loop(
    client: &RankerServiceClient<tonic::transport::Channel>,
    m: &FeatureMatrix,
    concurrency: usize,
    warmup: Duration,
    window: Duration,
    deadline: Option<Duration>,
) -> load::Measurement {
    let (client, m, rows) = (client.clone(), Arc::new(m.clone()), m.num_rows as usize);
    // With a deadline the client gives up a little after it: the ranker
    // answers (from the fallback) within it.
    let patience = deadline.map_or(Duration::from_secs(10), |d| d * 4);
    load::closed_loop(concurrency, warmup, window, patience, rows as u64, move |i| {
        let (mut client, m) = (client.clone(), m.clone());
        async move {
            // A request id per call, as the gateway sends: what a shadow
            // below sample_share 1 samples by.
            let call =
                ScoreRequest { matrix: Some((*m).clone()), request_id: format!("bench-{i}"), ..Default::default() };
            let mut request = tonic::Request::new(call);
            if let Some(deadline) = deadline {
                request.set_timeout(deadline);
            }
            match client.score(request).await {
                Ok(r) if r.get_ref().pctr.len() != rows => {
                    Outcome::Error(format!("{} scores for {rows} rows", r.get_ref().pctr.len()))
                }
                Ok(r) if r.get_ref().level == adserve_proto::v1::ScoreLevel::Model as i32 => Outcome::Ok,
                Ok(_) => Outcome::Degraded,
                Err(e) => Outcome::Error(format!("{:?}: {}", e.code(), e.message())),
            }
        }
    })
    .await
}
