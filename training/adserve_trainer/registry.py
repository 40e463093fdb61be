"""The feature registry (crates/adserve-features/features.toml): names, order,
defaults, the request contract's devices and the label window."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

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

    def accepts(self, value: float) -> bool:
        """FeatureSpec::accepts: finite and inside ``range`` when one is declared."""
        if not math.isfinite(value):
            return False
        return self.range is None or self.range[0] <= value <= self.range[1]


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
            if not rng[0] <= default <= rng[1]:
                raise TrainerError(f"feature registry {p}: feature '{name}' default lies outside range")
            rng = (float(rng[0]), float(rng[1]))
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
            )
        )
    devices = doc.get("request", {}).get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d for d in devices):
        raise TrainerError(f"feature registry {p}: [request].devices must be a non-empty list of names")
    window = doc.get("label", {}).get("window_seconds")
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise TrainerError(f"feature registry {p}: [label].window_seconds must be a positive integer")
    return Registry(path=p, features=tuple(features), devices=tuple(devices), label_window_seconds=window)
