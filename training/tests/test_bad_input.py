import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.schema import ROW_SCHEMA
from adserve_trainer.synthetic import generate
from adserve_trainer.train import main, run

from conftest import TRAINING_DIR


def _train(path, tmp_path):
    return run(["--data", str(path), "--out", str(tmp_path / "out")])


def test_missing_path(tmp_path):
    with pytest.raises(TrainerError, match="does not exist"):
        _train(tmp_path / "nope.parquet", tmp_path)


def test_empty_dataset(tmp_path):
    pq.write_table(ROW_SCHEMA.empty_table(), tmp_path / "empty.parquet")
    with pytest.raises(TrainerError, match="no rows"):
        _train(tmp_path / "empty.parquet", tmp_path)


def test_empty_directory(tmp_path):
    (tmp_path / "rows").mkdir()
    with pytest.raises(TrainerError, match="no rows"):
        _train(tmp_path / "rows", tmp_path)


@pytest.mark.parametrize("column", ["label", "feature_values", "served_at"])
def test_file_missing_a_column(tmp_path, registry, column):
    t = generate(200, 1, registry)
    pq.write_table(t.drop_columns([column]), tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match=f"missing column '{column}'"):
        _train(tmp_path / "rows.parquet", tmp_path)


def test_mistyped_column(tmp_path, registry):
    t = generate(200, 1, registry)
    i = t.schema.get_field_index("label")
    t = t.set_column(i, "label", pc.cast(t.column("label"), pa.string()))
    pq.write_table(t, tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match="column 'label' has type string"):
        _train(tmp_path / "rows.parquet", tmp_path)


def test_all_one_class(tmp_path, registry):
    t = generate(500, 1, registry)
    i = t.schema.get_field_index("label")
    t = t.set_column(i, ROW_SCHEMA.field("label"), pa.array([0] * t.num_rows, pa.int8()))
    pq.write_table(t, tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match="all one class"):
        _train(tmp_path / "rows.parquet", tmp_path)
    assert not (tmp_path / "out").exists()


