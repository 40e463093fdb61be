//! Model loading and batching against the committed baseline model in a real
//! ONNX Runtime. They fail (rather than pass vacuously) without ONNX Runtime:
//! `make test` sets ORT_DYLIB_PATH.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use adserve_proto::v1::FeatureMatrix;
use adserve_registry::ManifestError;

use crate::{BatchingConfig, CtrModel, ModelConfig, ModelError, QueueKind, ScoreError, model::MIN_PCTR};

fn dylib() -> String {
    std::env::var("ORT_DYLIB_PATH")
        .expect("ORT_DYLIB_PATH is unset: run the ranker tests through `make test` (scripts/env.sh)")
}

fn baseline_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-baseline")
}

fn load_from(dir: &Path, batching: &BatchingConfig) -> Result<CtrModel, ModelError> {
    let config = ModelConfig { dir: dir.to_path_buf(), ..ModelConfig::default() };
    CtrModel::load(&config, batching, 5000, &dylib(), QueueKind::Model)
}

fn baseline(batching: BatchingConfig) -> CtrModel {
    load_from(&baseline_dir(), &batching).expect("baseline model loads")
}

/// Batches flush only when full: what a test can count on without timing.
fn flush_when_full(rows: usize) -> BatchingConfig {
    BatchingConfig {
        sessions: 1,
        max_batch_rows: rows,
        max_queue_delay: Duration::from_secs(3600),
        max_queue_rows: 100_000,
        ..BatchingConfig::default()
    }
}

fn matrix(rows: usize) -> FeatureMatrix {
    let registry = adserve_features::registry();
    let names: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
    let mut values = Vec::new();
    for r in 0..rows {
        values.extend(registry.defaults().iter().map(|d| d + r as f32 * 0.01));
    }
    FeatureMatrix { feature_names: names, num_rows: rows as u32, values, ..Default::default() }
}

async fn score(model: &CtrModel, m: &FeatureMatrix) -> Result<Vec<f32>, ScoreError> {
    let input = model.gather(m).expect("valid matrix");
    model.batcher().score(input, None).await.map(|s| s.pctr)
}

#[tokio::test]
async fn scores_are_probabilities_one_per_row() {
    let model = baseline(BatchingConfig::default());
    let scores = score(&model, &matrix(7)).await.expect("scores");
    assert_eq!(scores.len(), 7);
    assert!(scores.iter().all(|p| (MIN_PCTR..=1.0).contains(p)));
    assert_eq!(model.provider().as_str(), "cpu");
}

#[tokio::test]
async fn the_manifest_calibration_is_applied_and_the_raw_score_kept() {
    let calibration = serde_json::json!({"keep_rate": 0.25, "mapping": {"method": "platt", "a": 1.2, "b": -0.3}});
    let dir = edited_model(|m| m["calibration"] = calibration.clone(), None);
    let calibrated = load_from(dir.path(), &BatchingConfig::default()).expect("a calibrated model loads");
    let plain = baseline(BatchingConfig::default());
    let m = matrix(6);
    let got = calibrated.batcher().score(calibrated.gather(&m).expect("valid"), None).await.expect("scores");
    let raw = plain.batcher().score(plain.gather(&m).expect("valid"), None).await.expect("scores");
    assert_eq!(got.raw, raw.raw, "calibration must not touch the model's output");
    assert_eq!(raw.pctr, raw.raw.iter().map(|p| p.max(MIN_PCTR)).collect::<Vec<_>>(), "no calibration: served raw");
    let c: adserve_registry::Calibration = serde_json::from_value(calibration).expect("calibration");
    for (r, p) in got.raw.iter().zip(&got.pctr) {
        assert_eq!(*p, c.apply(*r).max(MIN_PCTR));
        assert!(p < r, "keeping a quarter of the negatives: the corrected pCTR is lower ({p} vs {r})");
    }
}

#[tokio::test]
async fn columns_are_matched_by_name_not_position() {
    let model = baseline(BatchingConfig::default());
    let m = matrix(3);
    let want = score(&model, &m).await.expect("scores");
    let mut names = m.feature_names.clone();
    names.reverse();
    let mut values = Vec::new();
    for r in 0..3 {
        let mut row = m.row(r).expect("row").to_vec();
        row.reverse();
        values.extend(row);
    }
    let reversed = FeatureMatrix { feature_names: names, num_rows: 3, values, ..Default::default() };
    assert_eq!(score(&model, &reversed).await.expect("scores"), want);
}

