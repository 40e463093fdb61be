"""The two CTR models in PyTorch, and the graph the ranker runs.

Both cores take ``dense`` float32 ``[N, Fd]`` (already transformed and
standardized) and ``cats`` int64 ``[N, Fc]`` (per-field codes in
``[0, cardinality)``) and return a logit ``[N, 1]``:

* ``LogisticRegression``: a weight per dense column, a weight per category
  value (an embedding of width 1), one bias.
* ``DCNv2``: ``x0`` = dense columns ++ one embedding per categorical field;
  cross layers ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` (full-rank W, Wang
  et al. 2021), stacked with an MLP (ReLU), then a linear logit.

``RankerGraph`` wraps a core for the ranker's contract: a float32 input of
RAW registry dense features ``[N, F]`` and, when the model embeds the
registry's categorical features, an int64 input of their bucket ids
``[N, C]`` (the manifest's ``typed_inputs``). It standardizes the dense
columns with the training mean/std baked in, turns indicator columns into
embedding codes (round, clip to [0, K-1], cast to int64: Round/Clip/Cast/
Gather in ONNX), sends an id outside its buckets, or one the training rows
never held (its embedding row is untrained noise), to bucket 0 (missing), and
returns ``sigmoid(logit)`` ``[N, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

MODEL_TYPES = {"lr": "logistic_regression", "dcnv2": "dcn_v2"}
# Standardized dense inputs are clamped to +-this many training standard deviations.
STANDARDIZED_LIMIT = 5.0


@dataclass(frozen=True)
class DCNConfig:
    emb_dim: int = 8
    cross_layers: int = 2
    hidden: tuple[int, ...] = (64, 32)


@dataclass(frozen=True)
class Arch:
    """What a core needs to be built; recorded in reports."""

    kind: str  # "lr" | "dcnv2"
    n_dense: int
    cardinalities: tuple[int, ...] = ()
    dcn: DCNConfig = field(default_factory=DCNConfig)

    def describe(self) -> dict:
        d = {"type": MODEL_TYPES[self.kind], "dense_inputs": self.n_dense, "categorical_fields": len(self.cardinalities)}
        if self.kind == "dcnv2":
            d.update(
                embedding_dim=self.dcn.emb_dim, cross_layers=self.dcn.cross_layers, mlp_hidden=list(self.dcn.hidden)
            )
        return d


class _Embeddings(nn.Module):
    """One table for all categorical fields; field j's codes are offset by sum(card[:j])."""

    def __init__(self, cardinalities: tuple[int, ...], dim: int, zero_init: bool = False):
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64)
        self.register_buffer("offsets", torch.from_numpy(offsets).view(1, -1), persistent=False)
        self.table = nn.Embedding(int(sum(cardinalities)), dim)
        if zero_init:
            nn.init.zeros_(self.table.weight)
        else:
            nn.init.normal_(self.table.weight, std=0.05)

    def forward(self, cats: torch.Tensor) -> torch.Tensor:  # [N, Fc] -> [N, Fc, dim]
        return self.table(cats + self.offsets)


class LogisticRegression(nn.Module):
    def __init__(self, n_dense: int, cardinalities: tuple[int, ...] = ()):
        super().__init__()
        self.linear = nn.Linear(n_dense, 1) if n_dense else None
        self.emb = _Embeddings(cardinalities, 1, zero_init=True) if cardinalities else None
        self.bias = nn.Parameter(torch.zeros(1)) if not n_dense else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def init_bias(self, logit: float) -> None:
        with torch.no_grad():
            (self.linear.bias if self.linear is not None else self.bias).fill_(logit)

    def forward(self, dense: torch.Tensor, cats: torch.Tensor | None) -> torch.Tensor:
        z = self.linear(dense) if self.linear is not None else self.bias.expand(cats.shape[0], 1)
        if self.emb is not None:
            z = z + self.emb(cats).sum(dim=1)
        return z


