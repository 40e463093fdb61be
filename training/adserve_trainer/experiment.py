"""One evaluation protocol for every data source (adserve rows, Criteo, OBD).

Rows come in time order. The split is by position in that order:

    [ train: first 80% | calibration: next 10% | evaluation: last 10% ]
                         `------ the holdout: last 20% ------'

* train: the models are fitted here (sample weights ``w_train``);
* calibration (first half of the holdout): early stopping and the fit of the
  Platt / isotonic mappings;
* evaluation (second half): every reported figure. No decision is taken on
  these rows, so the figures are out-of-sample for the model AND its mapping.

Reported figures use ``w_eval``: the training weights, with negatives of
downsampled rows weighted by ``1 / keep_rate`` (so they describe the traffic
before downsampling, the distribution the ranker serves). "uncalibrated"
means the raw model output after the keep-rate correction only (what the
ranker serves with mapping "none").
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import TrainerError
from . import calibration as C
from . import metrics as M
from .fitting import FitConfig, FitResult, fit, predict
from .nets import n_params

HOLDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    train: slice
    calib: slice
    test: slice

    def sizes(self) -> dict[str, int]:
        return {k: s.stop - s.start for k, s in (("train", self.train), ("calibration", self.calib), ("evaluation", self.test))}


def time_split(n: int, holdout_fraction: float = HOLDOUT_FRACTION) -> Split:
    """Contiguous slices of time-ordered rows (see the module doc)."""
    n_hold = int(round(n * holdout_fraction))
    n_train = n - n_hold
    n_cal = n_hold // 2
    if n_train < 1 or n_cal < 1 or n_hold - n_cal < 1:
        raise TrainerError(f"too few rows ({n}) for a train/holdout split")
    return Split(slice(0, n_train), slice(n_train, n_train + n_cal), slice(n_train + n_cal, n))


def check_labels(y: np.ndarray, split: Split, what: str = "rows") -> None:
    """Refuse data a model cannot be fitted or judged on, naming the part that fails."""
    if len(y) == 0:
        raise TrainerError(f"no rows: the dataset is empty ({what})")
    if y.min() == y.max():
        raise TrainerError(f"labels are all one class (label={int(y[0])}) in {len(y)} {what}; cannot fit")
    for nm, s in (("training", split.train), ("evaluation", split.test)):
        part = y[s]
        if part.min() == part.max():
            raise TrainerError(
                f"the {nm} split has labels of one class only ({len(part)} rows, label={int(part[0])}); need more rows"
            )


def check_weights(w: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise TrainerError(f"{what}: sample weights must be finite and >= 0")
    if not np.sum(w) > 0:
        raise TrainerError(f"{what}: sample weights sum to 0")


@dataclass
class Candidate:
    key: str  # "lr" | "dcnv2"
    build: Callable[[], nn.Module]  # called right after torch.manual_seed(seed)
    inputs: tuple[np.ndarray, ...]  # all rows, time order; model.logits(*inputs[s])
    fit_config: FitConfig


@dataclass
class Outcome:
    key: str
    model: nn.Module
    fit: FitResult
    p_test: np.ndarray  # raw model output on the evaluation rows
    mappings: dict[str, tuple[dict, str]]  # method -> (mapping, why)
    metrics: dict[str, dict]  # "uncalibrated" | "platt" | "isotonic" -> summary
    reliability: dict[str, dict]
    selected: str  # calibration method served
    # "uncalibrated" | "platt" | "isotonic" -> predictions on the evaluation rows (what `metrics` scores)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def mapping(self) -> dict:
        return self.mappings[self.selected][0] if self.selected in self.mappings else {"method": "none"}

    @property
    def served(self) -> dict:
        return self.metrics[self.selected if self.selected in self.metrics else "uncalibrated"]

    @property
    def served_predictions(self) -> np.ndarray:
        """The served (calibrated) predictions on the evaluation rows: the figures of ``served``."""
        return self.predictions[self.selected if self.selected in self.predictions else "uncalibrated"]

    def report(self) -> dict:
        d = {k: round(v, 6) for k, v in self.served.items()}
        d["calibration_method"] = self.mapping["method"]
        for variant, m in self.metrics.items():
            d[variant] = {k: round(v, 6) for k, v in m.items()}
        for method, (mapping, why) in self.mappings.items():
            d[method]["mapping"] = mapping
            d[method]["fit"] = why
        d["reliability"] = self.reliability
        d["parameters"] = n_params(self.model)
        d["training"] = {
            "best_epoch": self.fit.best_epoch,
            "epochs_run": self.fit.epochs_run,
            "best_calibration_slice_logloss": round(self.fit.best_val_logloss, 6),
            "seconds": round(self.fit.seconds, 2),
            "history": [{k: round(v, 6) for k, v in h.items()} for h in self.fit.history],
        }
        return d


def _rows(inputs: tuple[np.ndarray, ...], s: slice) -> tuple[np.ndarray, ...]:
    return tuple(a[s] for a in inputs)


def run(
    candidates: list[Candidate],
    y: np.ndarray,
    w_train: np.ndarray,
    w_eval: np.ndarray,
    split: Split,
    keep_rate: float = 1.0,
    calibration: str = "platt",
    seed: int = 7,
) -> dict[str, Outcome]:
    """Fit, calibrate and evaluate each candidate; same seed for each."""
    if calibration not in C.METHODS:
        raise TrainerError(f"--calibration must be one of {', '.join(C.METHODS)}, got {calibration!r}")
    check_weights(w_train[split.train], "training rows")
    check_weights(w_eval[split.test], "evaluation rows")
    y_tr, y_cal, y_te = y[split.train], y[split.calib], y[split.test]
    out: dict[str, Outcome] = {}
    for c in candidates:
        torch.manual_seed(seed)
        model = c.build()
        res = fit(
            model,
            c.key,
            (_rows(c.inputs, split.train), y_tr, w_train[split.train]),
            (_rows(c.inputs, split.calib), y_cal, w_train[split.calib]),
            c.fit_config,
        )
        q_cal = C.correct_keep_rate(predict(model, _rows(c.inputs, split.calib)), keep_rate)
        p_te = predict(model, _rows(c.inputs, split.test))
        q_te = C.correct_keep_rate(p_te, keep_rate)
        w_te = w_eval[split.test]
        mappings = {m: C.fit(m, q_cal, y_cal, w_eval[split.calib], what=c.key) for m in ("platt", "isotonic")}
        metrics = {"uncalibrated": M.summary(y_te, q_te, w_te)}
        reliability = {"uncalibrated": M.reliability(y_te, q_te, w_te)}
        predictions = {"uncalibrated": q_te}
        for m, (mapping, _) in mappings.items():
            q_m = C.apply_mapping(mapping, q_te)
            predictions[m] = q_m
            metrics[m] = M.summary(y_te, q_m, w_te)
            reliability[m] = M.reliability(y_te, q_m, w_te)
        out[c.key] = Outcome(
            key=c.key,
            model=model,
            fit=res,
            p_test=p_te,
            mappings=mappings,
            metrics=metrics,
            reliability=reliability,
            selected=calibration if calibration != "none" else "uncalibrated",
            predictions=predictions,
        )
    return out


def versus_oracle(
    outcomes: dict[str, Outcome], y_test: np.ndarray, p_true_test: np.ndarray, w_test: np.ndarray
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The oracle (true label probabilities scored as a model) and each model's served predictions against it.

    All on the evaluation rows, weighted as every reported figure. Returns
    (oracle summary, {model: {auc_vs_oracle, calibration_vs_truth, mae_vs_truth}}).
    """
    p_true_test = np.asarray(p_true_test, dtype=np.float64)
    if p_true_test.shape != y_test.shape:
        raise TrainerError(f"true probabilities for {p_true_test.shape[0]} rows, {y_test.shape[0]} evaluation rows")
    oracle = M.summary(y_test, p_true_test, w_test)
    per_model = {}
    for key, o in outcomes.items():
        d = {"auc_vs_oracle": o.served["auc"] / oracle["auc"] if oracle["auc"] > 0 else float("nan")}
        d.update(M.versus_truth(o.served_predictions, p_true_test, w_test))
        per_model[key] = d
    return oracle, per_model