#[tokio::test]
async fn missing_ragged_and_non_finite_input_is_named() {
    let model = baseline(BatchingConfig::default());
    let mut m = matrix(1);
    let missing = model.manifest().feature_order[0].clone();
    let i = m.feature_names.iter().position(|n| *n == missing).expect("present");
    m.feature_names.remove(i);
    m.values.remove(i);
    let err = model.gather(&m).unwrap_err();
    assert!(err.contains(&missing), "{err}");
    let mut m = matrix(2);
    m.values.pop();
    assert!(model.gather(&m).is_err());
    // A non-finite value is named by its row and feature, whichever column.
    for feature in [&model.manifest().feature_order[0], model.manifest().feature_order.last().unwrap()] {
        let mut m = matrix(3);
        let col = m.feature_names.iter().position(|n| n == feature).expect("present");
        let cols = m.num_cols();
        m.values[cols + col] = f32::INFINITY;
        let err = model.gather(&m).unwrap_err();
        assert!(err.contains(&format!("row 1 feature {feature:?} is inf")), "{err}");
    }
}

#[tokio::test]
async fn concurrent_calls_share_one_run_and_get_their_own_rows_back() {
    // 8 calls of 10 rows, a batch of 80 rows: one session.run for all.
    let model = Arc::new(baseline(flush_when_full(80)));
    let alone = baseline(BatchingConfig { max_batch_rows: 1, ..BatchingConfig::default() });
    let calls: Vec<FeatureMatrix> = (0..8)
        .map(|k| {
            let mut m = matrix(10);
            m.values.iter_mut().for_each(|v| *v += k as f32 * 0.05);
            m
        })
        .collect();
    let tasks: Vec<_> = calls
        .iter()
        .cloned()
        .map(|m| {
            let model = model.clone();
            tokio::spawn(async move { score(&model, &m).await })
        })
        .collect();
    for (task, m) in tasks.into_iter().zip(&calls) {
        let batched = task.await.expect("task").expect("scores");
        assert_eq!(batched, score(&alone, m).await.expect("scored alone"), "a call got another call's rows");
    }
    let stats = model.batcher().stats();
    assert_eq!((stats.batches, stats.calls, stats.rows), (1, 8, 80), "{stats:?}");
    assert_eq!(alone.batcher().stats().batches, 8, "max_batch_rows = 1 runs every call alone");
}

#[tokio::test]
async fn a_call_past_its_deadline_is_answered_without_compute() {
    let model = baseline(BatchingConfig::default());
    let m = matrix(5);
    let input = model.gather(&m).expect("valid");
    let err = model.batcher().score(input, Some(Instant::now())).await.unwrap_err();
    assert!(matches!(err, ScoreError::DeadlineExceeded { .. }), "{err}");
    let stats = model.batcher().stats();
    assert_eq!((stats.batches, stats.expired), (0, 1), "{stats:?}");
}

#[tokio::test]
async fn a_call_predicted_to_miss_its_deadline_is_refused_at_arrival_once_costs_are_known() {
    for predict_misses in [true, false] {
        let model = baseline(BatchingConfig { sessions: 1, predict_misses, ..BatchingConfig::default() });
        let call = |rows: usize, deadline: Option<Instant>| {
            let input = model.gather(&matrix(rows)).expect("valid");
            model.batcher().score(input, deadline)
        };
        // Cold: nothing is predicted; a past deadline is found in the queue.
        let err = call(50, Some(Instant::now())).await.unwrap_err();
        assert!(matches!(err, ScoreError::DeadlineExceeded { .. }), "{err}");
        // Warm the cost model on runs of several sizes.
        for i in 0..crate::batcher::CostModel::WARM as usize + 4 {
            call(1 + (i % 4) * 60, None).await.expect("scores");
        }
        let (a, b) = model.batcher().cost_model().fit().expect("warm");
        assert!(a >= 0.0 && b >= 0.0 && a + b * 100.0 > 0.0, "a = {a}, b = {b}");
        // The first call that would miss still runs (a probe, re-measuring
        // the cost), and expires in the queue; the next is refused at once.
        let first = call(100, Some(Instant::now())).await.unwrap_err();
        assert!(matches!(first, ScoreError::DeadlineExceeded { .. }), "{first}");
        let second = call(100, Some(Instant::now())).await.unwrap_err();
        if predict_misses {
            assert!(matches!(second, ScoreError::WouldMiss { queued: 0, .. }), "{second}");
            assert!(second.to_string().starts_with("the model would miss the call's deadline: predicted"), "{second}");
        } else {
            assert!(matches!(second, ScoreError::DeadlineExceeded { .. }), "{second}");
        }
        // A call with time to spare is scored.
        let later = Some(Instant::now() + Duration::from_secs(30));
        assert_eq!(call(100, later).await.expect("scores").pctr.len(), 100);
        assert_eq!(model.batcher().stats().predicted_misses, u64::from(predict_misses));
    }
}

