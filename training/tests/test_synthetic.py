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
