"""The promotion gate (adserve_trainer.gate): the rule at its boundaries, both
models scored on the same rows as the ranker serves them, and the registry
calls, made to a fake `adservectl` that records its argv and answers
`models list --json` like the real one (one serialized ModelRecord per line,
crates/adserve-registry/src/lib.rs). No network, no PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pytest
from onnx import TensorProto, helper

from adserve_trainer import TrainerError
from adserve_trainer import calibration as C
from adserve_trainer import gate as G
from adserve_trainer import metrics as M
from adserve_trainer.data import build_matrix, time_order
from adserve_trainer.experiment import time_split
from adserve_trainer.synthetic import TRUE_INTERCEPT, TRUE_WEIGHTS, generate, write_parquet

# 20 000 synthetic rows, seed 5: an evaluation slice of 2 000 rows (67 clicks)
# on which the generator's truth has AUC ~0.727 and ECE ~0.007.
N, SEED = 20000, 5
ROWS = ["--synthetic", str(N), "--seed", str(SEED)]


# --------------------------------------------------------------------------- the rule


def test_auc_exactly_the_tolerance_below_production_passes():
    for prod in (0.6, 0.7123, 0.75, 0.9):
        d = G.decide(prod - G.AUC_TOLERANCE, 0.01, prod)
        assert d.passed and d.failed == (), prod
        assert G.decide(round(prod - 0.002, 6), 0.01, prod).passed, prod
    assert G.decide(0.748, 0.01, 0.75).passed


def test_auc_more_than_the_tolerance_below_production_fails():
    d = G.decide(0.75 - 0.0021, 0.01, 0.75)
    assert not d.passed and d.failed == ("auc",)
    assert d.checks["auc"]["minimum"] == pytest.approx(0.748)
    assert G.decide(0.7479, 0.01, 0.75).failed == ("auc",)


def test_ece_at_the_threshold_fails_below_passes():
    d = G.decide(0.8, G.MAX_ECE, 0.75)
    assert not d.passed and d.failed == ("ece",)
    assert G.decide(0.8, 0.02, 0.75).failed == ("ece",)
    assert G.decide(0.8, 0.0199999, 0.75).passed
    assert G.decide(0.7, 0.03, 0.75).failed == ("auc", "ece")


def test_without_production_calibration_alone_decides():
    d = G.decide(0.51, 0.01, None)
    assert d.passed and d.checks["auc"]["passed"] is None
    assert "calibration alone" in d.text
    assert G.decide(0.99, 0.02, None).failed == ("ece",)


def test_the_rule_constants():
    assert (G.AUC_TOLERANCE, G.MAX_ECE) == (0.002, 0.02)
    assert (G.EXIT_PASSED, G.EXIT_REFUSED, G.EXIT_ERROR) == (0, 1, 2)


# --------------------------------------------------------------------------- models by hand


def lr_onnx(feature_order, weights, intercept) -> bytes:
    """sigmoid(x @ w + b) over RAW features in feature_order: the ranker's graph contract."""
    f = len(feature_order)
    w = np.array([[weights.get(n, 0.0)] for n in feature_order], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["pctr"]),
        ],
        "lr",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", f])],
        [helper.make_tensor_value_info("pctr", TensorProto.FLOAT, ["batch", 1])],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [f, 1], w.reshape(-1).tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, [1], [float(intercept)]),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def write_model(d, version, feature_order, weights=TRUE_WEIGHTS, intercept=TRUE_INTERCEPT, calibration=None):
    d.mkdir(parents=True, exist_ok=True)
    data = lr_onnx(feature_order, weights, intercept)
    (d / "model.onnx").write_bytes(data)
    manifest = {
        "model_version": version,
        "model_type": "logistic_regression",
        "input_name": "features",
        "output_name": "pctr",
        "feature_order": list(feature_order),
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "metrics": {"auc": 0.7},
    }
    if calibration is not None:
        manifest["calibration"] = calibration
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return d


@pytest.fixture
def models(tmp_path, registry):
    """The generator's truth as production; candidates: the truth in another
    column order, the truth with doubled odds, the truth without ad_ctr_7d."""
    names = registry.names
    t = generate(N, SEED, registry)
    X, _, _ = build_matrix(t, registry, warn=False)
    mean_ad_ctr = float(X[:, names.index("ad_ctr_7d")].mean())
    return {
        "production": write_model(tmp_path / "prod", "ctr-prod", names),
        "good": write_model(tmp_path / "good", "ctr-good", list(reversed(names))),
        "miscalibrated": write_model(
            tmp_path / "miscal", "ctr-miscal", names,
            calibration={"keep_rate": 1.0, "mapping": {"method": "platt", "a": 1.0, "b": math.log(2.0)}},
        ),
        "worse": write_model(
            tmp_path / "worse", "ctr-worse", [n for n in names if n != "ad_ctr_7d"],
            intercept=TRUE_INTERCEPT + TRUE_WEIGHTS["ad_ctr_7d"] * mean_ad_ctr,
        ),
    }


