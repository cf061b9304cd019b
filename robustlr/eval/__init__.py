"""Evaluation: attacks over a dataset, accuracies with intervals, paired tests."""

from robustlr.eval.runner import RESULT_COLUMNS, AttackResult, evaluate
from robustlr.eval.stats import McNemarResult, mcnemar, wilson_interval

__all__ = [
    "RESULT_COLUMNS",
    "AttackResult",
    "McNemarResult",
    "evaluate",
    "mcnemar",
    "wilson_interval",
]
