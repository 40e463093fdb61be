"""Point-in-time offline retrieval: the feature rows a model would have been
served at given moments, built from the batch pipeline's Parquet output.

The online path and this one read the same inputs and the same registry:

- ``adservectl features backfill`` loads a batch file (the entity key,
  ``event_timestamp``, one column per batch attribute) into DynamoDB, where
  the feature-service serves each entity's latest row;
- :func:`historical_features` reads the same file and, for every
  ``(entity, timestamp)`` asked, takes the entity's latest row **at or
  before** that timestamp (never a later one: no label leakage), then checks
  and transforms it exactly as the feature-service does
  (``registry.Feature.accepts`` / ``serve``: f32, range, transform in f64
  rounded once).

So a row built here for "now" is bit-identical to the row GetFeatures serves
(``integration-tests/tests/feature_store.rs`` holds both paths to it, typed columns included).

What each column gets:

- batch features (``source = dynamodb``): as of the row's timestamp;
  no row yet, or a null, is the default ("missing"); a stored value the
  registry refuses (not finite, outside ``range``) is the default
  ("invalid");
- real-time features (``source = redis``): the entity table's column of
  that name when it has one (the value the logs say was served), else the
  default ("missing"). Recomputing the streaming counters offline would mean
  replaying the aggregator over the event log; this module does not;
- request features: from the entity table's ``device`` / ``placement`` /
  ``surface`` columns, else the default;
- personal features of rows with ``coppa`` true: the default, not counted;
- typed features, as the feature-service assembles them: a categorical's
  raw value (a stored string as of the row's timestamp, or the entity
  table's request field) becomes its bucket id, a cross hashes its two
  operands' raw values, an embedding is the stored vector as of the row's
  timestamp (the default in every element when absent, or refused whole
  when it is not ``dim`` long or an element fails ``range``).

Usage::

    python -m adserve_trainer.offline --entities rows.parquet \\
        --user-features users.parquet --ad-features ads.parquet --out out.parquet

The entity table needs ``user_id`` (string), ``ad_id`` (integer) and
``event_timestamp`` (a timestamp, or int64 epoch ms); every column passes
through, and one float32 column per registry feature is added (replacing a
column of the same name), in registry order, then one int64 column per
categorical feature and one fixed-size list of float32 per embedding.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import TrainerError
from .registry import Feature, Registry, load_registry

EVENT_TIMESTAMP = "event_timestamp"
KEYS = {"user": "user_id", "ad": "ad_id"}
REQUEST_FIELDS = ("device", "placement", "surface")
# adserve_features::request::MAX_USER_ID_LEN.
MAX_USER_ID_LEN = 128


@dataclass
class Retrieved:
    """The feature matrix (rows x registry, float32) and, per feature, cells
    that took the default because nothing was stored ("missing") or what was
    stored was refused ("invalid")."""

    names: list[str]
    matrix: np.ndarray
    missing: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    # Typed columns: rows x categorical features (int64 bucket ids), and per
    # embedding feature its rows x dim vectors (float32).
    categorical_names: list[str] = field(default_factory=list)
    categorical_ids: np.ndarray | None = None
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)


def _ms(col: pa.ChunkedArray | pa.Array, what: str) -> np.ndarray:
    """Epoch milliseconds of a timestamp (any unit) or int64 column; refuses nulls."""
    if pa.types.is_timestamp(col.type):
        col = pc.cast(col, pa.timestamp("ms", tz=col.type.tz), safe=False).cast(pa.int64())
    elif not pa.types.is_int64(col.type):
        raise TrainerError(f"{what}: {EVENT_TIMESTAMP} must be a timestamp or int64 epoch ms, not {col.type}")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise TrainerError(f"{what}: column {EVENT_TIMESTAMP}, row {row}: null")
    return col.to_numpy(zero_copy_only=False).astype(np.int64)


def _keys(col: pa.ChunkedArray, entity: str, what: str) -> np.ndarray:
    """Keys as DynamoDB holds them (decimal strings for ads); refuses what the
    backfill refuses, naming the row."""
    name = KEYS[entity]
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise TrainerError(f"{what}: column {name}, row {row}: null")
    values = col.to_pylist()
    if entity == "ad":
        out = []
        for i, v in enumerate(values):
            try:
                n = int(v)
            except (TypeError, ValueError):
                n = 0
            if isinstance(v, (bool, float)) or n <= 0:
                raise TrainerError(f"{what}: column {name}, row {i}: an ad id is a positive integer")
            out.append(str(n))
        return np.array(out, dtype=object)
    for i, v in enumerate(values):
        if (
            not isinstance(v, str)
            or not v.strip()
            or len(v.encode()) > MAX_USER_ID_LEN
            or any(ch.isprintable() is False and ch != " " for ch in v)
        ):
            raise TrainerError(f"{what}: column {name}, row {i}: empty, not a string, too long or not printable")
    return np.array(values, dtype=object)


def read_source(path: str | Path, entity: str, registry: Registry) -> pa.Table:
    """A batch file as the backfill accepts it: the key, event_timestamp and
    every batch attribute of ``entity``, nothing else."""
    p = Path(path)
    try:
        t = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise TrainerError(f"{p}: not Parquet: {e}") from e
    check_source(t, entity, registry, str(p), exact=True)
    return t


def check_source(t: pa.Table, entity: str, registry: Registry, what: str, exact: bool = False) -> None:
    """``t`` holds the key, event_timestamp and every batch attribute of
    ``entity``, typed as the store keeps them; with ``exact``, nothing else
    (the backfill's files). Raises a TrainerError naming the column."""
    stored = [*registry.features, *registry.categorical, *registry.embeddings]
    wanted = sorted({f.attribute for f in stored if f.entity == entity and f.source == "dynamodb"})
    for f in stored:
        if f.entity != entity or f.source != "dynamodb" or f.attribute not in t.column_names:
            continue
        typ = t.schema.field(f.attribute).type
        if f.kind == "categorical" and not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise TrainerError(f"{what}: column {f.attribute}: a string (a categorical's raw value), not {typ}")
        if f.kind == "embedding" and not (
            (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ))
            and (pa.types.is_integer(typ.value_type) or pa.types.is_floating(typ.value_type))
        ):
            raise TrainerError(f"{what}: column {f.attribute}: a list of {f.dim} numbers (an embedding), not {typ}")
    if exact:
        for name in t.column_names:
            if name not in (KEYS[entity], EVENT_TIMESTAMP) and name not in wanted:
                raise TrainerError(
                    f"{what}: column {name}: not a batch attribute of {entity} features (they are: {', '.join(wanted)})"
                )
    for name in (KEYS[entity], EVENT_TIMESTAMP, *wanted):
        if name not in t.column_names:
            raise TrainerError(f"{what}: no {name} column")