#[test]
fn the_cost_model_fits_a_run_cost_and_a_row_cost() {
    use crate::batcher::CostModel;
    let mut c = CostModel::default();
    assert_eq!(c.fit(), None, "cold");
    // 1 ms per run + 10 us per row, exactly.
    for i in 0..40 {
        let rows = 1 + (i % 5) * 100;
        c.observe(rows, 0.001 + 0.000_01 * rows as f64);
    }
    let (a, b) = c.fit().expect("warm");
    assert!((a - 0.001).abs() < 1e-6 && (b - 0.000_01).abs() < 1e-9, "a = {a}, b = {b}");
    assert!((c.cost(1000).unwrap() - 0.011).abs() < 1e-6);
    // Runs all of one size cannot separate the two: cost proportional to rows.
    let mut same = CostModel::default();
    for _ in 0..40 {
        same.observe(100, 0.002);
    }
    let (a, b) = same.fit().expect("warm");
    assert_eq!(a, 0.0);
    assert!((b * 100.0 - 0.002).abs() < 1e-9, "b = {b}");
    // Recent runs weigh more: after a slowdown the fit follows it.
    for _ in 0..400 {
        same.observe(100, 0.02);
    }
    assert!(same.cost(100).unwrap() > 0.019, "{:?}", same.cost(100));
}

#[tokio::test]
async fn abandoned_calls_are_skipped_and_a_full_queue_refuses_at_once() {
    let model = Arc::new(baseline(BatchingConfig { max_queue_rows: 30, ..flush_when_full(30) }));
    // Callers that give up (the gateway's deadline) before their batch fills.
    let gone = tokio::time::timeout(Duration::from_millis(20), score(&model, &matrix(10))).await;
    assert!(gone.is_err(), "the batch cannot flush before it is full");
    let gone = tokio::time::timeout(Duration::from_millis(20), score(&model, &matrix(10))).await;
    assert!(gone.is_err());
    // 20 abandoned rows queued: 25 live ones fit only because abandoned calls
    // do not count against max_queue_rows = 30.
    let live = {
        let model = model.clone();
        tokio::spawn(async move { score(&model, &matrix(25)).await })
    };
    while model.batcher().queued_rows() != 25 {
        tokio::task::yield_now().await;
    }
    // 25 live rows queued: 10 more would pass the limit, refused at once.
    let err = score(&model, &matrix(10)).await.unwrap_err();
    assert!(matches!(err, ScoreError::Overloaded { queued: 25, rows: 10, limit: 30 }), "{err}");
    // 5 more fill the batch: both live calls are scored in one run.
    assert_eq!(score(&model, &matrix(5)).await.expect("scores").len(), 5);
    assert_eq!(live.await.expect("task").expect("scores").len(), 25);
    let stats = model.batcher().stats();
    assert_eq!((stats.batches, stats.calls, stats.rows, stats.cancelled), (1, 2, 30, 2), "{stats:?}");
}

/// A copy of the baseline model whose manifest has been edited by `edit`.
fn edited_model(edit: impl FnOnce(&mut serde_json::Value), bytes: Option<&[u8]>) -> tempfile::TempDir {
    edited_copy(&baseline_dir(), edit, bytes)
}

