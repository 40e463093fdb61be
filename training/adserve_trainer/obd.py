"""Open Bandit Dataset (ZOZOTOWN, Saito et al. 2020) replay: LR and DCN-v2 on the click log.

    bash training/scripts/fetch_obd.sh            # -> $ADSTACK_HOME/obd (default ~/.cache/adserve/obd)
    python -m adserve_trainer.obd --data ~/.cache/adserve/obd --out DIR

``--data`` holds ``<policy>/<campaign>/<campaign>.csv`` and
``<policy>/<campaign>/item_context.csv`` for policies ``random`` and ``bts``
and campaigns ``all``, ``men``, ``women`` (the layout of obp's sdist, whose
small sample has 10,000 rows per log). Every log named by ``--policies`` and
``--campaigns`` is read, merged and sorted by timestamp; the usual split
follows (first 80% train, last 20% holdout: calibration half, evaluation
half).

Per impression (one row: an item shown at a position, clicked or not):

* categorical (crc32-hashed into ``--hash-buckets`` buckets, embedded):
  user_feature_0..3, the item (campaign:item_id), position, campaign,
  item_feature_1..3 (joined from item_context.csv);
* dense (standardized on the training rows): item_feature_0, and the
  user-item affinity of the SHOWN item (column user-item_affinity_<item_id>);
* label: click.

Weighting: rows are weighted by ``min((1 / n_items) / propensity_score,
--ips-clip)``: the importance weight that turns the logging policy's choice
of item into a uniform choice over the campaign's items (the candidate set
a ranker scores). Rows of the uniform-random policy get exactly 1; Bernoulli
Thompson sampling rows are up- or down-weighted; the clip (default 10)
bounds the variance. ``--ips-clip 0`` trains and evaluates unweighted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import TrainerError, cli

POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
USER_FEATURES = [f"user_feature_{i}" for i in range(4)]
ITEM_CAT_FEATURES = [f"item_feature_{i}" for i in range(1, 4)]
CAT_FIELDS = USER_FEATURES + ["item", "position", "campaign"] + ITEM_CAT_FEATURES
DENSE_FIELDS = ["item_feature_0", "user_item_affinity"]
LOG_COLUMNS = ["timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES]
DEFAULT_BUCKETS = 1000


@dataclass
class OBDData:
    time: np.ndarray  # int64 microseconds
    y: np.ndarray
    propensity: np.ndarray
    n_items: np.ndarray  # items in the row's campaign
    dense: np.ndarray  # float64 [N, 2]
    cat_values: list[list[str]]  # per CAT_FIELDS, N strings
    sources: list[str]


def _read_csv(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not path.is_file():
        raise TrainerError(f"OBD file not found: {path} (fetch it with training/scripts/fetch_obd.sh)")
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as e:
        raise TrainerError(f"{path}: cannot read as CSV: {e}") from e


def _require(table, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise TrainerError(f"{path}: missing column(s) {', '.join(missing)}")


def read_log(data: Path, policy: str, campaign: str) -> dict:
    """One behaviour policy's log for one campaign, joined with its item context."""
    import pyarrow as pa
    import pyarrow.compute as pc

    d = data / policy / campaign
    log_path, ctx_path = d / f"{campaign}.csv", d / "item_context.csv"
    log, ctx = _read_csv(log_path), _read_csv(ctx_path)
    _require(log, log_path, LOG_COLUMNS)
    _require(ctx, ctx_path, ["item_id", "item_feature_0", *ITEM_CAT_FEATURES])
    n = log.num_rows
    if n == 0:
        raise TrainerError(f"no rows: {log_path} is empty")

    ts = log.column("timestamp")
    if not pa.types.is_timestamp(ts.type):
        raise TrainerError(f"{log_path}: column 'timestamp' is not a timestamp ({ts.type})")
    time = ts.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)
    try:
        item = log.column("item_id").cast(pa.int64()).to_numpy(zero_copy_only=False)
        position = log.column("position").cast(pa.int64()).to_numpy(zero_copy_only=False)
        click = log.column("click").cast(pa.int64()).to_numpy(zero_copy_only=False)
        prop = log.column("propensity_score").cast(pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TrainerError(f"{log_path}: item_id, position, click must be integers, propensity_score a number: {e}") from e
    bad = np.flatnonzero((click != 0) & (click != 1))
    if bad.size:
        raise TrainerError(f"{log_path}: row {int(bad[0]) + 1}: click must be 0 or 1, got {int(click[bad[0]])}")
    bad = np.flatnonzero(~(np.isfinite(prop) & (prop > 0) & (prop <= 1)))
    if bad.size:
        raise TrainerError(f"{log_path}: row {int(bad[0]) + 1}: propensity_score must be in (0, 1], got {prop[bad[0]]}")

    ctx_items = ctx.column("item_id").cast(pa.int64()).to_numpy(zero_copy_only=False)
    n_items = len(ctx_items)
    index = {int(i): r for r, i in enumerate(ctx_items.tolist())}
    unknown = sorted(set(item.tolist()) - set(index))
    if unknown:
        raise TrainerError(f"{log_path}: item_id {unknown[0]} is not in {ctx_path}")
    rows = np.array([index[int(i)] for i in item.tolist()], dtype=np.int64)

    # The affinity of the shown item: column user-item_affinity_<item_id>, per row.
    affinity = np.zeros(n)
    for i in np.unique(item).tolist():
        col = f"user-item_affinity_{i}"
        if col in log.column_names:
            shown = item == i
            affinity[shown] = log.column(col).cast(pa.float64()).to_numpy(zero_copy_only=False)[shown]
    item_f0 = ctx.column("item_feature_0").cast(pa.float64()).to_numpy(zero_copy_only=False)[rows]

    def strings(table, name, take=None):
        col = pc.cast(table.column(name), pa.string()).to_pylist()
        return [col[r] for r in take.tolist()] if take is not None else col

    cats = {f: strings(log, f) for f in USER_FEATURES}
    cats["item"] = [f"{campaign}:{i}" for i in item.tolist()]
    cats["position"] = [str(p) for p in position.tolist()]
    cats["campaign"] = [campaign] * n
    for f in ITEM_CAT_FEATURES:
        cats[f] = strings(ctx, f, rows)
    return {
        "time": time,
        "y": click,
        "propensity": prop,
        "n_items": np.full(n, n_items, dtype=np.float64),
        "dense": np.stack([item_f0, affinity], axis=1),
        "cats": cats,
        "source": f"{policy}/{campaign} ({n} rows, {int(click.sum())} clicks, {n_items} items)",
    }


def load(data: str | Path, policies=POLICIES, campaigns=CAMPAIGNS) -> OBDData:
    data = Path(data)
    if not data.is_dir():
        raise TrainerError(f"OBD directory does not exist: {data} (fetch it with training/scripts/fetch_obd.sh)")
    logs = [read_log(data, p, c) for p in policies for c in campaigns]
    time = np.concatenate([g["time"] for g in logs])
    order = np.argsort(time, kind="mergesort")
    cat_values = []
    for f in CAT_FIELDS:
        merged = [v for g in logs for v in g["cats"][f]]
        cat_values.append([merged[i] for i in order.tolist()])
    return OBDData(
        time=time[order],
        y=np.concatenate([g["y"] for g in logs])[order],
        propensity=np.concatenate([g["propensity"] for g in logs])[order],
        n_items=np.concatenate([g["n_items"] for g in logs])[order],
        dense=np.concatenate([g["dense"] for g in logs])[order],
        cat_values=cat_values,
        sources=[g["source"] for g in logs],
    )


def ips_weights(d: OBDData, clip: float) -> np.ndarray:
    if clip <= 0:
        return np.ones(len(d.y))
    return np.minimum((1.0 / d.n_items) / d.propensity, clip)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .tabular import add_training_args

    ap = argparse.ArgumentParser(prog="python -m adserve_trainer.obd", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="directory with <policy>/<campaign>/*.csv")
    ap.add_argument("--out", type=Path, required=True, help="directory for report.json and calibration.png")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated: random,bts")
    ap.add_argument("--campaigns", default=",".join(CAMPAIGNS), help="comma-separated: all,men,women")
    ap.add_argument("--ips-clip", type=float, default=10.0, help="weight min((1/n_items)/propensity, CLIP); 0: unweighted")
    ap.add_argument("--hash-buckets", type=int, default=DEFAULT_BUCKETS)
    add_training_args(ap)
    return ap.parse_args(argv)


def _names(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if not names or bad:
        raise TrainerError(f"--{what} must be a comma-separated subset of {','.join(allowed)}, got {value!r}")
    return names


def run(argv: list[str] | None = None) -> dict:
    from . import experiment as E
    from .fitting import set_threads
    from .nets import DCNConfig
    from .tabular import candidates, hash_column, print_summary, standardize, write_report

    args = parse_args(argv)
    d = load(args.data, _names(args.policies, POLICIES, "policies"), _names(args.campaigns, CAMPAIGNS, "campaigns"))
    split = E.time_split(len(d.y))
    E.check_labels(d.y, split, what="OBD rows")
    set_threads(args.threads)
    dense = standardize(d.dense, split.train)
    cats = np.stack([hash_column(v, args.hash_buckets) for v in d.cat_values], axis=1)
    cards = tuple([args.hash_buckets] * len(CAT_FIELDS))
    w = ips_weights(d, args.ips_clip)
    dcn = DCNConfig(emb_dim=8, cross_layers=2, hidden=(64, 32))
    outcomes = E.run(
        candidates(dense, cats, cards, args, dcn), d.y, w, w, split, calibration=args.calibration, seed=args.seed
    )
    weighting = (
        f"min((1/n_items)/propensity_score, {args.ips_clip}) for training, calibration and evaluation"
        if args.ips_clip > 0
        else "none (every row weight 1)"
    )
    report = {
        "dataset": f"Open Bandit Dataset: {args.data}",
        "logs": d.sources,
        "features": {"categorical": CAT_FIELDS, "dense": DENSE_FIELDS, "hash_buckets": args.hash_buckets},
        **E.protocol(split, 1.0, args.calibration, weighting),
        "evaluation_clicks": int(d.y[split.test].sum()),
        "models": {k: o.report() for k, o in outcomes.items()},
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_report(args.out, report, outcomes, f"Open Bandit Dataset: evaluation rows ({split.sizes()['evaluation']})")
    print_summary(f"OBD {args.data} -> {args.out}", outcomes, split.sizes())
    return report


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        run(argv)
        return 0

    return cli(body)


if __name__ == "__main__":
    sys.exit(main())
