"""Ground truth for adserve rows: a CSV of true probabilities per impression (``--truth``).

A simulator that drives the serving stack knows, for every impression it
caused, the probability of a click and the probability that the row's label
is 1 (the click, and it arriving inside the label window). It writes them as

    impression_id,p_click,p_label
    imp-00a1...,0.03125000,0.02980000

``read_truth`` validates the file (header, one row per impression id,
probabilities finite and in [0, 1], ``p_label <= p_click``); ``attach`` keeps
the training rows that have a truth and returns their probabilities in row
order. The oracle of the report is ``p_label`` scored like a model.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import TrainerError

COLUMNS = ("impression_id", "p_click", "p_label")
# p_label = p_click * P(click inside the window) <= p_click; slack for rounding.
LABEL_SLACK = 1e-9


@dataclass(frozen=True)
class Truth:
    path: Path
    ids: list[str]
    p_click: np.ndarray  # float64, aligned with ids
    p_label: np.ndarray


def read_truth(path: str | Path) -> Truth:
    """Read and validate a truth CSV; TrainerError names the file, line and problem."""
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"--truth {path}: no such file")
    ids: list[str] = []
    p_click: list[float] = []
    p_label: list[float] = []
    first_line: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise TrainerError(f"--truth {path}: empty file (expected header {','.join(COLUMNS)})")
        names = [h.strip() for h in header]
        for c in COLUMNS:
            if c not in names:
                raise TrainerError(
                    f"--truth {path}:{reader.line_num}: header has no column '{c}' "
                    f"(got {','.join(names)}; expected {','.join(COLUMNS)})"
                )
        col = {c: names.index(c) for c in COLUMNS}
        width = max(col.values()) + 1
        for row in reader:
            line = reader.line_num
            if not row or all(not f.strip() for f in row):
                continue  # blank line
            if len(row) < width:
                raise TrainerError(f"--truth {path}:{line}: {len(row)} field(s), expected {len(names)}")
            imp = row[col["impression_id"]].strip()
            if not imp:
                raise TrainerError(f"--truth {path}:{line}: empty impression_id")
            if imp in first_line:
                raise TrainerError(
                    f"--truth {path}:{line}: duplicate impression_id {imp!r} (first on line {first_line[imp]})"
                )
            probs = []
            for c in ("p_click", "p_label"):
                raw = row[col[c]].strip()
                try:
                    v = float(raw)
                except ValueError:
                    raise TrainerError(f"--truth {path}:{line}: {c} {raw!r} is not a number") from None
                if not (np.isfinite(v) and 0.0 <= v <= 1.0):
                    raise TrainerError(f"--truth {path}:{line}: {c} {raw} is not a probability in [0, 1]")
                probs.append(v)
            if probs[1] > probs[0] + LABEL_SLACK:
                raise TrainerError(
                    f"--truth {path}:{line}: p_label {probs[1]} > p_click {probs[0]} "
                    "(p_label is p_click times the chance the click arrives inside the label window)"
                )
            first_line[imp] = line
            ids.append(imp)
            p_click.append(probs[0])
            p_label.append(probs[1])
    if not ids:
        raise TrainerError(f"--truth {path}: no rows after the header")
    return Truth(path, ids, np.asarray(p_click, np.float64), np.asarray(p_label, np.float64))


def attach(table: pa.Table, truth: Truth) -> tuple[pa.Table, np.ndarray, np.ndarray, dict]:
    """Keep the rows whose impression_id has a truth (order preserved).

    Returns (rows, p_click, p_label, counts): the probabilities aligned with the
    returned rows, and how many rows had no truth and how many truth ids no row.
    """
    ids = table.column("impression_id").combine_chunks()
    idx = pc.index_in(ids, value_set=pa.array(truth.ids, pa.string()))
    has = pc.is_valid(idx)
    kept = table.filter(has)
    rows_idx = pc.filter(idx, has).to_numpy(zero_copy_only=False).astype(np.int64)
    counts = {
        "file": str(truth.path),
        "truth_ids": len(truth.ids),
        "rows_read": table.num_rows,
        "rows_with_truth": kept.num_rows,
        "rows_dropped_without_truth": table.num_rows - kept.num_rows,
        "truth_ids_without_row": len(truth.ids) - int(np.unique(rows_idx).size),
    }
    if kept.num_rows == 0:
        raise TrainerError(
            f"--truth {truth.path}: none of the {table.num_rows} rows has its impression_id among the "
            f"{len(truth.ids)} ids of the truth file; are the rows and the truth from the same run?"
        )
    return kept, truth.p_click[rows_idx], truth.p_label[rows_idx], counts