/// A copy of the model in `from` whose manifest has been edited by `edit`
/// (with its reference rows, unless `bytes` replaces the model file).
fn edited_copy(from: &Path, edit: impl FnOnce(&mut serde_json::Value), bytes: Option<&[u8]>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    if bytes.is_none() {
        std::fs::copy(from.join("reference.json"), dir.path().join("reference.json")).expect("copy reference.json");
    }
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("manifest.json")).expect("manifest")).expect("json");
    let model = match bytes {
        Some(b) => b.to_vec(),
        None => std::fs::read(from.join("model.onnx")).expect("model"),
    };
    edit(&mut manifest);
    std::fs::write(dir.path().join("manifest.json"), serde_json::to_vec(&manifest).expect("json")).expect("write");
    std::fs::write(dir.path().join("model.onnx"), model).expect("write");
    dir
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_model_that_does_not_match_its_manifest_is_refused_at_load() {
    let batching = BatchingConfig::default();
    let refuse = |dir: &tempfile::TempDir| load_from(dir.path(), &batching).map(|_| ()).unwrap_err();

    let swapped = edited_model(|m| m["onnx_sha256"] = "0".repeat(64).into(), None);
    assert!(matches!(refuse(&swapped), ModelError::Artifact(ManifestError::Checksum { .. })));

    let output = edited_model(|m| m["output_name"] = "probability".into(), None);
    let err = refuse(&output).to_string();
    assert!(err.contains("outputs [\"pctr\"]") && err.contains("\"probability\""), "{err}");

    let input = edited_model(|m| m["input_name"] = "x".into(), None);
    assert!(matches!(refuse(&input), ModelError::Mismatch(_)));

    // One feature fewer than the graph's columns.
    let width = adserve_features::registry().features.len();
    let narrow = edited_model(|m| m["feature_order"].as_array_mut().expect("array").truncate(width - 1), None);
    let err = refuse(&narrow).to_string();
    assert!(
        err.contains(&format!("{width} columns")) && err.contains(&format!("feature_order has {}", width - 1)),
        "{err}"
    );

    let garbage = b"not an onnx graph";
    let corrupt = edited_model(|m| m["onnx_sha256"] = sha256(garbage).into(), Some(garbage));
    assert!(matches!(refuse(&corrupt), ModelError::Runtime { stage: "loading model.onnx", .. }));

    let missing = tempfile::tempdir().expect("temp dir");
    assert!(matches!(refuse(&missing), ModelError::Artifact(ManifestError::Invalid { .. })));
}

#[test]
fn a_gpu_provider_list_falls_back_to_cpu_here() {
    use crate::ExecutionProvider::*;
    let config =
        ModelConfig { dir: baseline_dir(), execution_providers: vec![Tensorrt, Cuda, Cpu], ..ModelConfig::default() };
    let model =
        CtrModel::load(&config, &BatchingConfig::default(), 5000, &dylib(), QueueKind::Model).expect("loads on CPU");
    assert_eq!(model.provider(), Cpu, "no GPU and a CPU build of ONNX Runtime on this machine");
}

#[test]
fn a_provider_this_build_lacks_passes_to_the_next_gpu_provider_not_to_cpu() {
    use crate::ExecutionProvider::*;
    let list = [Tensorrt, Cuda, Cpu];
    let lacks = || Err(("not_compiled", String::new()));
    // Built with CUDA but not TensorRT, on a GPU node: CUDA, not CPU.
    let cuda_only = |ep| if ep == Tensorrt { lacks() } else { Ok(()) };
    assert_eq!(crate::model::first_usable(&list, 0, cuda_only), (Cuda, 1));
    // The same build on a node without a GPU: CPU, the list's last entry.
    let no_gpu = |ep| if ep == Tensorrt { lacks() } else { Err(("unavailable", "no device".to_string())) };
    assert_eq!(crate::model::first_usable(&list, 0, no_gpu), (Cpu, 2));
    // A pool that failed on CUDA resumes after it (start = CUDA's index + 1).
    assert_eq!(crate::model::first_usable(&list, 2, cuda_only), (Cpu, 2));
    // A list that ends on GPUs falls to CPU past its end.
    assert_eq!(crate::model::first_usable(&[Tensorrt, Cuda], 0, no_gpu), (Cpu, 2));
    // Both compiled and usable: the first listed.
    assert_eq!(crate::model::first_usable(&list, 0, |_| Ok(())), (Tensorrt, 0));
}

/// The committed DCN-v2 that takes the registry's categoricals as an int64
/// input beside the dense one (`make model`).
fn typed_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ctr-dcnv2-typed")
}

/// `reference.json` beside the typed model: rows as a FeatureMatrix carries
/// them, and the raw output Python's onnxruntime gave for each.
fn reference() -> (FeatureMatrix, Vec<f32>) {
    let dir = typed_dir();
    let manifest = adserve_registry::read_manifest(&dir.join("manifest.json")).expect("manifest");
    let r = crate::Reference::read(&dir, &manifest).expect("reads").expect("the typed model has a reference");
    (crate::model::reference_matrix(&r), r.raw)
}

/// The matrix with its categorical columns in reverse order (ids moved along).
fn reverse_categoricals(m: &FeatureMatrix) -> FeatureMatrix {
    let width = m.categorical_names.len();
    let mut out = m.clone();
    out.categorical_names.reverse();
    out.categorical_ids = m.categorical_ids.chunks(width).flat_map(|row| row.iter().rev().copied()).collect();
    out
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6, "row {i}: the ranker gives {g}, onnxruntime in Python {w}");
    }
}

