import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adserve_trainer import calibration as C
from adserve_trainer import metrics as M
from adserve_trainer.synthetic import generate
from adserve_trainer.train import run


def test_apply_matches_the_rust_ranker():
    """The cases of manifest.rs's downsampling_correction_and_mappings_calibrate_as_defined."""
    c = {"keep_rate": 0.1, "mapping": {"method": "none"}}
    assert C.apply(c, np.array([0.5]))[0] == pytest.approx(0.1 / 1.1, abs=1e-9)
    assert C.apply(c, np.array([0.0]))[0] == 0.0
    assert C.apply(c, np.array([1.0]))[0] == pytest.approx(1.0)
    ident = {"keep_rate": 1.0, "mapping": {"method": "platt", "a": 1.0, "b": 0.0}}
    assert C.apply(ident, np.array([0.3]))[0] == pytest.approx(0.3)
    shift = {"keep_rate": 1.0, "mapping": {"method": "platt", "a": 1.0, "b": float(np.log(0.5))}}
    assert C.apply(shift, np.array([0.5]))[0] == pytest.approx(1.0 / 3.0)
    iso = {"keep_rate": 1.0, "mapping": {"method": "isotonic", "x": [0.1, 0.5, 0.9], "y": [0.05, 0.4, 0.8]}}
    got = C.apply(iso, np.array([0.3, 0.01, 0.95, 0.5]))
    np.testing.assert_allclose(got, [0.225, 0.05, 0.8, 0.4], atol=1e-12)
    assert C.apply(None, np.array([0.25]))[0] == 0.25


def test_platt_recovers_a_known_distortion():
    rng = np.random.default_rng(0)
    q = rng.uniform(0.01, 0.3, 50_000)
    a, b = 0.7, -0.4
    truth = 1.0 / (1.0 + np.exp(-(a * np.log(q / (1 - q)) + b)))
    y = (rng.random(q.size) < truth).astype(int)
    m = C.fit_platt(q, y, np.ones(q.size))
    assert m["method"] == "platt"
    assert m["a"] == pytest.approx(a, abs=0.06) and m["b"] == pytest.approx(b, abs=0.15)
    assert M.logloss(y, C.apply_mapping(m, q)) < M.logloss(y, q)


def _brute_isotonic(q, y, w):
    """Reference: weighted isotonic least squares by exhaustive block pooling (small n)."""
    order = np.argsort(q, kind="mergesort")
    vals = list(zip(y[order].astype(float) * w[order], w[order]))
    blocks = [[s, ww] for s, ww in vals]
    changed = True
    while changed:
        changed = False
        for i in range(len(blocks) - 1):
            if blocks[i][0] / blocks[i][1] >= blocks[i + 1][0] / blocks[i + 1][1]:
                blocks[i] = [blocks[i][0] + blocks[i + 1][0], blocks[i][1] + blocks[i + 1][1]]
                del blocks[i + 1]
                changed = True
                break
    return [s / ww for s, ww in blocks]


def test_isotonic_is_weighted_pav_and_passes_the_ranker_checks():
    rng = np.random.default_rng(3)
    q = rng.uniform(0, 1, 300)
    y = (rng.random(300) < q).astype(int)
    w = rng.uniform(0.5, 2.0, 300)
    m = C.fit_isotonic(q, y, w)
    C.check({"keep_rate": 1.0, "mapping": m})
    np.testing.assert_allclose(m["y"], _brute_isotonic(q, y, w), atol=1e-12)
    assert all(a < b for a, b in zip(m["y"], m["y"][1:]))
    # Fitted values are monotone in q and reduce the squared error against a constant.
    fitted = C.apply_mapping(m, q)
    assert np.all(np.diff(fitted[np.argsort(q)]) >= -1e-12)


def test_isotonic_on_constant_labels_is_flat():
    q = np.linspace(0.1, 0.2, 50)
    m = C.fit_isotonic(q, np.zeros(50, int), np.ones(50))
    assert m["y"] == [0.0, 0.0] and m["x"][0] < m["x"][1]


def test_too_few_rows_of_a_class_fit_no_mapping(capsys):
    q = np.linspace(0.01, 0.2, 100)
    y = np.zeros(100, int)
    y[:3] = 1
    mapping, why = C.fit("platt", q, y, np.ones(100))
    assert mapping == {"method": "none"} and "3 positive" in why
    assert "warning" in capsys.readouterr().err


def test_downsampled_rows_calibrate_with_their_keep_rate(tmp_path, registry):
    """Negatives kept at 0.5: the manifest carries keep_rate 0.5 and a Platt mapping fitted
    after the correction; the served pCTR is calibrated on the full (reweighted) traffic,
    while the raw output over-predicts."""
    t = generate(24000, 21, registry)
    rng = np.random.default_rng(4)
    y = t.column("label").to_numpy()
    keep = (y == 1) | (rng.random(t.num_rows) < 0.5)
    t = t.filter(pa.array(keep))
    i = t.schema.get_field_index("keep_rate")
    t = t.set_column(i, "keep_rate", pa.array([0.5] * t.num_rows, pa.float32())).cast(t.schema)
    pq.write_table(t, tmp_path / "rows.parquet")
    m = run(["--data", str(tmp_path / "rows.parquet"), "--model", "lr", "--out", str(tmp_path / "m"), "--epochs", "8"])
    cal = m["calibration"]
    assert cal["keep_rate"] == 0.5 and cal["mapping"]["method"] == "platt"
    C.check(cal)
    assert 0.8 < m["metrics"]["calibration"] < 1.25
    # The base rate reported is the full traffic's (negatives reweighted by 2), ~0.04, not the
    # kept rows' (~0.08).
    assert 0.025 < m["metrics"]["base_rate"] < 0.055
    import json

    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["keep_rate"] == 0.5
