"""Typed registry features (categorical ids, crosses, embeddings): parsed and
validated like adserve_features does, hashed with the same function."""

import json

import numpy as np
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.registry import fnv1a64, load_registry

HEAD = """
[tables]
user = "u"
ad = "a"
[redis]
key_prefix = "rt"
[request]
devices = ["mobile", "desktop"]
[label]
window_seconds = 60

[[feature]]
name = "dense_one"
entity = "ad"
source = "dynamodb"
attribute = "x"
default = 0.0
range = [0.0, 1.0]
owner = "t"
description = ""
"""

PLACEMENT = """
[[feature]]
name = "ctx_placement"
entity = "context"
source = "request"
attribute = "placement"
type = "categorical"
buckets = 64
default = 0
owner = "t"
description = ""
"""

CATEGORY = """
[[feature]]
name = "ad_category"
entity = "ad"
source = "dynamodb"
attribute = "category"
type = "categorical"
buckets = 1000
default = 0
owner = "t"
description = ""
"""

CROSS = """
[[feature]]
name = "placement_x_category"
entity = "ad"
source = "cross"
attribute = "-"
type = "categorical"
cross = ["ctx_placement", "ad_category"]
buckets = 4096
default = 0
owner = "t"
description = ""
"""

EMBEDDING = """
[[feature]]
name = "ad_embedding"
entity = "ad"
source = "dynamodb"
attribute = "embedding"
type = "embedding"
dim = 4
default = 0.0
range = [-10.0, 10.0]
owner = "t"
description = ""
"""


def load(tmp_path, text):
    p = tmp_path / "features.toml"
    p.write_text(text)
    return load_registry(p)


def test_fnv1a64_is_the_published_function():
    # The FNV test vectors (draft-eastlake-fnv); adserve_features tests the same ones.
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_typed_columns_are_kept_apart_in_registry_order(tmp_path):
    r = load(tmp_path, HEAD + PLACEMENT + CATEGORY + CROSS + EMBEDDING)
    assert [f.name for f in r.features] == ["dense_one"]
    assert [f.name for f in r.categorical] == ["ctx_placement", "ad_category", "placement_x_category"]
    assert [f.name for f in r.embeddings] == ["ad_embedding"]
    placement, category, cross = r.categorical
    assert placement.category_id(None) == 0 and placement.category_id("") == 0
    assert placement.category_id("feed_top") == 1 + fnv1a64(b"feed_top") % 63
    assert 1 <= category.category_id("travel") < 1000
    assert cross.cross == ("ctx_placement", "ad_category")
    assert cross.cross_id("feed_top", "travel") == 1 + fnv1a64(b"feed_top\x1ftravel") % 4095
    assert cross.cross_id("feed_top", None) == 0
    emb = r.embeddings[0]
    v, status = emb.embedding([0.5, -1.0, 2.0, 0.25])
    assert status == "ok" and v.dtype == np.float32 and v.tolist() == [0.5, -1.0, 2.0, 0.25]
    assert emb.embedding(None)[1] == "missing"
    for bad in ([1.0, 2.0], [0.0, 0.0, 0.0, float("nan")], [0.0, 0.0, 0.0, 11.0]):
        v, status = emb.embedding(bad)
        assert status == "invalid" and v.tolist() == [0.0] * 4, bad


