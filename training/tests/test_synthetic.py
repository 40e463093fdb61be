import numpy as np
import pyarrow.parquet as pq

from adserve_trainer.schema import ROW_SCHEMA, conform
from adserve_trainer.synthetic import generate, write_parquet


def test_rows_match_schema_exactly(registry):
    t = generate(600, 3, registry)
    assert t.schema.equals(ROW_SCHEMA, check_metadata=True)
    assert [f.name for f in t.schema] == [f.name for f in ROW_SCHEMA]
    for f in ROW_SCHEMA:
        assert t.schema.field(f.name).type == f.type, f.name
        if not f.nullable:
            assert t.column(f.name).null_count == 0, f.name
    t.validate(full=True)


def test_parquet_roundtrip_validates(registry, tmp_path):
    t = generate(300, 5, registry)
    p = write_parquet(t, tmp_path / "rows.parquet")
    back = conform(pq.read_table(p), str(p))
    assert back.equals(t)


def test_generator_is_deterministic(registry):
    a = generate(2000, 42, registry)
    b = generate(2000, 42, registry)
    c = generate(2000, 43, registry)
    assert a.equals(b)
    assert not a.equals(c)


def test_plausible_distributions(registry):
    t = generate(20000, 7, registry)
    rate = np.mean(t.column("label").to_numpy())
    assert 0.02 <= rate <= 0.06
    rows = t.slice(0, 3000).to_pylist()
    for r in rows:
        assert len(r["feature_names"]) == len(r["feature_values"])
        assert (r["clicked_at"] is not None) == (r["label"] == 1)
        assert r["joined_at"] > r["served_at"]
        if r["coppa"]:
            # COPPA: no user id and no personal features logged.
            assert r["user_id"] == ""
            personal = {f.name for f in registry.features if f.personal}
            assert not personal & set(r["feature_names"])
        else:
            assert r["feature_names"] == registry.names
    assert any(r["coppa"] for r in rows)


def test_stored_categoricals_are_drawn_per_entity_and_blank_for_coppa(registry):
    # The model must see every id the simulator's world serves (the demo's
    # topics): an id no training row held is served as missing instead.
    from adserve_trainer.synthetic import STORED_VOCABULARY

    t = generate(600, 4, registry)
    names = t.column("categorical_names")[0].as_py()
    ids = np.array(t.column("categorical_ids").to_pylist())
    coppa = t.column("coppa").to_numpy(zero_copy_only=False)
    by = {f.name: f for f in registry.categorical}
    topic = names.index("ad_topic_id")
    assert set(ids[:, topic]) == {by["ad_topic_id"].category_id(v) for v in STORED_VOCABULARY}
    ad_ids = t.column("ad_id").to_numpy()
    for ad in np.unique(ad_ids)[:20]:
        assert len(set(ids[ad_ids == ad, topic])) == 1, "one topic per ad"
    for name, f in by.items():
        k = names.index(name)
        if f.personal:
            assert (ids[coppa, k] == 0).all() and (ids[~coppa, k] != 0).all(), name
