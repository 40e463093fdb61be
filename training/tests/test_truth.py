"""--truth: training on label-joiner rows scored against known true probabilities (a simulator's oracle)."""

import contextlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from adserve_trainer import TrainerError
from adserve_trainer import metrics as M
from adserve_trainer.data import build_matrix, row_weights, time_order
from adserve_trainer.experiment import time_split
from adserve_trainer.synthetic import generate, true_probability, write_parquet
from adserve_trainer.train import main, run

METRIC_KEYS = {"logloss", "auc", "calibration", "base_rate", "normalized_entropy", "ece"}
N_ROWS = 8000
N_WITHOUT_TRUTH = 300  # rows written to Parquet but absent from the truth file
EXTRA_IDS = ["imp-not-served-1", "imp-not-served-2"]  # truth ids with no row
QUICK = ["--epochs", "4", "--patience", "2"]


def _write_truth(path, ids, p_click, p_label, header="impression_id,p_click,p_label"):
    lines = [header] + [f"{i},{c:.8f},{lab:.8f}" for i, c, lab in zip(ids, p_click, p_label)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, registry):
    """Parquet rows in shuffled order (time order != file order) and a truth CSV in another order.

    p_click is the generator's true probability; p_label = 0.9 * p_click (a
    label window that misses 10% of clicks), so the two columns differ.
    """
    d = tmp_path_factory.mktemp("truth")
    t = generate(N_ROWS, 21, registry)
    rng = np.random.default_rng(0)
    t = t.take(rng.permutation(t.num_rows))
    write_parquet(t.slice(0, 5000), d / "rows" / "part-000.parquet")
    write_parquet(t.slice(5000), d / "rows" / "part-001.parquet")
    X, _, _ = build_matrix(t, registry, warn=False)
    p_click = true_probability(X, registry.names)
    ids = t.column("impression_id").to_pylist()
    keep = np.sort(rng.permutation(len(ids))[N_WITHOUT_TRUTH:])
    rows = rng.permutation(keep)  # truth file in yet another order
    truth = _write_truth(
        d / "truth.csv",
        [ids[i] for i in rows] + EXTRA_IDS,
        list(p_click[rows]) + [0.1, 0.2],
        list(0.9 * p_click[rows]) + [0.05, 0.1],
    )
    return d / "rows", truth, t, keep


@pytest.fixture(scope="module")
def trained_with_truth(dataset, tmp_path_factory):
    rows, truth, _, _ = dataset
    out = tmp_path_factory.mktemp("model") / "ctr-truth"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        manifest = run(["--data", str(rows), "--truth", str(truth), "--version", "t", "--out", str(out)] + QUICK)
    return out, manifest, json.loads((out / "report.json").read_text()), buf.getvalue()


def test_report_has_oracle_and_per_model_comparison(trained_with_truth):
    _, _, report, _ = trained_with_truth
    oracle = report["oracle"]
    assert set(oracle) == METRIC_KEYS
    assert 0.5 < oracle["auc"] <= 1.0
    for key in ("lr", "dcnv2"):
        r = report["models"][key]
        assert 0.5 < r["auc_vs_oracle"] < 1.1, (key, r["auc_vs_oracle"])
        assert r["auc_vs_oracle"] == pytest.approx(r["auc"] / oracle["auc"], abs=2e-6)
        # Served (Platt) predictions against the true label probability, per equal-mass bin.
        assert r["calibration_method"] == "platt"
        assert 0.0 <= r["calibration_vs_truth"] < 0.05, (key, r["calibration_vs_truth"])
        assert 0.0 < r["mae_vs_truth"] < 0.1
        assert set(r) >= METRIC_KEYS | {"uncalibrated", "platt", "isotonic"}  # existing keys kept


def test_truth_stays_aligned_through_time_order_and_split(trained_with_truth, dataset, registry):
    """The oracle, recomputed independently (rows with truth, sorted by served_at, last 10%), is the report's."""
    _, _, report, _ = trained_with_truth
    _, _, t, keep = dataset
    t = t.take(keep)
    t = t.take(time_order(t))
    X, y, _ = build_matrix(t, registry, warn=False)
    p_label = 0.9 * true_probability(X, registry.names)
    test = time_split(len(y)).test
    w = row_weights(t)[test]
    want = M.summary(y[test], np.round(p_label[test], 8), w)
    for k in METRIC_KEYS:
        assert report["oracle"][k] == pytest.approx(want[k], abs=2e-6), k
    assert report["truth"]["evaluation_mean_p_label"] == pytest.approx(
        report["truth"]["evaluation_mean_p_click"] * 0.9, abs=2e-6
    )


