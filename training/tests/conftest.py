from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# Light on a shared machine, and deterministic: one CPU thread for torch.
torch.set_num_threads(1)

TRAINING_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TRAINING_DIR.parent
if str(TRAINING_DIR) not in sys.path:  # also works without pyproject's pythonpath
    sys.path.insert(0, str(TRAINING_DIR))

from adserve_trainer.registry import load_registry  # noqa: E402
from adserve_trainer.train import run  # noqa: E402


@pytest.fixture(scope="session")
def registry():
    return load_registry()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One synthetic training run (default model: DCN-v2) shared by the tests: (out_dir, manifest)."""
    out = tmp_path_factory.mktemp("model") / "ctr-test"
    manifest = run(["--synthetic", "30000", "--seed", "11", "--version", "ctr-test-v1", "--out", str(out)])
    return out, manifest


@pytest.fixture(scope="session")
def trained_lr(tmp_path_factory):
    """The logistic-regression export (--model lr) of a smaller run: (out_dir, manifest)."""
    out = tmp_path_factory.mktemp("model") / "ctr-test-lr"
    manifest = run(
        ["--synthetic", "8000", "--seed", "3", "--model", "lr", "--version", "ctr-test-lr", "--out", str(out)]
    )
    return out, manifest
