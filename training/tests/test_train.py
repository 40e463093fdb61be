import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adserve_trainer import TrainerError
from adserve_trainer import calibration as C
from adserve_trainer import metrics as M
from adserve_trainer.data import build_matrix, build_typed, time_order
from adserve_trainer.experiment import time_split
from adserve_trainer.export import feeds, to_onnx, verify_with_onnxruntime
from adserve_trainer.metrics import auc
from adserve_trainer.nets import Arch, DCNConfig, RankerGraph
from adserve_trainer.synthetic import generate, write_parquet
from adserve_trainer.train import run

MANIFEST_KEYS = {
    "model_version", "model_type", "input_name", "output_name", "feature_order", "feature_defaults",
    "created_at", "training_rows", "holdout_rows", "metrics", "onnx_sha256", "trainer", "data",
}
METRIC_KEYS = {"logloss", "auc", "calibration", "base_rate", "normalized_entropy", "ece"}


def test_recovers_signal_and_is_calibrated(trained):
    out, m = trained
    assert m["metrics"]["auc"] > 0.6
    assert 0.8 < m["metrics"]["calibration"] < 1.2
    assert 0.0 < m["metrics"]["logloss"] < 0.3
    assert m["metrics"]["normalized_entropy"] < 1.0
    assert m["training_rows"] == 24000 and m["holdout_rows"] == 6000
    assert m["calibration_rows"] == 3000 and m["evaluation_rows"] == 3000
    report = json.loads((out / "report.json").read_text())
    oracle = report["oracle"]["auc"]
    for key in ("lr", "dcnv2"):
        r = report["models"][key]
        # Within a few points of the ground truth on 3000 evaluation rows.
        assert r["auc"] > oracle - 0.03, (key, r["auc"], oracle)
        assert set(r) >= METRIC_KEYS | {"uncalibrated", "platt", "isotonic"}
        assert r["platt"]["mapping"]["method"] == "platt"
        assert r["isotonic"]["mapping"]["method"] == "isotonic"
        assert r["training"]["best_epoch"] >= 1
    assert report["exported"] == "dcnv2"
    assert report["score_levels"] == {"model": 30000}, "the synthetic rows, by the level that scored them"
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_fields_and_registry_order(trained, registry):
    out, m = trained
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert MANIFEST_KEYS <= set(m)
    assert m["model_version"] == "ctr-test-v1"
    assert m["model_type"] == "dcn_v2"
    assert m["trainer"] == "adserve_trainer.train"
    assert m["feature_order"] == registry.names
    # DCN-v2 embeds the registry's categorical features, fed as int64 ids.
    assert m["typed_inputs"] == [
        {"name": "categorical", "dtype": "int64", "features": [c.name for c in registry.categorical]}
    ]
    assert m["feature_defaults"] == registry.defaults
    assert set(m["metrics"]) == METRIC_KEYS
    assert m["onnx_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert m["created_at"].endswith("Z")
    # Platt fitted on the calibration slice, in the ranker's format.
    assert set(m["calibration"]) == {"keep_rate", "mapping"}
    assert m["calibration"]["keep_rate"] == 1.0
    assert set(m["calibration"]["mapping"]) == {"method", "a", "b"} and m["calibration"]["mapping"]["a"] > 0


def test_manifest_metrics_are_what_the_ranker_serves(trained, registry):
    """ORT output + the manifest's calibration, on the evaluation rows, give the manifest's metrics."""
    out, m = trained
    t = generate(30000, 11, registry)
    t = t.take(time_order(t))
    X, y, _ = build_matrix(t, registry, warn=False)
    ids, _ = build_typed(t, registry)
    test = time_split(len(y)).test
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = sess.run([m["output_name"]], {m["input_name"]: X[test], "categorical": ids[test]})[0][:, 0]
    served = C.apply(m["calibration"], raw)
    got = M.summary(y[test], served)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(m["metrics"][k], abs=2e-6), k
    # reference.json: the first 16 evaluation rows and their raw outputs, for
    # the ranker to re-score at load.
    ref = json.loads((out / "reference.json").read_text())
    assert (ref["model_version"], ref["onnx_sha256"], ref["rows"]) == (m["model_version"], m["onnx_sha256"], 16)
    assert ref["feature_names"] == registry.names
    assert ref["categorical_names"] == [c.name for c in registry.categorical]
    first = slice(test.start, test.start + 16)
    np.testing.assert_array_equal(np.array(ref["values"], np.float32).reshape(16, -1), X[first])
    np.testing.assert_array_equal(np.array(ref["categorical_ids"]).reshape(16, -1), ids[first])
    np.testing.assert_array_equal(np.array(ref["raw"], np.float32), raw[:16])


def _graph_io(model, width, categorical=0):
    inputs, (outp,) = model.graph.input, model.graph.output
    want = [("features", width, onnx.TensorProto.FLOAT)]
    if categorical:
        want.append(("categorical", categorical, onnx.TensorProto.INT64))
    assert [i.name for i in inputs] == [w[0] for w in want] and outp.name == "pctr"
    for inp, (_, cols, elem) in zip(inputs, want):
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and dims[1].dim_value == cols
        assert inp.type.tensor_type.elem_type == elem
    odims = outp.type.tensor_type.shape.dim
    assert odims[0].dim_param == "batch" and odims[1].dim_value == 1
    assert model.opset_import[0].version == 17


def test_onnx_graphs_take_raw_features(trained, trained_lr, registry):
    t = generate(3000, 99, registry)
    X, _, _ = build_matrix(t, registry, warn=False)
    ids, _ = build_typed(t, registry)
    n_cat = len(registry.categorical)
    for (out, m), cats in ((trained, n_cat), (trained_lr, 0)):
        model = onnx.load(str(out / "model.onnx"))
        onnx.checker.check_model(model)
        _graph_io(model, len(registry.names), cats)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(["pctr"], feeds(X, ids if cats else None))[0]
        assert got.shape == (3000, 1) and got.dtype == np.float32
        assert np.all((got > 0) & (got < 1))
    # The exporter's own check fails loudly on a mismatch.
    out, _ = trained
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = sess.run(["pctr"], feeds(X, ids))[0][:, 0].astype(np.float64)
    assert verify_with_onnxruntime((out / "model.onnx").read_bytes(), X, expected, ids=ids) <= 1e-7
    with pytest.raises(TrainerError, match="ONNX verification failed"):
        verify_with_onnxruntime((out / "model.onnx").read_bytes(), X, expected + 1e-3, ids=ids)


def test_lr_graph_is_standardize_then_linear(trained_lr, registry):
    """An independent numpy evaluation of the exported LR:
    sigmoid(clip((x - mean) / std, -L, L) @ w + b), L = STANDARDIZED_LIMIT."""
    from adserve_trainer.nets import STANDARDIZED_LIMIT as L

    out, m = trained_lr
    assert m["model_type"] == "logistic_regression"
    from onnx import numpy_helper

    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    mean = next(v for k, v in inits.items() if k.endswith("mean"))
    std = next(v for k, v in inits.items() if k.endswith("std"))
    w = next(v for k, v in inits.items() if k.endswith("linear.weight"))
    b = next(v for k, v in inits.items() if k.endswith("linear.bias"))
    X, _, _ = build_matrix(generate(500, 98, registry), registry, warn=False)
    # Row 0 gets a counter far beyond anything in training: it saturates.
    j = registry.names.index("ad_impressions_1h")
    X[0, j] = 1e6
    zs = np.clip((X - mean) / std, -L, L)
    z = zs.astype(np.float64) @ w.astype(np.float64).reshape(-1) + float(b.reshape(-1)[0])
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["pctr"], {"features": X})[0][:, 0]
    np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-z)), atol=1e-6, rtol=0)
    at_limit = X[:1].copy()
    at_limit[0, j] = mean.reshape(-1)[j] + L * std.reshape(-1)[j] * 1.01
    assert sess.run(["pctr"], {"features": at_limit})[0][0, 0] == got[0]


