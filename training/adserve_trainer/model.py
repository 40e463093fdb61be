"""L2-regularized logistic regression on standardized features, in numpy (deterministic)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import TrainerError

STD_FLOOR = 1e-6


@dataclass
class LogisticModel:
    mean: np.ndarray  # float32 [F]
    std: np.ndarray  # float32 [F]
    weights: np.ndarray  # float32 [F]
    bias: float  # float32-representable
    iterations: int = 0

    def predict(self, X: np.ndarray) -> np.ndarray:
        """pctr for RAW features, computed exactly like the ONNX graph (float32 params)."""
        z = ((np.asarray(X, np.float32) - self.mean) / self.std).astype(np.float64) @ self.weights.astype(
            np.float64
        ) + float(self.bias)
        return 1.0 / (1.0 + np.exp(-z))


def standardization(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = X.astype(np.float64).mean(axis=0)
    std = X.astype(np.float64).std(axis=0)
    # A constant column would divide by ~0; it carries no information, so scale by 1
    # (its weight is driven to 0 by the L2 penalty anyway).
    std = np.where(std < STD_FLOOR, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def fit(X: np.ndarray, y: np.ndarray, l2: float = 1.0, max_iter: int = 50, tol: float = 1e-10) -> LogisticModel:
    """Full-batch Newton (IRLS) on sum(logloss) + l2/2 * ||w||^2 (bias unpenalized)."""
    if X.shape[0] == 0:
        raise TrainerError("no rows to train on")
    if l2 < 0:
        raise TrainerError("--l2 must be >= 0")
    rate = float(np.mean(y))
    if rate in (0.0, 1.0):
        raise TrainerError(f"labels are all one class (label={int(rate)}) in the training split; cannot fit")
    mean, std = standardization(X)
    Z = ((X.astype(np.float32) - mean) / std).astype(np.float64)
    n, f = Z.shape
    A = np.hstack([Z, np.ones((n, 1))])
    yf = y.astype(np.float64)
    theta = np.zeros(f + 1)
    theta[-1] = np.log(rate / (1.0 - rate))  # start at the base rate
    reg = np.full(f + 1, float(l2))
    reg[-1] = 0.0
    reg_floor = 1e-9  # keeps the Hessian invertible with l2=0 and separable-ish data

    def objective(t: np.ndarray) -> float:
        z = A @ t
        return float(np.sum(np.logaddexp(0.0, z) - yf * z) + 0.5 * np.sum(reg * t * t))

    obj = objective(theta)
    it = 0
    for it in range(1, max_iter + 1):
        p = 1.0 / (1.0 + np.exp(-(A @ theta)))
        grad = A.T @ (p - yf) + reg * theta
        H = (A * (p * (1.0 - p))[:, None]).T @ A + np.diag(reg + reg_floor)
        step = np.linalg.solve(H, grad)
        # Backtracking line search keeps Newton monotone.
        t = 1.0
        while True:
            cand = theta - t * step
            new_obj = objective(cand)
            if new_obj <= obj or t < 1e-8:
                break
            t *= 0.5
        theta = cand
        if abs(obj - new_obj) <= tol * max(1.0, abs(obj)):
            obj = new_obj
            break
        obj = new_obj
    if not np.all(np.isfinite(theta)):
        raise TrainerError("training diverged (non-finite weights)")
    return LogisticModel(
        mean=mean,
        std=std,
        weights=theta[:f].astype(np.float32),
        bias=float(np.float32(theta[-1])),
        iterations=it,
    )


def split(n: int, seed: int, holdout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/holdout index split (sorted indices, deterministic)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout_fraction))
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U), ties get average ranks."""
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise TrainerError("AUC undefined: holdout labels are all one class (need more rows)")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # Average rank over runs of tied scores.
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    p = np.clip(p, eps, 1.0 - eps)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    base = float(np.mean(y))
    return {
        "logloss": logloss(y, p),
        "auc": auc(y, p),
        "calibration": float(np.mean(p) / base) if base > 0 else float("nan"),
        "base_rate": base,
    }
