import numpy as np
import pyarrow as pa
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.data import build_matrix
from adserve_trainer.schema import ROW_SCHEMA
from adserve_trainer.synthetic import generate


def _with_features(table, names, values):
    i = ROW_SCHEMA.get_field_index
    t = table.set_column(i("feature_names"), "feature_names", pa.array(names, ROW_SCHEMA.field("feature_names").type))
    return t.set_column(i("feature_values"), "feature_values", pa.array(values, ROW_SCHEMA.field("feature_values").type))


def test_shuffled_features_give_same_matrix(registry):
    t = generate(400, 1, registry)
    X, y, _ = build_matrix(t, registry)
    rng = np.random.default_rng(0)
    names, values = [], []
    for ns, vs in zip(t.column("feature_names").to_pylist(), t.column("feature_values").to_pylist()):
        perm = rng.permutation(len(ns))
        names.append([ns[k] for k in perm])
        values.append([vs[k] for k in perm])
    X2, y2, _ = build_matrix(_with_features(t, names, values), registry)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)


def test_partial_rows_get_registry_default_by_name(registry):
    t = generate(300, 2, registry)
    X, _, _ = build_matrix(t, registry)
    defaults = np.array([registry.defaults[n] for n in registry.names], dtype=np.float32)
    rng = np.random.default_rng(1)
    names, values, expected = [], [], X.copy()
    for r, (ns, vs) in enumerate(zip(t.column("feature_names").to_pylist(), t.column("feature_values").to_pylist())):
        keep = rng.random(len(ns)) < 0.5
        kept = [k for k in rng.permutation(len(ns)) if keep[k]]
        names.append([ns[k] for k in kept])
        values.append([vs[k] for k in kept])
        for k in range(len(ns)):
            if not keep[k]:
                expected[r, registry.names.index(ns[k])] = defaults[registry.names.index(ns[k])]
    X2, _, stats = build_matrix(_with_features(t, names, values), registry)
    np.testing.assert_array_equal(X2, expected)
    assert all(0 < v < 1 for v in stats["defaulted_fraction"].values())


def test_empty_lists_unknown_names_and_null_values(registry):
    t = generate(3, 4, registry).slice(0, 3)
    names = [[], ["not_a_feature", "ad_quality_score"], ["ad_ctr_7d"]]
    values = [[], [9.0, 0.75], [None]]
    X, _, stats = build_matrix(_with_features(t, names, values), registry)
    defaults = np.array([registry.defaults[n] for n in registry.names], dtype=np.float32)
    np.testing.assert_array_equal(X[0], defaults)
    exp1 = defaults.copy()
    exp1[registry.names.index("ad_quality_score")] = 0.75
    np.testing.assert_array_equal(X[1], exp1)
    np.testing.assert_array_equal(X[2], defaults)  # null value -> default
    assert stats["unknown_features"] == ["not_a_feature"]


def test_misaligned_names_and_values_rejected(registry):
    t = generate(2, 4, registry).slice(0, 2)
    with pytest.raises(TrainerError, match="different lengths"):
        build_matrix(_with_features(t, [["ad_ctr_7d"], ["ad_ctr_7d"]], [[0.1], [0.1, 0.2]]), registry)


def test_the_registry_declares_a_range_for_every_stored_feature(registry):
    """The trainer reads the same `range` the feature-service enforces."""
    for f in registry.features:
        assert (f.range is not None) == (f.source != "request"), f.name
        if f.range is not None:
            # With a transform the default is in served units, not stored ones.
            assert f.transform is not None or f.accepts(f.default)
            assert f.accepts(f.range[0]) and f.accepts(f.range[1])
            # Compared as f32, as the feature-service compares: 1e9 + 1 is 1e9.
            assert not f.accepts(float("nan")) and not f.accepts(f.range[1] * 1.01 + 1.0)


@pytest.mark.parametrize(
    "rng, why",
    [("[1.0, 0.0]", "min <= max"), ("[0.0]", "min <= max"), ("[0.0, 0.1]", "outside range"), ('["a", 1.0]', "min <= max")],
)
def test_a_malformed_range_is_refused_naming_the_feature(tmp_path, registry, rng, why):
    from adserve_trainer.registry import load_registry

    text = registry.path.read_text().replace("default = 0.5\nrange = [0.0, 1.0]", f"default = 0.5\nrange = {rng}", 1)
    assert text != registry.path.read_text(), "ad_quality_score's entry is the one rewritten"
    p = tmp_path / "features.toml"
    p.write_text(text)
    with pytest.raises(TrainerError, match=f"ad_quality_score.*{why}"):
        load_registry(p)


def test_every_user_feature_is_personal_whatever_the_file_says(tmp_path, registry):
    # As adserve_features::FeatureRegistry::parse: a COPPA request names no
    # user, so the feature-service reads no user feature for it; offline
    # retrieval and the synthetic rows must blank every one too.
    from adserve_trainer.registry import load_registry

    everything = {f.name: f for f in [*registry.features, *registry.categorical, *registry.embeddings]}
    for f in everything.values():
        # A cross is personal when an operand is (the user x ad-topic cross).
        want = any(everything[op].personal for op in f.cross) if f.cross else f.entity == "user"
        assert f.personal == want, f.name
    text = registry.path.read_text()
    unmarked = text.replace('attribute = "ctr_30d"\ndefault = 0.02\nrange = [0.0, 1.0]\npersonal = true\n',
                            'attribute = "ctr_30d"\ndefault = 0.02\nrange = [0.0, 1.0]\n', 1)
    assert unmarked != text, "user_ctr_30d's entry is the one rewritten"
    p = tmp_path / "features.toml"
    p.write_text(unmarked)
    assert next(f for f in load_registry(p).features if f.name == "user_ctr_30d").personal


def test_a_personal_stored_ad_feature_is_refused(tmp_path, registry):
    # As adserve_features: only a cross (of a personal feature) may be a personal ad feature.
    from adserve_trainer.registry import load_registry

    text = registry.path.read_text()
    marked = text.replace('attribute = "ctr_7d"\n', 'attribute = "ctr_7d"\npersonal = true\n', 1)
    assert marked != text, "ad_ctr_7d's entry is the one rewritten"
    p = tmp_path / "features.toml"
    p.write_text(marked)
    with pytest.raises(TrainerError, match="ad_ctr_7d.*cannot be personal"):
        load_registry(p)