@pytest.mark.parametrize("kind", ["lr", "dcnv2"])
def test_onnxruntime_equals_pytorch_on_random_inputs(kind, registry):
    """Export a (randomly initialized) graph; ORT and PyTorch agree to 1e-5 on random raw rows,
    including indicator columns with values that are not 0/1 and (DCN-v2) categorical ids
    anywhere in int64, in and out of their buckets, above 2^24."""
    f = len(registry.names)
    ind = [j for j, feat in enumerate(registry.features) if feat.equals is not None]
    dense = list(range(f)) if kind == "lr" else [j for j in range(f) if j not in ind]
    cats = [] if kind == "lr" else ind
    buckets = () if kind == "lr" else tuple(c.buckets for c in registry.categorical)
    names = [c.name for c in registry.categorical] if buckets else []
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    arch = Arch(kind, len(dense), tuple(2 for _ in cats) + buckets, DCNConfig(emb_dim=4, cross_layers=2, hidden=(16, 8)))
    mean, std = rng.normal(size=len(dense)), rng.uniform(0.5, 2.0, len(dense))
    # Half of each field's ids "held in training" (its own generator: the
    # draws below stay as they were).
    seen = [np.random.default_rng(1 + k).random(b) < 0.5 for k, b in enumerate(buckets)] if buckets else None
    graph = RankerGraph(arch, f, dense, cats, mean, std, typed_buckets=buckets, typed_seen=seen)
    with torch.no_grad():  # non-trivial weights everywhere
        for p in graph.core.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model_bytes = to_onnx(graph, registry.names, "rand", doc="test", categorical=names)
    X = rng.normal(0, 3, size=(2048, f)).astype(np.float32)
    X[:1024, ind] = rng.integers(0, 2, size=(1024, len(ind)))
    ids = np.stack([rng.integers(0, b, 2048) for b in buckets], axis=1) if buckets else np.zeros((2048, 0), np.int64)
    if buckets:
        ids[:16] = np.array([-1, 2**40, 2**24 + 1, max(buckets)])[np.arange(16) % 4, None]
    inputs = (torch.from_numpy(X), torch.from_numpy(ids)) if buckets else (torch.from_numpy(X),)
    with torch.no_grad():
        want = graph(*inputs).numpy()[:, 0]
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(["pctr"], feeds(X, ids))[0][:, 0]
    assert np.max(np.abs(got.astype(np.float64) - want)) <= 1e-5
    if buckets:
        # An id outside its buckets scores as the missing bucket, 0.
        zero = ids.copy()
        zero[:16] = np.where((ids[:16] >= 0) & (ids[:16] < np.array(buckets)), ids[:16], 0)
        np.testing.assert_array_equal(sess.run(["pctr"], feeds(X[:16], zero[:16]))[0][:, 0], got[:16])
        # So does an id the training rows never held (its embedding row is untrained).
        known = np.stack([seen[k][np.clip(ids[:, k], 0, b - 1)] for k, b in enumerate(buckets)], axis=1)
        unseen = np.where(known | (ids < 0) | (ids >= np.array(buckets)), ids, 0)
        assert (unseen != ids).any(), "some ids are unseen"
        np.testing.assert_array_equal(sess.run(["pctr"], feeds(X, unseen))[0][:, 0], got)
        # And every bucket of every categorical moves the score (an embedding row each).
        other = ids.copy()
        other[:, 0] = (ids[:, 0] + 1) % buckets[0]
        assert np.any(sess.run(["pctr"], feeds(X, other))[0][:, 0] != got)
    # Any batch size (the ranker stacks requests).
    for n in (1, 7, 5000):
        rows = np.resize(X, (n, f))
        assert sess.run(["pctr"], feeds(rows, np.resize(ids, (n, ids.shape[1])) if buckets else None))[0].shape == (n, 1)


