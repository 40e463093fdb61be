"""Shared pieces of the public-dataset replays (Criteo, Open Bandit Dataset):
hashing categoricals into buckets, standardizing dense columns on the
training rows, building the two models over (dense, cats) and writing the
report. These replays report figures only; they export no model for the
ranker (its input contract is the adserve feature registry).
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np

from . import TrainerError


def hash_bucket(value: str, buckets: int) -> int:
    """Stable code in [1, buckets) for a non-empty string; 0 is kept for "missing".

    crc32, not hash(): Python salts str hashes per process.
    """
    return 1 + zlib.crc32(value.encode()) % (buckets - 1)


def hash_column(values, buckets: int) -> np.ndarray:
    if buckets < 2:
        raise TrainerError("--hash-buckets must be >= 2")
    return np.fromiter(
        (0 if v is None or v == "" else hash_bucket(v, buckets) for v in values), dtype=np.int64, count=len(values)
    )


def standardize(dense: np.ndarray, train: slice) -> np.ndarray:
    """(x - mean) / std with the training rows' mean and std (std floored at 1e-6 -> 1)."""
    if dense.shape[1] == 0:
        return dense.astype(np.float32)
    t = dense[train].astype(np.float64)
    mean = t.mean(axis=0)
    std = t.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return ((dense - mean) / std).astype(np.float32)


def candidates(
    dense: np.ndarray, cats: np.ndarray, cardinalities: tuple[int, ...], args: argparse.Namespace, dcn
) -> list:
    from .experiment import Candidate
    from .nets import Arch, Tabular
    from .train import fit_configs

    cfgs = fit_configs(args)
    inputs = (np.ascontiguousarray(dense, np.float32), np.ascontiguousarray(cats, np.int64))
    out = []
    for key in ("lr", "dcnv2"):
        arch = Arch(key, dense.shape[1], cardinalities, dcn)
        out.append(Candidate(key, (lambda a=arch: Tabular(a)), inputs, cfgs[key]))
    return out


def write_report(out: Path, report: dict, outcomes: dict, title: str) -> None:
    from .experiment import plot_reliability
    from .train import PLOT_FILE, REPORT_FILE, json_bytes, write_files_atomically

    png = plot_reliability(outcomes, title)
    write_files_atomically(out, [(PLOT_FILE, png), (REPORT_FILE, json_bytes(report))])


def add_training_args(ap: argparse.ArgumentParser) -> None:
    """The training knobs shared with adserve_trainer.train."""
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--calibration", choices=("platt", "isotonic", "none"), default="platt")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)


def print_summary(name: str, outcomes: dict, sizes: dict) -> None:
    print(f"{name}: {sizes['train']} train / {sizes['calibration']} calibration / {sizes['evaluation']} evaluation rows")
    for k, o in outcomes.items():
        s, u = o.served, o.metrics["uncalibrated"]
        print(
            f"  {k:6s} auc {s['auc']:.4f}  logloss {s['logloss']:.5f}  ne {s['normalized_entropy']:.4f}  "
            f"ece {s['ece']:.5f} ({o.mapping['method']}; uncalibrated ece {u['ece']:.5f})"
        )
