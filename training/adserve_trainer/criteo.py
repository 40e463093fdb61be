"""The Criteo Display Advertising Challenge format, trained with both models (report only).

    python -m adserve_trainer.train --criteo FILE --out DIR [--limit N] [--hash-buckets 20000]

One impression per line, tab-separated, 40 fields: label (0/1), I1-I13
(integer counts, may be negative), C1-C26 (hex-hashed categoricals). Empty
fields are missing values; lines whose trailing fields are empty may have
them stripped, so a short line is padded with empty fields. A line with more
than 40 fields, a non-integer I field or a label other than 0/1 is refused
with its line number.

Features: I -> sign(x) * log(1 + |x|), missing -> 0 plus a missing indicator,
then standardized on the training lines; C -> crc32 hashed into
``--hash-buckets`` buckets per field (0 = missing) and embedded. The file is
in time order, so the split is by line: first 80% train, last 20% holdout
(calibration half, evaluation half; see experiment.py).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import TrainerError
from .tabular import candidates, hash_bucket, print_summary, standardize, write_report

N_INT = 13
N_CAT = 26
N_FIELDS = 1 + N_INT + N_CAT
INT_NAMES = [f"I{i}" for i in range(1, N_INT + 1)]
CAT_NAMES = [f"C{i}" for i in range(1, N_CAT + 1)]
EMBEDDING_DIM = 8
DEFAULT_BUCKETS = 20_000
_INT = re.compile(r"-?[0-9]+")


@dataclass
class CriteoData:
    y: np.ndarray  # int64 [N]
    ints: np.ndarray  # float64 [N, 13], NaN = missing
    cats: np.ndarray  # int64 [N, 26], 0 = missing
    buckets: int


def read_criteo(path: str | Path, buckets: int = DEFAULT_BUCKETS, limit: int | None = None) -> CriteoData:
    p = Path(path)
    if not p.is_file():
        raise TrainerError(f"criteo file does not exist: {p}")
    if buckets < 2:
        raise TrainerError("--hash-buckets must be >= 2")
    labels: list[int] = []
    ints: list[list[float]] = []
    cats: list[list[int]] = []
    nan = float("nan")
    with p.open("r", encoding="utf-8", newline="") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and len(labels) >= limit:
                break
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) > N_FIELDS:
                raise TrainerError(
                    f"{p}:{lineno}: {len(fields)} tab-separated fields, expected at most {N_FIELDS} "
                    "(label, I1-I13, C1-C26)"
                )
            if len(fields) < N_FIELDS:
                fields += [""] * (N_FIELDS - len(fields))  # trailing empty fields were stripped
            label = fields[0]
            if label not in ("0", "1"):
                raise TrainerError(f"{p}:{lineno}: label must be 0 or 1, got {label!r}")
            labels.append(int(label))
            row = []
            for name, v in zip(INT_NAMES, fields[1 : 1 + N_INT]):
                if v == "":
                    row.append(nan)
                    continue
                if not _INT.fullmatch(v):
                    raise TrainerError(f"{p}:{lineno}: {name} must be an integer or empty, got {v!r}")
                row.append(float(v))
            ints.append(row)
            cats.append([0 if v == "" else hash_bucket(v, buckets) for v in fields[1 + N_INT :]])
    if not labels:
        raise TrainerError(f"no rows: {p} contains no lines")
    return CriteoData(
        y=np.asarray(labels, dtype=np.int64),
        ints=np.asarray(ints, dtype=np.float64).reshape(-1, N_INT),
        cats=np.asarray(cats, dtype=np.int64).reshape(-1, N_CAT),
        buckets=buckets,
    )


def dense_features(ints: np.ndarray) -> np.ndarray:
    """[signed log1p(I) with missing -> 0 | missing indicators], float32 [N, 26]."""
    missing = np.isnan(ints)
    v = np.where(missing, 0.0, ints)
    logged = np.sign(v) * np.log1p(np.abs(v))
    return np.concatenate([logged, missing.astype(np.float64)], axis=1).astype(np.float32)


def train_criteo(args: argparse.Namespace) -> dict:
    from . import experiment as E
    from .fitting import set_threads
    from .nets import DCNConfig

    data = read_criteo(args.criteo, args.hash_buckets, args.limit)
    n = len(data.y)
    split = E.time_split(n)
    E.check_labels(data.y, split, what=f"lines of {args.criteo}")
    set_threads(args.threads)
    dense = standardize(dense_features(data.ints), split.train)
    cards = tuple([data.buckets] * N_CAT)
    dcn = DCNConfig(emb_dim=EMBEDDING_DIM, cross_layers=2, hidden=(128, 64))
    w = np.ones(n, dtype=np.float64)  # the challenge data is unweighted and not downsampled
    outcomes = E.run(
        candidates(dense, data.cats, cards, args, dcn), data.y, w, w, split,
        calibration=args.calibration, seed=args.seed,
    )
    report = {
        "dataset": f"criteo: {args.criteo} ({n} lines)",
        "features": f"I1-I13 signed log1p + missing indicators, standardized; C1-C26 crc32-hashed into "
        f"{data.buckets} buckets per field, embedded (dim {EMBEDDING_DIM} in DCN-v2, 1 in LR)",
        **E.protocol(split, 1.0, args.calibration, "none (every line weight 1)"),
        "models": {k: o.report() for k, o in outcomes.items()},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    out = args.out if args.out is not None else Path("out") / ("criteo-" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))
    write_report(out, report, outcomes, f"Criteo {Path(args.criteo).name}: evaluation rows ({split.sizes()['evaluation']})")
    print_summary(f"criteo {args.criteo} -> {out}", outcomes, split.sizes())
    return report