class CrossLayer(nn.Module):
    """x_{l+1} = x0 * (W x_l + b) + x_l."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.linear.weight, gain=0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(nn.Module):
    def __init__(self, n_dense: int, cardinalities: tuple[int, ...] = (), cfg: DCNConfig = DCNConfig()):
        super().__init__()
        self.emb = _Embeddings(cardinalities, cfg.emb_dim) if cardinalities else None
        d = n_dense + len(cardinalities) * cfg.emb_dim
        if d == 0:
            raise ValueError("DCN-v2 needs at least one input")
        self.cross = nn.ModuleList(CrossLayer(d) for _ in range(cfg.cross_layers))
        layers: list[nn.Module] = []
        width = d
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)
        self.n_dense = n_dense

    def init_bias(self, logit: float) -> None:
        with torch.no_grad():
            self.head.bias.fill_(logit)

    def forward(self, dense: torch.Tensor, cats: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if self.n_dense:
            parts.append(dense)
        if self.emb is not None:
            parts.append(self.emb(cats).flatten(start_dim=1))
        x0 = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.head(self.mlp(x))


def build_core(arch: Arch) -> nn.Module:
    if arch.kind == "lr":
        return LogisticRegression(arch.n_dense, arch.cardinalities)
    if arch.kind == "dcnv2":
        return DCNv2(arch.n_dense, arch.cardinalities, arch.dcn)
    raise ValueError(f"unknown model {arch.kind!r}")


class Tabular(nn.Module):
    """A core over pre-encoded (dense, cats) inputs: the Criteo and OBD replays."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.core = build_core(arch)

    def logits(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return self.core(dense, cats if self.arch.cardinalities else None)

    def forward(self, dense: torch.Tensor, cats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(dense, cats))


class RankerGraph(nn.Module):
    """RAW registry features [N, F] (and bucket ids [N, C]) -> pctr [N, 1]; preprocessing inside the graph."""

    def __init__(
        self,
        arch: Arch,
        n_features: int,
        dense_cols: list[int],
        cat_cols: list[int],
        mean: np.ndarray,
        std: np.ndarray,
        typed_buckets: tuple[int, ...] = (),
        typed_seen: list[np.ndarray] | None = None,
    ):
        super().__init__()
        k = len(arch.cardinalities) - len(typed_buckets)
        if len(dense_cols) != arch.n_dense or len(cat_cols) != k or tuple(arch.cardinalities[k:]) != tuple(typed_buckets):
            raise ValueError("columns do not match the architecture")
        self.arch = arch
        self.n_features = n_features
        self.n_typed = len(typed_buckets)
        self.all_dense = dense_cols == list(range(n_features))
        self.register_buffer("dense_cols", torch.tensor(dense_cols, dtype=torch.int64))
        self.register_buffer("cat_cols", torch.tensor(cat_cols, dtype=torch.int64))
        self.register_buffer("mean", torch.from_numpy(np.asarray(mean, np.float32)).view(1, -1))
        self.register_buffer("std", torch.from_numpy(np.asarray(std, np.float32)).view(1, -1))
        self.register_buffer(
            "cat_max", torch.tensor([float(c - 1) for c in arch.cardinalities[:k]], dtype=torch.float32).view(1, -1)
        )
        self.register_buffer("typed_buckets", torch.tensor(list(typed_buckets), dtype=torch.int64).view(1, -1))
        # Ids the training rows held, per typed field (flat, offset per field);
        # any other id is served as bucket 0 (missing): its embedding row was
        # never trained and holds its random initial value.
        self.known_only = typed_seen is not None
        if typed_seen is not None:
            if [len(s) for s in typed_seen] != list(typed_buckets):
                raise ValueError("typed_seen needs one mask per typed field, as long as its buckets")
            offsets = np.concatenate([[0], np.cumsum(typed_buckets)[:-1]]).astype(np.int64)
            known = np.concatenate([np.asarray(s, bool) for s in typed_seen] or [np.zeros(0, bool)])
            known[offsets] = True  # bucket 0 of every field: missing is always known
            self.register_buffer("typed_known", torch.from_numpy(known.astype(np.int64)))
            self.register_buffer("typed_offsets", torch.from_numpy(offsets).view(1, -1))
        self.core = build_core(arch)

    def encode(
        self, features: torch.Tensor, categorical: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dense = features if self.all_dense else features.index_select(1, self.dense_cols)
        # Clamped: a value far outside what training saw (a counter that
        # grew tenfold since) saturates instead of extrapolating the model
        # to a pCTR of 0 or 1.
        dense = torch.clamp((dense - self.mean) / self.std, -STANDARDIZED_LIMIT, STANDARDIZED_LIMIT)
        parts = []
        if self.cat_cols.numel():
            codes = features.index_select(1, self.cat_cols).round()
            codes = torch.minimum(torch.clamp(codes, min=0.0), self.cat_max)
            parts.append(codes.to(torch.int64))
        if self.n_typed:
            if categorical is None or categorical.shape[1] != self.n_typed:
                raise ValueError(f"the model takes {self.n_typed} categorical ids per row")
            # An id outside its feature's buckets is the missing bucket, 0
            # (the ranker refuses such a request; this guards the graph).
            ok = (categorical >= 0) & (categorical < self.typed_buckets)
            ids = torch.where(ok, categorical, torch.zeros_like(categorical))
            if self.known_only:
                ids = torch.where(self.typed_known[ids + self.typed_offsets] > 0, ids, torch.zeros_like(ids))
            parts.append(ids)
        cats = torch.cat(parts, dim=1) if len(parts) > 1 else (parts[0] if parts else None)
        return dense, cats

    def logits(self, features: torch.Tensor, categorical: torch.Tensor | None = None) -> torch.Tensor:
        dense, cats = self.encode(features, categorical)
        return self.core(dense, cats)

    def forward(self, features: torch.Tensor, categorical: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logits(features, categorical))


def n_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
