"""Minibatch Adam on the weighted log loss, early stopping on a validation slice.

Deterministic for a given seed on one machine: parameters are initialized
and batches shuffled from ``torch.manual_seed(seed)`` / a seeded generator,
and deterministic algorithms are requested. One line per epoch goes to
stderr (epoch, train loss, validation logloss and AUC, rows/s).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import numpy as np
import torch
from torch import nn

from . import TrainerError
from . import metrics as M


@dataclass
class FitConfig:
    epochs: int = 30
    batch_size: int = 512
    lr: float = 2e-3
    # L2 penalty on every weight matrix and embedding (not biases), on the
    # SUM of the weighted losses: loss = mean(w * ll) + l2 / (2 * N) * ||W||^2.
    l2: float = 1.0
    patience: int = 3  # stop after this many epochs without a better validation logloss
    seed: int = 7
    log: TextIO | None = field(default=None, repr=False)  # None: sys.stderr


@dataclass
class FitResult:
    best_epoch: int
    epochs_run: int
    best_val_logloss: float
    seconds: float
    history: list[dict]


def set_threads(n: int) -> None:
    if n < 1:
        raise TrainerError("--threads must be >= 1")
    torch.set_num_threads(n)


def _tensors(arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def predict(model: nn.Module, inputs: tuple[np.ndarray, ...], batch: int = 65536) -> np.ndarray:
    """model(*inputs) (a probability per row), float32 as the ONNX graph computes it."""
    ts = _tensors(inputs)
    n = ts[0].shape[0]
    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, n, batch):
            out.append(model(*(t[s : s + batch] for t in ts)).reshape(-1))
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _penalized(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() > 1]


def fit(
    model: nn.Module,
    name: str,
    train: tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray],
    val: tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray],
    cfg: FitConfig,
    on_epoch: Callable[[int], None] | None = None,
) -> FitResult:
    """Train ``model.logits(*inputs)`` in place on (inputs, y, w); keeps the best epoch's weights.

    ``train`` and ``val`` are ``(inputs, y, w)``; w are sample weights (any scale).
    """
    log = cfg.log or sys.stderr
    (x_tr, y_tr, w_tr), (x_va, y_va, w_va) = train, val
    n = len(y_tr)
    if n == 0:
        raise TrainerError("no rows to train on")
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0 or cfg.l2 < 0:
        raise TrainerError("--epochs, --batch-size and --lr must be positive and --l2 >= 0")
    torch.use_deterministic_algorithms(True)
    xt = _tensors(x_tr)
    yt = torch.from_numpy(np.asarray(y_tr, np.float32)).view(-1, 1)
    wt = torch.from_numpy((np.asarray(w_tr, np.float64) / np.mean(w_tr)).astype(np.float32)).view(-1, 1)
    # Start at the (weighted) base rate: the first epochs then learn the signal, not the intercept.
    rate = float(np.sum(np.asarray(w_tr, np.float64) * y_tr) / np.sum(w_tr))
    if 0.0 < rate < 1.0 and hasattr(getattr(model, "core", None), "init_bias"):
        model.core.init_bias(float(np.log(rate / (1.0 - rate))))
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    penalized = _penalized(model)
    l2_scale = cfg.l2 / (2.0 * n)
    bce = nn.BCEWithLogitsLoss(reduction="none")

    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history: list[dict] = []
    start = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for s in range(0, n, cfg.batch_size):
            idx = perm[s : s + cfg.batch_size]
            logits = model.logits(*(t[idx] for t in xt))
            loss = (bce(logits, yt[idx]) * wt[idx]).mean()
            if l2_scale > 0:
                loss = loss + l2_scale * sum((p * p).sum() for p in penalized)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        secs = time.perf_counter() - t0
        p_va = predict(model, x_va)
        if not np.all(np.isfinite(p_va)):
            raise TrainerError(f"{name}: training diverged (non-finite predictions at epoch {epoch}); try a lower --lr")
        v_ll = M.logloss(y_va, p_va, w_va)
        try:
            v_auc = M.auc(y_va, p_va, w_va)
        except TrainerError:
            v_auc = float("nan")
        rec = {"epoch": epoch, "train_loss": total / seen, "val_logloss": v_ll, "val_auc": v_auc, "rows_per_s": n / secs}
        history.append(rec)
        print(
            f"[{name}] epoch {epoch}/{cfg.epochs}  train loss {rec['train_loss']:.5f}  "
            f"holdout logloss {v_ll:.5f}  auc {v_auc:.4f}  {rec['rows_per_s']:,.0f} rows/s",
            file=log,
            flush=True,
        )
        if on_epoch is not None:
            on_epoch(epoch)
        if v_ll < best[0] - 1e-7:
            best = (v_ll, epoch, copy.deepcopy(model.state_dict()))
        elif epoch - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(
        best_epoch=best[1],
        epochs_run=epoch,
        best_val_logloss=best[0],
        seconds=time.perf_counter() - start,
        history=history,
    )