#[tokio::test]
async fn a_typed_model_scores_as_onnxruntime_does_in_the_trainer() {
    let (m, want) = reference();
    let rows = m.num_rows as usize;
    // Batches flush only when both calls are in: their blocks are stacked.
    let model = load_from(&typed_dir(), &flush_when_full(2 * rows)).expect("the typed model loads");
    let typed = &model.manifest().typed_inputs;
    assert_eq!((typed.len(), typed[0].name.as_str()), (1, "categorical"));
    let (a, b) = (model.gather(&m).expect("valid"), model.gather(&reverse_categoricals(&m)).expect("valid"));
    assert_eq!(a, b, "columns are bound by name, not by position on the wire");
    let (a, b) = tokio::join!(model.batcher().score(a, None), model.batcher().score(b, None));
    assert_close(&a.expect("scores").raw, &want);
    assert_close(&b.expect("scores").raw, &want);
    assert_eq!(model.batcher().stats().batches, 1, "one run scored both calls");
    // The ids reach the graph: another device moves every score. Mobile (4)
    // and desktop (3), ids the training rows held: the graph serves an id
    // training never saw as missing, bucket 0.
    let mut other = m.clone();
    let k = m.categorical_names.iter().position(|n| n == "ctx_device_id").expect("device");
    for row in other.categorical_ids.chunks_mut(m.categorical_names.len()) {
        row[k] = if row[k] == 4 { 3 } else { 4 };
    }
    let moved = model.batcher().score(model.gather(&other).expect("valid"), None);
    let single = model.batcher().score(model.gather(&m).expect("valid"), None);
    let (moved, single) = tokio::join!(moved, single);
    assert_close(&single.expect("scores").raw, &want);
    let moved = moved.expect("scores").raw;
    assert!(moved.iter().zip(&want).all(|(a, b)| a != b), "{moved:?} vs {want:?}");
}

#[tokio::test]
async fn a_typed_model_refuses_missing_or_out_of_range_ids_by_name() {
    let model = load_from(&typed_dir(), &BatchingConfig::default()).expect("loads");
    let (m, _) = reference();
    let mut missing = m.clone();
    let width = m.categorical_names.len();
    let k = m.categorical_names.iter().position(|n| n == "ctx_device_id").expect("device");
    missing.categorical_names.remove(k);
    missing.categorical_ids = m
        .categorical_ids
        .chunks(width)
        .flat_map(|row| row.iter().enumerate().filter(|(c, _)| *c != k).map(|(_, v)| *v))
        .collect();
    let err = model.gather(&missing).unwrap_err();
    assert!(err.contains("categorical_names lacks \"ctx_device_id\"") && err.contains("\"categorical\""), "{err}");
    for bad in [16, -1, 1 << 40] {
        let mut m = m.clone();
        m.categorical_ids[width + k] = bad;
        let err = model.gather(&m).unwrap_err();
        assert!(
            err.contains("row 1") && err.contains("\"ctx_device_id\"") && err.contains("outside its 16 buckets"),
            "{err}"
        );
    }
    // A dense-only matrix cannot feed it.
    let dense = FeatureMatrix { categorical_names: vec![], categorical_ids: vec![], ..m };
    assert!(model.gather(&dense).unwrap_err().contains("categorical_names lacks"));
}

#[test]
fn a_typed_model_whose_inputs_do_not_match_its_manifest_is_refused_at_load() {
    let batching = BatchingConfig::default();
    let refuse = |dir: &tempfile::TempDir| load_from(dir.path(), &batching).map(|_| ()).unwrap_err().to_string();
    let typed = |edit: fn(&mut serde_json::Value)| edited_copy(&typed_dir(), edit, None);

    // The manifest forgets the int64 input: the graph has two.
    let err = refuse(&typed(|m| {
        m.as_object_mut().expect("object").remove("typed_inputs");
    }));
    assert!(err.contains("[\"features\", \"categorical\"]") && err.contains("exactly one"), "{err}");
    // One categorical fewer than the graph's columns.
    let err = refuse(&typed(|m| {
        m["typed_inputs"][0]["features"].as_array_mut().expect("array").pop();
    }));
    assert!(err.contains("input \"categorical\" has 7 columns, its manifest features has 6"), "{err}");
    // Another name than the graph's.
    let err = refuse(&typed(|m| m["typed_inputs"][0]["name"] = "ids".into()));
    assert!(err.contains("its manifest names [\"features\", \"ids\"]"), "{err}");
    // The baseline's graph takes no int64 input at all.
    let err = refuse(&edited_model(
        |m| {
            m["typed_inputs"] =
                serde_json::json!([{"name": "categorical", "dtype": "int64", "features": ["ctx_device_id"]}])
        },
        None,
    ));
    assert!(err.contains("model.onnx has inputs [\"features\"]"), "{err}");
    // Categoricals declared as float32: not the registry type of that dtype.
    let err = refuse(&typed(|m| m["typed_inputs"][0]["dtype"] = "float32".into()));
    assert!(err.contains("not a registry embedding feature"), "{err}");
}

