"""CLI: fit the logistic-regression CTR baseline and export ONNX + manifest.

    python -m adserve_trainer.train (--data PATH | --synthetic N) [--seed 7] [--out DIR]
                                    [--version V] [--l2 1.0] [--registry PATH]
    python -m adserve_trainer.train --synthetic N --seed S --write-synthetic FILE.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import TrainerError
from .data import build_matrix, load_rows
from .export import INPUT_NAME, OUTPUT_NAME, to_onnx, verify_with_onnxruntime
from .model import fit, metrics, split
from .registry import load_registry
from .synthetic import generate, write_parquet

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
HOLDOUT_FRACTION = 0.2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m adserve_trainer.train", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Parquet file or directory of *.parquet label-joiner rows")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic rows instead of --data")
    ap.add_argument("--seed", type=int, default=7, help="seed for synthetic data and the train/holdout split")
    ap.add_argument("--out", type=Path, help="output directory (default: out/<version>)")
    ap.add_argument("--version", help='model_version (default: "ctr-lr-" + UTC yyyymmddHHMMSS)')
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty on standardized weights (default 1.0)")
    ap.add_argument("--registry", type=Path, help="features.toml (default: crates/adserve-features/features.toml)")
    ap.add_argument("--write-synthetic", type=Path, metavar="PATH", help="with --synthetic: only write the rows to PATH")
    return ap.parse_args(argv)


def write_atomically(out: Path, model_bytes: bytes, manifest: dict) -> None:
    """Publish model.onnx + manifest.json so a reader never sees a half-written model.

    New directory: both files are written into a sibling temp dir that is then
    renamed into place (one atomic rename). Existing directory: each file is
    written to a temp name and os.replace()d, model first and manifest LAST; the
    manifest's onnx_sha256 lets a loader detect (and retry) a torn pair.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in ((MODEL_FILE, model_bytes), (MANIFEST_FILE, manifest_bytes(manifest))):
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if not out.exists():
            try:
                os.rename(tmp, out)
                return
            except OSError:
                if not out.is_dir():
                    raise
        if not out.is_dir():
            raise TrainerError(f"--out {out} exists and is not a directory")
        os.replace(tmp / MODEL_FILE, out / MODEL_FILE)
        os.replace(tmp / MANIFEST_FILE, out / MANIFEST_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()


def negative_keep_rate(table) -> float:
    """The one negative keep rate the rows were written with (label-joiner downsampling)."""
    rates = set(table.column("keep_rate").unique().to_pylist())
    if len(rates) > 1:
        raise TrainerError(
            f"rows were written with different negative keep rates {sorted(rates)}; "
            "train on data written with one rate"
        )
    return float(rates.pop()) if rates else 1.0


def run(argv: list[str] | None = None) -> dict:
    """Train and publish; returns the manifest. Raises TrainerError on bad input."""
    args = parse_args(argv)
    registry = load_registry(args.registry)

    if args.write_synthetic is not None:
        if args.synthetic is None:
            raise TrainerError("--write-synthetic needs --synthetic N")
        if args.synthetic <= 0:
            raise TrainerError("--synthetic N must be positive")
        path = write_parquet(generate(args.synthetic, args.seed, registry), args.write_synthetic)
        print(f"wrote {args.synthetic} synthetic rows (seed {args.seed}) to {path}")
        return {}

    if args.synthetic is not None:
        if args.synthetic <= 0:
            raise TrainerError("--synthetic N must be positive")
        table = generate(args.synthetic, args.seed, registry)
        data_desc = f"synthetic: {args.synthetic} rows, seed {args.seed} (adserve_trainer.synthetic)"
    else:
        table = load_rows(args.data)
        data_desc = f"parquet: {args.data} ({table.num_rows} rows)"

    X, y, stats = build_matrix(table, registry)
    keep_rate = negative_keep_rate(table)
    if y.min() == y.max():
        raise TrainerError(f"labels are all one class (label={int(y[0])}) in {table.num_rows} rows; cannot fit")
    train_idx, hold_idx = split(len(y), args.seed, HOLDOUT_FRACTION)
    if len(hold_idx) == 0 or len(train_idx) == 0:
        raise TrainerError(f"too few rows ({len(y)}) for a train/holdout split")
    for nm, idx in (("training", train_idx), ("holdout", hold_idx)):
        if y[idx].min() == y[idx].max():
            raise TrainerError(f"the {nm} split has labels of one class only ({len(idx)} rows); need more rows")

    model = fit(X[train_idx], y[train_idx], l2=args.l2)
    p_hold = model.predict(X[hold_idx])
    m = metrics(y[hold_idx], p_hold)

    now = datetime.now(timezone.utc)
    version = args.version or "ctr-lr-" + now.strftime("%Y%m%d%H%M%S")
    onnx_model = to_onnx(model, registry.names, version)
    model_bytes = onnx_model.SerializeToString()
    max_diff = verify_with_onnxruntime(model_bytes, X[hold_idx], p_hold)

    manifest = {
        "model_version": version,
        "model_type": "logistic_regression",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "feature_order": registry.names,
        "feature_defaults": registry.defaults,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "training_rows": int(len(train_idx)),
        "holdout_rows": int(len(hold_idx)),
        "metrics": {k: round(v, 6) for k, v in m.items()},
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "trainer": "adserve_trainer.train",
        "data": data_desc,
    }
    if keep_rate < 1.0:
        # The rows kept only this share of negatives: the ranker corrects the
        # raw output by p / (p + (1 - p) / keep_rate) before the auction.
        manifest["calibration"] = {"keep_rate": keep_rate, "mapping": {"method": "none"}}
    out = args.out if args.out is not None else Path("out") / version
    write_atomically(out, model_bytes, manifest)

    defaulted = {k: v for k, v in stats["defaulted_fraction"].items() if v > 0}
    print(f"model {version} -> {out}")
    print(f"  rows: {len(train_idx)} train / {len(hold_idx)} holdout; newton iterations: {model.iterations}")
    print(
        f"  holdout: logloss {m['logloss']:.5f}  auc {m['auc']:.4f}  calibration {m['calibration']:.4f}"
        f"  base_rate {m['base_rate']:.4f}"
    )
    print(f"  onnxruntime max |diff| vs numpy: {max_diff:.2e}")
    if defaulted:
        print("  filled with registry default: " + ", ".join(f"{k} {v:.1%}" for k, v in defaulted.items()))
    return manifest


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
