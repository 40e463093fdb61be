"""ONNX export of a RankerGraph (torch.onnx.export, opset 17) and onnxruntime verification.

The graph the ranker loads: ONE input ``features`` float32 ``[batch, F]`` of
RAW feature values in the manifest's ``feature_order``; ONE output ``pctr``
float32 ``[batch, 1]``; the batch axis is dynamic.
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
OUTPUT_NAME = "pctr"
OPSET = 17
MAX_IR_VERSION = 10  # what onnxruntime 1.31 (the ranker's) loads


def to_onnx(graph: RankerGraph, feature_order: list[str], model_version: str, doc: str) -> bytes:
    """Serialized ONNX model; raises TrainerError when the graph breaks the ranker's contract."""
    f = len(feature_order)
    if graph.n_features != f:
        raise TrainerError(f"model takes {graph.n_features} features, feature_order has {f}")
    graph.eval()
    example = torch.zeros(2, f, dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated in favour of
        # torch.export, which needs onnxscript; this graph is static and small.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "adserve_trainer"
    m.producer_version = "2"
    m.doc_string = doc
    del m.metadata_props[:]
    onnx.helper.set_model_props(m, {"model_version": model_version, "feature_order": ",".join(feature_order)})
    check_contract(m, f)
    return m.SerializeToString()


def check_contract(m: onnx.ModelProto, width: int) -> None:
    """What services/ranker/src/model.rs checks at load, checked before anything is written."""
    onnx.checker.check_model(m, full_check=True)
    if m.ir_version > MAX_IR_VERSION:
        raise TrainerError(f"ONNX IR version {m.ir_version} > {MAX_IR_VERSION} (onnxruntime 1.31)")
    if [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] != [OPSET]:
        raise TrainerError(f"ONNX opset is not {OPSET}")
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise TrainerError(f"ONNX graph has inputs {[i.name for i in inputs]}, the ranker feeds exactly one, {INPUT_NAME!r}")
    t = inputs[0].type.tensor_type
    dims = t.shape.dim
    if t.elem_type != onnx.TensorProto.FLOAT or len(dims) != 2 or dims[0].dim_value or dims[1].dim_value != width:
        raise TrainerError(f"ONNX input {INPUT_NAME!r} is not float32 [batch, {width}]")
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


def verify_with_onnxruntime(model_bytes: bytes, X: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> float:
    """Run the exported model on CPU and compare with the PyTorch output; returns max |diff|."""
    sess = session(model_bytes)
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]
    if out.shape != (X.shape[0], 1):
        raise TrainerError(f"ONNX verification failed: output shape {out.shape}, expected {(X.shape[0], 1)}")
    diff = float(np.max(np.abs(out[:, 0].astype(np.float64) - np.asarray(expected, np.float64)))) if X.shape[0] else 0.0
    if not diff <= atol:
        raise TrainerError(f"ONNX verification failed: onnxruntime differs from PyTorch by {diff:.3g} > {atol}")
    return diff