def test_deterministic_apart_from_created_at(tmp_path):
    args = ["--synthetic", "4000", "--seed", "5", "--version", "v", "--epochs", "6"]
    a = run(args + ["--out", str(tmp_path / "a")])
    b = run(args + ["--out", str(tmp_path / "b")])
    a.pop("created_at"), b.pop("created_at")
    assert a == b
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()


def test_train_from_parquet_directory_and_overwrite(tmp_path, registry):
    t = generate(6000, 8, registry)
    write_parquet(t.slice(0, 2500), tmp_path / "rows" / "part-000.parquet")
    write_parquet(t.slice(2500), tmp_path / "rows" / "part-001.parquet")
    out = tmp_path / "models" / "m"
    quick = ["--epochs", "5"]
    m1 = run(["--data", str(tmp_path / "rows"), "--version", "a", "--out", str(out)] + quick)
    assert m1["training_rows"] + m1["holdout_rows"] == 6000
    assert m1["model_type"] == "dcn_v2", "DCN-v2 is the default for Parquet rows"
    m2 = run(["--data", str(tmp_path / "rows"), "--version", "b", "--out", str(out), "--model", "lr"] + quick)
    assert json.loads((out / "manifest.json").read_text())["model_version"] == "b"
    assert m2["model_type"] == "logistic_regression"
    assert m2["onnx_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert json.loads((out / "report.json").read_text())["model_version"] == "b"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]  # no temp dirs left
    assert sorted(p.name for p in out.iterdir()) == [
        "calibration.png", "manifest.json", "model.onnx", "reference.json", "report.json"
    ]


def test_default_version_format(tmp_path):
    m = run(["--synthetic", "3000", "--out", str(tmp_path / "o"), "--epochs", "3"])
    assert m["model_version"].startswith("ctr-dcnv2-") and len(m["model_version"]) == len("ctr-dcnv2-") + 14
    m = run(["--synthetic", "3000", "--out", str(tmp_path / "p"), "--epochs", "3", "--model", "lr"])
    assert m["model_version"].startswith("ctr-lr-")


def test_auc_handles_ties():
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5])) == pytest.approx(0.875)
    assert auc(np.array([0, 1]), np.array([0.3, 0.3])) == pytest.approx(0.5)


