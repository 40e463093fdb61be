"""The feature registry (crates/adserve-features/features.toml): names, order,
defaults, transforms, the request contract's devices and the label window.

``Feature.serve`` is the Python twin of ``adserve_features::FeatureSpec``'s
``accepts`` + ``serve``: a stored raw value is checked against ``range`` and
put through the feature's transform exactly as the feature-service does,
computing in f64 and rounding once to f32, so a row built offline
(``adserve_trainer.offline``) is bit-identical to the row served.

Typed features (``type = "categorical"`` / ``"embedding"``) are kept apart
from the dense columns: ``Registry.features`` is the dense matrix's column
order (a model's ``feature_order``), ``Registry.categorical`` and
``Registry.embeddings`` the typed columns' orders. A categorical value is
hashed (FNV-1a 64 over its UTF-8 bytes, ``category_id``) into buckets
1..buckets-1; bucket 0 is "missing". A cross hashes its two operands' raw
values joined by U+001F.
"""

from __future__ import annotations

import bisect
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import TrainerError

# training/adserve_trainer/registry.py -> repo root is two levels above the package.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_REGISTRY = REPO_ROOT / "crates" / "adserve-features" / "features.toml"


@dataclass(frozen=True)
class Feature:
    name: str
    entity: str
    source: str
    attribute: str
    default: float
    personal: bool = False
    equals: str | None = None
    # Stored features: [min, max] a store may hold (adserve_features::FeatureSpec::range).
    range: tuple[float, float] | None = None
    # Stored features: ("log1p", None), ("clip", (lo, hi)) or ("bucketize", (b1, ...)).
    transform: tuple[str, tuple[float, ...] | None] | None = None
    owner: str = ""
    freshness_sla_seconds: float | None = None
    # "dense" (f32), "categorical" (int64 bucket ids) or "embedding" (f32 x dim).
    kind: str = "dense"
    buckets: int | None = None
    dim: int | None = None
    # source = "cross": the two categorical features whose raw values are hashed together.
    cross: tuple[str, str] | None = None

    def category_id(self, raw: str | None) -> int:
        """The bucket of a raw categorical value (None or empty: 0, missing)."""
        if raw is None or raw == "":
            return 0
        return 1 + fnv1a64(raw.encode("utf-8")) % (self.buckets - 1)

    def cross_id(self, a: str | None, b: str | None) -> int:
        """The bucket of a cross of two raw values (either missing: 0)."""
        if not a or not b:
            return 0
        return self.category_id(a + CROSS_SEPARATOR + b)

    def embedding(self, raw) -> tuple[np.ndarray, str]:
        """The served vector of a stored embedding (None: absent) and what happened:
        "ok", "missing" or "invalid" (wrong length, or an element ``accepts``
        refuses: the whole vector is the default)."""
        fill = np.full(self.dim, np.float32(self.default), dtype=np.float32)
        if raw is None:
            return fill, "missing"
        v = np.asarray(raw, dtype=np.float32)
        if v.shape != (self.dim,) or not all(self.accepts(x) for x in v):
            return fill, "invalid"
        return v, "ok"

    def accepts(self, value: float) -> bool:
        """FeatureSpec::accepts: finite and inside ``range`` when one is declared."""
        value = float(np.float32(value))
        if not math.isfinite(value):
            return False
        return self.range is None or self.range[0] <= value <= self.range[1]

    def serve(self, raw: float) -> np.float32:
        """FeatureSpec::serve for a value ``accepts`` took: the transform's output as f32."""
        x = np.float32(raw)
        if self.transform is None:
            return x
        kind, params = self.transform
        if kind == "log1p":
            return np.float32(math.log1p(float(x)))
        if kind == "clip":
            return np.float32(min(max(x, params[0]), params[1]))
        return np.float32(bisect.bisect_right(params, float(x)))

    def stored(self, raw: float | None) -> tuple[np.float32, str]:
        """The served value of a stored ``raw`` (None: absent) and what happened:
        "ok", "missing" (the default) or "invalid" (refused, the default)."""
        if raw is None:
            return np.float32(self.default), "missing"
        if not self.accepts(raw):
            return np.float32(self.default), "invalid"
        return self.serve(raw), "ok"


CROSS_SEPARATOR = "\x1f"
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_REQUEST_CATEGORICALS = ("placement", "device", "surface")
MAX_BUCKETS = 1 << 24
MAX_DIM = 1024