def test_main_prints_one_line_error(tmp_path, capsys):
    assert main(["--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_exit_code(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(TRAINING_DIR))
    r = subprocess.run(
        [sys.executable, "-m", "adserve_trainer.train", "--data", str(tmp_path / "missing")],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and "does not exist" in r.stderr


def test_version_1_rows_without_the_auction_columns_still_load(tmp_path, registry):
    from adserve_trainer.data import load_rows

    t = generate(60, 3, registry)
    old = t.drop_columns(["advertiser_id", "price_cpm_micros", "propensity", "explored"])
    pq.write_table(old, tmp_path / "v1.parquet")
    rows = load_rows(tmp_path / "v1.parquet")
    assert rows.schema == ROW_SCHEMA
    assert rows.column("propensity").to_pylist() == [1.0] * 60
    assert rows.column("explored").to_pylist() == [False] * 60
    # A column of the original schema is still required.
    pq.write_table(t.drop_columns(["label"]), tmp_path / "bad.parquet")
    with pytest.raises(TrainerError, match="missing column 'label'"):
        load_rows(tmp_path / "bad.parquet")


def test_version_4_rows_without_a_score_level_load_as_unspecified(tmp_path, registry):
    from adserve_trainer.data import load_rows

    t = generate(30, 3, registry)
    pq.write_table(t.drop_columns(["score_level"]), tmp_path / "v4.parquet")
    rows = load_rows(tmp_path / "v4.parquet")
    assert rows.schema == ROW_SCHEMA
    assert rows.column("score_level").to_pylist() == ["unspecified"] * 30


def test_version_3_files_name_features_in_the_footer_and_only_final_rows_train(tmp_path, registry):
    """The label-joiner's schema 3: names once per file, streaming rows beside final ones."""
    import json

    from adserve_trainer.data import load_rows
    from adserve_trainer.schema import FEATURE_NAMES_KEY

    t = generate(80, 3, registry)
    t = t.filter(pc.invert(t.column("coppa")))  # one feature list per file
    names = t.column("feature_names")[0].as_py()
    provisional = t.slice(0, 5)
    provisional = provisional.set_column(
        provisional.schema.get_field_index("row_kind"), "row_kind", pa.array(["provisional"] * 5)
    ).set_column(provisional.schema.get_field_index("is_final"), "is_final", pa.array([False] * 5)).cast(t.schema)
    on_disk = pa.concat_tables([t, provisional]).drop_columns(["feature_names"])
    on_disk = on_disk.replace_schema_metadata({FEATURE_NAMES_KEY: json.dumps(names).encode()})
    hour = tmp_path / "date=2026-12-01" / "hour=10"
    hour.mkdir(parents=True)
    pq.write_table(on_disk, hour / "rows-1.parquet")

    rows = load_rows(tmp_path)
    assert rows.num_rows == t.num_rows, "provisional rows are not training rows"
    assert rows.column("feature_names").to_pylist() == [names] * t.num_rows
    assert "date" not in rows.schema.names, "hive directories do not become columns"
    assert load_rows(tmp_path, final_only=False).num_rows == t.num_rows + 5

    broken = on_disk.replace_schema_metadata({FEATURE_NAMES_KEY: b"[1, 2"})
    pq.write_table(broken, tmp_path / "broken.parquet")
    with pytest.raises(TrainerError, match="not JSON"):
        load_rows(tmp_path / "broken.parquet")


def test_downsampled_rows_carry_their_keep_rate_into_the_manifest(tmp_path, registry):
    from adserve_trainer.train import run

    t = generate(400, 5, registry)
    i = t.schema.get_field_index("keep_rate")
    half = t.set_column(i, "keep_rate", pa.array([0.5] * t.num_rows, pa.float32())).cast(t.schema)
    pq.write_table(half, tmp_path / "half.parquet")
    manifest = run(["--data", str(tmp_path / "half.parquet"), "--out", str(tmp_path / "m")])
    assert manifest["calibration"] == {"keep_rate": 0.5, "mapping": {"method": "none"}}

    mixed = pa.concat_tables([half, t])
    pq.write_table(mixed, tmp_path / "mixed.parquet")
    with pytest.raises(TrainerError, match="different negative keep rates"):
        run(["--data", str(tmp_path / "mixed.parquet"), "--out", str(tmp_path / "m2")])


def _set(t, name, values):
    i = t.schema.get_field_index(name)
    return t.set_column(i, ROW_SCHEMA.field(name), pa.array(values, ROW_SCHEMA.field(name).type))


def test_one_class_in_the_training_period_is_refused(tmp_path, registry):
    """The split is by time: clicks only in the last fifth leave the training rows one class."""
    t = generate(1000, 1, registry)
    labels = [0] * 800 + [1, 0] * 100
    pq.write_table(_set(t, "label", labels), tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match="training split has labels of one class only"):
        _train(tmp_path / "rows.parquet", tmp_path)
    assert not (tmp_path / "out").exists()


def test_no_clicks_in_the_evaluation_period_is_refused(tmp_path, registry):
    t = generate(1000, 1, registry)
    labels = [1, 0, 0, 0] * 225 + [0] * 100
    pq.write_table(_set(t, "label", labels), tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match="evaluation split has labels of one class only"):
        _train(tmp_path / "rows.parquet", tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("propensity", 0.0, "'propensity' must be in \\(0, 1\\]"),
        ("propensity", float("nan"), "'propensity' must be in \\(0, 1\\]"),
        ("weight", -1.0, "'weight' must be finite and >= 0"),
    ],
)
def test_bad_weights_are_refused(tmp_path, registry, column, value, message):
    t = generate(300, 2, registry)
    values = t.column(column).to_pylist()
    values[5] = value
    pq.write_table(_set(t, column, values), tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match=message):
        _train(tmp_path / "rows.parquet", tmp_path)
    assert not (tmp_path / "out").exists()


def test_zero_total_weight_is_refused(tmp_path, registry):
    t = generate(300, 2, registry)
    pq.write_table(_set(t, "weight", [0.0] * 300), tmp_path / "rows.parquet")
    with pytest.raises(TrainerError, match="weights sum to 0"):
        _train(tmp_path / "rows.parquet", tmp_path)


def test_rows_are_weighted_by_clipped_inverse_propensity(registry):
    from adserve_trainer.data import row_weights

    t = generate(4, 2, registry)
    t = _set(t, "propensity", [1.0, 0.5, 0.01, 0.95])
    t = _set(t, "explored", [False, True, True, False])
    t = _set(t, "weight", [1.0, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(row_weights(t), [1.0, 2.0, 5.0, 1 / 0.95], rtol=1e-6)
    np.testing.assert_allclose(row_weights(t, ips_clip=0), [1.0, 1.0, 0.5, 1.0])
