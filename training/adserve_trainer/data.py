"""Reading label-joiner Parquet rows and turning them into a dense feature matrix."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import TrainerError
from .registry import Registry
from .schema import FEATURE_NAMES_KEY, ROW_SCHEMA, TYPED_FOOTER_KEYS, conform


def parquet_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise TrainerError(f"data path does not exist: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if f.is_file())
        if not files:
            raise TrainerError(f"no rows: directory {p} contains no *.parquet files")
        return files
    return [p]


def _with_footer_names(t: pa.Table, source: str, file_meta: dict | None = None) -> pa.Table:
    """Schema-3 files name their features once, in the footer: rebuild the per-row column.

    The label-joiner (arrow-rs) writes the names as Parquet key-value
    metadata beside ARROW:schema, which pyarrow does not carry onto the
    table's schema: ``file_meta`` is the file's own footer metadata.
    """
    meta = dict(file_meta or {})
    meta.update(t.schema.metadata or {})
    keys = {"feature_names": FEATURE_NAMES_KEY, **TYPED_FOOTER_KEYS}
    for column_name, key in keys.items():
        if column_name in t.schema.names or key not in meta:
            continue  # per-row already, or an older file (defaults), or validation names it
        try:
            value = json.loads(meta[key])
        except ValueError as e:
            raise TrainerError(f"{source}: footer {key.decode()} is not JSON: {e}") from e
        item = str if column_name != "embedding_dims" else int
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise TrainerError(f"{source}: footer {key.decode()} must be a list of {item.__name__}")
        field = ROW_SCHEMA.field(column_name)
        t = t.append_column(field, pa.array([value] * t.num_rows, field.type))
    return t


def load_rows(path: str | Path, final_only: bool = True) -> pa.Table:
    """Read one Parquet file or a directory tree of them, validating each file's schema.

    With ``final_only`` (the default) only final rows are kept: the
    provisional and correction rows of the joiner's streaming mode describe
    the same impressions again.
    """
    tables = []
    for f in parquet_files(path):
        try:
            pf = pq.ParquetFile(f)
            t, file_meta = pf.read(), pf.metadata.metadata
        except (pa.ArrowInvalid, OSError) as e:
            raise TrainerError(f"{f}: cannot read as Parquet: {e}") from e
        t = conform(_with_footer_names(t, str(f), file_meta), source=str(f))
        if final_only:
            t = t.filter(pc.field("is_final"))
        tables.append(t)
    table = pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()
    if table.num_rows == 0:
        raise TrainerError(f"no rows: {path} contains 0 training rows")
    return table


def build_matrix(table: pa.Table, registry: Registry, warn: bool = True) -> tuple[np.ndarray, np.ndarray, dict]:
    """Dense float32 [rows, F] matrix in registry order, plus int labels.

    Values are placed by feature NAME, never by position: a row may list its
    features in any order or omit some (e.g. personal features on COPPA
    requests); missing features, null lists and null values get the registry
    default. Names not in the registry are ignored (reported in stats).
    """
    n = table.num_rows
    if n == 0:
        raise TrainerError("no rows: the dataset is empty")
    order = registry.names
    defaults = np.asarray([registry.defaults[name] for name in order], dtype=np.float32)

    names_col = table.column("feature_names").combine_chunks()
    values_col = table.column("feature_values").combine_chunks()
    name_lens = pc.fill_null(pc.list_value_length(names_col), 0).to_numpy(zero_copy_only=False)
    value_lens = pc.fill_null(pc.list_value_length(values_col), 0).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(name_lens != value_lens)
    if bad.size:
        i = int(bad[0])
        raise TrainerError(
            f"{bad.size} row(s) have feature_names and feature_values of different lengths "
            f"(first: row {i}, {name_lens[i]} names vs {value_lens[i]} values)"
        )

    flat_names = pc.list_flatten(names_col)
    flat_values = pc.list_flatten(values_col)
    col_idx = pc.index_in(flat_names, value_set=pa.array(order, pa.string()))
    known = pc.and_(pc.is_valid(col_idx), pc.is_valid(flat_values))
    known_np = known.to_numpy(zero_copy_only=False).astype(bool)
    row_idx = np.repeat(np.arange(n), name_lens.astype(np.int64))
    cols = pc.fill_null(col_idx, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    vals = pc.fill_null(flat_values, 0.0).to_numpy(zero_copy_only=False).astype(np.float32)

    X = np.tile(defaults, (n, 1))
    present = np.zeros((n, len(order)), dtype=bool)
    X[row_idx[known_np], cols[known_np]] = vals[known_np]
    present[row_idx[known_np], cols[known_np]] = True
    if not np.all(np.isfinite(X)):
        raise TrainerError("feature_values contain NaN or infinite values")

    unknown = sorted(set(pc.unique(pc.filter(flat_names, pc.is_null(col_idx))).to_pylist()) - {None})
    stats = {
        "defaulted_fraction": {name: float(1.0 - present[:, j].mean()) for j, name in enumerate(order)},
        "unknown_features": unknown,
    }
    if warn and unknown:
        print(f"warning: ignoring features not in the registry: {', '.join(unknown)}", file=sys.stderr)

    y = table.column("label").to_numpy().astype(np.int64)
    if np.any((y != 0) & (y != 1)):
        raise TrainerError(f"column 'label' must be 0 or 1, found values {sorted(set(np.unique(y)) - {0, 1})}")
    return X, y, stats


def build_typed(table: pa.Table, registry: Registry) -> tuple[np.ndarray, np.ndarray]:
    """Categorical ids ``[rows, C]`` (int64, registry.categorical order) and
    embeddings ``[rows, sum(dims)]`` (float32, registry.embeddings order, one
    after the other), placed by NAME like ``build_matrix``: a column a row
    lacks is 0 (the missing bucket) or the embedding's default; names not in
    the registry are ignored. A ragged row is refused."""
    n = table.num_rows
    cats, embs = registry.categorical, registry.embeddings
    ids = np.zeros((n, len(cats)), dtype=np.int64)
    offsets = np.cumsum([0] + [f.dim for f in embs])
    vectors = np.zeros((n, int(offsets[-1])), dtype=np.float32)
    for k, f in enumerate(embs):
        vectors[:, offsets[k] : offsets[k + 1]] = np.float32(f.default)
    if n == 0 or not (cats or embs):
        return ids, vectors
    cat_at = {f.name: k for k, f in enumerate(cats)}
    emb_at = {f.name: (k, f.dim) for k, f in enumerate(embs)}
    columns = ("categorical_names", "categorical_ids", "embedding_names", "embedding_dims", "embedding_values")
    rows = zip(*(table.column(c).to_pylist() for c in columns))
    for r, (cnames, cids, enames, edims, evalues) in enumerate(rows):
        if len(cnames) != len(cids) or len(enames) != len(edims) or sum(edims) != len(evalues):
            raise TrainerError(f"row {r}: typed feature names, lengths and values disagree")
        for name, v in zip(cnames, cids):
            k = cat_at.get(name)
            if k is not None:
                ids[r, k] = v
        at = 0
        for name, dim in zip(enames, edims):
            slot = emb_at.get(name)
            if slot is not None and slot[1] == dim:
                vectors[r, offsets[slot[0]] : offsets[slot[0]] + dim] = evalues[at : at + dim]
            at += dim
    if not np.all(np.isfinite(vectors)):
        raise TrainerError("embedding_values contain NaN or infinite values")
    return ids, vectors


def time_order(table: pa.Table) -> np.ndarray:
    """Row indices sorted by served_at (stable: ties keep file order)."""
    served = table.column("served_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    return np.argsort(served, kind="mergesort")


IPS_CLIP = 10.0


def row_weights(table: pa.Table, ips_clip: float = IPS_CLIP) -> np.ndarray:
    """Training weight per row: ``weight * min(1 / propensity, ips_clip)``.

    ``weight`` is the joiner's sample weight (1 for final rows). The
    propensity is the auction's probability of placing this ad in this slot
    given the slots above: 1 without exploration, ``exploration / n`` for an
    explored winner and ``1 - exploration + exploration / n`` for the greedy
    winner when exploration is on. Inverse-propensity weighting moves the
    training distribution from "what the ranker chose" towards "every
    candidate", which is what the ranker scores; the clip bounds the variance
    an explored row (1/propensity can be in the hundreds) adds. ``ips_clip``
    <= 0 turns the propensity weighting off.
    """
    w = table.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise TrainerError("column 'weight' must be finite and >= 0")
    if ips_clip > 0:
        prop = table.column("propensity").to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.all(np.isfinite(prop)) or np.any(prop <= 0) or np.any(prop > 1):
            raise TrainerError("column 'propensity' must be in (0, 1]")
        w = w * np.minimum(1.0 / prop, ips_clip)
    return w
