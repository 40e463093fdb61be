import json

import numpy as np
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.criteo import N_FIELDS, read_criteo
from adserve_trainer.train import main, run


def _hex(rng, n):
    return [f"{v:08x}" for v in rng.integers(0, 2**32, size=n).tolist()]


def criteo_lines(n: int, seed: int = 0) -> list[str]:
    """Criteo-format lines with a planted signal: C1 shifts the odds, log(I1) raises them,
    and C2 x C3 interact. Some values are empty; some lines have their trailing empty
    fields stripped, as in the real files."""
    rng = np.random.default_rng(seed)
    pools = [_hex(rng, 4)] + [_hex(rng, 20) for _ in range(25)]
    good_c2, good_c3 = set(pools[1][:5]), set(pools[2][:5])
    lines = []
    for _ in range(n):
        ints = [rng.poisson(3) for _ in range(13)]
        ints[1] = int(rng.integers(-3, 50))  # I2 takes negative values in the real data
        int_s = [str(v) for v in ints]
        for j in range(13):
            if rng.random() < 0.15:
                int_s[j] = ""
        cats = [pool[int(rng.integers(0, len(pool)))] for pool in pools]
        for j in range(3, 26):
            if rng.random() < 0.1:
                cats[j] = ""
        logit = -1.6 + 1.3 * (cats[0] == pools[0][0]) - 1.2 * (cats[0] == pools[0][1])
        logit += 0.5 * np.log1p(ints[0]) * (int_s[0] != "")
        logit += 1.2 * (cats[1] in good_c2 and cats[2] in good_c3)
        label = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
        if rng.random() < 0.3:
            cats[23:] = ["", "", ""]
        line = "\t".join([str(label)] + int_s + cats)
        if cats[-1] == "" and rng.random() < 0.7:
            line = line.rstrip("\t")  # stripped trailing empty fields
        lines.append(line)
    return lines


def test_reader_pads_stripped_lines_and_reads_missing_values(tmp_path):
    lines = criteo_lines(200, seed=1)
    assert any(len(ln.split("\t")) < N_FIELDS for ln in lines), "the fixture has stripped lines"
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    d = read_criteo(tmp_path / "c.txt", buckets=1000)
    assert d.y.shape == (200,) and d.ints.shape == (200, 13) and d.cats.shape == (200, 26)
    assert np.isnan(d.ints).any() and (d.cats == 0).any()
    assert d.cats.max() < 1000 and d.cats.min() >= 0
    assert (d.ints[~np.isnan(d.ints)] < 0).any(), "negative integers are read"
    assert read_criteo(tmp_path / "c.txt", buckets=1000, limit=50).y.shape == (50,)


def test_criteo_trains_both_models_and_reports(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(criteo_lines(6000)) + "\n")
    out = tmp_path / "report"
    run(["--criteo", str(tmp_path / "train.txt"), "--out", str(out), "--hash-buckets", "1000", "--epochs", "8"])
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == {"train": 4800, "calibration": 600, "evaluation": 600}
    for key in ("lr", "dcnv2"):
        r = report["models"][key]
        assert {"auc", "logloss", "normalized_entropy", "ece"} <= set(r)
        assert r["auc"] > 0.62, (key, r["auc"])
        assert r["normalized_entropy"] < 1.0
        assert 0 <= r["ece"] < 0.1
    assert (out / "calibration.png").stat().st_size > 1000
    assert not (out / "model.onnx").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("\t".join(["0"] * 41), "41 tab-separated fields, expected at most 40"),
        ("\t".join(["1", "3", "1.5"] + [""] * 37), "I2 must be an integer or empty, got '1.5'"),
        ("\t".join(["1", "3", "x"]), "I2 must be an integer or empty"),
        ("\t".join(["2", "3"]), "label must be 0 or 1, got '2'"),
        ("", "label must be 0 or 1, got ''"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path, bad, message):
    lines = criteo_lines(5, seed=2)
    lines.insert(3, bad)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainerError, match=":4: " + message.replace("(", r"\(").replace(".", r"\.")):
        read_criteo(tmp_path / "c.txt")


def test_criteo_cli_errors(tmp_path, capsys):
    assert main(["--criteo", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("\n".join(ln.replace("1\t", "0\t", 1) if ln.startswith("1") else ln
                                                for ln in criteo_lines(300)) + "\n")
    assert main(["--criteo", str(tmp_path / "one.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "all one class" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
