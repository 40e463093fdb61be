"""The feature registry (crates/adserve-features/features.toml): names, order,
defaults, transforms, the request contract's devices and the label window.

``Feature.serve`` is the Python twin of ``adserve_features::FeatureSpec``'s
``accepts`` + ``serve``: a stored raw value is checked against ``range`` and
put through the feature's transform exactly as the feature-service does,
computing in f64 and rounding once to f32, so a row built offline
(``adserve_trainer.offline``) is bit-identical to the row served.
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


@dataclass(frozen=True)
class Registry:
    path: Path
    features: tuple[Feature, ...]
    devices: tuple[str, ...]
    label_window_seconds: int

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
        features.append(
            Feature(
                name=name,
                entity=e["entity"],
                source=e["source"],
                attribute=e["attribute"],
                default=float(default),
                personal=bool(e.get("personal", False)),
                equals=e.get("equals"),
                range=rng,
                transform=transform,
                owner=owner,
                freshness_sla_seconds=sla,
            )
        )
    devices = doc.get("request", {}).get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
        raise TrainerError(f"feature registry {p}: [request].devices must be a non-empty list of names")
    window = doc.get("label", {}).get("window_seconds")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise TrainerError(f"feature registry {p}: [label].window_seconds must be a positive integer")
    return Registry(path=p, features=tuple(features), devices=tuple(devices), label_window_seconds=window)


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
