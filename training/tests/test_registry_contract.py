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


@pytest.mark.parametrize(
    "transform, default, why",
    [
        ('"log1p"', "0.0", None),
        ('"sqrt"', "0.0", "unknown transform"),
        ("{ clip = [1.0, 0.0] }", "0.5", "clip must be"),
        ("{ bucketize = [0.5, 0.5] }", "0.0", "strictly increasing"),
        ("{ bucketize = [0.5] }", "0.5", "bucket index"),
    ],
)
def test_transforms_are_validated_like_the_services_do(tmp_path, transform, default, why):
    text = load_registry().path.read_text().replace(
        'transform = "log1p"\npersonal = true', f"transform = {transform}\npersonal = true"
    ).replace('name = "user_sessions_7d_log"\nentity = "user"\nsource = "dynamodb"\nattribute = "sessions_7d"\ndefault = 0.0',
              f'name = "user_sessions_7d_log"\nentity = "user"\nsource = "dynamodb"\nattribute = "sessions_7d"\ndefault = {default}')
    p = tmp_path / "features.toml"
    p.write_text(text)
    if why is None:
        assert load_registry(p).features[-2].transform == ("log1p", None)
    else:
        with pytest.raises(TrainerError, match=why):
            load_registry(p)


def test_every_feature_has_an_owner_and_stored_ones_a_freshness_sla(registry):
    for f in registry.features:
        assert f.owner, f.name
        assert (f.freshness_sla_seconds is not None) == (f.source != "request"), f.name