# --------------------------------------------------------------------------- a faithful fake adservectl

FAKE = """#!{python}
import json, sys
from pathlib import Path
here = Path({here!r})
with open(here / "calls.jsonl", "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
# Global flags (--database-url, --schema) come before the subcommand.
while args and args[0].startswith("--"):
    args = args[2:]
if args[:2] == ["models", "list"]:
    if (here / "list_fails").exists():
        sys.stderr.write((here / "list_fails").read_text())
        sys.exit(1)
    sys.stdout.write((here / "list.jsonl").read_text())
elif args[:2] == ["models", "promote"]:
    if (here / "promote_fails").exists():
        sys.stderr.write((here / "promote_fails").read_text())
        sys.exit(1)
    name, version, to = (args[args.index(k) + 1] for k in ("--name", "--version", "--to"))
    print(f"{{name}} {{version}}: candidate -> {{to}}")
else:
    sys.stderr.write("adservectl: error: unexpected arguments\\n")
    sys.exit(2)
"""


def model_record(model_dir, stage, name="ctr"):
    """One line of `adservectl models list --json`: serde_json of ModelRecord
    (crates/adserve-registry/src/lib.rs), field for field."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return {
        "name": name,
        "version": manifest["model_version"],
        "artifact": str(model_dir.resolve()),
        "manifest": manifest,
        "onnx_sha256": manifest["onnx_sha256"].lower(),
        "metrics": manifest.get("metrics", {}),
        "stage": stage,
        "canary_share": 0.0,
        "registered_by": "tester",
        "registered_at": "2026-12-02T18:34:20Z",
        "stage_changed_by": "tester",
        "stage_changed_at": "2026-12-02T18:34:21Z",
    }


class FakeCtl:
    def __init__(self, d):
        d.mkdir()
        self.dir = d
        self.path = d / "adservectl"
        self.path.write_text(FAKE.format(python=sys.executable, here=str(d)))
        self.path.chmod(0o755)
        self.records([])

    def records(self, recs):
        (self.dir / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    def fail(self, command, stderr):
        (self.dir / f"{command}_fails").write_text(stderr)

    @property
    def calls(self):
        f = self.dir / "calls.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


@pytest.fixture
def ctl(tmp_path):
    return FakeCtl(tmp_path / "bin")


def gate(candidate, ctl=None, *extra):
    argv = ["--candidate", str(candidate), *ROWS, *extra]
    if ctl is not None:
        argv += ["--adservectl", str(ctl.path)]
    return G.main(argv)


def gate_json(candidate):
    return json.loads((candidate / "gate.json").read_text())


def promote_call(ctl):
    calls = [c for c in ctl.calls if "promote" in c]
    assert len(calls) == 1, ctl.calls
    c = calls[0]
    return {k: c[c.index(k) + 1] for k in ("--name", "--version", "--to", "--reason")}


# --------------------------------------------------------------------------- end to end, registry faked


def test_a_good_candidate_is_promoted_to_shadow(models, ctl, capsys):
    ctl.records([model_record(models["good"], "candidate"), model_record(models["production"], "production")])
    assert gate(models["good"], ctl, "--database-url", "postgres://u:p@db:5432/x", "--schema", "reg_t") == 0
    list_call, promote = ctl.calls
    assert list_call == [
        "--database-url", "postgres://u:p@db:5432/x", "--schema", "reg_t", "models", "list", "--name", "ctr", "--json"
    ]
    assert promote[:4] == ["--database-url", "postgres://u:p@db:5432/x", "--schema", "reg_t"]
    p = promote_call(ctl)
    assert (p["--name"], p["--version"], p["--to"]) == ("ctr", "ctr-good", "shadow")
    doc = gate_json(models["good"])
    assert doc["decision"] == "passed" and doc["failed"] == [] and doc["registry"]["recorded"]
    assert doc["production"]["version"] == "ctr-prod" and doc["production"]["source"] == "registry"
    assert doc["holdout"]["rows"] == 2000 and doc["holdout"]["rows_range"] == [18000, 20000]
    # Same model, columns in another order: the same served pCTR (float32 sums in another order).
    assert doc["candidate"]["metrics"]["auc"] == pytest.approx(doc["production"]["metrics"]["auc"], abs=1e-4)
    reason = p["--reason"]
    assert reason == doc["reason"]
    assert reason.startswith("gate: passed; auc ")
    c, pr = doc["candidate"]["metrics"], doc["production"]["metrics"]
    assert f"auc {c['auc']:.6f} >= production (ctr-prod) {pr['auc']:.6f} - 0.002" in reason
    assert f"ece {c['ece']:.6f} < 0.02" in reason
    assert "holdout 2000 rows" in reason and doc["holdout"]["impression_ids_sha256"][:12] in reason
    out = capsys.readouterr().out
    assert "gate: PASSED" in out and "ctr ctr-good -> shadow" in out and "auc rule:" in out and "ece rule:" in out


def test_both_models_are_scored_on_the_same_rows_as_the_ranker_serves_them(models, ctl, monkeypatch, registry):
    ctl.records([model_record(models["miscalibrated"], "candidate"), model_record(models["production"], "production")])
    seen = []
    real = G.served_pctr

    def spy(model, X, ids, reg, what):
        p = real(model, X, ids, reg, what)
        seen.append((model.version, X.copy(), p))
        return p

    monkeypatch.setattr(G, "served_pctr", spy)
    status, doc = G.run(["--candidate", str(models["miscalibrated"]), *ROWS, "--adservectl", str(ctl.path)])
    assert status == G.EXIT_REFUSED
    (v1, X1, p1), (v2, X2, p2) = seen
    assert (v1, v2) == ("ctr-miscal", "ctr-prod")
    assert np.array_equal(X1, X2) and len(X1) == 2000

    # Independently: the trainer's evaluation slice, ORT in each manifest's order, the manifest's calibration.
    t = generate(N, SEED, registry)
    t = t.take(time_order(t))
    X, y, _ = build_matrix(t, registry, warn=False)
    test = time_split(len(y)).test
    assert np.array_equal(X[test], X1)
    ids = t.column("impression_id").slice(test.start, test.stop - test.start).to_pylist()
    assert doc["holdout"]["impression_ids_sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()
    for d, p, key in ((models["miscalibrated"], p1, "candidate"), (models["production"], p2, "production")):
        m = json.loads((d / "manifest.json").read_text())
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        cols = [registry.names.index(n) for n in m["feature_order"]]
        raw = sess.run(["pctr"], {"features": X[test][:, cols]})[0][:, 0]
        want = C.apply(m.get("calibration"), raw)
        np.testing.assert_array_equal(p, want)
        assert doc[key]["metrics"] == M.summary(y[test], want)
    # Doubling the odds keeps the ranking (same AUC) and breaks the calibration.
    assert doc["candidate"]["metrics"]["auc"] == pytest.approx(doc["production"]["metrics"]["auc"], abs=1e-12)


def test_a_miscalibrated_candidate_is_refused_on_ece_and_retired(models, ctl, capsys):
    ctl.records([model_record(models["miscalibrated"], "candidate"), model_record(models["production"], "production")])
    assert gate(models["miscalibrated"], ctl) == G.EXIT_REFUSED
    doc = gate_json(models["miscalibrated"])
    assert doc["decision"] == "refused" and doc["failed"] == ["ece"]
    assert doc["candidate"]["metrics"]["ece"] > 0.02 > doc["production"]["metrics"]["ece"]
    p = promote_call(ctl)
    assert (p["--version"], p["--to"]) == ("ctr-miscal", "retired")
    assert p["--reason"].startswith("gate: refused (ece); auc ") and " >= 0.02" in p["--reason"]
    out = capsys.readouterr().out
    assert "REFUSED (ece rule failed)" in out and "ece rule:" in out and "FAILED" in out


def test_a_worse_auc_candidate_is_refused(models, ctl):
    ctl.records([model_record(models["production"], "production"), model_record(models["worse"], "candidate")])
    assert gate(models["worse"], ctl) == G.EXIT_REFUSED
    doc = gate_json(models["worse"])
    assert doc["failed"] == ["auc"]
    a = doc["checks"]["auc"]
    assert a["candidate"] < a["production"] - 0.002 and a["minimum"] == pytest.approx(a["production"] - 0.002)
    p = promote_call(ctl)
    assert p["--to"] == "retired" and p["--reason"].startswith("gate: refused (auc); auc ")
    assert " < production (ctr-prod) " in p["--reason"]


def test_without_a_production_model_calibration_alone_decides(models, ctl, capsys):
    ctl.records([model_record(models["worse"], "candidate"), model_record(models["good"], "retired")])
    assert gate(models["worse"], ctl) == 0
    doc = gate_json(models["worse"])
    assert doc["production"] is None and doc["judged_on"] == "calibration alone (no production model)"
    p = promote_call(ctl)
    assert p["--to"] == "shadow" and "no production model: judged on calibration alone" in p["--reason"]
    assert "calibration alone" in capsys.readouterr().out


def test_production_dir_and_dry_run_touch_no_registry(models, tmp_path, capsys):
    # --dry-run with --production needs no adservectl at all.
    missing = tmp_path / "no-such-adservectl"
    out = tmp_path / "decision.json"
    argv = ["--production", str(models["production"]), "--dry-run", "--adservectl", str(missing), "--out", str(out)]
    assert gate(models["good"], None, *argv) == 0
    doc = json.loads(out.read_text())
    assert doc["registry"] == {"name": "ctr", "dry_run": True, "action": "promote --to shadow", "recorded": False}
    assert doc["production"]["source"].startswith("--production")
    assert not (models["good"] / "gate.json").exists()
    assert "dry run" in capsys.readouterr().out
    assert gate(models["miscalibrated"], None, *argv) == G.EXIT_REFUSED


def test_dry_run_reads_but_never_writes_the_registry(models, ctl):
    ctl.records([model_record(models["production"], "production")])  # candidate not registered: a warning only
    assert gate(models["worse"], ctl, "--dry-run") == G.EXIT_REFUSED
    assert [c[:2] for c in ctl.calls] == [["models", "list"]]


def test_the_candidate_must_be_registered(models, ctl, capsys):
    ctl.records([model_record(models["production"], "production")])
    assert gate(models["good"], ctl) == G.EXIT_ERROR
    err = capsys.readouterr().err
    assert "ctr-good" in err and "is not registered" in err and "adservectl models register" in err and "--dir" in err
    assert not any("promote" in c for c in ctl.calls)
    assert not (models["good"] / "gate.json").exists()


def test_only_a_candidate_is_judged(models, ctl, capsys):
    ctl.records([model_record(models["good"], "retired"), model_record(models["production"], "production")])
    assert gate(models["good"], ctl) == G.EXIT_ERROR
    err = capsys.readouterr().err
    assert "stage retired, not candidate" in err and "--to candidate" in err


def test_a_registered_version_with_another_model_file_is_refused(models, ctl, capsys):
    rec = model_record(models["good"], "candidate")
    rec["onnx_sha256"] = "0" * 64
    ctl.records([rec, model_record(models["production"], "production")])
    assert gate(models["good"], ctl) == G.EXIT_ERROR
    assert "registered with model.onnx sha256" in capsys.readouterr().err


def test_a_failing_promote_shows_adservectl_stderr(models, ctl, capsys):
    ctl.records([model_record(models["good"], "candidate"), model_record(models["production"], "production")])
    ctl.fail("promote", 'adservectl: error: ctr already has a shadow version, "ctr-x": retire or promote it first\n')
    assert gate(models["good"], ctl) == G.EXIT_ERROR
    err = capsys.readouterr().err
    assert "already has a shadow version" in err and "exit 1" in err
    assert "`adservectl models promote --name ctr --version ctr-good --to shadow --reason ...` failed" in err
    doc = gate_json(models["good"])
    assert doc["decision"] == "passed" and doc["registry"]["recorded"] is False
    assert "already has a shadow version" in doc["registry"]["error"]


def test_a_failing_list_shows_adservectl_stderr(models, ctl, capsys):
    ctl.fail("list", "adservectl: error: model registry database: pool timed out while waiting for a connection\n")
    assert gate(models["good"], ctl) == G.EXIT_ERROR
    assert "pool timed out" in capsys.readouterr().err


def test_a_missing_adservectl_is_named(models, tmp_path, capsys):
    assert gate(models["good"], None, "--adservectl", str(tmp_path / "nope")) == G.EXIT_ERROR
    err = capsys.readouterr().err
    assert "adservectl not found" in err and "--adservectl" in err


def test_the_registry_production_artifact_is_scored(models, ctl):
    """The production model comes from its registry record's artifact directory."""
    moved = models["production"].parent / "elsewhere"
    shutil.copytree(models["production"], moved)
    ctl.records([model_record(models["good"], "candidate"), model_record(moved, "production")])
    assert gate(models["good"], ctl) == 0
    assert gate_json(models["good"])["production"]["dir"] == str(moved.resolve())