def test_rows_without_truth_are_dropped_and_counted(trained_with_truth):
    _, manifest, report, printed = trained_with_truth
    c = report["truth"]
    assert c["rows_read"] == N_ROWS
    assert c["rows_dropped_without_truth"] == N_WITHOUT_TRUTH
    assert c["rows_with_truth"] == N_ROWS - N_WITHOUT_TRUTH
    assert c["truth_ids"] == N_ROWS - N_WITHOUT_TRUTH + len(EXTRA_IDS)
    assert c["truth_ids_without_row"] == len(EXTRA_IDS)
    assert manifest["training_rows"] + manifest["holdout_rows"] == N_ROWS - N_WITHOUT_TRUTH
    assert sum(report["rows"].values()) == N_ROWS - N_WITHOUT_TRUTH
    assert "--truth" in manifest["data"] and f"{N_WITHOUT_TRUTH} without dropped" in manifest["data"]
    assert f"{N_ROWS - N_WITHOUT_TRUTH} of {N_ROWS} rows have a truth ({N_WITHOUT_TRUTH} dropped" in printed
    assert f"{len(EXTRA_IDS)} of {c['truth_ids']} truth ids have no row" in printed
    oracle_line = next(ln for ln in printed.splitlines() if ln.strip().startswith("oracle auc"))
    assert "dcnv2 auc/oracle" in oracle_line and "lr auc/oracle" in oracle_line
    assert "calibration vs truth" in oracle_line


def test_synthetic_path_shares_the_oracle_comparison(trained):
    out, _ = trained
    report = json.loads((out / "report.json").read_text())
    assert set(report["oracle"]) == METRIC_KEYS
    for key in ("lr", "dcnv2"):
        r = report["models"][key]
        assert r["auc_vs_oracle"] == pytest.approx(r["auc"] / report["oracle"]["auc"], abs=2e-6)
        assert 0.0 <= r["calibration_vs_truth"] < 0.05
        assert r["mae_vs_truth"] > 0


def test_versus_truth_metric():
    rng = np.random.default_rng(1)
    p_true = rng.uniform(0.0, 0.2, 5000)
    assert M.versus_truth(p_true, p_true) == {"calibration_vs_truth": 0.0, "mae_vs_truth": 0.0}
    got = M.versus_truth(p_true + 0.01, p_true)
    assert got["calibration_vs_truth"] == pytest.approx(0.01) and got["mae_vs_truth"] == pytest.approx(0.01)
    # Noise around the truth: pointwise error, calibrated per bin on average.
    noisy = np.clip(p_true + rng.normal(0, 0.02, p_true.size), 0, 1)
    got = M.versus_truth(noisy, p_true)
    assert got["mae_vs_truth"] > 0.01 and got["calibration_vs_truth"] < got["mae_vs_truth"]
    # Weighted: the bin mass is the weight's.
    w = np.where(np.arange(p_true.size) % 2 == 0, 3.0, 1.0)
    pred = p_true + np.where(w > 1, 0.02, 0.0)
    assert M.versus_truth(pred, p_true, w)["mae_vs_truth"] == pytest.approx(0.015)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_rows(tmp_path_factory, registry):
    d = tmp_path_factory.mktemp("small")
    t = generate(300, 4, registry)
    pq.write_table(t, d / "rows.parquet")
    return d / "rows.parquet", t.column("impression_id").to_pylist()


def _train(rows, truth, tmp_path):
    return run(["--data", str(rows), "--truth", str(truth), "--out", str(tmp_path / "out")] + QUICK)


@pytest.mark.parametrize(
    "body, match",
    [
        ("impression_id,p_click\n{id0},0.1\n", r"truth.csv:1: header has no column 'p_label'"),
        ("id,p_click,p_label\n{id0},0.1,0.1\n", r"truth.csv:1: header has no column 'impression_id'"),
        ("impression_id,p_click,p_label\n{id0},0.1,0.1\n{id1},abc,0.1\n", r"truth.csv:3: p_click 'abc' is not a number"),
        ("impression_id,p_click,p_label\n{id0},0.1,\n", r"truth.csv:2: p_label '' is not a number"),
        ("impression_id,p_click,p_label\n{id0},1.5,0.1\n", r"truth.csv:2: p_click 1.5 is not a probability in \[0, 1\]"),
        ("impression_id,p_click,p_label\n{id0},0.1,-0.01\n", r"truth.csv:2: p_label -0.01 is not a probability"),
        ("impression_id,p_click,p_label\n{id0},nan,0.1\n", r"truth.csv:2: p_click nan is not a probability"),
        ("impression_id,p_click,p_label\n{id0},0.1,0.2\n", r"truth.csv:2: p_label 0.2 > p_click 0.1"),
        (
            "impression_id,p_click,p_label\n{id0},0.1,0.1\n{id1},0.1,0.1\n{id0},0.2,0.1\n",
            r"truth.csv:4: duplicate impression_id '.*' \(first on line 2\)",
        ),
        ("impression_id,p_click,p_label\n{id0},0.1\n", r"truth.csv:2: 2 field\(s\), expected 3"),
        ("impression_id,p_click,p_label\n,0.1,0.1\n", r"truth.csv:2: empty impression_id"),
        ("", r"truth.csv: empty file"),
        ("impression_id,p_click,p_label\n", r"truth.csv: no rows after the header"),
    ],
)
def test_malformed_truth_is_refused(small_rows, tmp_path, body, match):
    rows, ids = small_rows
    truth = tmp_path / "truth.csv"
    truth.write_text(body.format(id0=ids[0], id1=ids[1]))
    with pytest.raises(TrainerError, match=match):
        _train(rows, truth, tmp_path)
    assert not (tmp_path / "out").exists()