def fnv1a64(data: bytes) -> int:
    """FNV-1a, 64 bits (adserve_features::fnv1a64)."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass(frozen=True)
class Registry:
    path: Path
    # Dense columns, in column order.
    features: tuple[Feature, ...]
    devices: tuple[str, ...]
    label_window_seconds: int
    # Typed columns, each in its own column order.
    categorical: tuple[Feature, ...] = ()
    embeddings: tuple[Feature, ...] = ()

    @property
    def names(self) -> list[str]:
        """The model's feature_order: registry order."""
        return [f.name for f in self.features]

    @property
    def defaults(self) -> dict[str, float]:
        return {f.name: f.default for f in self.features}


def load_registry(path: str | Path | None = None) -> Registry:
    p = Path(path) if path is not None else DEFAULT_REGISTRY
    if not p.is_file():
        raise TrainerError(f"feature registry not found: {p}")
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise TrainerError(f"feature registry {p}: invalid TOML: {e}") from e
    entries = doc.get("feature")
    if not isinstance(entries, list) or not entries:
        raise TrainerError(f"feature registry {p}: no [[feature]] entries")
    features: list[Feature] = []
    seen: set[str] = set()
    for i, e in enumerate(entries):
        for key in ("name", "entity", "source", "attribute", "default"):
            if key not in e:
                raise TrainerError(f"feature registry {p}: feature #{i + 1} has no '{key}'")
        name = e["name"]
        if name in seen:
            raise TrainerError(f"feature registry {p}: duplicate feature '{name}'")
        seen.add(name)
        default = e["default"]
        if isinstance(default, bool) or not isinstance(default, (int, float)) or not math.isfinite(default):
            raise TrainerError(f"feature registry {p}: feature '{name}' default must be a finite number")
        rng = e.get("range")
        if rng is not None:
            ok = (
                isinstance(rng, list) and len(rng) == 2
                and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in rng)
                and rng[0] <= rng[1]
            )
            if not ok:
                raise TrainerError(f"feature registry {p}: feature '{name}' range must be [min, max] with finite min <= max")
            if e["source"] == "request":
                raise TrainerError(f"feature registry {p}: feature '{name}' range is for stored features")
            if "transform" not in e and not rng[0] <= default <= rng[1]:
                raise TrainerError(f"feature registry {p}: feature '{name}' default lies outside range")
            rng = (float(np.float32(rng[0])), float(np.float32(rng[1])))
        transform = _transform(p, name, e.get("transform"), rng, default)
        owner = e.get("owner")
        if not isinstance(owner, str) or not owner.strip():
            raise TrainerError(f"feature registry {p}: feature '{name}' needs an owner")
        sla = e.get("freshness_sla")
        if sla is not None:
            sla = _duration_seconds(p, name, sla)
        kind, buckets, dim, cross = _typed(p, name, e, default, {f.name: f for f in features})
        if e["entity"] == "ad" and _personal(e) and e["source"] != "cross":
            raise TrainerError(f"feature registry {p}: feature '{name}': ad features cannot be personal (only a cross may be)")
        features.append(
            Feature(
                name=name,
                entity=e["entity"],
                source=e["source"],
                attribute=e["attribute"],
                default=float(default),
                personal=_personal(e),
                equals=e.get("equals"),
                range=rng,
                transform=transform,
                owner=owner,
                freshness_sla_seconds=sla,
                kind=kind,
                buckets=buckets,
                dim=dim,
                cross=cross,
            )
        )
    devices = doc.get("request", {}).get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
        raise TrainerError(f"feature registry {p}: [request].devices must be a non-empty list of names")
    window = doc.get("label", {}).get("window_seconds")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise TrainerError(f"feature registry {p}: [label].window_seconds must be a positive integer")
    return Registry(
        path=p,
        features=tuple(f for f in features if f.kind == "dense"),
        devices=tuple(devices),
        label_window_seconds=window,
        categorical=tuple(f for f in features if f.kind == "categorical"),
        embeddings=tuple(f for f in features if f.kind == "embedding"),
    )


def _personal(e: dict) -> bool:
    """Never used for COPPA rows: every user feature (a COPPA request names
    no user, so the feature-service reads none), and what the file marks
    (a cross of a personal feature). As ``FeatureRegistry::parse``."""
    return bool(e.get("personal", False)) or e.get("entity") == "user"