# --------------------------------------------------------------------------- the trainer's own model


def test_the_gate_reproduces_the_trainers_evaluation(trained, tmp_path):
    """On the rows it was trained on, the gate's candidate figures are the manifest's (report.json's)."""
    out, m = trained
    status, doc = G.run(
        ["--candidate", str(out), "--synthetic", "30000", "--seed", "11", "--production", str(out),
         "--dry-run", "--out", str(tmp_path / "g.json")]
    )
    assert status == 0
    assert doc["holdout"]["same_as_candidate_evaluation"] is True and doc["warnings"] == []
    assert doc["holdout"]["rows"] == m["evaluation_rows"]
    for k, v in m["metrics"].items():
        assert doc["candidate"]["metrics"][k] == pytest.approx(v, abs=2e-6), k
    report = json.loads((out / "report.json").read_text())
    assert doc["candidate"]["metrics"]["auc"] == pytest.approx(report["models"]["dcnv2"]["auc"], abs=2e-6)
    assert doc["candidate"]["metrics"] == doc["production"]["metrics"]


def test_another_dataset_size_is_flagged(trained, tmp_path):
    out, _ = trained
    status, doc = G.run(
        ["--candidate", str(out), "--synthetic", "12000", "--seed", "4", "--production", str(out),
         "--dry-run", "--out", str(tmp_path / "g.json")]
    )
    assert doc["holdout"]["same_as_candidate_evaluation"] is False
    assert any("may overlap the candidate's training rows" in w for w in doc["warnings"])


