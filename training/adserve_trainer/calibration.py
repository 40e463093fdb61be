"""Calibration in the ranker's format (crates/adserve-registry/src/manifest.rs, ``Calibration``).

The ranker serves ``apply(calibration, raw)``: first the negative-downsampling
correction ``q = p / (p + (1 - p) / keep_rate)``, then an optional mapping,
``{"method": "none"}``, ``{"method": "platt", "a": a, "b": b}`` (sigmoid(a *
logit(q) + b), a > 0) or ``{"method": "isotonic", "x": [...], "y": [...]}``
(piecewise linear through the points, flat outside). ``apply`` here is the
same arithmetic, so offline metrics of a calibrated model are the figures the
auction will see. The manifest's ``calibration`` object has exactly the keys
``keep_rate`` and ``mapping`` (the Rust struct denies unknown fields).
"""

from __future__ import annotations

import sys

import numpy as np

from . import TrainerError

CLAMP = 1e-12  # the ranker clamps q to [1e-12, 1 - 1e-12] before logit (Platt)
METHODS = ("platt", "isotonic", "none")
# A mapping is fitted only when the calibration slice has at least this many
# rows of each class; fewer, and the mapping would fit noise.
MIN_ROWS_PER_CLASS = 10


def correct_keep_rate(p: np.ndarray, keep_rate: float) -> np.ndarray:
    """Undo negative downsampling: odds scale by keep_rate."""
    q = np.asarray(p, dtype=np.float64)
    if keep_rate < 1.0:
        q = q / (q + (1.0 - q) / keep_rate)
    return q


def _logit(q: np.ndarray) -> np.ndarray:
    q = np.clip(q, CLAMP, 1.0 - CLAMP)
    return np.log(q / (1.0 - q))


def apply_mapping(mapping: dict, q: np.ndarray) -> np.ndarray:
    method = mapping.get("method", "none")
    q = np.asarray(q, dtype=np.float64)
    if method == "none":
        return q
    if method == "platt":
        z = mapping["a"] * _logit(q) + mapping["b"]
        return 1.0 / (1.0 + np.exp(-z))
    if method == "isotonic":
        # np.interp is flat outside [x0, xn], like the ranker.
        return np.interp(q, np.asarray(mapping["x"]), np.asarray(mapping["y"]))
    raise TrainerError(f"unknown calibration method {method!r}")


def apply(calibration: dict | None, p: np.ndarray) -> np.ndarray:
    """What the ranker serves for raw model output ``p`` under the manifest's ``calibration``."""
    if calibration is None:
        return np.asarray(p, dtype=np.float64)
    q = correct_keep_rate(p, float(calibration.get("keep_rate", 1.0)))
    return apply_mapping(calibration.get("mapping", {"method": "none"}), q)


def fit_platt(q: np.ndarray, y: np.ndarray, w: np.ndarray, iters: int = 100) -> dict | None:
    """Weighted logistic regression of y on logit(q) (Newton); None when a <= 0 or it fails."""
    z = _logit(np.asarray(q, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64) / np.mean(w)
    A = np.stack([z, np.ones_like(z)], axis=1)
    theta = np.array([1.0, 0.0])

    def obj(t: np.ndarray) -> float:
        s = A @ t
        return float(np.sum(w * (np.logaddexp(0.0, s) - y * s)) + 1e-6 * float(t @ t))

    cur = obj(theta)
    for _ in range(iters):
        s = A @ theta
        p = 1.0 / (1.0 + np.exp(-s))
        g = A.T @ (w * (p - y)) + 2e-6 * theta
        H = (A * (w * p * (1.0 - p))[:, None]).T @ A + 2e-6 * np.eye(2)
        try:
            step = np.linalg.solve(H, g)
        except np.linalg.LinAlgError:
            return None
        t = 1.0
        while True:
            cand = theta - t * step
            new = obj(cand)
            if new <= cur or t < 1e-8:
                break
            t *= 0.5
        theta = cand
        done = abs(cur - new) <= 1e-12 * max(1.0, abs(cur))
        cur = new
        if done:
            break
    a, b = float(theta[0]), float(theta[1])
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):
        return None
    return {"method": "platt", "a": a, "b": b}