def asof_rows(src_keys: np.ndarray, src_ms: np.ndarray, q_keys: np.ndarray, q_ms: np.ndarray) -> np.ndarray:
    """For each query, the index of the source row with the same key and the
    greatest time <= the query's (on a tie, the last in file order: the row
    the backfill writes), or -1.

    One sort of sources and queries together by (key, time, source before
    query, position); a running maximum of source positions then gives each
    query the last source row before it, kept only when its key matches."""
    n_s, n_q = len(src_keys), len(q_keys)
    if n_q == 0:
        return np.zeros(0, dtype=np.int64)
    if n_s == 0:
        return np.full(n_q, -1, dtype=np.int64)
    _, codes = np.unique(np.concatenate([src_keys, q_keys]).astype(str), return_inverse=True)
    ms = np.concatenate([src_ms, q_ms])
    kind = np.concatenate([np.zeros(n_s, np.int8), np.ones(n_q, np.int8)])
    order = np.lexsort((np.arange(n_s + n_q), kind, ms, codes))
    is_src = order < n_s
    last = np.maximum.accumulate(np.where(is_src, np.arange(n_s + n_q), -1))
    q_pos = np.flatnonzero(~is_src)
    cand = last[q_pos]
    ok = (cand >= 0) & (codes[order[np.maximum(cand, 0)]] == codes[order[q_pos]])
    out = np.full(n_q, -1, dtype=np.int64)
    out[order[q_pos] - n_s] = np.where(ok, order[np.maximum(cand, 0)], -1)
    return out