def test_progress_lines_go_to_stderr(tmp_path, capsys):
    run(["--synthetic", "3000", "--out", str(tmp_path / "o"), "--epochs", "2", "--patience", "5"])
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("[")]
    assert [ln.split()[0] for ln in lines] == ["[lr]", "[lr]", "[dcnv2]", "[dcnv2]"]
    assert "epoch 2/2" in lines[1] and "holdout logloss" in lines[1] and "auc" in lines[1] and "rows/s" in lines[1]


@pytest.mark.parametrize("kind", ["lr", "dcnv2"])
def test_a_column_constant_in_training_cannot_move_predictions_at_serving(kind, registry):
    """A feature the training rows never filled (always its default) must not
    matter once serving fills it: its untrained weights would turn real values
    into noise (a bootstrap model scored a 0.44 AUC that way)."""
    import argparse

    from adserve_trainer.train import ranker_candidates

    rng = np.random.default_rng(3)
    f = len(registry.names)
    X = rng.normal(0, 1, size=(512, f)).astype(np.float32)
    k = registry.names.index("ad_clicks_24h_log")
    X[:, k] = 0.0
    args = argparse.Namespace(epochs=1, batch_size=256, lr=0.01, l2=0.0, patience=1, seed=0)
    torch.manual_seed(0)
    ids = np.stack([rng.integers(0, c.buckets, 512) for c in registry.categorical], axis=1)
    (cand,) = [c for c in ranker_candidates(X, ids, slice(0, 512), registry, args) if c.key == kind]
    graph = cand.build()
    typed = (torch.from_numpy(ids),) if graph.n_typed else ()
    with torch.no_grad():
        for p in graph.core.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        served = X.copy()
        served[:, k] = rng.uniform(0, 12, size=512)
        a = graph(torch.from_numpy(X), *typed).numpy()
        b = graph(torch.from_numpy(served), *typed).numpy()
    assert np.max(np.abs(a - b)) < 1e-6
