"""Evaluation: attacks over a dataset, accuracies with intervals, paired tests."""

from robustlr.eval.runner import (
    RESULT_COLUMNS,
    AttackResult,
    evaluate,
    load_outcomes,
    save_outcomes,
    subset_sha256,
)
from robustlr.eval.stats import McNemarResult, mcnemar, wilson_interval

__all__ = [
    "RESULT_COLUMNS",
    "AttackResult",
    "McNemarResult",
    "evaluate",
    "load_outcomes",
    "mcnemar",
    "save_outcomes",
    "subset_sha256",
    "wilson_interval",
]