@pytest.mark.parametrize(
    "text, why",
    [
        (PLACEMENT.replace('type = "categorical"', 'type = "sparse"'), "unknown type"),
        (PLACEMENT.replace("buckets = 64", "buckets = 1"), "buckets"),
        (PLACEMENT.replace("buckets = 64\n", ""), "buckets"),
        (PLACEMENT.replace("default = 0", "default = 3"), "must be 0"),
        (PLACEMENT.replace('attribute = "placement"', 'attribute = "user_agent"'), "request categoricals"),
        (EMBEDDING.replace("dim = 4", "dim = 0"), "dim"),
        (EMBEDDING.replace('source = "dynamodb"', 'source = "redis"'), "stored features"),
        (PLACEMENT + CATEGORY + CROSS.replace('entity = "ad"', 'entity = "context"'), "has entity 'ad'"),
        (PLACEMENT + CROSS.replace('"ad_category"', '"missing"'), "defined above"),
        (CATEGORY + PLACEMENT + CROSS.replace('cross = ["ctx_placement", "ad_category"]', 'cross = ["ad_category", "ad_category"]'), "two different"),
        (PLACEMENT.replace("buckets = 64", "buckets = 64\ndim = 3"), "`dim` is for embedding"),
    ],
)
def test_typed_mistakes_are_refused_with_the_reason(tmp_path, text, why):
    with pytest.raises(TrainerError, match=why):
        load(tmp_path, HEAD + text)


