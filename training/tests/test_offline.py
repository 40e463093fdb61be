"""Point-in-time offline retrieval (adserve_trainer.offline): no leakage, the
registry's checks and transforms applied as the feature-service applies them."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.offline import asof_rows, historical_features, main, read_source, serve_stored

TS = pa.timestamp("ms", tz="UTC")


def _stored(registry, entity, cols, rows):
    """Every batch attribute of ``entity``'s features: numbers, strings
    (categoricals) and lists (embeddings); absent values are null."""
    kinds = (
        (registry.features, pa.float64()),
        (registry.categorical, pa.string()),
        (registry.embeddings, pa.list_(pa.float64())),
    )
    for features, typ in kinds:
        for a in sorted({f.attribute for f in features if f.entity == entity and f.source == "dynamodb"}):
            cols[a] = pa.array([r[2].get(a) for r in rows], type=typ)
    return pa.table(cols)


def users(registry, rows):
    """A user batch file: (user_id, ms, {attribute: value}); absent attributes are null."""
    cols = {"user_id": [r[0] for r in rows], "event_timestamp": pa.array([r[1] for r in rows], type=TS)}
    return _stored(registry, "user", cols, rows)


def ads(registry, rows):
    cols = {"ad_id": pa.array([r[0] for r in rows], type=pa.int64()), "event_timestamp": pa.array([r[1] for r in rows], type=TS)}
    return _stored(registry, "ad", cols, rows)


def entities(rows, **extra):
    t = {
        "user_id": [r[0] for r in rows],
        "ad_id": pa.array([r[1] for r in rows], type=pa.int64()),
        "event_timestamp": pa.array([r[2] for r in rows], type=TS),
    }
    t.update(extra)
    return pa.table(t)


def column(got, name):
    return got.matrix[:, got.names.index(name)]


def test_a_feature_that_changes_over_time_is_read_as_of_each_moment_never_later(registry):
    src = users(registry, [("u1", 100, {"ctr_30d": 0.1}), ("u1", 200, {"ctr_30d": 0.5}), ("u1", 300, {"ctr_30d": 0.9}),
                           ("u2", 150, {"ctr_30d": 0.7})])
    q = entities([("u1", 1, 50), ("u1", 1, 100), ("u1", 1, 199), ("u1", 1, 250), ("u1", 1, 10_000), ("u2", 1, 149), ("u3", 1, 500)])
    got = historical_features(q, registry, src, None)
    default = registry.defaults["user_ctr_30d"]
    expect = np.array([default, 0.1, 0.1, 0.5, 0.9, default, default], dtype=np.float32)
    assert np.array_equal(column(got, "user_ctr_30d"), expect)
    assert got.missing["user_ctr_30d"] == 3  # before u1's first row, before u2's, and u3 unknown


def test_no_leakage_on_random_histories(registry):
    rng = np.random.default_rng(5)
    hist = []
    for i in range(3000):
        hist.append((f"u{rng.integers(50)}", int(rng.integers(0, 10_000)), {"ctr_30d": float(i) / 3000}))
    src = users(registry, hist)
    qs = [(f"u{rng.integers(60)}", 1, int(rng.integers(0, 11_000))) for _ in range(2000)]
    got = column(historical_features(entities(qs), registry, src, None), "user_ctr_30d")
    for (uid, _, t), v in zip(qs, got):
        # The value as of t: the latest row at or before t, the last in file order on a tie.
        best = None
        for j, (hu, ht, vals) in enumerate(hist):
            if hu == uid and ht <= t and (best is None or ht >= hist[best][1]):
                best = j
        want = registry.defaults["user_ctr_30d"] if best is None else np.float32(hist[best][2]["ctr_30d"])
        assert v == np.float32(want), (uid, t)


def test_asof_ties_take_the_last_row_in_file_order_like_the_backfill():
    idx = asof_rows(np.array(["a", "a", "b"], dtype=object), np.array([5, 5, 1]), np.array(["a", "b", "c"], dtype=object), np.array([5, 0, 9]))
    assert idx.tolist() == [1, -1, -1]


def test_stored_values_are_checked_and_transformed_as_served(registry):
    f = next(f for f in registry.features if f.name == "user_sessions_7d_log")
    raw = np.array([0.0, 3.0, 1e7, np.nan, 5.0], dtype=np.float32)  # 1e7 is outside range
    present = np.array([True, True, True, True, False])
    out, missing, invalid = serve_stored(f, raw, present)
    assert out.tolist() == [0.0, np.float32(math.log1p(3.0)), f.default, f.default, f.default]
    assert (missing, invalid) == (1, 2)
    b = next(f for f in registry.features if f.name == "ad_quality_bucket")
    out, _, _ = serve_stored(b, np.array([0.0, 0.25, 0.6, 1.0], dtype=np.float32), np.ones(4, dtype=bool))
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
    # The scalar twin agrees.
    assert all(f.serve(v) == f.stored(v)[0] for v in (0.0, 3.0, 999.5))


def test_request_realtime_and_coppa_columns(registry):
    src = users(registry, [("u1", 1, {"ctr_30d": 0.3, "sessions_7d": 7.0})])
    q = entities(
        [("u1", 1, 10), ("u1", 1, 10)],
        device=["mobile", "desktop"],
        placement=["feed_top", "sidebar"],
        coppa=[False, True],
        user_impressions_1h=pa.array([4.0, 9.0], type=pa.float32()),
    )
    got = historical_features(q, registry, src, None)
    assert column(got, "ctx_device_mobile").tolist() == [1.0, 0.0]
    assert column(got, "ctx_placement_sidebar").tolist() == [0.0, 1.0]
    # COPPA: personal features are defaults, whatever is stored or logged.
    assert column(got, "user_ctr_30d").tolist() == [np.float32(0.3), np.float32(registry.defaults["user_ctr_30d"])]
    assert column(got, "user_impressions_1h").tolist() == [4.0, registry.defaults["user_impressions_1h"]]
    assert column(got, "user_sessions_7d_log")[0] == np.float32(math.log1p(7.0))
    assert got.missing["user_ctr_30d"] == 0 and got.missing["ad_ctr_7d"] == 2


def test_bad_sources_and_entities_are_refused_naming_the_column(registry, tmp_path):
    bad = users(registry, [("u1", 1, {})]).append_column("colour", pa.array([1.0]))
    p = tmp_path / "u.parquet"
    pq.write_table(bad, p)
    with pytest.raises(TrainerError, match="column colour: not a batch attribute"):
        read_source(p, "user", registry)
    pq.write_table(users(registry, [("u1", 1, {})]).drop_columns(["ctr_30d"]), p)
    with pytest.raises(TrainerError, match="no ctr_30d column"):
        read_source(p, "user", registry)
    with pytest.raises(TrainerError, match="row 1: an ad id is a positive integer"):
        historical_features(entities([("u", 1, 1), ("u", -4, 1)]), registry)
    with pytest.raises(TrainerError, match="no event_timestamp"):
        historical_features(pa.table({"user_id": ["u"], "ad_id": [1]}), registry)
    src = users(registry, [("", 1, {})])
    with pytest.raises(TrainerError, match="column user_id, row 0"):
        historical_features(entities([("u", 1, 1)]), registry, src)
    # An in-memory source is checked as a file is (it used to be a bare KeyError).
    src = users(registry, [("u", 1, {"ctr_30d": 0.5})])
    with pytest.raises(TrainerError, match="user source: no ctr_30d column"):
        historical_features(entities([("u", 1, 1)]), registry, src.drop_columns(["ctr_30d"]))
    with pytest.raises(TrainerError, match="ad source: no ad_id column"):
        historical_features(entities([("u", 1, 1)]), registry, None, src)


def test_cli_writes_features_in_registry_order(registry, tmp_path, capsys):
    pq.write_table(users(registry, [("u1", 5, {"ctr_30d": 0.25})]), tmp_path / "u.parquet")
    pq.write_table(ads(registry, [(7, 5, {"quality_score": 0.8, "ctr_7d": 0.05})]), tmp_path / "a.parquet")
    pq.write_table(entities([("u1", 7, 6)]), tmp_path / "e.parquet")
    rc = main(["--entities", str(tmp_path / "e.parquet"), "--user-features", str(tmp_path / "u.parquet"),
               "--ad-features", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "o.parquet")])
    assert rc == 0
    out = pq.read_table(tmp_path / "o.parquet")
    typed = [f.name for f in (*registry.categorical, *registry.embeddings)]
    assert out.column_names[3:] == registry.names + typed, "dense columns in registry order, then the typed ones"
    assert out.column("ad_quality_bucket").to_pylist() == [3.0]
    assert out.column("user_ctr_30d").to_pylist() == [np.float32(0.25)]
    assert main(["--entities", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "x")]) == 2
    assert "not Parquet" in capsys.readouterr().err
