"""ONNX export of a RankerGraph (torch.onnx.export, opset 17) and onnxruntime verification.

The graph the ranker loads: an input ``features`` float32 ``[batch, F]`` of
RAW feature values in the manifest's ``feature_order``; for a model that
embeds the registry's categorical features, a second input ``categorical``
int64 ``[batch, C]`` of their bucket ids (the manifest's ``typed_inputs``,
bound by the ranker by name and dtype); ONE output ``pctr`` float32
``[batch, 1]``; the batch axis is dynamic.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch

from . import TrainerError
from .nets import RankerGraph

INPUT_NAME = "features"
CATEGORICAL_INPUT = "categorical"
OUTPUT_NAME = "pctr"
OPSET = 17
MAX_IR_VERSION = 10  # what onnxruntime 1.31 (the ranker's) loads


def typed_inputs(categorical: list[str]) -> list[dict]:
    """The manifest's ``typed_inputs`` for a graph fed ``categorical`` (registry names, in order)."""
    return [{"name": CATEGORICAL_INPUT, "dtype": "int64", "features": list(categorical)}] if categorical else []


def to_onnx(
    graph: RankerGraph, feature_order: list[str], model_version: str, doc: str, categorical: list[str] = ()
) -> bytes:
    """Serialized ONNX model; raises TrainerError when the graph breaks the ranker's contract.

    ``categorical``: the registry categorical features the graph's int64
    input takes, in its column order (none: a dense-only graph)."""
    f = len(feature_order)
    if graph.n_features != f:
        raise TrainerError(f"model takes {graph.n_features} features, feature_order has {f}")
    if graph.n_typed != len(categorical):
        raise TrainerError(f"model takes {graph.n_typed} categorical ids, {len(categorical)} are named")
    graph.eval()
    example = (torch.zeros(2, f, dtype=torch.float32),)
    names = [INPUT_NAME]
    if categorical:
        example += (torch.zeros(2, len(categorical), dtype=torch.int64),)
        names.append(CATEGORICAL_INPUT)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated in favour of
        # torch.export, which needs onnxscript; this graph is static and small.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            buf,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "adserve_trainer"
    m.producer_version = "2"
    m.doc_string = doc
    del m.metadata_props[:]
    props = {"model_version": model_version, "feature_order": ",".join(feature_order)}
    if categorical:
        props["categorical_order"] = ",".join(categorical)
    onnx.helper.set_model_props(m, props)
    check_contract(m, f, len(categorical))
    return m.SerializeToString()


def check_contract(m: onnx.ModelProto, width: int, categorical: int = 0) -> None:
    """What services/ranker/src/model.rs checks at load, checked before anything is written."""
    onnx.checker.check_model(m, full_check=True)
    if m.ir_version > MAX_IR_VERSION:
        raise TrainerError(f"ONNX IR version {m.ir_version} > {MAX_IR_VERSION} (onnxruntime 1.31)")
    if [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] != [OPSET]:
        raise TrainerError(f"ONNX opset is not {OPSET}")
    inits = {i.name for i in m.graph.initializer}
    inputs = {i.name: i for i in m.graph.input if i.name not in inits}
    want = {INPUT_NAME: (onnx.TensorProto.FLOAT, width, "float32")}
    if categorical:
        want[CATEGORICAL_INPUT] = (onnx.TensorProto.INT64, categorical, "int64")
    if sorted(inputs) != sorted(want):
        raise TrainerError(f"ONNX graph has inputs {sorted(inputs)}, the manifest feeds {sorted(want)}")
    for name, (elem, cols, dtype) in want.items():
        t = inputs[name].type.tensor_type
        dims = t.shape.dim
        if t.elem_type != elem or len(dims) != 2 or dims[0].dim_value or dims[1].dim_value != cols:
            raise TrainerError(f"ONNX input {name!r} is not {dtype} [batch, {cols}]")
    outs = [o for o in m.graph.output if o.name == OUTPUT_NAME]
    if not outs:
        raise TrainerError(f"ONNX graph has no output {OUTPUT_NAME!r}")
    t = outs[0].type.tensor_type
    dims = t.shape.dim
    if t.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[0].dim_value or dims[1].dim_value != 1:
        raise TrainerError(f"ONNX output {OUTPUT_NAME!r} is not float32 [batch, 1]")


