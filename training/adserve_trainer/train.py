"""CLI: train the CTR models (LR baseline and DCN-v2), evaluate, calibrate, export ONNX + manifest.

    python -m adserve_trainer.train (--data PATH [--truth FILE.csv] | --synthetic N) [--model dcnv2|lr] [--seed 7] [--out DIR]
                                    [--version V] [--calibration platt|isotonic|none] [--ips-clip 10]
                                    [--epochs 30] [--batch-size 512] [--lr X] [--l2 1.0] [--threads 1]
    python -m adserve_trainer.train --synthetic N --seed S --write-synthetic FILE.parquet
    python -m adserve_trainer.train --criteo FILE --out DIR [--limit N] [--hash-buckets 20000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import TrainerError, cli

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
PLOT_FILE = "calibration.png"
MODELS = ("dcnv2", "lr")
DEFAULT_LR = {"lr": 1e-2, "dcnv2": 2e-3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m adserve_trainer.train", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Parquet file or directory of *.parquet label-joiner rows")
    src.add_argument("--synthetic", type=int, metavar="N", help="train on N synthetic rows instead of --data")
    src.add_argument("--criteo", type=Path, metavar="FILE", help="Criteo Display Advertising Challenge TSV: report only")
    ap.add_argument(
        "--truth", type=Path, metavar="FILE",
        help="with --data: CSV impression_id,p_click,p_label of true probabilities (a simulator's); "
        "only rows with a truth are used and the report scores the models against it",
    )
    ap.add_argument("--model", choices=MODELS, default="dcnv2", help="model exported for the ranker (default dcnv2)")
    ap.add_argument("--seed", type=int, default=7, help="seed for synthetic data, initialization and batch order")
    ap.add_argument("--out", type=Path, help="output directory (default: out/<version>)")
    ap.add_argument("--version", help='model_version (default: "ctr-<model>-" + UTC yyyymmddHHMMSS)')
    ap.add_argument(
        "--calibration", choices=("platt", "isotonic", "none"), default="platt",
        help="mapping fitted on the calibration slice and put into the manifest (default platt)",
    )
    ap.add_argument(
        "--ips-clip", type=float, default=10.0,
        help="weight rows by min(1/propensity, CLIP) (default 10; 0: ignore propensities)",
    )
    ap.add_argument("--epochs", type=int, default=30, help="maximum epochs (early stopping, patience --patience)")
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, help="Adam learning rate (default: lr 1e-2, dcnv2 2e-3)")
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty on weights, on the summed loss (default 1.0)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: light and deterministic)")
    ap.add_argument("--registry", type=Path, help="features.toml (default: crates/adserve-features/features.toml)")
    ap.add_argument("--write-synthetic", type=Path, metavar="PATH", help="with --synthetic: only write the rows to PATH")
    ap.add_argument("--limit", type=int, help="--criteo: read at most N lines")
    ap.add_argument("--hash-buckets", type=int, default=20_000, help="--criteo: hash buckets per field (20000)")
    return ap.parse_args(argv)


def write_atomically(out: Path, model_bytes: bytes, manifest: dict, extra: dict[str, bytes] | None = None) -> None:
    """Publish model.onnx + manifest.json (and report files) so a reader never sees a half-written model.

    New directory: every file is written into a sibling temp dir that is then
    renamed into place (one atomic rename). Existing directory: each file is
    written to a temp name and os.replace()d, the extra files first, then the
    model, and the manifest LAST; the manifest's onnx_sha256 lets a loader
    detect (and retry) a torn pair.
    """
    files = list((extra or {}).items()) + [(MODEL_FILE, model_bytes), (MANIFEST_FILE, manifest_bytes(manifest))]
    write_files_atomically(out, files)


def write_files_atomically(out: Path, files: list[tuple[str, bytes]]) -> None:
    """Write ``files`` (in order) into ``out`` as described in write_atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for name, data in files:
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)
        if not out.exists():
            try:
                os.rename(tmp, out)
                return
            except OSError:
                if not out.is_dir():
                    raise
        if not out.is_dir():
            raise TrainerError(f"--out {out} exists and is not a directory")
        for name, _ in files:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()


