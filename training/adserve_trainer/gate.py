"""The promotion gate: a registered candidate model goes to shadow, or is retired.

A candidate passes only if it ranks about as well as production on the same
holdout and its served pCTR is calibrated.

    python -m adserve_trainer.gate --candidate DIR (--data ROWS [--truth FILE.csv] | --synthetic N [--seed S])
        [--production DIR] [--name ctr] [--adservectl PATH] [--database-url URL] [--schema S]
        [--out FILE] [--dry-run] [--ips-clip 10] [--registry features.toml]

Rule (issue 7, item 5), with the constants below:

    passed  iff  candidate_auc >= production_auc - AUC_TOLERANCE  and  candidate_ece < MAX_ECE

With no production model in the registry (and no ``--production``) the
candidate is judged on calibration alone. Both models are scored with
onnxruntime on exactly the same rows, the trainer's evaluation slice of ROWS
(``experiment.time_split``: time order, the last 10 %), each from its own
manifest's ``feature_order`` (by name, registry defaults for missing
features), and each served pCTR is the ranker's: the manifest's calibration
applied with ``calibration.apply``. AUC and ECE are ``metrics.summary``'s,
weighted as in report.json.

The decision is printed, written as JSON (``--out``, default
``DIR/gate.json``) and recorded in the registry: passed -> ``adservectl
models promote --to shadow``, refused -> ``--to retired``, the reason text
carrying the numbers. Exit status: EXIT_PASSED (0), EXIT_REFUSED (1),
EXIT_ERROR (2: bad input, candidate not registered, adservectl failed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import EXIT_ERROR, TrainerError, cli

# The rule. The candidate may rank at most this much worse than production ...
AUC_TOLERANCE = 0.002
# ... and its served pCTR must have an expected calibration error below this (strict).
MAX_ECE = 0.02
# AUCs are compared with this slack so that a difference of exactly
# -AUC_TOLERANCE passes despite floating-point rounding (AUC on a few thousand
# rows moves in steps far larger than this).
FLOAT_SLACK = 1e-9

EXIT_PASSED = 0
EXIT_REFUSED = 1

GATE_FILE = "gate.json"
DEFAULT_MODEL_NAME = "ctr"  # RegistryConfig::default().model_name
STAGE_PASSED = "shadow"
STAGE_REFUSED = "retired"
ADSERVECTL_TIMEOUT_S = 120
RULE = f"candidate_auc >= production_auc - {AUC_TOLERANCE} and candidate_ece < {MAX_ECE}"


# --------------------------------------------------------------------------- the rule


@dataclass(frozen=True)
class Decision:
    passed: bool
    failed: tuple[str, ...]  # the rules that failed: "auc", "ece"
    checks: dict  # per rule: the numbers and whether it passed
    text: str  # one line: "auc 0.7412 >= 0.7399 - 0.002 = 0.7379; ece 0.0123 < 0.02"

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "refused"


def decide(
    candidate_auc: float, candidate_ece: float, production_auc: float | None, production_version: str | None = None
) -> Decision:
    """The gate's rule; ``production_auc`` None: no production model, calibration alone.
    ``production_version`` only names production in the text."""
    named = (("candidate auc", candidate_auc), ("candidate ece", candidate_ece), ("production auc", production_auc))
    for nm, v in named:
        if v is not None and not np.isfinite(v):
            raise TrainerError(f"{nm} is {v}: cannot decide")
    checks: dict = {}
    parts: list[str] = []
    if production_auc is None:
        checks["auc"] = {"passed": None, "candidate": candidate_auc, "skipped": "no production model"}
        parts.append(f"auc {candidate_auc:.6f} (no production model: judged on calibration alone)")
    else:
        minimum = production_auc - AUC_TOLERANCE
        ok = candidate_auc - production_auc >= -AUC_TOLERANCE - FLOAT_SLACK
        checks["auc"] = {
            "passed": ok,
            "candidate": candidate_auc,
            "production": production_auc,
            "difference": candidate_auc - production_auc,
            "tolerance": AUC_TOLERANCE,
            "minimum": minimum,
        }
        named = f"production ({production_version})" if production_version else "production"
        parts.append(
            f"auc {candidate_auc:.6f} {'>=' if ok else '<'} {named} {production_auc:.6f} - {AUC_TOLERANCE} "
            f"= {minimum:.6f}"
        )
    ok = candidate_ece < MAX_ECE
    checks["ece"] = {"passed": ok, "candidate": candidate_ece, "maximum": MAX_ECE, "strict": True}
    parts.append(f"ece {candidate_ece:.6f} {'<' if ok else '>='} {MAX_ECE}")
    failed = tuple(k for k, c in checks.items() if c["passed"] is False)
    return Decision(passed=not failed, failed=failed, checks=checks, text="; ".join(parts))


# --------------------------------------------------------------------------- models


@dataclass
class Model:
    dir: Path
    manifest: dict
    onnx: bytes
    sha256: str

    @property
    def version(self) -> str:
        return self.manifest["model_version"]


def read_model_dir(path: str | Path, registry, what: str) -> Model:
    """``dir/manifest.json`` + ``dir/model.onnx``, with the checks the registry and
    the ranker make at load (crates/adserve-registry/src/manifest.rs, read_model_dir)."""
    from . import calibration as C
    from .train import MANIFEST_FILE, MODEL_FILE

    d = Path(path)
    if not d.is_dir():
        raise TrainerError(f"{what} model directory does not exist: {d}")
    mpath, opath = d / MANIFEST_FILE, d / MODEL_FILE
    for p in (mpath, opath):
        if not p.is_file():
            raise TrainerError(f"{what} model {d}: {p.name} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"{what} manifest {mpath}: not JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise TrainerError(f"{what} manifest {mpath}: not a JSON object")
    for key in ("model_version", "input_name", "output_name", "feature_order", "onnx_sha256"):
        if key not in manifest:
            raise TrainerError(f"{what} manifest {mpath}: no {key!r}")
    version = manifest["model_version"]
    if not isinstance(version, str) or not 1 <= len(version.encode()) <= 128:
        raise TrainerError(f"{what} manifest {mpath}: model_version must be 1 to 128 bytes")
    order = manifest["feature_order"]
    if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
        raise TrainerError(f"{what} manifest {mpath}: feature_order must be a non-empty list of names")
    unknown = [n for n in order if n not in registry.defaults]
    if unknown:
        raise TrainerError(
            f"{what} manifest {mpath}: features not in the feature registry ({registry.path}): {', '.join(unknown)}"
        )
    dup = sorted({n for n in order if order.count(n) > 1})
    if dup:
        raise TrainerError(f"{what} manifest {mpath}: features listed twice: {', '.join(dup)}")
    _check_typed_inputs(manifest.get("typed_inputs", []), order, registry, f"{what} manifest {mpath}")
    want = manifest["onnx_sha256"]
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", want):
        raise TrainerError(f"{what} manifest {mpath}: onnx_sha256 {want!r} is not 64 hex digits")
    if manifest.get("calibration") is not None:
        try:
            C.check(manifest["calibration"])
        except TrainerError as e:
            raise TrainerError(f"{what} manifest {mpath}: {e}") from e
    data = opath.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want.lower():
        raise TrainerError(
            f"{what} model {d}: model.onnx has sha256 {got}, its manifest says {want}: a torn copy or a swapped file"
        )
    return Model(dir=d, manifest=manifest, onnx=data, sha256=got)


def _check_typed_inputs(inputs, dense: list[str], registry, where: str) -> None:
    """The gate scores int64 inputs of registry categorical features (the
    ranker's rules: adserve_registry::manifest::check_typed_inputs)."""
    if not isinstance(inputs, list):
        raise TrainerError(f"{where}: typed_inputs must be a list")
    cats = {c.name for c in registry.categorical}
    seen: set[str] = set()
    for i, t in enumerate(inputs):
        at = f"{where}: typed_inputs[{i}]"
        if not isinstance(t, dict) or set(t) != {"name", "dtype", "features"}:
            raise TrainerError(f"{at} must be an object with name, dtype and features")
        if t["dtype"] != "int64":
            raise TrainerError(f"{at}: dtype {t['dtype']!r}: the gate scores int64 (categorical) inputs only")
        feats = t["features"]
        if not isinstance(feats, list) or not feats or not all(isinstance(n, str) for n in feats):
            raise TrainerError(f"{at}: features must be a non-empty list of names")
        unknown = [n for n in feats if n not in cats]
        if unknown:
            raise TrainerError(f"{at}: not registry categorical features ({registry.path}): {', '.join(unknown)}")
        twice = [n for n in feats if n in seen or feats.count(n) > 1]
        if twice:
            raise TrainerError(f"{at}: features listed twice: {', '.join(sorted(set(twice)))}")
        seen.update(feats)


def served_pctr(model: Model, X: np.ndarray, ids: np.ndarray, registry, what: str) -> np.ndarray:
    """What the ranker serves for registry-ordered rows ``X`` and bucket ids
    ``ids``: the model's own feature_order (by name) and each typed input's
    features (by name), onnxruntime, then the manifest's calibration."""
    from . import calibration as C
    from .export import session

    cols = [registry.names.index(n) for n in model.manifest["feature_order"]]
    Xm = np.ascontiguousarray(X[:, cols], dtype=np.float32)
    inp, outp = model.manifest["input_name"], model.manifest["output_name"]
    feeds = {inp: Xm}
    cat_names = [c.name for c in registry.categorical]
    for t in model.manifest.get("typed_inputs", []):
        # read_model checked each typed input names registry categoricals.
        feeds[t["name"]] = np.ascontiguousarray(ids[:, [cat_names.index(n) for n in t["features"]]], dtype=np.int64)
    try:
        sess = session(model.onnx)
        inputs = [i.name for i in sess.get_inputs()]
        outputs = [o.name for o in sess.get_outputs()]
        if sorted(inputs) != sorted(feeds):
            raise TrainerError(
                f"{what} model {model.dir}: ONNX inputs are {inputs}, the manifest names {sorted(feeds)} "
                "(input_name and typed_inputs)"
            )
        if outp not in outputs:
            raise TrainerError(f"{what} model {model.dir}: ONNX has no output {outp!r} (outputs {outputs})")
        raw = sess.run([outp], feeds)[0]
    except TrainerError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types
        raise TrainerError(f"{what} model {model.dir}: onnxruntime failed: {e}") from e
    raw = np.asarray(raw)
    if raw.size != len(Xm) or (raw.ndim == 2 and raw.shape[1] != 1) or raw.ndim > 2:
        raise TrainerError(f"{what} model {model.dir}: output {outp!r} has shape {raw.shape}, expected ({len(Xm)}, 1)")
    raw = raw.reshape(-1)
    if not np.all(np.isfinite(raw) & (raw >= 0) & (raw <= 1)):
        raise TrainerError(f"{what} model {model.dir}: output {outp!r} is not a probability on every row")
    return C.apply(model.manifest.get("calibration"), raw)


# --------------------------------------------------------------------------- the holdout


@dataclass
class Holdout:
    X: np.ndarray  # registry order, float32
    ids: np.ndarray  # categorical bucket ids, registry.categorical order, int64
    y: np.ndarray
    w: np.ndarray
    rows: int
    of_rows: int  # rows in the whole dataset
    start: int  # position of the first holdout row in time order
    dataset: str
    rows_sha256: str  # sha256 of the holdout's impression ids, in time order
    served_at: tuple[str, str]
    same_as_candidate_evaluation: bool | None
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        pos = int(np.sum(self.y == 1))
        return {
            "slice": "evaluation",
            "definition": "experiment.time_split: rows sorted by served_at; last 10% "
            "(the second half of the last 20%); the trainer reports on the same slice",
            "rows": self.rows,
            "positives": pos,
            "negatives": self.rows - pos,
            "weight": float(np.sum(self.w)),
            "of_rows": self.of_rows,
            "rows_range": [self.start, self.start + self.rows],
            "dataset": self.dataset,
            "served_at": list(self.served_at),
            "impression_ids_sha256": self.rows_sha256,
            "same_as_candidate_evaluation": self.same_as_candidate_evaluation,
        }


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def holdout(table, registry, dataset: str, ips_clip: float, candidate_manifest: dict) -> Holdout:
    """The trainer's evaluation slice of ``table`` and its weights (see train.run)."""
    import pyarrow as pa

    from . import experiment as E
    from .data import build_matrix, build_typed, row_weights, time_order
    from .train import WEIGHTING, negative_keep_rate

    if table.num_rows == 0:
        raise TrainerError(f"empty holdout: {dataset} has no rows")
    table = table.take(time_order(table))
    X, y, _ = build_matrix(table, registry)
    cat_ids, _ = build_typed(table, registry)
    keep_rate = negative_keep_rate(table)
    w = row_weights(table, ips_clip) * np.where(y == 0, 1.0 / keep_rate, 1.0)
    n = len(y)
    try:
        test = E.time_split(n).test
    except TrainerError as e:
        raise TrainerError(
            f"empty holdout: {n} rows are too few for the trainer's time split "
            f"(the holdout is the last 10% of the rows): {e}"
        ) from e
    rows = test.stop - test.start
    if rows < 1:
        raise TrainerError(f"empty holdout: the evaluation slice of {n} rows is empty")
    y_t, w_t = y[test], w[test]
    if y_t.min() == y_t.max():
        raise TrainerError(
            f"the holdout ({rows} rows, the last 10% of {dataset}) has labels of one class only "
            f"(label={int(y_t[0])}): AUC is undefined; use more rows"
        )
    E.check_weights(w_t, "holdout rows")

    warnings: list[str] = []
    counts = [candidate_manifest.get(k) for k in ("training_rows", "calibration_rows", "evaluation_rows")]
    same: bool | None = None
    if all(isinstance(c, int) for c in counts):
        ct, cc, ce = counts
        same = ct + cc + ce == n and ct + cc == test.start and ce == rows
        if not same:
            warnings.append(
                f"the candidate was trained and evaluated on {ct + cc + ce} rows ({ce} evaluation rows), this dataset "
                f"has {n}: its evaluation slice is not the candidate's and may overlap the candidate's training rows"
            )
    want = WEIGHTING.format(clip=ips_clip) if ips_clip > 0 else "training: weight (propensities ignored)"
    if "weighting" in candidate_manifest and candidate_manifest["weighting"] != want:
        warnings.append(
            f"the candidate was weighted {candidate_manifest['weighting']!r}; "
            f"the gate weighs rows {want!r} (--ips-clip)"
        )
    ids = table.column("impression_id").slice(test.start, rows).to_pylist()
    sha = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    served = table.column("served_at").slice(test.start, rows).cast(pa.int64()).to_numpy(zero_copy_only=False)
    return Holdout(
        X=X[test],
        ids=cat_ids[test],
        y=y_t,
        w=w_t,
        rows=rows,
        of_rows=n,
        start=test.start,
        dataset=dataset,
        rows_sha256=sha,
        served_at=(_iso(int(served[0])), _iso(int(served[-1]))),
        same_as_candidate_evaluation=same,
        warnings=warnings,
    )


# --------------------------------------------------------------------------- adservectl


def find_adservectl(path: str | Path | None) -> str:
    """--adservectl, else $CARGO_TARGET_DIR/debug/adservectl, else adservectl on PATH."""
    hint = "build it (cargo build -p adserve-registry --bin adservectl) or pass --adservectl PATH"
    if path is not None:
        p = Path(path)
        if not p.is_file() or not os.access(p, os.X_OK):
            raise TrainerError(f"adservectl not found or not executable: {p}; {hint}")
        return str(p)
    home = Path(os.environ.get("ADSTACK_HOME") or Path.home() / ".cache" / "adserve")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or home / "target")
    p = target / "debug" / "adservectl"
    if p.is_file() and os.access(p, os.X_OK):
        return str(p)
    found = shutil.which("adservectl")
    if found:
        return found
    raise TrainerError(f"adservectl not found ({p} does not exist, none on PATH); {hint}")


