"""adserve_trainer: offline trainer for the adserve CTR ranker.

Reads label-joiner Parquet rows (or generates synthetic ones), trains a
logistic-regression baseline and DCN-v2 in PyTorch on a time-based split,
calibrates (Platt / isotonic), reports AUC, log loss, normalized entropy and
ECE, and exports the chosen model as ONNX plus a manifest the ranker loads.
Entry points: ``python -m adserve_trainer.train`` (adserve rows, synthetic
rows, ``--criteo``) and ``python -m adserve_trainer.obd`` (Open Bandit
Dataset replay).
"""


class TrainerError(ValueError):
    """Bad input or a failed check; the CLI prints it as a one-line error."""