def json_bytes(doc: dict) -> bytes:
    """A report as JSON; NaN / infinite figures (e.g. an undefined AUC) become null."""
    return (json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n").encode()


def _finite(o):
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def negative_keep_rate(table) -> float:
    """The one negative keep rate the rows were written with (label-joiner downsampling)."""
    rates = set(table.column("keep_rate").unique().to_pylist())
    if len(rates) > 1:
        raise TrainerError(
            f"rows were written with different negative keep rates {sorted(rates)}; "
            "train on data written with one rate"
        )
    rate = float(rates.pop()) if rates else 1.0
    if not (0.0 < rate <= 1.0):
        raise TrainerError(f"rows were written with keep_rate {rate}, not in (0, 1]")
    return rate


def fit_configs(args: argparse.Namespace, batch_size: int | None = None) -> dict:
    from .fitting import FitConfig

    return {
        key: FitConfig(
            epochs=args.epochs,
            batch_size=batch_size or args.batch_size,
            lr=args.lr if args.lr is not None else DEFAULT_LR[key],
            l2=args.l2,
            patience=args.patience,
            seed=args.seed,
        )
        for key in MODELS
    }


# The std given to a column that is constant in the training rows (see ranker_candidates).
CONSTANT_COLUMN_SCALE = 1e30


def ranker_candidates(X: np.ndarray, ids: np.ndarray, train: slice, registry, args: argparse.Namespace) -> list:
    """LR on all dense features standardized; DCN-v2 with an embedding per
    indicator feature and per registry categorical feature (``ids``, their
    bucket ids in registry order, fed as the graph's int64 input)."""
    from .experiment import Candidate
    from .nets import Arch, DCNConfig, RankerGraph

    f = X.shape[1]
    # Registry features with `equals` are 0/1 request indicators: categorical
    # with two values, embedded inside the graph (Round, Clip, Cast, Gather).
    indicators = [j for j, feat in enumerate(registry.features) if feat.equals is not None]
    buckets = tuple(int(c.buckets) for c in registry.categorical)
    cfgs = fit_configs(args)

    def graph(kind: str, dense_cols: list[int], cat_cols: list[int], typed: tuple[int, ...] = ()):
        xs = X[train][:, dense_cols].astype(np.float64)
        mean = xs.mean(axis=0)
        std = xs.std(axis=0)
        # A column constant in training (a feature the data never filled)
        # carries nothing, and must not start to matter when serving fills
        # it: a scale of 1e30 keeps its standardized input ~0 for any value,
        # so the (random, never trained) weights it meets see nothing.
        std = np.where(std < 1e-6, CONSTANT_COLUMN_SCALE, std)
        cards = tuple(2 for _ in cat_cols) + typed
        arch = Arch(kind, len(dense_cols), cards, DCNConfig(emb_dim=4, cross_layers=2, hidden=(64, 32)))
        # The ids each typed field held in training; any other is served as
        # missing rather than through an embedding row training never moved.
        seen = [np.isin(np.arange(b), ids[train][:, k]) for k, b in enumerate(typed)] if typed else None
        return lambda: RankerGraph(
            arch, f, dense_cols, cat_cols, mean.astype(np.float32), std.astype(np.float32), typed_buckets=typed,
            typed_seen=seen,
        )

    dense = [j for j in range(f) if j not in indicators]
    dcn_inputs = (X, ids) if buckets else (X,)
    return [
        Candidate("lr", graph("lr", list(range(f)), []), (X,), cfgs["lr"]),
        Candidate("dcnv2", graph("dcnv2", dense, indicators, buckets), dcn_inputs, cfgs["dcnv2"]),
    ]


WEIGHTING = (
    "training: weight * min(1/propensity, {clip}); evaluation and calibration: the same, "
    "with negatives weighted by 1/keep_rate"
)


def run(argv: list[str] | None = None) -> dict:
    """Train and publish; returns the manifest (the report for --criteo). Raises TrainerError on bad input."""
    args = parse_args(argv)
    if args.truth is not None and args.data is None:
        source = "--synthetic" if args.synthetic is not None else "--criteo"
        raise TrainerError(
            f"--truth goes with --data (label-joiner rows with impression ids), not {source}"
            + (" (synthetic rows carry their own true probability)" if source == "--synthetic" else "")
        )
    if args.criteo is not None:
        from .criteo import train_criteo

        return train_criteo(args)

    from .data import build_matrix, build_typed, load_rows, row_weights, time_order
    from .registry import load_registry
    from .synthetic import generate, true_probability, write_parquet
    from .truth import attach, read_truth

    registry = load_registry(args.registry)
    if args.write_synthetic is not None:
        if args.synthetic is None:
            raise TrainerError("--write-synthetic needs --synthetic N")
        if args.synthetic <= 0:
            raise TrainerError("--synthetic N must be positive")
        path = write_parquet(generate(args.synthetic, args.seed, registry), args.write_synthetic)
        print(f"wrote {args.synthetic} synthetic rows (seed {args.seed}) to {path}")
        return {}

    if args.synthetic is not None:
        if args.synthetic <= 0:
            raise TrainerError("--synthetic N must be positive")
        table = generate(args.synthetic, args.seed, registry)
        data_desc = f"synthetic: {args.synthetic} rows, seed {args.seed} (adserve_trainer.synthetic)"
    else:
        table = load_rows(args.data)
        data_desc = f"parquet: {args.data} ({table.num_rows} rows)"

    # Rows by the level of the ranker's fallback chain that scored them when
    # served: all are trained on (their labels are real), but a dataset
    # scored mostly by fallbacks (an outage) is worth a look.
    score_levels = {
        str(v["values"]): int(v["counts"]) for v in table.column("score_level").value_counts().to_pylist()
    }

    # True probabilities per row, when known: p_label (the probability the row's
    # label is 1) is the oracle every model is compared with.
    p_label = p_click = truth_counts = None
    if args.truth is not None:
        truth = read_truth(args.truth)
        table, p_click, p_label, truth_counts = attach(table, truth)
        c = truth_counts
        data_desc += (
            f"; --truth {args.truth}: {c['rows_with_truth']} rows with truth used, "
            f"{c['rows_dropped_without_truth']} without dropped"
        )
        print(
            f"truth {args.truth}: {c['rows_with_truth']} of {c['rows_read']} rows have a truth "
            f"({c['rows_dropped_without_truth']} dropped without one); "
            f"{c['truth_ids_without_row']} of {c['truth_ids']} truth ids have no row"
        )

    # Everything below is in time order (served_at); the truth moves with its rows.
    order = time_order(table)
    table = table.take(order)
    if p_label is not None:
        p_label, p_click = p_label[order], p_click[order]
    X, y, stats = build_matrix(table, registry)
    ids, _ = build_typed(table, registry)
    if args.synthetic is not None:
        p_label = true_probability(X, registry.names)
    keep_rate = negative_keep_rate(table)
    w_train = row_weights(table, args.ips_clip)
    w_eval = w_train * np.where(y == 0, 1.0 / keep_rate, 1.0)

    from . import calibration as C
    from . import experiment as E
    from .export import (
        INPUT_NAME, OUTPUT_NAME, REFERENCE_FILE, REFERENCE_ROWS, reference_doc, to_onnx, typed_inputs,
        verify_with_onnxruntime,
    )
    from .fitting import predict, set_threads
    from .nets import MODEL_TYPES

    split = E.time_split(len(y))
    E.check_labels(y, split)
    set_threads(args.threads)
    outcomes = E.run(
        ranker_candidates(X, ids, split.train, registry, args), y, w_train, w_eval, split,
        keep_rate=keep_rate, calibration=args.calibration, seed=args.seed,
    )
    chosen = outcomes[args.model]

    now = datetime.now(timezone.utc)
    version = args.version or f"ctr-{args.model}-" + now.strftime("%Y%m%d%H%M%S")
    graph = chosen.model
    categorical = [c.name for c in registry.categorical] if graph.n_typed else []
    model_bytes = to_onnx(
        graph, registry.names, version,
        doc=f"{MODEL_TYPES[args.model]} CTR model; inputs are RAW features in feature_order "
        "(and bucket ids of typed_inputs), output pctr.",
        categorical=categorical,
    )
    holdout = slice(split.calib.start, split.test.stop)
    typed_ids = ids[holdout] if graph.n_typed else None
    expected = predict(graph, (X[holdout], ids[holdout]) if graph.n_typed else (X[holdout],))
    max_diff = verify_with_onnxruntime(model_bytes, X[holdout], expected, ids=typed_ids)

    calibration = {"keep_rate": keep_rate, "mapping": chosen.mapping}
    C.check(calibration)
    served = chosen.served
    weighting = WEIGHTING.format(clip=args.ips_clip) if args.ips_clip > 0 else "training: weight (propensities ignored)"
    manifest = {
        "model_version": version,
        "model_type": MODEL_TYPES[args.model],
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "feature_order": registry.names,
        **({"typed_inputs": typed_inputs(categorical)} if categorical else {}),
        "feature_defaults": registry.defaults,
        "created_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "training_rows": split.sizes()["train"],
        "holdout_rows": split.sizes()["calibration"] + split.sizes()["evaluation"],
        "calibration_rows": split.sizes()["calibration"],
        "evaluation_rows": split.sizes()["evaluation"],
        # Evaluation rows, as served (after `calibration`); report.json has the rest.
        "metrics": {k: round(v, 6) for k, v in served.items()},
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "trainer": "adserve_trainer.train",
        "data": data_desc,
        "architecture": graph.arch.describe(),
        "weighting": weighting,
    }
    if keep_rate < 1.0 or calibration["mapping"]["method"] != "none":
        # The ranker serves calibration(raw): the keep-rate correction
        # p / (p + (1 - p) / keep_rate), then the mapping.
        manifest["calibration"] = calibration

    report = {
        "model_version": version,
        "dataset": data_desc,
        "score_levels": dict(sorted(score_levels.items())),
        "exported": args.model,
        **E.protocol(split, keep_rate, args.calibration, weighting),
        "models": {k: o.report() for k, o in outcomes.items()},
    }
    if p_label is not None:
        # The oracle: the true label probabilities scored like a model; each
        # model's served predictions against them (same rows, same weights).
        test = split.test
        oracle, vs_oracle = E.versus_oracle(outcomes, y[test], p_label[test], w_eval[test])
        report["oracle"] = {k: round(v, 6) for k, v in oracle.items()}
        for k, d in vs_oracle.items():
            report["models"][k].update({name: round(v, 6) for name, v in d.items()})
        if truth_counts is not None:
            we = w_eval[test]
            report["truth"] = {
                **truth_counts,
                "p_label": "P(label = 1): p_click times the probability the click arrives inside the label window",
                "evaluation_mean_p_click": round(float(np.sum(we * p_click[test]) / np.sum(we)), 6),
                "evaluation_mean_p_label": round(float(np.sum(we * p_label[test]) / np.sum(we)), 6),
            }
        else:
            report["truth"] = {"source": "adserve_trainer.synthetic.true_probability (p_label = p_click)"}
    png = E.plot_reliability(outcomes, f"{version}: evaluation rows ({split.sizes()['evaluation']})")
    out = args.out if args.out is not None else Path("out") / version
    # The ranker re-scores these evaluation rows at load and must agree.
    ref = slice(split.test.start, min(split.test.start + REFERENCE_ROWS, split.test.stop))
    reference = reference_doc(model_bytes, manifest, X[ref], ids[ref], registry)
    extra = {REPORT_FILE: json_bytes(report), PLOT_FILE: png, REFERENCE_FILE: json_bytes(reference)}
    write_atomically(out, model_bytes, manifest, extra)

    defaulted = {k: v for k, v in stats["defaulted_fraction"].items() if v > 0}
    sizes = split.sizes()
    print(f"model {version} ({MODEL_TYPES[args.model]}) -> {out}")
    print(f"  rows: {sizes['train']} train / {sizes['calibration']} calibration / {sizes['evaluation']} evaluation")
    for k, o in outcomes.items():
        u, s = o.metrics["uncalibrated"], o.served
        print(
            f"  {k:6s} auc {s['auc']:.4f}  logloss {s['logloss']:.5f}  ne {s['normalized_entropy']:.4f}  "
            f"ece {s['ece']:.5f} ({o.mapping['method']}; uncalibrated ece {u['ece']:.5f})  "
            f"epochs {o.fit.best_epoch}/{o.fit.epochs_run}"
        )
    if "oracle" in report:
        o = report["oracle"]
        vs = "; ".join(
            f"{k} auc/oracle {r['auc_vs_oracle']:.3f}, calibration vs truth {r['calibration_vs_truth']:.4f}"
            for k, r in report["models"].items()
        )
        print(f"  oracle auc {o['auc']:.4f}  logloss {o['logloss']:.5f}  ne {o['normalized_entropy']:.4f}; {vs}")
    print(f"  onnxruntime max |diff| vs PyTorch: {max_diff:.2e}")
    if defaulted:
        print("  filled with registry default: " + ", ".join(f"{k} {v:.1%}" for k, v in defaulted.items()))
    return manifest


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        run(argv)
        return 0

    return cli(body)


if __name__ == "__main__":
    sys.exit(main())
