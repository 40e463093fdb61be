"""Guards drift between the feature registry and the committed baseline model."""

import hashlib
import json

import numpy as np
import onnxruntime as ort

from conftest import REPO_ROOT

MODEL_DIR = REPO_ROOT / "models" / "ctr-baseline"


def test_committed_manifest_matches_registry(registry):
    m = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert m["model_version"] == "ctr-baseline-v1"
    assert m["feature_order"] == registry.names, (
        "models/ctr-baseline is stale vs crates/adserve-features/features.toml; regenerate with `make model`"
    )
    assert m["feature_defaults"] == registry.defaults


def test_committed_model_file_matches_manifest():
    m = json.loads((MODEL_DIR / "manifest.json").read_text())
    data = (MODEL_DIR / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == m["onnx_sha256"]
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == m["input_name"] and inp.shape[1] == len(m["feature_order"])
    defaults = np.array([[m["feature_defaults"][n] for n in m["feature_order"]]], dtype=np.float32)
    (p,) = sess.run([m["output_name"]], {m["input_name"]: defaults})
    assert p.shape == (1, 1) and 0.0 < float(p[0, 0]) < 0.2
