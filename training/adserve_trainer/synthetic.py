"""Deterministic synthetic training rows in the label-joiner schema.

Labels come from a KNOWN logistic ground truth over the raw registry features
(``TRUE_WEIGHTS``, ``TRUE_INTERCEPT``), so tests can check that a fitted model
recovers the signal and is calibrated. Used before real rows exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .offline import serve_stored
from .registry import Registry, fnv1a64
from .schema import ROW_SCHEMA

# Ground truth: logit(p) = TRUE_INTERCEPT + sum_k TRUE_WEIGHTS[k] * feature_k (raw units).
# Features in the registry but not listed here carry no signal.
TRUE_INTERCEPT = -5.5
TRUE_WEIGHTS = {
    "user_ctr_30d": 25.0,  # ~0.35 per std
    "user_sessions_7d": 0.06,
    "user_impressions_1h": -0.10,  # ad fatigue
    "ad_ctr_7d": 35.0,
    "ad_quality_score": 1.2,
    "ad_impressions_1h": -0.004,
    "ctx_device_mobile": 0.35,
    "ctx_placement_feed_top": 0.6,
}

PLACEMENTS = np.array(["feed_top", "feed_mid", "sidebar", "article_inline"])
PLACEMENT_P = [0.3, 0.3, 0.2, 0.2]
# Traffic share of each device; the devices themselves are the registry's
# [request].devices (the closed set the gateway accepts). A device added there
# and not listed here gets DEFAULT_DEVICE_WEIGHT.
DEVICE_WEIGHTS = {"mobile": 0.55, "desktop": 0.3, "tablet": 0.1, "ctv": 0.05}
DEFAULT_DEVICE_WEIGHT = 0.05
SURFACES = np.array(["home", "search", "article", "video"])
SURFACE_P = [0.4, 0.2, 0.3, 0.1]

SLOTS_PER_REQUEST = 3
COPPA_RATE = 0.05
EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z


def _ids(rng: np.random.Generator, prefix: str, n: int) -> list[str]:
    return [f"{prefix}{v:016x}" for v in rng.integers(0, 2**63, size=n, dtype=np.int64).tolist()]


def _feature_column(name: str, n: int, default: float, ctx: dict, rng: np.random.Generator) -> np.ndarray:
    if name == "user_ctr_30d":
        return rng.beta(2.0, 98.0, n)
    if name == "ad_ctr_7d":
        return ctx["ad_ctr"]
    if name == "user_sessions_7d":
        return rng.poisson(5.0, n).astype(np.float64)
    if name == "user_impressions_1h":
        return rng.poisson(3.0, n).astype(np.float64)
    if name == "ad_quality_score":
        return ctx["ad_quality"]
    if name == "ad_impressions_1h":
        return rng.poisson(40.0, n).astype(np.float64)
    if name == "ctx_device_mobile":
        return (ctx["device"] == "mobile").astype(np.float64)
    if name == "ctx_placement_feed_top":
        return (ctx["placement"] == "feed_top").astype(np.float64)
    # A registry feature this generator does not know: constant default, no signal.
    return np.full(n, default, dtype=np.float64)


def generate(n: int, seed: int, registry: Registry) -> pa.Table:
    """``n`` rows in exactly ROW_SCHEMA; same (n, seed, registry) -> identical table."""
    if n <= 0:
        raise ValueError("synthetic row count must be positive")
    rng = np.random.default_rng(seed)
    n_req = -(-n // SLOTS_PER_REQUEST)
    req = np.arange(n) // SLOTS_PER_REQUEST
    slot = (np.arange(n) % SLOTS_PER_REQUEST).astype(np.int32)

    # Per-request context.
    request_ids = np.array(_ids(rng, "req-", n_req))
    placement_r = rng.choice(PLACEMENTS, size=n_req, p=PLACEMENT_P)
    devices = np.array(registry.devices)
    weights = np.array([DEVICE_WEIGHTS.get(d, DEFAULT_DEVICE_WEIGHT) for d in registry.devices])
    device_r = rng.choice(devices, size=n_req, p=weights / weights.sum())
    surface_r = rng.choice(SURFACES, size=n_req, p=SURFACE_P)
    coppa_r = rng.random(n_req) < COPPA_RATE
    user_r = np.array([f"u{u:06d}" for u in rng.integers(1, 50_000, size=n_req).tolist()])
    user_r[coppa_r] = ""
    served_r = EPOCH_MS + np.sort(rng.integers(0, 24 * 3600 * 1000, size=n_req))

    # Per-ad attributes (stable per ad_id).
    n_ads = 500
    ad_ctr_by_ad = rng.beta(2.0, 98.0, n_ads)
    ad_quality_by_ad = rng.uniform(0.0, 1.0, n_ads)
    ad_id = rng.integers(1, n_ads + 1, size=n).astype(np.int64)
    campaign_id = (1000 + (ad_id - 1) // 10).astype(np.int64)

    ctx = {
        "placement": placement_r[req],
        "device": device_r[req],
        "ad_ctr": ad_ctr_by_ad[ad_id - 1],
        "ad_quality": ad_quality_by_ad[ad_id - 1],
    }
    coppa = coppa_r[req]

    # Features as served: personal features are not used (so not logged) for COPPA
    # requests; the ranker scored them at the registry default.
    logit = np.full(n, TRUE_INTERCEPT)
    served_cols: list[np.ndarray] = []
    raw_of: dict[tuple[str, str, str], np.ndarray] = {}
    for f in registry.features:
        twin = raw_of.get((f.entity, f.source, f.attribute))
        if f.transform is not None and twin is not None:
            # A transformed view of a stored value generated above: served
            # as the feature-service would serve it (no extra draws, so the
            # other columns and the truth do not move).
            col, _, _ = serve_stored(f, twin.astype(np.float32), np.ones(n, dtype=bool))
            col = col.astype(np.float64)
        else:
            col = _feature_column(f.name, n, f.default, ctx, rng)
            if f.transform is None and f.source != "request":
                raw_of.setdefault((f.entity, f.source, f.attribute), col)
        if f.personal:
            col = np.where(coppa, f.default, col)
        col = col.astype(np.float32)
        served_cols.append(col)
        logit += TRUE_WEIGHTS.get(f.name, 0.0) * col.astype(np.float64)
    p_true = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p_true).astype(np.int8)

    # The serving model's pctr: the truth seen through noise.
    pctr = np.clip(p_true * np.exp(rng.normal(0.0, 0.3, n)), 1e-4, 0.999).astype(np.float32)
    price_cpc = rng.integers(200_000, 3_000_000, size=n).astype(np.int64)
    ecpm = np.round(pctr.astype(np.float64) * price_cpc * 1000).astype(np.int64)

    served_at = served_r[req] + slot.astype(np.int64)  # slots rendered ms apart
    label_window_ms = registry.label_window_seconds * 1000
    click_delay = rng.integers(500, label_window_ms, size=n)
    clicked_at = pa.array(served_at + click_delay, pa.int64(), mask=label == 0)
    joined_at = served_at + label_window_ms + rng.integers(0, 60_000, size=n)

    names_all = [f.name for f in registry.features]
    personal = np.array([f.personal for f in registry.features])
    names_coppa = [nm for nm, per in zip(names_all, personal) if not per]
    mat = np.stack(served_cols, axis=1)
    feature_names = [names_coppa if c else names_all for c in coppa.tolist()]
    feature_values = [row[~personal] if c else row for row, c in zip(mat, coppa.tolist())]
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in feature_values])]).astype(np.int32)
    flat_values = np.concatenate(feature_values).astype(np.float32)

    ts = ROW_SCHEMA.field("served_at").type
    cols = {
        "impression_id": pa.array(_ids(rng, "imp-", n), pa.string()),
        "request_id": pa.array(request_ids[req], pa.string()),
        "user_id": pa.array(user_r[req], pa.string()),
        "ad_id": pa.array(ad_id, pa.int64()),
        "campaign_id": pa.array(campaign_id, pa.int64()),
        "slot": pa.array(slot, pa.int32()),
        "placement": pa.array(ctx["placement"], pa.string()),
        "device": pa.array(ctx["device"], pa.string()),
        "surface": pa.array(surface_r[req], pa.string()),
        "coppa": pa.array(coppa, pa.bool_()),
        "served_at": pa.array(served_at, pa.int64()).cast(ts),
        "clicked_at": clicked_at.cast(ts),
        "joined_at": pa.array(joined_at, pa.int64()).cast(ts),
        "label": pa.array(label, pa.int8()),
        "row_kind": pa.array(["final"] * n, pa.string()),
        "is_final": pa.array(np.ones(n, dtype=bool), pa.bool_()),
        "weight": pa.array(np.ones(n, dtype=np.float32), pa.float32()),
        "keep_rate": pa.array(np.ones(n, dtype=np.float32), pa.float32()),
        "model_version": pa.array(["synthetic-truth"] * n, pa.string()),
        "pctr": pa.array(pctr, pa.float32()),
        "score_level": pa.array(["model"] * n, pa.string()),
        "ecpm_micros": pa.array(ecpm, pa.int64()),
        "price_cpc_micros": pa.array(price_cpc, pa.int64()),
        "advertiser_id": pa.array(campaign_id // 3, pa.int64()),
        "price_cpm_micros": pa.array(np.zeros(n, dtype=np.int64), pa.int64()),
        "propensity": pa.array(np.ones(n, dtype=np.float32), pa.float32()),
        "explored": pa.array(np.zeros(n, dtype=bool), pa.bool_()),
        "feature_names": pa.array(feature_names, ROW_SCHEMA.field("feature_names").type),
        "feature_values": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_values, pa.float32())),
    }
    keys = {"user": user_r[req], "ad": ad_id.astype(str)}
    cols.update(_typed_columns(registry, ctx["placement"], ctx["device"], surface_r[req], keys, coppa))
    return pa.Table.from_arrays([cols[f.name] for f in ROW_SCHEMA], schema=ROW_SCHEMA)


# Raw values of stored categoricals: one of these per entity, fixed by a hash
# of the feature and the entity's key (no truth weight: they carry no signal,
# but the model sees every id the simulator's world serves, the demo's topics).
STORED_VOCABULARY = ("travel", "games", "finance", "food", "books")


def _stored_value(feature: str, key: str) -> str | None:
    if not key:
        return None
    return STORED_VOCABULARY[fnv1a64(f"{feature}:{key}".encode()) % len(STORED_VOCABULARY)]


def _typed_columns(registry: Registry, placement, device, surface, keys: dict, coppa: np.ndarray) -> dict:
    """The typed columns as the feature-service would serve them: request
    categoricals (and crosses of them) hashed from the row's context; stored
    categoricals one of STORED_VOCABULARY per user or ad; personal ones (and
    crosses of them) blank for COPPA rows; embeddings missing (the default)."""
    n = len(placement)
    fields = {"placement": placement, "device": device, "surface": surface}
    raw: dict[str, list] = {}
    ids = np.zeros((n, len(registry.categorical)), dtype=np.int64)
    for k, f in enumerate(registry.categorical):
        if f.source == "request":
            raw[f.name] = list(fields[f.attribute])
        elif f.source == "dynamodb":
            by_key = {key: _stored_value(f.name, key) for key in set(keys[f.entity].tolist())}
            raw[f.name] = [by_key[key] for key in keys[f.entity].tolist()]
        if f.personal and f.name in raw:
            raw[f.name] = [None if c else v for v, c in zip(raw[f.name], coppa.tolist())]
        if f.cross is not None:
            if all(op in raw for op in f.cross):
                a, b = raw[f.cross[0]], raw[f.cross[1]]
                ids[:, k] = [0 if c and f.personal else f.cross_id(x, y) for x, y, c in zip(a, b, coppa.tolist())]
        elif f.name in raw:
            ids[:, k] = [f.category_id(v) for v in raw[f.name]]
    dims = [f.dim for f in registry.embeddings]
    row = np.concatenate([np.full(f.dim, f.default, np.float32) for f in registry.embeddings] or [np.zeros(0, np.float32)])
    lists = lambda name, values: pa.array(values, ROW_SCHEMA.field(name).type)  # noqa: E731
    return {
        "categorical_names": lists("categorical_names", [[f.name for f in registry.categorical]] * n),
        "categorical_ids": lists("categorical_ids", ids.tolist()),
        "embedding_names": lists("embedding_names", [[f.name for f in registry.embeddings]] * n),
        "embedding_dims": lists("embedding_dims", [dims] * n),
        "embedding_values": lists("embedding_values", [row.tolist()] * n),
    }


def write_parquet(table: pa.Table, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(p)
    return p


def true_probability(X: np.ndarray, feature_order: list[str]) -> np.ndarray:
    """The generator's ground-truth click probability for RAW feature rows (the oracle)."""
    logit = np.full(X.shape[0], TRUE_INTERCEPT)
    for j, name in enumerate(feature_order):
        logit += TRUE_WEIGHTS.get(name, 0.0) * np.asarray(X[:, j], dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-logit))
