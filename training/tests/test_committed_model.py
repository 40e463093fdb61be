"""Guards drift between the feature registry and the committed baseline model."""

import hashlib
import json
import shutil
import tempfile

import numpy as np
import onnxruntime as ort
import pytest

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


TYPED_DIR = REPO_ROOT / "models" / "ctr-dcnv2-typed"


def test_committed_typed_model_matches_registry(registry):
    """The DCN-v2 fixture takes the registry's categoricals as int64 ids."""
    m = json.loads((TYPED_DIR / "manifest.json").read_text())
    stale = "models/ctr-dcnv2-typed is stale vs features.toml; regenerate with `make model`"
    assert m["feature_order"] == registry.names, stale
    assert m["typed_inputs"] == [
        {"name": "categorical", "dtype": "int64", "features": [c.name for c in registry.categorical]}
    ], stale
    data = (TYPED_DIR / "model.onnx").read_bytes()
    assert hashlib.sha256(data).hexdigest() == m["onnx_sha256"]


@pytest.mark.parametrize("model_dir", [MODEL_DIR, TYPED_DIR], ids=["baseline", "typed"])
def test_committed_reference_rows_are_what_onnxruntime_gives(model_dir):
    """reference.json (which the ranker re-scores at load, and refuses the
    model unless it agrees) is what onnxruntime gives for its rows."""
    from adserve_trainer.export import write_reference

    m = json.loads((model_dir / "manifest.json").read_text())
    committed = json.loads((model_dir / "reference.json").read_text())
    assert (committed["model_version"], committed["onnx_sha256"]) == (m["model_version"], m["onnx_sha256"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("manifest.json", "model.onnx"):
            shutil.copy(model_dir / name, tmp)
        fresh = write_reference(tmp)
    assert fresh == committed, "reference.json is stale: regenerate with `make model`"
    # Every row scores differently: the rows exercise the model.
    assert len(set(committed["raw"])) == committed["rows"]