#[test]
fn a_model_that_does_not_reproduce_its_reference_rows_is_refused_at_load() {
    let batching = BatchingConfig::default();
    let with_reference = |edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = edited_copy(&typed_dir(), |_| {}, None);
        let path = dir.path().join("reference.json");
        let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        edit(&mut r);
        std::fs::write(&path, serde_json::to_vec(&r).expect("json")).expect("write");
        dir
    };
    let refuse = |dir: &tempfile::TempDir| load_from(dir.path(), &batching).map(|_| ()).unwrap_err();

    // The trainer saw another number for row 3.
    let off = with_reference(&|r| {
        let v = r["raw"][3].as_f64().expect("number");
        r["raw"][3] = (v + 1e-3).into();
    });
    let err = refuse(&off);
    assert_eq!(err.reason(), "reference");
    assert!(err.to_string().contains("row 3 scores"), "{err}");
    // Ids moved to other columns: what a binding by position would feed.
    let swapped = with_reference(&|r| {
        let names = r["categorical_names"].as_array_mut().expect("array");
        names.swap(0, 2);
    });
    assert!(refuse(&swapped).to_string().contains("scores"), "a swapped binding scores differently");
    // For another model.onnx: a stale copy.
    let stale = with_reference(&|r| r["onnx_sha256"] = "0".repeat(64).into());
    assert!(refuse(&stale).to_string().contains("stale or torn"), "{}", refuse(&stale));
    // Not a reference at all.
    let garbage = with_reference(&|r| *r = serde_json::json!({"rows": "many"}));
    assert_eq!(refuse(&garbage).reason(), "reference");
    // Within the tolerance: loads.
    let close = with_reference(&|r| {
        let v = r["raw"][0].as_f64().expect("number");
        r["raw"][0] = (v + 1e-7).into();
    });
    load_from(close.path(), &batching).expect("a difference within the tolerance loads");
}

/// A float32 typed input of embeddings, against a registry that declares
/// some (the compiled-in one declares none yet): gathered by name, lengths
/// checked against the registry's dims, non-finite values named.
#[test]
fn an_embedding_input_is_gathered_by_name_with_its_registry_dims() {
    use adserve_registry::{InputDtype, TypedInput};
    let entry = |body: &str| format!("[[feature]]\n{body}description=\"\"\nowner=\"t\"\n");
    let doc = [
        "[tables]\nuser=\"u\"\nad=\"a\"\n[redis]\nkey_prefix=\"rt\"\n[request]\ndevices=[\"mobile\"]\n\
         [label]\nwindow_seconds=60\n"
            .to_string(),
        entry("name=\"ad_x\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"x\"\ndefault=0.0\nrange=[0.0, 1.0]\n"),
        entry(
            "name=\"user_vec\"\nentity=\"user\"\nsource=\"dynamodb\"\nattribute=\"vec\"\ntype=\"embedding\"\n\
             dim=2\ndefault=0.0\nrange=[-1.0, 1.0]\n",
        ),
        entry(
            "name=\"ad_vec\"\nentity=\"ad\"\nsource=\"dynamodb\"\nattribute=\"vec\"\ntype=\"embedding\"\n\
             dim=3\ndefault=0.5\nrange=[-1.0, 1.0]\n",
        ),
    ]
    .concat();
    let registry = adserve_features::FeatureRegistry::parse(&doc).expect("test registry");
    let mut manifest: crate::ModelManifest = serde_json::from_value(serde_json::json!({
        "model_version": "v", "input_name": "features", "output_name": "pctr",
        "feature_order": ["ad_x"], "onnx_sha256": "ab".repeat(32),
    }))
    .expect("manifest");
    // The input takes the ad's vector first, then the user's.
    manifest.typed_inputs = vec![TypedInput {
        name: "embeddings".into(),
        dtype: InputDtype::Float32,
        features: vec!["ad_vec".into(), "user_vec".into()],
    }];
    assert_eq!(manifest.typed_inputs[0].width_in(&registry), 5);
    let m = FeatureMatrix {
        feature_names: vec!["ad_x".into()],
        num_rows: 2,
        values: vec![0.1, 0.2],
        embedding_names: vec!["user_vec".into(), "ad_vec".into()],
        embedding_dims: vec![2, 3],
        embedding_values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 11.0, 12.0, 13.0, 14.0, 15.0],
        ..Default::default()
    };
    let input = crate::model::gather_in(&m, &manifest, &registry).expect("valid");
    assert_eq!(input.dense, vec![0.1, 0.2]);
    assert_eq!(input.typed, vec![crate::Block::Float32(vec![3.0, 4.0, 5.0, 1.0, 2.0, 13.0, 14.0, 15.0, 11.0, 12.0])]);

    let mut short = m.clone();
    short.embedding_dims = vec![3, 2];
    let err = crate::model::gather_in(&short, &manifest, &registry).unwrap_err();
    assert!(err.contains("gives \"ad_vec\" 2 values, the registry 3"), "{err}");
    let mut nan = m.clone();
    nan.embedding_values[7] = f32::NAN;
    let err = crate::model::gather_in(&nan, &manifest, &registry).unwrap_err();
    assert!(err.contains("row 1 feature \"ad_vec\" holds NaN"), "{err}");
    let mut missing = m.clone();
    missing.embedding_names = vec!["user_vec".into(), "other_vec".into()];
    let err = crate::model::gather_in(&missing, &manifest, &registry).unwrap_err();
    assert!(err.contains("embedding_names lacks \"ad_vec\""), "{err}");
    // The input's features are checked in its order: the first one's wrong
    // length is reported before the second one's absence.
    let both = FeatureMatrix {
        embedding_names: vec!["ad_vec".into()],
        embedding_dims: vec![2],
        embedding_values: vec![1.0, 2.0, 3.0, 4.0],
        ..m
    };
    let err = crate::model::gather_in(&both, &manifest, &registry).unwrap_err();
    assert!(err.contains("gives \"ad_vec\" 2 values, the registry 3"), "{err}");
}

