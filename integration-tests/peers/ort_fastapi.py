#!/usr/bin/env python3
"""ONNX Runtime behind FastAPI/uvicorn: the Python peer of the adserve ranker.

Run it with the bench venv's interpreter ($ADSTACK_HOME/bench-venv/bin/python)::

    ort_fastapi.py --port 18090 --model-dir models/ctr-baseline --intra-threads 1

Loads DIR/manifest.json (``model_version``, ``input_name``, ``output_name``,
``feature_order``, and int64 ``typed_inputs``, fed from the matrix's
``categorical_names`` / ``categorical_ids`` by name) and DIR/model.onnx into one onnxruntime InferenceSession on
CPUExecutionProvider (intra-op threads as given, inter-op 1, sequential execution) and
serves it with a single uvicorn worker (uvloop + httptools when installed, access log off).

Endpoints
---------
``GET /healthz`` -> ``{"status": "ok", "model_version": ...}``

``POST /score`` with our FeatureMatrix JSON form::

    {"feature_names": ["user_ctr_30d", ...], "num_rows": 2, "values": [0.1, ... row-major]}

-> 200 ``{"pctr": [0.0123, 0.0456], "model_version": "ctr-baseline-v1"}``

Like the ranker (services/ranker/src/model.rs): columns are gathered by name into the
manifest's ``feature_order`` (extra columns are ignored), the matrix must hold exactly
``num_rows x len(feature_names)`` values, names must be unique and non-empty, values
finite; pCTRs are checked to be probabilities and floored at 1e-7.  A body that is not a
FeatureMatrix (missing field, wrong JSON type) gets FastAPI's 422; a FeatureMatrix that
does not fit the model (shape, missing or repeated feature, non-finite value) gets 400
``{"detail": "..."}``.

Handler choice (``--mode``, default ``inline``): ``POST /score`` is an ``async def`` that
reads the body, parses and validates it in one pass with pydantic's Rust JSON parser
(``FeatureMatrix.model_validate_json``; FastAPI's default ``json.loads`` + validate is ~6x
slower on a 1000-row matrix), and scores on the event loop. Nearly all of a request's work
holds the GIL (parsing, list -> ndarray, serialising), and ``session.run`` on this
logistic-regression model takes ~0.1 ms, so a threadpool hop buys no parallelism in one
process: measured on this 2-core box (Python keep-alive clients on the same cores, a build
running alongside: informative only), inline gave p50 0.56 / 0.67 / 1.45 ms at 1 / 100 /
1000 rows sequentially and 1.9k / 1.5k / 640 req/s with 4 clients; ``--mode threadpool``
(``run_in_threadpool(model.score, ...)``, the shape of the ranker's ``spawn_blocking``)
gave 0.78 / 0.75 / 2.83 ms and 1.5k / 1.5k / 355 req/s. The faster variant is the default
so the Python peer is not a strawman; threadpool stays for a model heavy enough for the
overlap to pay.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

MIN_PCTR = np.float32(1e-7)


class FeatureMatrix(BaseModel):
    feature_names: list[str]
    num_rows: int = Field(ge=0)
    values: list[float]
    categorical_names: list[str] = []
    categorical_ids: list[int] = []


class ScoreResponse(BaseModel):
    pctr: list[float]
    model_version: str


class Model:
    def __init__(self, model_dir: Path, intra_threads: int):
        manifest = json.loads((model_dir / "manifest.json").read_text())
        self.version: str = manifest["model_version"]
        self.input_name: str = manifest["input_name"]
        self.output_name: str = manifest["output_name"]
        self.feature_order: list[str] = list(manifest["feature_order"])
        if not self.version or not self.feature_order:
            raise ValueError(f"{model_dir}/manifest.json: empty model_version or feature_order")

        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(model_dir / "model.onnx"), sess_options=so, providers=["CPUExecutionProvider"]
        )
        # typed_inputs: int64 inputs of categorical ids, gathered by name
        # like the dense columns (the ranker's binding; the trainer writes
        # no float32 embedding inputs, and this peer refuses them).
        self.typed: list[tuple[str, list[str]]] = []
        for t in manifest.get("typed_inputs", []):
            if t["dtype"] != "int64":
                raise ValueError(f"typed input {t['name']!r}: dtype {t['dtype']!r}; this peer feeds int64 only")
            self.typed.append((t["name"], list(t["features"])))
        inputs = sorted(i.name for i in self.session.get_inputs())
        if inputs != sorted([self.input_name, *(n for n, _ in self.typed)]):
            raise ValueError(f"model.onnx has inputs {inputs}, the manifest names {self.input_name!r} and typed_inputs")
        self._outputs = [self.output_name]
        # The column index list is cached per distinct feature_names list: a load generator
        # (or gateway) sends the same names on every request.
        self._index_cache: dict[tuple[str, ...], np.ndarray] = {}

    def _index(self, names: list[str]) -> np.ndarray:
        key = tuple(names)
        idx = self._index_cache.get(key)
        if idx is not None:
            return idx
        if any(not n for n in names):
            raise ValueError("feature_names contains an empty name")
        pos = {n: i for i, n in enumerate(names)}
        if len(pos) != len(names):
            raise ValueError("feature_names repeats a name")
        missing = [n for n in self.feature_order if n not in pos]
        if missing:
            raise ValueError(f"feature_names lacks {missing[0]!r}, which model {self.version} needs")
        idx = np.fromiter((pos[n] for n in self.feature_order), dtype=np.intp, count=len(self.feature_order))
        if len(self._index_cache) < 64:
            self._index_cache[key] = idx
        return idx

    def score(self, m: FeatureMatrix) -> np.ndarray:
        cols = len(m.feature_names)
        if len(m.values) != m.num_rows * cols:
            raise ValueError(
                f"values has {len(m.values)} numbers, expected num_rows ({m.num_rows}) "
                f"x feature_names ({cols}) = {m.num_rows * cols}"
            )
        idx = self._index(m.feature_names)
        x = np.asarray(m.values, dtype=np.float32).reshape(m.num_rows, cols)[:, idx]
        if not np.isfinite(x).all():
            r, c = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"values row {r} feature {self.feature_order[c]!r} is {x[r, c]}")
        feeds = {self.input_name: x}
        if self.typed:
            width = len(m.categorical_names)
            if len(m.categorical_ids) != m.num_rows * width:
                raise ValueError(f"categorical_ids has {len(m.categorical_ids)} ids, expected {m.num_rows} x {width}")
            ids = np.asarray(m.categorical_ids, dtype=np.int64).reshape(m.num_rows, width)
            pos = {n: i for i, n in enumerate(m.categorical_names)}
            for name, features in self.typed:
                missing = [f for f in features if f not in pos]
                if missing:
                    raise ValueError(f"categorical_names lacks {missing[0]!r}, which input {name!r} needs")
                feeds[name] = np.ascontiguousarray(ids[:, [pos[f] for f in features]])
        if m.num_rows == 0:
            return np.empty(0, dtype=np.float32)
        (out,) = self.session.run(self._outputs, feeds)
        p = np.asarray(out, dtype=np.float32).reshape(-1)
        if p.shape[0] != m.num_rows:
            raise RuntimeError(f"{p.shape[0]} values for {m.num_rows} rows")
        if not (np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()):
            raise RuntimeError("model output is not a probability")
        return np.maximum(p, MIN_PCTR)


def create_app(model_dir: str | os.PathLike, intra_threads: int = 1, mode: str = "inline") -> FastAPI:
    if mode not in ("inline", "threadpool"):
        raise ValueError(f"unknown mode {mode!r}")
    model = Model(Path(model_dir), intra_threads)
    app = FastAPI(title="adserve ORT peer", docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/score")
    async def score(request: Request) -> Response:
        # Parse and validate in one pass with pydantic's Rust JSON parser: ~6x faster than
        # FastAPI's default json.loads + validate for a 1000-row matrix.
        try:
            m = FeatureMatrix.model_validate_json(await request.body())
        except ValidationError as e:
            errors = [dict(err, loc=("body", *err["loc"])) for err in e.errors(include_url=False)]
            raise RequestValidationError(errors) from None
        try:
            if mode == "inline":
                p = model.score(m)
            else:
                p = await run_in_threadpool(model.score, m)
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None
        out = ScoreResponse(pctr=p.tolist(), model_version=model.version)
        return Response(out.model_dump_json(), media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model_version": model.version}

    app.state.model = model
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="ONNX Runtime + FastAPI peer of the adserve ranker")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--intra-threads", type=int, default=1)
    p.add_argument("--mode", choices=["inline", "threadpool"], default="inline")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args()

    import uvicorn

    app = create_app(a.model_dir, a.intra_threads, a.mode)
    uvicorn.run(app, host=a.host, port=a.port, workers=1, access_log=False, log_level=a.log_level)


if __name__ == "__main__":
    main()
