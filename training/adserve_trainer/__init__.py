"""adserve_trainer: offline trainer for the adserve CTR ranker.

Reads label-joiner Parquet rows (or generates synthetic ones), trains a
logistic-regression baseline and DCN-v2 in PyTorch on a time-based split,
calibrates (Platt / isotonic), reports AUC, log loss, normalized entropy and
ECE, and exports the chosen model as ONNX plus a manifest the ranker loads.
Entry points: ``python -m adserve_trainer.train`` (adserve rows, synthetic
rows, ``--criteo``) and ``python -m adserve_trainer.obd`` (Open Bandit
Dataset replay).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: Exit status of a command that stopped on bad input or a failed check.
EXIT_ERROR = 2


class TrainerError(ValueError):
    """Bad input or a failed check; the CLI prints it as a one-line error."""


def cli(body: Callable[[], int]) -> int:
    """Runs a command's body and returns its exit status; bad input
    (TrainerError) or a file-system error becomes one ``error: ...`` line on
    stderr and EXIT_ERROR."""
    try:
        return body()
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