def session(model_bytes: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def feeds(X: np.ndarray, ids: np.ndarray | None = None) -> dict:
    """onnxruntime's inputs for dense rows ``X`` (and bucket ids ``ids``)."""
    out = {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)}
    if ids is not None and ids.shape[1]:
        out[CATEGORICAL_INPUT] = np.ascontiguousarray(ids, dtype=np.int64)
    return out


def verify_with_onnxruntime(
    model_bytes: bytes, X: np.ndarray, expected: np.ndarray, atol: float = 1e-5, ids: np.ndarray | None = None
) -> float:
    """Run the exported model on CPU and compare with the PyTorch output; returns max |diff|."""
    sess = session(model_bytes)
    out = sess.run([OUTPUT_NAME], feeds(X, ids))[0]
    if out.shape != (X.shape[0], 1):
        raise TrainerError(f"ONNX verification failed: output shape {out.shape}, expected {(X.shape[0], 1)}")
    diff = float(np.max(np.abs(out[:, 0].astype(np.float64) - np.asarray(expected, np.float64)))) if X.shape[0] else 0.0
    if not diff <= atol:
        raise TrainerError(f"ONNX verification failed: onnxruntime differs from PyTorch by {diff:.3g} > {atol}")
    return diff


REFERENCE_FILE = "reference.json"
REFERENCE_ROWS = 16


def reference_doc(model_bytes: bytes, manifest: dict, X: np.ndarray, ids: np.ndarray, registry) -> dict:
    """``reference.json``: registry rows (dense values and categorical ids, as
    a FeatureMatrix carries them) and the raw output onnxruntime gives each.
    The ranker scores these rows at load through its own binding of the
    model's inputs and refuses the model unless it gets the same outputs:
    the guard against a skewed input binding or another onnxruntime."""
    import hashlib

    cat_names = [c.name for c in registry.categorical]
    X = np.ascontiguousarray(X, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    feeds_ = {manifest["input_name"]: np.ascontiguousarray(X[:, [registry.names.index(n) for n in manifest["feature_order"]]])}
    for t in manifest.get("typed_inputs", []):
        feeds_[t["name"]] = np.ascontiguousarray(ids[:, [cat_names.index(n) for n in t["features"]]])
    raw = session(model_bytes).run([manifest["output_name"]], feeds_)[0].reshape(-1)
    return {
        "model_version": manifest["model_version"],
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "rows": int(len(X)),
        "feature_names": registry.names,
        "values": [float(v) for v in X.reshape(-1)],
        "categorical_names": cat_names,
        "categorical_ids": [int(v) for v in ids.reshape(-1)],
        "raw": [float(v) for v in raw],
    }


def write_reference(model_dir, rows: int = REFERENCE_ROWS, seed: int = 5) -> dict:
    """``model_dir/reference.json`` for ``rows`` synthetic rows (every other
    row with categorical ids drawn over all of each feature's buckets)."""
    import json
    from pathlib import Path

    from .data import build_matrix, build_typed
    from .registry import load_registry
    from .synthetic import generate

    d = Path(model_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    registry = load_registry()
    t = generate(rows, seed, registry)
    X, _, _ = build_matrix(t, registry, warn=False)
    ids, _ = build_typed(t, registry)
    rng = np.random.default_rng(seed)
    for k, c in enumerate(registry.categorical):
        ids[1::2, k] = rng.integers(0, c.buckets, len(ids[1::2]))
    doc = reference_doc((d / "model.onnx").read_bytes(), manifest, X, ids, registry)
    (d / REFERENCE_FILE).write_text(json.dumps(doc) + "\n")
    return doc


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--reference":
        print("usage: python -m adserve_trainer.export --reference MODEL_DIR", file=sys.stderr)
        sys.exit(2)
    write_reference(sys.argv[2])