# --------------------------------------------------------------------------- bad input


def _dry(candidate, production, *rows):
    return G.run(["--candidate", str(candidate), "--production", str(production), *rows, "--dry-run"])


def test_missing_model_files(models, tmp_path):
    (models["good"] / "model.onnx").unlink()
    with pytest.raises(TrainerError, match="candidate model .*model.onnx is missing"):
        _dry(models["good"], models["production"], *ROWS)
    (models["production"] / "manifest.json").unlink()
    with pytest.raises(TrainerError, match="production model .*manifest.json is missing"):
        _dry(models["worse"], models["production"], *ROWS)
    with pytest.raises(TrainerError, match="does not exist"):
        _dry(tmp_path / "nothing", models["worse"], *ROWS)


def test_manifest_features_unknown_to_the_registry(models, registry):
    m = json.loads((models["good"] / "manifest.json").read_text())
    m["feature_order"][0] = "user_shoe_size"
    (models["good"] / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainerError, match="features not in the feature registry .*: user_shoe_size"):
        _dry(models["good"], models["production"], *ROWS)


def test_a_swapped_model_file_is_refused(models):
    shutil.copy(models["worse"] / "model.onnx", models["good"] / "model.onnx")
    with pytest.raises(TrainerError, match="torn copy or a swapped file"):
        _dry(models["good"], models["production"], *ROWS)