@dataclass
class Adservectl:
    """`adservectl` as a subprocess (its `models list --json` prints one ModelRecord per line)."""

    path: str
    name: str = DEFAULT_MODEL_NAME
    database_url: str | None = None
    schema: str | None = None

    def argv(self, *args: str) -> list[str]:
        g = []
        if self.database_url is not None:
            g += ["--database-url", self.database_url]
        if self.schema is not None:
            g += ["--schema", self.schema]
        return [self.path, *g, *args]

    def run(self, *args: str) -> str:
        argv = self.argv(*args)
        # The command for messages, without the (long) reason text.
        shown = " ".join(["adservectl", *("..." if i and args[i - 1] == "--reason" else a for i, a in enumerate(args))])
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=ADSERVECTL_TIMEOUT_S, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as e:
            raise TrainerError(f"adservectl not found: {self.path}") from e
        except PermissionError as e:
            raise TrainerError(f"adservectl is not executable: {self.path}") from e
        except subprocess.TimeoutExpired as e:
            raise TrainerError(f"`{shown}` did not finish within {ADSERVECTL_TIMEOUT_S} s") from e
        if p.returncode != 0:
            err = (p.stderr or "").strip() or "(no stderr)"
            raise TrainerError(f"`{shown}` failed (exit {p.returncode}): {err}")
        return p.stdout

    def list(self) -> list[dict]:
        out = self.run("models", "list", "--name", self.name, "--json")
        records = []
        for i, line in enumerate(out.splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise TrainerError(f"`adservectl models list --json` line {i} is not JSON: {e}") from e
            if not isinstance(r, dict) or not all(k in r for k in ("name", "version", "stage", "artifact")):
                raise TrainerError(f"`adservectl models list --json` line {i} is not a model record: {line[:200]}")
            if r["name"] == self.name:
                records.append(r)
        return records

    def promote(self, version: str, to: str, reason: str) -> str:
        return self.run("models", "promote", "--name", self.name, "--version", version, "--to", to, "--reason", reason)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .data import IPS_CLIP

    ap = argparse.ArgumentParser(prog="python -m adserve_trainer.gate", description=__doc__.split("\n")[0])
    ap.add_argument("--candidate", type=Path, required=True, help="the candidate's model directory (registered)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Parquet file or directory of label-joiner rows (final rows are used)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic rows (as train.py --synthetic)")
    ap.add_argument("--seed", type=int, default=7, help="--synthetic: seed (default 7, as train.py)")
    ap.add_argument(
        "--truth", type=Path, metavar="FILE",
        help="--data: keep only the rows whose impression_id the truth CSV lists, as train.py --truth does, "
        "so the holdout is the candidate's own evaluation slice even when DATA holds other runs' rows",
    )
    ap.add_argument(
        "--production", type=Path, metavar="DIR", help="production model directory (default: the registry's)"
    )
    ap.add_argument("--name", default=DEFAULT_MODEL_NAME, help=f"registry model name (default {DEFAULT_MODEL_NAME})")
    ap.add_argument(
        "--adservectl", type=Path, metavar="PATH",
        help="adservectl binary (default $CARGO_TARGET_DIR/debug/adservectl, then adservectl on PATH)",
    )
    ap.add_argument(
        "--database-url", help="registry database, passed to adservectl (default: its ADSERVE_REGISTRY__POSTGRES__URL)"
    )
    ap.add_argument(
        "--schema", help="registry schema, passed to adservectl (default: its ADSERVE_REGISTRY__POSTGRES__SCHEMA)"
    )
    ap.add_argument("--out", type=Path, metavar="FILE", help=f"decision as JSON (default CANDIDATE/{GATE_FILE})")
    ap.add_argument("--dry-run", action="store_true", help="decide and print; never write to the registry")
    ap.add_argument(
        "--ips-clip", type=float, default=IPS_CLIP, help=f"row weights, as the trainer's --ips-clip (default {IPS_CLIP})"
    )
    ap.add_argument("--registry", type=Path, help="features.toml (default: crates/adserve-features/features.toml)")
    return ap.parse_args(argv)


def _write_json(path: Path, doc: dict) -> None:
    from .train import json_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(json_bytes(doc))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_doc(m: Model, metrics: dict, source: str) -> dict:
    cal = m.manifest.get("calibration") or {}
    return {
        "version": m.version,
        "dir": str(m.dir.resolve()),
        "source": source,
        "onnx_sha256": m.sha256,
        "model_type": m.manifest.get("model_type"),
        "feature_order": m.manifest["feature_order"],
        "calibration_method": (cal.get("mapping") or {}).get("method", "none"),
        "keep_rate": cal.get("keep_rate", 1.0),
        "metrics": metrics,
        "manifest_metrics": m.manifest.get("metrics"),
    }


def run(argv: list[str] | None = None) -> tuple[int, dict]:
    """Decide, write the JSON, record in the registry; (exit status, the decision document).

    Raises TrainerError before a decision (bad input, registry lookups);
    a failed registry write after the decision returns EXIT_ERROR with the
    error in the document."""
    args = parse_args(argv)
    from . import metrics as M
    from .registry import load_registry

    if args.truth is not None and args.data is None:
        raise TrainerError("--truth goes with --data (label-joiner rows with impression ids), not --synthetic")
    registry = load_registry(args.registry)
    cand = read_model_dir(args.candidate, registry, "candidate")
    warnings: list[str] = []

    ctl: Adservectl | None = None
    records: list[dict] | None = None
    if not (args.dry_run and args.production is not None):
        ctl = Adservectl(find_adservectl(args.adservectl), args.name, args.database_url, args.schema)
        records = ctl.list()

    register_hint = f"run `adservectl models register --name {args.name} --dir {args.candidate}` first"
    if records is not None:
        rec = next((r for r in records if r["version"] == cand.version), None)
        problem = None
        if rec is None:
            problem = (
                f"candidate {cand.version} ({args.candidate}) is not registered under model name {args.name!r}: "
                + register_hint
            )
        elif rec["stage"] != "candidate":
            problem = (
                f"{args.name} {cand.version} is in stage {rec['stage']}, not candidate: the gate judges candidates only"
                + (
                    f" (re-qualify: adservectl models promote --name {args.name} --version {cand.version}"
                    " --to candidate)"
                    if rec["stage"] == "retired"
                    else ""
                )
            )
        elif str(rec.get("onnx_sha256", cand.sha256)).lower() != cand.sha256:
            problem = (
                f"{args.name} {cand.version} is registered with model.onnx sha256 {rec['onnx_sha256']}, "
                f"but {args.candidate}/model.onnx has {cand.sha256}: register the new model under a new version"
            )
        if problem is not None:
            if not args.dry_run:
                raise TrainerError(problem)
            warnings.append(problem)

    prod: Model | None = None
    prod_source = None
    if args.production is not None:
        prod = read_model_dir(args.production, registry, "production")
        prod_source = f"--production {args.production}"
    else:
        assert records is not None
        live = [r for r in records if r["stage"] == "production"]
        if len(live) > 1:
            raise TrainerError(f"the registry lists {len(live)} production versions of {args.name}")
        if live:
            r = live[0]
            prod = read_model_dir(r["artifact"], registry, f"production ({r['version']}, from the registry)")
            if str(r.get("onnx_sha256", prod.sha256)).lower() != prod.sha256:
                raise TrainerError(
                    f"production {r['version']}: {r['artifact']}/model.onnx has sha256 {prod.sha256}, "
                    f"the registry recorded {r['onnx_sha256']}"
                )
            if prod.version != r["version"]:
                raise TrainerError(
                    f"production {r['version']}: the manifest in {r['artifact']} says model_version {prod.version}"
                )
            prod_source = "registry"

    # The rows: exactly as the trainer reads them.
    if args.synthetic is not None:
        from .synthetic import generate

        if args.synthetic <= 0:
            raise TrainerError("--synthetic N must be positive")
        table = generate(args.synthetic, args.seed, registry)
        dataset = f"synthetic: {args.synthetic} rows, seed {args.seed} (adserve_trainer.synthetic)"
    else:
        from .data import load_rows

        table = load_rows(args.data)
        dataset = f"parquet: {args.data} ({table.num_rows} rows)"
        if args.truth is not None:
            from .truth import attach, read_truth

            table, _, _, counts = attach(table, read_truth(args.truth))
            dataset += f"; the {counts['rows_with_truth']} with a truth in {args.truth}"
    hold = holdout(table, registry, dataset, args.ips_clip, cand.manifest)
    warnings += hold.warnings

    # Both models on exactly the same rows and weights; metrics.summary as in report.json.
    m_cand = M.summary(hold.y, served_pctr(cand, hold.X, hold.ids, registry, "candidate"), hold.w)
    m_prod = None
    if prod is not None:
        m_prod = M.summary(hold.y, served_pctr(prod, hold.X, hold.ids, registry, "production"), hold.w)
    if hold.same_as_candidate_evaluation and isinstance(cand.manifest.get("metrics"), dict):
        for k in ("auc", "ece"):
            v = cand.manifest["metrics"].get(k)
            if isinstance(v, (int, float)) and abs(v - m_cand[k]) > 1e-5:
                warnings.append(
                    f"candidate {k} on its own evaluation slice is {m_cand[k]:.6f}, its manifest says {v:.6f}: "
                    "not the rows (or weights) it was trained with?"
                )

    decision = decide(
        m_cand["auc"], m_cand["ece"], None if m_prod is None else m_prod["auc"], None if prod is None else prod.version
    )
    holdout_text = f"holdout {hold.rows} rows, last 10% of {hold.dataset}, ids sha256 {hold.rows_sha256[:12]}"
    failed = f" ({', '.join(decision.failed)})" if decision.failed else ""
    reason = f"gate: {decision.verdict}{failed}; {decision.text}; {holdout_text}"
    to = STAGE_PASSED if decision.passed else STAGE_REFUSED

    doc = {
        "gate": "adserve_trainer.gate",
        "decided_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "decision": decision.verdict,
        "passed": decision.passed,
        "failed": list(decision.failed),
        "rule": RULE,
        "thresholds": {"auc_tolerance": AUC_TOLERANCE, "max_ece": MAX_ECE, "ece_strict": True},
        "judged_on": "auc and calibration" if prod is not None else "calibration alone (no production model)",
        "checks": decision.checks,
        "reason": reason,
        "candidate": _model_doc(cand, m_cand, str(args.candidate)),
        "production": None if prod is None else _model_doc(prod, m_prod, prod_source),
        "holdout": hold.describe(),
        "weighting": {"ips_clip": args.ips_clip},
        "warnings": warnings,
        "registry": {
            "name": args.name,
            "dry_run": args.dry_run,
            "action": f"promote --to {to}",
            "recorded": False,
        },
    }

    status = EXIT_PASSED if decision.passed else EXIT_REFUSED
    error = None
    if not args.dry_run:
        assert ctl is not None
        try:
            doc["registry"]["output"] = ctl.promote(cand.version, to, reason).strip()
            doc["registry"]["recorded"] = True
        except TrainerError as e:
            error = str(e)
            doc["registry"]["error"] = error
            status = EXIT_ERROR
    out = args.out if args.out is not None else args.candidate / GATE_FILE
    _write_json(out, doc)
    doc["out"] = str(out)
    _print(doc, cand, prod, hold, decision, out, error)
    return status, doc


def _print(doc: dict, cand: Model, prod: Model | None, hold: Holdout, decision: Decision, out: Path, error) -> None:
    for w in doc["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    h = doc["holdout"]
    print(
        f"gate: {cand.version} vs "
        + (f"production {prod.version} ({doc['production']['source']})" if prod is not None else "no production model")
    )
    print(
        f"  holdout: {h['rows']} rows ({h['positives']} clicks), the evaluation slice (last 10% by served_at, "
        f"rows {h['rows_range'][0]}..{h['rows_range'][1]}) of {h['dataset']}"
    )
    for label, m in (("candidate", doc["candidate"]), ("production", doc["production"])):
        if m is None:
            continue
        s = m["metrics"]
        print(
            f"  {label:10s} auc {s['auc']:.6f}  ece {s['ece']:.6f}  logloss {s['logloss']:.5f}  "
            f"calibration {s['calibration']:.3f}  ({m['calibration_method']}, {m['version']})"
        )
    c = decision.checks
    if c["auc"]["passed"] is None:
        print("  auc rule: skipped, no production model: the candidate is judged on calibration alone")
    else:
        a = c["auc"]
        print(
            f"  auc rule: {a['candidate']:.6f} {'>=' if a['passed'] else '<'} {a['production']:.6f} - {AUC_TOLERANCE}"
            f" = {a['minimum']:.6f}  ({'ok' if a['passed'] else 'FAILED'}; difference {a['difference']:+.6f})"
        )
    e = c["ece"]
    ok = "ok" if e["passed"] else "FAILED"
    print(f"  ece rule: {e['candidate']:.6f} {'<' if e['passed'] else '>='} {MAX_ECE}  ({ok})")
    verdict = "PASSED" if decision.passed else "REFUSED (" + ", ".join(f"{k} rule failed" for k in decision.failed) + ")"
    reg = doc["registry"]
    if reg["dry_run"]:
        where = f"dry run: the registry is not changed (would {reg['action']})"
    elif reg["recorded"]:
        where = f"{doc['registry']['name']} {cand.version} -> {reg['action'].split()[-1]} (recorded in the registry)"
    else:
        where = "NOT recorded in the registry"
    print(f"gate: {verdict}; {where}; decision written to {out}")
    if error is not None:
        print(f"error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return cli(lambda: run(argv)[0])


if __name__ == "__main__":
    sys.exit(main())