def plot_reliability(outcomes: dict[str, Outcome], title: str) -> bytes:
    """Reliability diagram (equal-mass bins) of every model, before and after calibration, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    hi = 0.0
    colors = {"lr": "tab:blue", "dcnv2": "tab:orange"}
    for key, o in outcomes.items():
        variants = [("uncalibrated", "--", "uncalibrated")]
        if o.selected != "uncalibrated" and o.mapping["method"] != "none":
            variants.append((o.selected, "-", o.selected))
        for variant, style, label in variants:
            r = o.reliability[variant]
            x, yv = r["mean_predicted"], r["observed_rate"]
            hi = max(hi, max(x), max(yv))
            ece = o.metrics[variant]["ece"]
            ax.plot(x, yv, style, marker="o", ms=4, color=colors.get(key), label=f"{key} {label} (ECE {ece:.4f})")
    hi = hi * 1.05 if hi > 0 else 1.0
    ax.plot([0, hi], [0, hi], ":", color="grey", label="perfect calibration")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel(f"mean predicted pCTR ({M.ECE_BINS} equal-mass bins)")
    ax.set_ylabel("observed click rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def protocol(split: Split, keep_rate: float, calibration: str, weighting: str) -> dict:
    """The report's description of how the figures were made."""
    return {
        "split": "time-ordered: first 80% train; holdout = last 20%: its first half calibrates "
        "(early stopping, Platt/isotonic fit), its second half is evaluated",
        "rows": split.sizes(),
        "weighting": weighting,
        "keep_rate": keep_rate,
        "calibration": f"{calibration} (served); both platt and isotonic are reported",
        "ece": f"{M.ECE_BINS} equal-mass bins by sorted prediction, weighted |mean prediction - observed rate|",
        "normalized_entropy": "logloss / binary entropy of the evaluation base rate",
    }