def _typed(p: Path, name: str, e: dict, default, earlier: dict):
    """adserve_features::Kind and the cross operands, validated the same way."""
    bad = lambda why: TrainerError(f"feature registry {p}: feature '{name}' {why}")  # noqa: E731
    kind = e.get("type", "dense")
    source = e["source"]
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if kind not in ("dense", "categorical", "embedding"):
        raise bad(f"unknown type {kind!r} (dense, categorical, embedding)")
    if kind != "categorical" and ("buckets" in e or "cross" in e):
        raise bad("`buckets` and `cross` are for categorical features")
    if kind != "embedding" and "dim" in e:
        raise bad("`dim` is for embedding features")
    if source == "cross" and kind != "categorical":
        raise bad("a cross is a categorical feature")
    if kind == "dense":
        return kind, None, None, None
    if "transform" in e or "equals" in e:
        raise bad("`transform` and `equals` are for dense features")
    if kind == "categorical":
        buckets = e.get("buckets")
        if not is_int(buckets) or not 2 <= buckets <= MAX_BUCKETS:
            raise bad(f"categorical features need `buckets` in 2..={MAX_BUCKETS}")
        if default != 0:
            raise bad("a categorical default must be 0 (bucket 0 is missing)")
        if "range" in e:
            raise bad("`range` is for numeric features")
        cross = None
        if source == "cross":
            ops = e.get("cross")
            if not isinstance(ops, list) or len(ops) != 2 or ops[0] == ops[1]:
                raise bad("`cross` must name two different categorical features")
            for op in ops:
                f = earlier.get(op)
                if f is None or f.kind != "categorical" or f.source == "cross":
                    raise bad(f"`cross` operand {op!r} must be a categorical, non-cross feature defined above it")
            cross = (ops[0], ops[1])
            entities = {earlier[op].entity for op in ops}
            want = "ad" if "ad" in entities else "user" if "user" in entities else "context"
            if e["entity"] != want:
                raise bad(f"a cross of these features has entity {want!r}")
            if any(earlier[op].personal for op in ops) and not _personal(e):
                raise bad("a cross of a personal feature is personal")
        elif "cross" in e:
            raise bad("`cross` needs source = \"cross\"")
        elif source == "request" and e["entity"] != "context":
            raise bad("context features, and only they, come from the request")
        elif source == "request" and e["attribute"] not in _REQUEST_CATEGORICALS:
            raise bad(f"request categoricals read one of {', '.join(_REQUEST_CATEGORICALS)}")
        elif source not in ("request", "dynamodb"):
            raise bad("categorical features come from the request, DynamoDB or a cross")
        return kind, buckets, None, cross
    dim = e.get("dim")
    if not is_int(dim) or not 1 <= dim <= MAX_DIM:
        raise bad(f"embedding features need `dim` in 1..={MAX_DIM}")
    if source != "dynamodb":
        raise bad("embeddings are stored features (source = \"dynamodb\")")
    return kind, None, dim, None


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def _duration_seconds(p: Path, name: str, text) -> float:
    """The humantime forms the registry uses: "90s", "1m", "36h", "7d"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)\s*", text) if isinstance(text, str) else None
    if m is None:
        raise TrainerError(f"feature registry {p}: feature '{name}' freshness_sla {text!r} is not a duration like \"36h\"")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _transform(p: Path, name: str, spec, rng, default):
    """adserve_features::Transform, parsed and validated the same way."""
    if spec is None:
        return None
    bad = lambda why: TrainerError(f"feature registry {p}: feature '{name}' {why}")  # noqa: E731
    if spec == "log1p":
        if rng is None or rng[0] <= -1.0:
            raise bad("log1p needs a range with min above -1")
        lo, hi = (float(np.float32(math.log1p(v))) for v in rng)
        if not lo <= default <= hi:
            raise bad("default is not between log1p(range min) and log1p(range max)")
        return ("log1p", None)
    if isinstance(spec, dict) and len(spec) == 1:
        ((kind, params),) = spec.items()
        nums = isinstance(params, list) and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in params
        )
        if kind == "clip":
            if not nums or len(params) != 2 or params[0] > params[1]:
                raise bad("clip must be [lo, hi] with finite lo <= hi")
            if not params[0] <= default <= params[1]:
                raise bad("default lies outside clip")
            return ("clip", tuple(float(np.float32(v)) for v in params))
        if kind == "bucketize":
            if not nums or not params or any(a >= b for a, b in zip(params, params[1:])):
                raise bad("bucketize needs strictly increasing finite boundaries")
            if default != int(default) or not 0 <= default <= len(params):
                raise bad(f"default must be a bucket index, 0..={len(params)}")
            return ("bucketize", tuple(float(np.float32(v)) for v in params))
    raise bad(f"unknown transform {spec!r} (log1p, {{clip = [lo, hi]}}, {{bucketize = [...]}})")