def fit_isotonic(q: np.ndarray, y: np.ndarray, w: np.ndarray) -> dict | None:
    """Weighted pool-adjacent-violators on (q, y); knots at each block's weighted mean q.

    The knots are strictly increasing (blocks are runs of distinct sorted q)
    and the block rates strictly increasing (violators, including equal
    neighbours, are pooled), so the mapping passes the ranker's checks.
    """
    q = np.asarray(q, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    order = np.argsort(q, kind="mergesort")
    q, y, w = q[order], y[order], w[order]
    # Pool exact ties in q first.
    starts = np.concatenate([[0], np.flatnonzero(np.diff(q)) + 1])
    bw = np.add.reduceat(w, starts)
    by = np.add.reduceat(w * y, starts)
    bq = np.add.reduceat(w * q, starts)
    keep = bw > 0
    bw, by, bq = bw[keep], by[keep], bq[keep]
    # Stack-based PAV over (weight, sum w*y, sum w*q).
    sw: list[float] = []
    sy: list[float] = []
    sq: list[float] = []
    for wi, yi, qi in zip(bw.tolist(), by.tolist(), bq.tolist()):
        sw.append(wi), sy.append(yi), sq.append(qi)
        while len(sw) > 1 and sy[-2] / sw[-2] >= sy[-1] / sw[-1]:
            wi, yi, qi = sw.pop(), sy.pop(), sq.pop()
            sw[-1] += wi
            sy[-1] += yi
            sq[-1] += qi
    xs = [min(max(a / b, 0.0), 1.0) for a, b in zip(sq, sw)]
    ys = [min(max(a / b, 0.0), 1.0) for a, b in zip(sy, sw)]
    if len(xs) == 1:
        # No monotone signal: a constant mapping, spanning the data.
        lo, hi = float(q[0]), float(q[-1])
        if not lo < hi:
            return None
        xs, ys = [lo, hi], [ys[0], ys[0]]
    if not all(a < b for a, b in zip(xs, xs[1:])):
        return None
    return {"method": "isotonic", "x": xs, "y": ys}


def fit(method: str, q: np.ndarray, y: np.ndarray, w: np.ndarray, what: str = "model") -> tuple[dict, str]:
    """The mapping for ``method`` fitted on (q, y, w), or ``{"method": "none"}``
    with the reason when the slice is too small or the fit is degenerate."""
    if method not in METHODS:
        raise TrainerError(f"--calibration must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "none":
        return {"method": "none"}, "not requested"
    y = np.asarray(y)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if min(n_pos, n_neg) < MIN_ROWS_PER_CLASS:
        why = (
            f"calibration slice has {n_pos} positive and {n_neg} negative rows "
            f"(< {MIN_ROWS_PER_CLASS} of a class): no {method} mapping fitted"
        )
        print(f"warning: {what}: {why}", file=sys.stderr)
        return {"method": "none"}, why
    mapping = fit_platt(q, y, w) if method == "platt" else fit_isotonic(q, y, w)
    if mapping is None:
        why = f"{method} fit is degenerate (no increasing relation between score and label): not fitted"
        print(f"warning: {what}: {why}", file=sys.stderr)
        return {"method": "none"}, why
    return mapping, "fitted"


def check(calibration: dict) -> None:
    """The ranker's Calibration::check, so a manifest the ranker would refuse is never written."""
    if set(calibration) - {"keep_rate", "mapping"}:
        raise TrainerError(f"calibration has unknown keys {sorted(set(calibration) - {'keep_rate', 'mapping'})}")
    r = calibration.get("keep_rate", 1.0)
    if not (0.0 < r <= 1.0):
        raise TrainerError(f"calibration.keep_rate {r} is not in (0, 1]")
    m = calibration.get("mapping", {"method": "none"})
    method = m.get("method")
    allowed = {"none": {"method"}, "platt": {"method", "a", "b"}, "isotonic": {"method", "x", "y"}}
    if method not in allowed or set(m) != allowed[method]:
        raise TrainerError(f"calibration mapping {m} does not have the ranker's fields")
    if method == "platt" and not (np.isfinite(m["a"]) and m["a"] > 0 and np.isfinite(m["b"])):
        raise TrainerError(f"calibration platt a = {m['a']}, b = {m['b']}: a must be > 0 and both finite")
    if method == "isotonic":
        x, y = m["x"], m["y"]
        if len(x) < 2 or len(x) != len(y):
            raise TrainerError("calibration isotonic needs x and y of equal length >= 2")
        if not all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in list(x) + list(y)):
            raise TrainerError("calibration isotonic x and y must be in [0, 1]")
        if not all(a < b for a, b in zip(x, x[1:])):
            raise TrainerError("calibration isotonic x must be strictly increasing")
        if not all(a <= b for a, b in zip(y, y[1:])):
            raise TrainerError("calibration isotonic y must be non-decreasing")
