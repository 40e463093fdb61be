"""The Open Bandit Dataset reader on a few rows written in obp's CSV layout (no network)."""

import csv
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from adserve_trainer import TrainerError
from adserve_trainer import obd


def _md5ish(rng, n):
    return ["".join(f"{v:08x}" for v in rng.integers(0, 2**32, size=4).tolist()) for _ in range(n)]


def write_obd(root, rows=3000, n_items=6, seed=0, policies=("random", "bts"), campaign="all", click_value=None):
    """<root>/<policy>/<campaign>/{<campaign>.csv,item_context.csv} as in obp 0.5.7's sdist:
    an unnamed index column first, a '+00:00' timestamp, user-item_affinity_<item> columns.
    Planted signal: user_feature_0 == u0 and item 0 click more; affinity of the shown item helps."""
    rng = np.random.default_rng(seed)
    users = [_md5ish(rng, 3) for _ in range(4)]
    item_cats = [_md5ish(rng, 3) for _ in range(3)]
    start = datetime(2019, 11, 24, tzinfo=timezone.utc)
    for policy in policies:
        d = root / policy / campaign
        d.mkdir(parents=True)
        with open(d / "item_context.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"])
            for i in range(n_items):
                w.writerow([i, i, rng.normal()] + [item_cats[k][i % 3] for k in range(3)])
        header = ["", "timestamp", "item_id", "position", "click", "propensity_score"]
        header += [f"user_feature_{k}" for k in range(4)] + [f"user-item_affinity_{i}" for i in range(n_items)]
        t = start + timedelta(seconds=int(rng.integers(0, 60)))
        with open(d / f"{campaign}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for r in range(rows):
                t += timedelta(seconds=int(rng.integers(1, 120)), microseconds=int(rng.integers(0, 10**6)))
                u = [users[k][int(rng.integers(0, 3))] for k in range(4)]
                item = int(rng.integers(0, n_items))
                aff = rng.random(n_items) * (rng.random(n_items) < 0.3)
                logit = -2.2 + 1.4 * (u[0] == users[0][0]) + 1.0 * (item == 0) + 1.5 * aff[item]
                click = int(rng.random() < 1 / (1 + np.exp(-logit)))
                if click_value is not None and r == 7:
                    click = click_value
                prop = 1.0 / n_items if policy == "random" else float(rng.uniform(0.02, 0.6))
                w.writerow([r, t.strftime("%Y-%m-%d %H:%M:%S.%f+00:00"), item, int(rng.integers(1, 4)), click, prop]
                           + u + [f"{a:.1f}" for a in aff])
    return root


def test_reader_joins_item_context_and_picks_the_shown_items_affinity(tmp_path):
    root = write_obd(tmp_path / "obd", rows=50)
    log = obd.read_log(root, "bts", "all")
    assert log["y"].shape == (50,) and log["dense"].shape == (50, 2)
    assert set(log["cats"]) == set(obd.CAT_FIELDS)
    assert all(v.startswith("all:") for v in log["cats"]["item"])
    # The affinity column is the one named after the row's item.
    with open(root / "bts" / "all" / "all.csv") as fh:
        rows = list(csv.DictReader(fh))
    want = [float(r[f"user-item_affinity_{r['item_id']}"]) for r in rows]
    np.testing.assert_allclose(log["dense"][:, 1], want)
    data = obd.load(root, campaigns=["all"])
    assert len(data.y) == 100 and np.all(np.diff(data.time) >= 0), "merged logs are in time order"
    w = obd.ips_weights(data, 10.0)
    assert np.all((w > 0) & (w <= 10.0))


def test_replay_trains_both_models_and_reports(tmp_path):
    root = write_obd(tmp_path / "obd")
    out = tmp_path / "report"
    report = obd.run(["--data", str(root), "--out", str(out), "--campaigns", "all", "--epochs", "8"])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"] == {"train": 4800, "calibration": 600, "evaluation": 600}
    assert on_disk["models"].keys() == {"lr", "dcnv2"} == report["models"].keys()
    for key in ("lr", "dcnv2"):
        r = on_disk["models"][key]
        assert {"auc", "logloss", "normalized_entropy", "ece"} <= set(r)
        assert r["auc"] > 0.6, (key, r["auc"])
    assert (out / "calibration.png").exists()
    assert on_disk["weighting"].startswith("min((1/n_items)/propensity_score, 10.0)")


def test_bad_obd_input_is_named(tmp_path, capsys):
    with pytest.raises(TrainerError, match="fetch_obd.sh"):
        obd.run(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    root = write_obd(tmp_path / "obd", rows=40, policies=("random",))
    with pytest.raises(TrainerError, match="OBD file not found.*bts"):
        obd.run(["--data", str(root), "--out", str(tmp_path / "o"), "--campaigns", "all"])
    bad = write_obd(tmp_path / "bad", rows=40, policies=("random",), click_value=3)
    with pytest.raises(TrainerError, match="row 8: click must be 0 or 1, got 3"):
        obd.read_log(bad, "random", "all")
    with pytest.raises(TrainerError, match="--campaigns"):
        obd.run(["--data", str(root), "--out", str(tmp_path / "o"), "--campaigns", "kids"])
    assert obd.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists()
