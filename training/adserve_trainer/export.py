"""ONNX export of a LogisticModel, with standardization inside the graph."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import TrainerError
from .model import LogisticModel

INPUT_NAME = "features"
OUTPUT_NAME = "pctr"
OPSET = 17
IR_VERSION = 10  # loadable by onnxruntime 1.31


def to_onnx(model: LogisticModel, feature_order: list[str], model_version: str) -> onnx.ModelProto:
    f = len(feature_order)
    inits = [
        numpy_helper.from_array(model.mean.astype(np.float32).reshape(1, f), "mean"),
        numpy_helper.from_array(model.std.astype(np.float32).reshape(1, f), "std"),
        numpy_helper.from_array(model.weights.astype(np.float32).reshape(f, 1), "W"),
        numpy_helper.from_array(np.array([[model.bias]], dtype=np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "mean"], ["centered"], name="standardize_sub"),
        helper.make_node("Div", ["centered", "std"], ["standardized"], name="standardize_div"),
        helper.make_node("MatMul", ["standardized", "W"], ["logit_w"], name="matmul"),
        helper.make_node("Add", ["logit_w", "b"], ["logit"], name="bias"),
        helper.make_node("Sigmoid", ["logit"], [OUTPUT_NAME], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "ctr_logistic_regression",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", f])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializer=inits,
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="adserve_trainer",
        producer_version="1",
        doc_string="Logistic-regression CTR baseline; input is RAW features in feature_order.",
    )
    m.ir_version = IR_VERSION
    helper.set_model_props(m, {"model_version": model_version, "feature_order": ",".join(feature_order)})
    onnx.checker.check_model(m, full_check=True)
    return m


def verify_with_onnxruntime(model_bytes: bytes, X: np.ndarray, expected: np.ndarray, atol: float = 1e-5) -> float:
    """Run the exported model on CPU and compare with numpy; returns max |diff|."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    out = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})[0]
    if out.shape != (X.shape[0], 1):
        raise TrainerError(f"ONNX verification failed: output shape {out.shape}, expected {(X.shape[0], 1)}")
    diff = float(np.max(np.abs(out[:, 0].astype(np.float64) - expected))) if X.shape[0] else 0.0
    if not diff <= atol:
        raise TrainerError(f"ONNX verification failed: onnxruntime differs from numpy by {diff:.3g} > {atol}")
    return diff
