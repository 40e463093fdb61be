"""The trainer reads the request contract and the label window from the one
registry the services read, instead of defining them again."""

import dataclasses

import numpy as np
import pytest

from adserve_trainer import TrainerError
from adserve_trainer.registry import load_registry
from adserve_trainer.synthetic import generate


def test_registry_carries_devices_and_label_window(registry):
    assert "mobile" in registry.devices
    assert registry.label_window_seconds > 0


def test_synthetic_devices_and_click_delays_follow_the_registry(registry):
    narrowed = dataclasses.replace(registry, devices=("tablet",), label_window_seconds=2)
    t = generate(2000, 3, narrowed)
    assert set(t.column("device").to_pylist()) == {"tablet"}
    served = t.column("served_at").cast("int64").to_numpy(zero_copy_only=False)
    clicked = t.column("clicked_at").cast("int64")
    clicked_mask = clicked.is_valid().to_numpy(zero_copy_only=False)
    delays = clicked.fill_null(0).to_numpy(zero_copy_only=False)[clicked_mask] - served[clicked_mask]
    assert clicked_mask.any()
    assert (delays < 2000).all(), "every click lands inside the registry's label window (ms timestamps)"


def test_a_registry_without_devices_is_refused(tmp_path):
    text = (load_registry().path.read_text()).replace('devices = ["mobile", "desktop", "tablet", "ctv"]', "")
    p = tmp_path / "features.toml"
    p.write_text(text)
    with pytest.raises(TrainerError, match="devices"):
        load_registry(p)