def test_typed_columns_are_read_from_joiner_files_by_name(tmp_path):
    """A schema-4 file stores typed names once, in its footer (as the
    label-joiner writes them); the trainer rebuilds the per-row columns and
    places ids and vectors by name, missing ones as 0 / the default."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adserve_trainer.data import build_typed, load_rows
    from adserve_trainer.registry import load_registry as load_real
    from adserve_trainer.synthetic import generate

    r = load(tmp_path, HEAD + PLACEMENT + CATEGORY + CROSS + EMBEDDING)
    t = generate(6, 1, load_real())
    typed = {
        "categorical_ids": pa.array([[5, 7]] * 5 + [[9, 7]], pa.list_(pa.int64())),
        "embedding_values": pa.array([[0.5, -1.0, 2.0, 0.25]] * 6, pa.list_(pa.float32())),
    }
    per_row = ("categorical_names", "embedding_names", "embedding_dims", "feature_names")
    keep = [c for c in t.schema.names if c not in per_row and c not in typed]
    t = t.select(keep)
    for name, column in typed.items():
        t = t.append_column(name, column)
    footer = {
        b"adserve.feature_names": json.dumps(["dense_one"]).encode(),
        b"adserve.categorical_names": json.dumps(["ad_category", "unknown_one"]).encode(),
        b"adserve.embedding_names": json.dumps(["ad_embedding"]).encode(),
        b"adserve.embedding_dims": b"[4]",
    }
    t = t.replace_schema_metadata(footer)
    path = tmp_path / "rows.parquet"
    pq.write_table(t, path)
    rows = load_rows(path)
    assert rows.column("categorical_names").to_pylist()[0] == ["ad_category", "unknown_one"]
    ids, vectors = build_typed(rows, r)
    assert ids.shape == (6, 3) and vectors.shape == (6, 4)
    assert ids[:, 1].tolist() == [5] * 5 + [9], "placed by name: ad_category is the second column"
    assert ids[:, 0].tolist() == [0] * 6 and ids[:, 2].tolist() == [0] * 6, "absent: the missing bucket"
    assert vectors[0].tolist() == [0.5, -1.0, 2.0, 0.25]


def test_older_files_carry_no_typed_columns(tmp_path):
    import pyarrow.parquet as pq

    from adserve_trainer.data import build_typed, load_rows
    from adserve_trainer.registry import load_registry as load_real
    from adserve_trainer.synthetic import generate

    t = generate(4, 2, load_real())
    old = t.select([c for c in t.schema.names if not c.startswith(("categorical_", "embedding_"))])
    pq.write_table(old, tmp_path / "old.parquet")
    rows = load_rows(tmp_path / "old.parquet")
    assert rows.column("categorical_ids").to_pylist() == [[]] * 4
    r = load(tmp_path, HEAD + PLACEMENT + EMBEDDING)
    ids, vectors = build_typed(rows, r)
    assert ids.tolist() == [[0]] * 4 and vectors.tolist() == [[0.0] * 4] * 4


def test_the_registrys_categoricals_hash_to_the_pinned_ids():
    # The same numbers are pinned in adserve_features' Rust tests
    # (`the_registrys_categoricals_hash_to_the_pinned_ids`): the trainer and
    # the feature-service give the same ids for the same raw values.
    by = {f.name: f for f in load_registry().categorical}
    assert (
        by["ctx_placement_id"].category_id("feed_top"),
        by["ctx_device_id"].category_id("mobile"),
        by["ctx_surface_id"].category_id("home"),
    ) == (96, 4, 80)
    assert by["ctx_placement_x_device"].cross_id("feed_top", "mobile") == 914
    assert (by["ad_topic_id"].category_id("travel"), by["user_top_interest_id"].category_id("games")) == (32, 49)
    assert by["user_interest_x_ad_topic"].cross_id("games", "travel") == 493


def test_point_in_time_retrieval_serves_typed_batch_features_as_of_each_moment(tmp_path):
    """offline.historical_features: a stored categorical and embedding as of
    each row's time, hashed and checked as the feature-service serves them."""
    import pyarrow as pa

    from adserve_trainer.offline import historical_features, read_source, with_features

    registry = load(tmp_path, HEAD + PLACEMENT + CATEGORY + CROSS + EMBEDDING)
    ts = pa.timestamp("ms", tz="UTC")
    ads = pa.table({
        "ad_id": pa.array([7, 7, 8], type=pa.int64()),
        "event_timestamp": pa.array([100, 200, 100], type=ts),
        "x": pa.array([0.5, 0.6, None], type=pa.float64()),
        "category": ["shoes", "boots", None],
        # 8's vector has an element outside range: refused whole.
        "embedding": pa.array([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 11]], type=pa.list_(pa.float32())),
    })
    path = tmp_path / "ads.parquet"
    import pyarrow.parquet as pq

    pq.write_table(ads, path)
    source = read_source(path, "ad", registry)
    entities = pa.table({
        "user_id": ["u", "u", "u", "u"],
        "ad_id": pa.array([7, 7, 8, 9], type=pa.int64()),
        "event_timestamp": pa.array([150, 250, 150, 150], type=ts),
        "placement": ["feed", "feed", "", "feed"],
    })
    got = historical_features(entities, registry, None, source)
    placement, category, cross = registry.categorical
    (emb,) = registry.embeddings
    ids = got.categorical_ids
    assert ids[:, 1].tolist() == [category.category_id("shoes"), category.category_id("boots"), 0, 0], "as of each time"
    assert ids[:, 0].tolist() == [placement.category_id("feed")] * 2 + [0, placement.category_id("feed")]
    assert ids[:, 2].tolist() == [cross.cross_id("feed", "shoes"), cross.cross_id("feed", "boots"), 0, 0]
    vectors = got.embeddings["ad_embedding"]
    assert vectors.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert (got.missing["ad_category"], got.missing["ctx_placement"]) == (2, 1)
    assert (got.missing["ad_embedding"], got.invalid["ad_embedding"]) == (1, 1)
    out = with_features(entities, got)
    assert out.column("ad_category").type == pa.int64()
    assert out.column("ad_embedding").type == pa.list_(pa.float32(), 4)
    assert out.column("ad_embedding").to_pylist()[1] == [5, 6, 7, 8]


def test_a_batch_file_with_a_typed_column_of_the_wrong_type_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adserve_trainer.offline import read_source

    registry = load(tmp_path, HEAD + CATEGORY + EMBEDDING)
    base = {"ad_id": pa.array([1], type=pa.int64()), "event_timestamp": pa.array([1], type=pa.int64()), "x": [0.5]}
    pq.write_table(pa.table({**base, "category": [7], "embedding": pa.array([[1.0] * 4])}), tmp_path / "a.parquet")
    with pytest.raises(TrainerError, match="column category: a string"):
        read_source(tmp_path / "a.parquet", "ad", registry)
    pq.write_table(pa.table({**base, "category": ["c"], "embedding": [0.5]}), tmp_path / "b.parquet")
    with pytest.raises(TrainerError, match="column embedding: a list of 4 numbers"):
        read_source(tmp_path / "b.parquet", "ad", registry)