def _f32(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column as f32 (the backfill's `as f32`) and its null mask."""
    nulls = col.is_null().to_numpy(zero_copy_only=False)
    values = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
    return np.asarray(values).astype(np.float32), nulls


def serve_stored(f: Feature, raw: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The vectorised ``Feature.stored``: served values, missing and invalid counts."""
    out = np.full(raw.shape, np.float32(f.default), dtype=np.float32)
    ok = present & np.isfinite(raw)
    if f.range is not None:
        lo, hi = np.float32(f.range[0]), np.float32(f.range[1])
        ok &= (raw >= lo) & (raw <= hi)
    x = raw[ok]
    if f.transform is not None:
        kind, params = f.transform
        if kind == "log1p":
            x = np.array([math.log1p(float(v)) for v in x], dtype=np.float64).astype(np.float32)
        elif kind == "clip":
            x = np.clip(x, np.float32(params[0]), np.float32(params[1])).astype(np.float32)
        else:
            x = np.searchsorted(np.array(params, dtype=np.float32), x, side="right").astype(np.float32)
    out[ok] = x
    missing = int((~present).sum())
    return out, missing, int(present.sum()) - int(ok.sum())


def historical_features(
    entities: pa.Table,
    registry: Registry,
    user_source: pa.Table | None = None,
    ad_source: pa.Table | None = None,
) -> Retrieved:
    """The registry row of every entity row as of its ``event_timestamp``."""
    what = "entities"
    for name in ("user_id", "ad_id", EVENT_TIMESTAMP):
        if name not in entities.column_names:
            raise TrainerError(f"{what}: no {name} column")
    n = entities.num_rows
    q_ms = _ms(entities.column(EVENT_TIMESTAMP), what)
    coppa = (
        entities.column("coppa").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
        if "coppa" in entities.column_names
        else np.zeros(n, dtype=bool)
    )
    user_ids = np.array(entities.column("user_id").fill_null("").to_pylist(), dtype=object)
    ad_ids = _keys(entities.column("ad_id"), "ad", what)

    matches: dict[str, tuple[np.ndarray, pa.Table | None]] = {}
    for entity, src, q_keys in (("user", user_source, user_ids), ("ad", ad_source, ad_ids)):
        if src is None:
            matches[entity] = (np.full(n, -1, dtype=np.int64), None)
            continue
        check_source(src, entity, registry, f"{entity} source")
        s_keys = _keys(src.column(KEYS[entity]), entity, f"{entity} source")
        s_ms = _ms(src.column(EVENT_TIMESTAMP), f"{entity} source")
        matches[entity] = (asof_rows(s_keys, s_ms, q_keys, q_ms), src)

    names = [f.name for f in registry.features]
    matrix = np.empty((n, len(names)), dtype=np.float32)
    result = Retrieved(names=names, matrix=matrix)
    for c, f in enumerate(registry.features):
        blind = coppa if f.personal else np.zeros(n, dtype=bool)
        if f.source == "dynamodb":
            rows, src = matches[f.entity]
            present = rows >= 0
            raw = np.zeros(n, dtype=np.float32)
            if src is not None:
                col, nulls = _f32(src.column(f.attribute))
                raw[present] = col[rows[present]]
                present[present] &= ~nulls[rows[present]]
            present &= ~blind
            values, missing, invalid = serve_stored(f, raw, present)
            missing -= int(blind.sum())
        elif f.source == "redis":
            if f.name in entities.column_names:
                values, nulls = _f32(entities.column(f.name))
                values = np.where(nulls, np.float32(f.default), values).astype(np.float32)
                missing = int((nulls & ~blind).sum())
            else:
                values = np.full(n, np.float32(f.default), dtype=np.float32)
                missing = int((~blind).sum())
            invalid = 0
        else:
            if f.attribute in REQUEST_FIELDS and f.attribute in entities.column_names:
                field_values = np.array(entities.column(f.attribute).fill_null("").to_pylist(), dtype=object)
                values = (field_values == f.equals).astype(np.float32)
                missing = 0
            else:
                values = np.full(n, np.float32(f.default), dtype=np.float32)
                missing = int((~blind).sum())
            invalid = 0
        values = np.where(blind, np.float32(f.default), values)
        matrix[:, c] = values
        result.missing[f.name] = missing
        result.invalid[f.name] = invalid
    _typed(result, registry, entities, matches, coppa)
    return result


def _as_of(src: pa.Table | None, attribute: str, rows: np.ndarray) -> list:
    """Each row's stored value of ``attribute`` as of its time (None: no row, or a null)."""
    if src is None:
        return [None] * len(rows)
    col = src.column(attribute).to_pylist()
    return [col[r] if r >= 0 else None for r in rows]


def _typed(result: Retrieved, registry: Registry, entities: pa.Table, matches: dict, coppa: np.ndarray) -> None:
    """The categorical ids and embeddings of every row, as ``assemble_typed``
    builds them (missing and invalid counted the same way)."""
    n = entities.num_rows
    cats = registry.categorical
    raw: list[list[str | None]] = []
    ids = np.zeros((n, len(cats)), dtype=np.int64)
    for k, f in enumerate(cats):
        blind = coppa if f.personal else np.zeros(n, dtype=bool)
        if f.source == "cross":
            a, b = (next(i for i, c in enumerate(cats) if c.name == op) for op in f.cross)
            values = [None if blind[r] else raw[a][r] for r in range(n)]
            ids[:, k] = [0 if blind[r] else f.cross_id(raw[a][r], raw[b][r]) for r in range(n)]
            raw.append(values)
            result.missing[f.name] = 0
            continue
        if f.source == "request":
            got = entities.column(f.attribute).to_pylist() if f.attribute in entities.column_names else [None] * n
        else:
            rows, src = matches[f.entity]
            got = _as_of(src, f.attribute, rows)
        values = [None if blind[r] or not got[r] else str(got[r]) for r in range(n)]
        raw.append(values)
        ids[:, k] = [f.category_id(v) for v in values]
        result.missing[f.name] = sum(1 for r in range(n) if values[r] is None and not blind[r])
    result.categorical_names = [f.name for f in cats]
    result.categorical_ids = ids
    for f in registry.embeddings:
        blind = coppa if f.personal else np.zeros(n, dtype=bool)
        rows, src = matches[f.entity]
        got = _as_of(src, f.attribute, rows)
        out = np.empty((n, f.dim), dtype=np.float32)
        missing = invalid = 0
        for r in range(n):
            vector, status = f.embedding(None if blind[r] else got[r])
            out[r] = vector
            if not blind[r]:
                missing += status == "missing"
                invalid += status == "invalid"
        result.embeddings[f.name] = out
        result.missing[f.name] = missing
        result.invalid[f.name] = invalid


def with_features(entities: pa.Table, got: Retrieved) -> pa.Table:
    """``entities`` with one float32 column per feature (replacing same-named ones)."""
    typed = [*got.categorical_names, *got.embeddings]
    t = entities.drop_columns([n for n in [*got.names, *typed] if n in entities.column_names])
    for c, name in enumerate(got.names):
        t = t.append_column(pa.field(name, pa.float32(), nullable=False), pa.array(got.matrix[:, c], type=pa.float32()))
    for k, name in enumerate(got.categorical_names):
        t = t.append_column(pa.field(name, pa.int64(), nullable=False), pa.array(got.categorical_ids[:, k], type=pa.int64()))
    for name, vectors in got.embeddings.items():
        dim = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        t = t.append_column(pa.field(name, pa.list_(pa.float32(), dim), nullable=False), pa.FixedSizeListArray.from_arrays(flat, dim))
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adserve_trainer.offline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--entities", type=Path, required=True, help="Parquet: user_id, ad_id, event_timestamp[, device, placement, surface, coppa]")
    ap.add_argument("--user-features", type=Path, help="the user batch file (as given to adservectl features backfill)")
    ap.add_argument("--ad-features", type=Path, help="the ad batch file")
    ap.add_argument("--registry", type=Path, help="features.toml (default: crates/adserve-features/features.toml)")
    ap.add_argument("--out", type=Path, required=True, help="output Parquet")
    args = ap.parse_args(argv)
    try:
        registry = load_registry(args.registry)
        try:
            entities = pq.read_table(args.entities)
        except Exception as e:
            raise TrainerError(f"{args.entities}: not Parquet: {e}") from e
        users = read_source(args.user_features, "user", registry) if args.user_features else None
        ads = read_source(args.ad_features, "ad", registry) if args.ad_features else None
        got = historical_features(entities, registry, users, ads)
        pq.write_table(with_features(entities, got), args.out)
    except TrainerError as e:
        print(f"offline: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rows": int(got.matrix.shape[0]), "out": str(args.out), "missing": got.missing, "invalid": got.invalid}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