def test_empty_holdout(models):
    with pytest.raises(TrainerError, match="empty holdout"):
        _dry(models["good"], models["production"], "--synthetic", "4", "--seed", "1")
    assert G.main(["--candidate", str(models["good"]), "--production", str(models["production"]),
                   "--synthetic", "4", "--dry-run"]) == G.EXIT_ERROR


def test_single_class_holdout(models, tmp_path, registry):
    t = generate(3000, 2, registry)
    t = t.take(time_order(t))
    labels = np.asarray(t.column("label")).copy()
    labels[time_split(len(labels)).test] = 0
    t = t.set_column(t.schema.get_field_index("label"), t.schema.field("label"), pa.array(labels, pa.int8()))
    write_parquet(t, tmp_path / "rows" / "part-0.parquet")
    with pytest.raises(TrainerError, match=r"holdout \(300 rows.*one class only \(label=0\)"):
        _dry(models["good"], models["production"], "--data", str(tmp_path / "rows"))


def test_parquet_rows_are_read_like_the_trainer_reads_them(models, tmp_path, registry):
    """--data: the same loader (final rows only); the same figures as --synthetic on the same rows."""
    t = generate(N, SEED, registry)
    write_parquet(t, tmp_path / "rows" / "part-0.parquet")
    _, a = _dry(models["good"], models["production"], "--data", str(tmp_path / "rows"))
    _, b = _dry(models["good"], models["production"], *ROWS)
    assert a["candidate"]["metrics"] == b["candidate"]["metrics"]
    assert a["holdout"]["impression_ids_sha256"] == b["holdout"]["impression_ids_sha256"]
