from __future__ import annotations

import sys
from pathlib import Path

import pytest

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
    """One synthetic training run shared by the tests: (out_dir, manifest)."""
    out = tmp_path_factory.mktemp("model") / "ctr-test"
    manifest = run(["--synthetic", "30000", "--seed", "11", "--version", "ctr-test-v1", "--out", str(out)])
    return out, manifest