def test_extra_columns_and_any_column_order_are_accepted(small_rows, tmp_path):
    from adserve_trainer.truth import read_truth

    rows, ids = small_rows
    truth = tmp_path / "truth.csv"
    truth.write_text(f"p_label,note,impression_id,p_click\n0.05,x,{ids[0]},0.1\n\n0.0,y,{ids[1]},0.0\n")
    t = read_truth(truth)
    assert t.ids == ids[:2]
    assert t.p_click.tolist() == [0.1, 0.0] and t.p_label.tolist() == [0.05, 0.0]


def test_no_row_has_a_truth(small_rows, tmp_path):
    rows, _ = small_rows
    truth = _write_truth(tmp_path / "truth.csv", ["imp-a", "imp-b"], [0.1, 0.1], [0.1, 0.1])
    with pytest.raises(TrainerError, match=r"none of the 300 rows has its impression_id among the 2 ids"):
        _train(rows, truth, tmp_path)


def test_missing_truth_file(small_rows, tmp_path):
    rows, _ = small_rows
    with pytest.raises(TrainerError, match="no such file"):
        _train(rows, tmp_path / "nope.csv", tmp_path)


@pytest.mark.parametrize("source", [["--synthetic", "1000"], ["--criteo", "train.txt"]])
def test_truth_only_with_data(tmp_path, source):
    truth = _write_truth(tmp_path / "truth.csv", ["imp-a"], [0.1], [0.1])
    with pytest.raises(TrainerError, match=f"--truth goes with --data.*not {source[0]}"):
        run(source + ["--truth", str(truth), "--out", str(tmp_path / "out")])


def test_cli_reports_bad_truth_as_one_line(small_rows, tmp_path, capsys):
    rows, ids = small_rows
    truth = tmp_path / "truth.csv"
    truth.write_text(f"impression_id,p_click,p_label\n{ids[0]},2,0.1\n")
    assert main(["--data", str(rows), "--truth", str(truth), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --truth ") and "truth.csv:2: p_click 2 is not a probability" in err
    assert err.count("\n") == 1


def test_the_gate_with_truth_judges_the_candidates_own_evaluation_rows(trained_with_truth, dataset, tmp_path):
    """DATA holds rows of other runs (here: rows without a truth). Without
    --truth the gate's holdout is a different slice and it says so; with it,
    the gate scores exactly the candidate's evaluation rows."""
    from adserve_trainer import gate as G

    out, manifest, _, _ = trained_with_truth
    rows, truth, _, _ = dataset
    base = ["--candidate", str(out), "--production", str(out), "--data", str(rows), "--dry-run"]
    with contextlib.redirect_stdout(io.StringIO()):
        _, mixed = G.run(base + ["--out", str(tmp_path / "mixed.json")])
        _, own = G.run(base + ["--truth", str(truth), "--out", str(tmp_path / "own.json")])
    assert mixed["holdout"]["same_as_candidate_evaluation"] is False
    assert any("may overlap the candidate's training rows" in w for w in mixed["warnings"])
    assert own["holdout"]["same_as_candidate_evaluation"] is True
    assert own["warnings"] == []
    assert own["holdout"]["rows"] == manifest["evaluation_rows"]
    assert own["candidate"]["metrics"]["auc"] == pytest.approx(manifest["metrics"]["auc"], abs=2e-6)


def test_the_gate_refuses_truth_with_synthetic_rows(trained_with_truth, dataset):
    from adserve_trainer import gate as G

    out, _, _, _ = trained_with_truth
    _, truth, _, _ = dataset
    with pytest.raises(TrainerError, match="--truth goes with --data"):
        G.run(["--candidate", str(out), "--production", str(out), "--synthetic", "100", "--truth", str(truth),
               "--dry-run"])
