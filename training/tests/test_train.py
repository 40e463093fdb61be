import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from adserve_trainer import TrainerError
from adserve_trainer.data import build_matrix
from adserve_trainer.export import verify_with_onnxruntime
from adserve_trainer.model import auc
from adserve_trainer.synthetic import generate, write_parquet
from adserve_trainer.train import run

MANIFEST_KEYS = {
    "model_version", "model_type", "input_name", "output_name", "feature_order", "feature_defaults",
    "created_at", "training_rows", "holdout_rows", "metrics", "onnx_sha256", "trainer", "data",
}


def test_recovers_signal_and_is_calibrated(trained):
    _, m = trained
    assert m["metrics"]["auc"] > 0.6
    assert 0.8 < m["metrics"]["calibration"] < 1.2
    assert 0.0 < m["metrics"]["logloss"] < 0.3
    assert m["training_rows"] == 24000 and m["holdout_rows"] == 6000


def test_manifest_fields_and_registry_order(trained, registry):
    out, m = trained
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert MANIFEST_KEYS <= set(m)
    assert m["model_version"] == "ctr-test-v1"
    assert m["model_type"] == "logistic_regression"
    assert m["trainer"] == "adserve_trainer.train"
    assert m["feature_order"] == registry.names
    assert m["feature_defaults"] == registry.defaults
    assert set(m["metrics"]) == {"logloss", "auc", "calibration", "base_rate"}
    assert m["onnx_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert m["created_at"].endswith("Z")


def test_onnx_graph_matches_numpy(trained, registry):
    out, m = trained
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == 17
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert inp.name == m["input_name"] == "features" and outp.name == m["output_name"] == "pctr"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == len(registry.names)
    assert [n.op_type for n in model.graph.node] == ["Sub", "Div", "MatMul", "Add", "Sigmoid"]

    # Fresh raw rows (never standardized by the caller): ORT == numpy on the same params.
    X, _, _ = build_matrix(generate(3000, 99, registry), registry)
    p = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    z = ((X - p["mean"]) / p["std"]).astype(np.float64) @ p["W"].astype(np.float64) + float(p["b"].ravel()[0])
    expected = 1.0 / (1.0 + np.exp(-z[:, 0]))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["pctr"], {"features": X})[0]
    assert got.shape == (3000, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got[:, 0], expected, atol=1e-5, rtol=0)
    # The exporter's own check fails loudly on a mismatch.
    with pytest.raises(TrainerError, match="ONNX verification failed"):
        verify_with_onnxruntime((out / "model.onnx").read_bytes(), X, expected + 1e-3)


def test_deterministic_apart_from_created_at(tmp_path):
    args = ["--synthetic", "4000", "--seed", "5", "--version", "v"]
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
    m1 = run(["--data", str(tmp_path / "rows"), "--version", "a", "--out", str(out)])
    assert m1["training_rows"] + m1["holdout_rows"] == 6000
    m2 = run(["--data", str(tmp_path / "rows"), "--version", "b", "--out", str(out), "--l2", "10"])
    assert json.loads((out / "manifest.json").read_text())["model_version"] == "b"
    assert m2["onnx_sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["m"]  # no temp dirs left
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]


def test_default_version_format(tmp_path):
    m = run(["--synthetic", "3000", "--out", str(tmp_path / "o")])
    assert m["model_version"].startswith("ctr-lr-") and len(m["model_version"]) == len("ctr-lr-") + 14


def test_auc_handles_ties():
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.5, 0.5])) == pytest.approx(0.875)
    assert auc(np.array([0, 1]), np.array([0.3, 0.3])) == pytest.approx(0.5)
