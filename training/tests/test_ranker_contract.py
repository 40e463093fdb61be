"""What the Rust ranker checks when it loads a model directory, checked here on
every model this trainer writes (and on the committed baseline).

Mirrors crates/adserve-registry/src/manifest.rs (read_manifest, read_model_dir,
Calibration::check; `calibration` denies unknown fields) and
services/ranker/src/model.rs (a float32 input [N, F] with a dynamic batch
under input_name, and exactly the inputs of typed_inputs besides it, each by
name, dtype and width; a float32 output [N] or [N, 1] under output_name; a
warm-up on the registry defaults (bucket 0 for a categorical) at 1,
max_batch_rows and max_rows rows must return probabilities). The ranker links the same onnxruntime (1.31.1) as the
Python package, extracted from the same wheel by scripts/install.sh.
"""

import hashlib
import json
import re

import numpy as np
import onnxruntime as ort
import pytest

from adserve_trainer import calibration as C

from conftest import REPO_ROOT

WARM_UP_ROWS = (1, 1024, 5000)  # one row, the default max_batch_rows, MAX_CANDIDATES


def ranker_load(model_dir, registry):
    manifest = json.loads((model_dir / "manifest.json").read_text())
    for key in ("model_version", "input_name", "output_name", "feature_order", "onnx_sha256"):
        assert key in manifest, key
    assert 1 <= len(manifest["model_version"].encode()) <= 128
    order = manifest["feature_order"]
    assert order and len(set(order)) == len(order)
    assert all(name in registry.names for name in order)
    assert re.fullmatch(r"[0-9a-fA-F]{64}", manifest["onnx_sha256"])
    if "calibration" in manifest:
        C.check(manifest["calibration"])  # raises on what the ranker refuses
    data = (model_dir / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["onnx_sha256"].lower()

    typed = manifest.get("typed_inputs", [])
    categorical = [c.name for c in registry.categorical]
    names = [manifest["input_name"], manifest["output_name"]]
    fed = []
    for t in typed:
        assert set(t) == {"name", "dtype", "features"}
        assert t["name"] and t["name"] not in names
        names.append(t["name"])
        assert t["dtype"] == "int64", "the trainer writes categorical inputs only"
        assert t["features"] and all(n in categorical for n in t["features"])
        fed += t["features"]
    assert len(set(fed)) == len(fed)

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    assert sorted(inputs) == sorted([manifest["input_name"], *(t["name"] for t in typed)])
    want = [(manifest["input_name"], "tensor(float)", len(order))]
    want += [(t["name"], "tensor(int64)", len(t["features"])) for t in typed]
    for name, dtype, width in want:
        inp = inputs[name]
        assert inp.type == dtype
        n, f = inp.shape
        assert not isinstance(n, int), "the batch dimension must be dynamic"
        assert f == width or not isinstance(f, int)
    (out,) = [o for o in sess.get_outputs() if o.name == manifest["output_name"]]
    assert out.type == "tensor(float)"
    shape = out.shape  # [N] or [N, 1] (or [N, dynamic])
    assert len(shape) == 1 or (len(shape) == 2 and (shape[1] == 1 or not isinstance(shape[1], int)))

    row = np.array([registry.defaults[name] for name in order], dtype=np.float32)
    for rows in WARM_UP_ROWS:
        feeds = {manifest["input_name"]: np.tile(row, (rows, 1))}
        feeds.update({t["name"]: np.zeros((rows, len(t["features"])), np.int64) for t in typed})
        (p,) = sess.run([manifest["output_name"]], feeds)
        assert p.size == rows
        assert np.all(np.isfinite(p) & (p >= 0) & (p <= 1))
    return manifest, sess


def test_the_trained_dcnv2_model_loads(trained, registry):
    out, _ = trained
    manifest, _ = ranker_load(out, registry)
    assert manifest["model_type"] == "dcn_v2"


def test_the_trained_lr_model_loads(trained_lr, registry):
    out, _ = trained_lr
    ranker_load(out, registry)


def test_the_committed_baseline_still_loads(registry):
    ranker_load(REPO_ROOT / "models" / "ctr-baseline", registry)


def test_served_scores_are_monotone_in_the_calibration(trained, registry):
    """Platt (a > 0) keeps the model's ranking: calibrated scores order as the raw ones."""
    out, m = trained
    _, sess = ranker_load(out, registry)
    rng = np.random.default_rng(1)
    row = np.array([registry.defaults[n] for n in m["feature_order"]], dtype=np.float32)
    X = np.tile(row, (400, 1))
    X[:, m["feature_order"].index("ad_ctr_7d")] = rng.uniform(0.0, 0.1, 400)
    ids = np.zeros((400, len(registry.categorical)), np.int64)
    raw = sess.run(["pctr"], {"features": X, "categorical": ids})[0][:, 0]
    served = C.apply(m["calibration"], raw)
    order = np.argsort(raw, kind="mergesort")
    assert np.all(np.diff(served[order]) >= 0)


@pytest.mark.parametrize(
    "calibration",
    [
        {"keep_rate": 0.5, "mapping": {"method": "none"}, "extra": 1},
        {"keep_rate": 0.0, "mapping": {"method": "none"}},
        {"keep_rate": 1.0, "mapping": {"method": "platt", "a": -1.0, "b": 0.0}},
        {"keep_rate": 1.0, "mapping": {"method": "isotonic", "x": [0.5, 0.2], "y": [0.1, 0.2]}},
        {"keep_rate": 1.0, "mapping": {"method": "isotonic", "x": [0.2, 0.5], "y": [0.3, 0.2]}},
        {"keep_rate": 1.0, "mapping": {"method": "isotonic", "x": [0.2], "y": [0.3]}},
        {"keep_rate": 1.0, "mapping": {"method": "beta"}},
    ],
)
def test_calibrations_the_ranker_refuses_are_refused_here(calibration):
    from adserve_trainer import TrainerError

    with pytest.raises(TrainerError):
        C.check(calibration)