/// The matrix-to-inputs gather, written the plain way (a linear search per
/// column, then value by value with its check): what [`crate::model::gather_in`]
/// must agree with, answers and refusals alike.
fn gather_reference(
    m: &FeatureMatrix,
    manifest: &crate::ModelManifest,
    registry: &adserve_features::FeatureRegistry,
) -> Result<crate::Input, String> {
    m.check_shape()?;
    let rows = m.num_rows as usize;
    let version = &manifest.model_version;
    let find = |names: &[String], name: &str| names.iter().position(|n| n == name);
    let mut index = Vec::new();
    for name in &manifest.feature_order {
        index.push(
            find(&m.feature_names, name)
                .ok_or_else(|| format!("matrix.feature_names lacks {name:?}, which model {version} needs"))?,
        );
    }
    let mut dense = Vec::new();
    for r in 0..rows {
        for (c, &i) in index.iter().enumerate() {
            let v = m.values[r * m.feature_names.len() + i];
            if !v.is_finite() {
                return Err(format!("matrix.values row {r} feature {:?} is {v}", manifest.feature_order[c]));
            }
            dense.push(v);
        }
    }
    let mut typed = Vec::new();
    for input in &manifest.typed_inputs {
        let mut columns = Vec::new();
        for name in &input.features {
            let at = find(&m.categorical_names, name).ok_or_else(|| {
                format!("matrix.categorical_names lacks {name:?}, which model {version} needs (input {:?})", input.name)
            })?;
            let buckets = registry.categorical.iter().find(|f| &f.name == name).and_then(|f| f.buckets).unwrap_or(0);
            columns.push((at, i64::from(buckets)));
        }
        let mut ids = Vec::new();
        for r in 0..rows {
            for (c, &(at, buckets)) in columns.iter().enumerate() {
                let id = m.categorical_ids[r * m.categorical_names.len() + at];
                if !(0..buckets).contains(&id) {
                    return Err(format!(
                        "matrix.categorical_ids row {r} feature {:?} is {id}, outside its {buckets} buckets",
                        input.features[c]
                    ));
                }
                ids.push(id);
            }
        }
        typed.push(crate::Block::Int64(ids));
    }
    Ok(crate::Input { rows, dense, typed })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Random column orders and subsets on both sides, extra and missing
    /// columns, non-finite values and ids outside their buckets: the gather
    /// answers exactly as the plain one, and refuses with the same message.
    #[test]
    fn gather_agrees_with_the_plain_gather(seed in proptest::prelude::any::<u64>(), rows in 0usize..6) {
        let registry = adserve_features::registry();
        let mut rng = seed | 1;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n.max(1) as u64) as usize
        };
        let shuffled = |names: Vec<String>, next: &mut dyn FnMut(usize) -> usize| {
            let mut names = names;
            for i in (1..names.len()).rev() {
                names.swap(i, next(i + 1));
            }
            names
        };
        let dense: Vec<String> = registry.names().iter().map(|s| s.to_string()).collect();
        let categorical: Vec<String> = registry.categorical.iter().map(|f| f.name.clone()).collect();
        // The model's columns: all or some, in the registry's order or not.
        let pick = |names: &[String], next: &mut dyn FnMut(usize) -> usize| -> Vec<String> {
            match next(3) {
                0 => names.to_vec(),
                1 => {
                    let from = next(names.len());
                    names[from..from + 1 + next(names.len() - from)].to_vec()
                }
                _ => names.iter().filter(|_| next(4) != 0).cloned().collect(),
            }
        };
        let mut feature_order = if next(16) == 0 { vec![] } else { pick(&dense, &mut next) };
        if next(2) == 0 {
            feature_order = shuffled(feature_order, &mut next);
        }
        let mut id_features = pick(&categorical, &mut next);
        if next(2) == 0 {
            id_features = shuffled(id_features, &mut next);
        }
        // The matrix's columns: the registry's, maybe reordered, maybe with
        // an extra column or without one the model needs.
        let mut feature_names = dense.clone();
        if next(2) == 0 {
            feature_names = shuffled(feature_names, &mut next);
        }
        if next(4) == 0 {
            feature_names.insert(next(feature_names.len() + 1), "not_a_feature".into());
        }
        if next(8) == 0 {
            feature_names.remove(next(feature_names.len()));
        }
        let mut categorical_names = categorical.clone();
        if next(2) == 0 {
            categorical_names = shuffled(categorical_names, &mut next);
        }
        if next(8) == 0 {
            categorical_names.remove(next(categorical_names.len()));
        }
        if next(4) == 0 {
            categorical_names.insert(next(categorical_names.len() + 1), "not_a_categorical".into());
        }
        // A name twice (within a block or across two): refused by the shape check.
        if next(16) == 0 {
            let name = if next(2) == 0 { feature_names[next(feature_names.len())].clone() } else { dense[0].clone() };
            categorical_names.insert(next(categorical_names.len() + 1), name);
        }
        // Valid values, and in a third of the cases one or two bad ones.
        let mut values: Vec<f32> = (0..rows * feature_names.len()).map(|_| next(40) as f32 * 0.25 - 3.0).collect();
        for _ in 0..[0, 0, 1, 2][next(4)] {
            if values.is_empty() {
                break;
            }
            let at = next(values.len());
            values[at] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][next(3)];
        }
        // An unknown column gets ids in 0..8.
        let buckets_of = |name: &str| {
            i64::from(registry.categorical.iter().find(|f| f.name == name).and_then(|f| f.buckets).unwrap_or(8))
        };
        let mut categorical_ids: Vec<i64> = (0..rows)
            .flat_map(|_| categorical_names.clone())
            .map(|name| next(buckets_of(&name) as usize) as i64)
            .collect();
        for _ in 0..[0, 0, 1, 2][next(4)] {
            if categorical_ids.is_empty() {
                break;
            }
            let at = next(categorical_ids.len());
            let buckets = buckets_of(&categorical_names[at % categorical_names.len()]);
            categorical_ids[at] = [-1, -1 - next(1 << 20) as i64, buckets, buckets + next(3) as i64, i64::MIN][next(5)];
        }
        let mut manifest: crate::ModelManifest = serde_json::from_value(serde_json::json!({
            "model_version": "v", "input_name": "features", "output_name": "pctr",
            "feature_order": feature_order, "onnx_sha256": "ab".repeat(32),
        }))
        .expect("manifest");
        if !id_features.is_empty() {
            manifest.typed_inputs = vec![adserve_registry::TypedInput {
                name: "categorical".into(),
                dtype: adserve_registry::InputDtype::Int64,
                features: id_features,
            }];
        }
        let m = FeatureMatrix {
            feature_names,
            num_rows: rows as u32,
            values,
            categorical_names,
            categorical_ids,
            ..Default::default()
        };
        let fast = crate::model::gather_in(&m, &manifest, registry);
        let plain = gather_reference(&m, &manifest, registry);
        // NaN != NaN: compare the bits.
        let bits = |r: &Result<crate::Input, String>| r.as_ref().map(|i| {
            (i.rows, i.dense.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), i.typed.clone())
        }).map_err(Clone::clone);
        proptest::prop_assert_eq!(bits(&fast), bits(&plain));
    }
}
