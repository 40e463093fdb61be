"""adserve_trainer: offline trainer for the adserve CTR ranker.

Reads label-joiner Parquet rows (or generates synthetic ones), fits a
logistic-regression baseline in numpy and exports ONNX plus a manifest the
ranker loads. Entry point: ``python -m adserve_trainer.train``.
"""


class TrainerError(ValueError):
    """Bad input or a failed check; the CLI prints it as a one-line error."""
