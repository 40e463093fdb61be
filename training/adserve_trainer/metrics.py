"""Weighted offline metrics in numpy: AUC, log loss, normalized entropy, ECE.

Every function takes optional sample weights ``w`` (None = all ones), so the
same code reports on unweighted rows, on inverse-propensity-weighted rows and
on negatively downsampled rows reweighted by ``1 / keep_rate``.
"""

from __future__ import annotations

import numpy as np

from . import TrainerError

EPS = 1e-12
ECE_BINS = 10  # equal-mass bins (each holds ~1/10 of the total weight), see ece()


def _weights(y: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    if w is None:
        return np.ones(len(y), dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (len(y),):
        raise TrainerError(f"weights have shape {w.shape}, expected ({len(y)},)")
    return w


def auc(y: np.ndarray, score: np.ndarray, w: np.ndarray | None = None) -> float:
    """ROC AUC: the (weighted) share of positive/negative pairs ranked correctly; ties count 1/2.

    Unweighted, this is the Mann-Whitney U statistic with average ranks for ties.
    """
    y = np.asarray(y).astype(bool)
    w = _weights(y, w)
    w_pos, w_neg = float(w[y].sum()), float(w[~y].sum())
    if w_pos <= 0 or w_neg <= 0:
        raise TrainerError("AUC undefined: holdout labels are all one class (need more rows)")
    order = np.argsort(np.asarray(score, dtype=np.float64), kind="mergesort")
    s = np.asarray(score, dtype=np.float64)[order]
    pos = np.where(y[order], w[order], 0.0)
    neg = np.where(y[order], 0.0, w[order])
    # Group runs of tied scores.
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s)) + 1])
    pos_g = np.add.reduceat(pos, starts)
    neg_g = np.add.reduceat(neg, starts)
    neg_below = np.cumsum(neg_g) - neg_g
    return float(np.sum(pos_g * (neg_below + 0.5 * neg_g)) / (w_pos * w_neg))


def logloss(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, eps: float = EPS) -> float:
    """Mean (weighted) binary cross-entropy in nats; p clipped to [eps, 1 - eps]."""
    y = np.asarray(y, dtype=np.float64)
    w = _weights(y, w)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    ll = -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))
    return float(np.sum(w * ll) / np.sum(w))


def base_rate(y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = _weights(y, w)
    return float(np.sum(w * np.asarray(y, dtype=np.float64)) / np.sum(w))


def entropy(rate: float) -> float:
    """Binary entropy (nats) of a base rate: the log loss of always predicting it."""
    r = min(max(rate, EPS), 1.0 - EPS)
    return float(-(r * np.log(r) + (1.0 - r) * np.log(1.0 - r)))


def normalized_entropy(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> float:
    """Log loss divided by the entropy of the base rate (< 1: better than predicting the base rate)."""
    return logloss(y, p, w) / entropy(base_rate(y, w))


def reliability(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, bins: int = ECE_BINS) -> dict:
    """Equal-mass reliability bins: rows sorted by prediction, cut where the
    cumulative weight crosses k/bins of the total. Returns per-bin mean
    prediction, observed rate and weight share (empty bins dropped)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = _weights(y, w)
    order = np.argsort(p, kind="mergesort")
    cw = np.cumsum(w[order])
    total = cw[-1]
    # A row belongs to the bin that holds the midpoint of its weight.
    b = np.minimum((bins * (cw - 0.5 * w[order]) / total).astype(np.int64), bins - 1)
    wsum = np.bincount(b, weights=w[order], minlength=bins)
    psum = np.bincount(b, weights=w[order] * p[order], minlength=bins)
    ysum = np.bincount(b, weights=w[order] * y[order], minlength=bins)
    keep = wsum > 0
    return {
        "mean_predicted": (psum[keep] / wsum[keep]).tolist(),
        "observed_rate": (ysum[keep] / wsum[keep]).tolist(),
        "weight_share": (wsum[keep] / total).tolist(),
    }


def ece(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-mass bins:
    sum_b share_b * |mean prediction_b - observed rate_b|."""
    r = reliability(y, p, w, bins)
    return float(
        sum(s * abs(m - o) for s, m, o in zip(r["weight_share"], r["mean_predicted"], r["observed_rate"]))
    )


def versus_truth(p: np.ndarray, p_true: np.ndarray, w: np.ndarray | None = None, bins: int = ECE_BINS) -> dict[str, float]:
    """Predictions against the TRUE probabilities of the same rows (an oracle is known).

    ``calibration_vs_truth``: the ECE's equal-mass bins of ``p`` (``reliability``,
    the same cut), each bin's weighted mean prediction against its weighted mean
    true probability, ``sum_b share_b * |mean p_b - mean p_true_b|`` (no label
    noise: 0 for a calibrated model at any sample size). ``mae_vs_truth``: the
    weighted mean ``|p - p_true|`` (0 only for the oracle itself).
    """
    p = np.asarray(p, dtype=np.float64)
    p_true = np.asarray(p_true, dtype=np.float64)
    if p_true.shape != p.shape:
        raise TrainerError(f"true probabilities have shape {p_true.shape}, predictions {p.shape}")
    w = _weights(p, w)
    return {
        # reliability() bins by p and averages its first argument per bin: here the truth.
        "calibration_vs_truth": ece(p_true, p, w, bins),
        "mae_vs_truth": float(np.sum(w * np.abs(p - p_true)) / np.sum(w)),
    }


def summary(y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> dict[str, float]:
    """The figures every report carries for one set of predictions."""
    rate = base_rate(y, w)
    mean_p = float(np.sum(_weights(y, w) * np.asarray(p, np.float64)) / np.sum(_weights(y, w)))
    return {
        "auc": auc(y, p, w),
        "logloss": logloss(y, p, w),
        "normalized_entropy": normalized_entropy(y, p, w),
        "ece": ece(y, p, w),
        # Mean prediction / observed rate (1 = calibrated on average).
        "calibration": mean_p / rate if rate > 0 else float("nan"),
        "base_rate": rate,
    }
