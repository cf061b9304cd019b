"""robustlr: adversarial robustness of Local Relation Networks."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from robustlr.checkpoint import load_model  # noqa: E402
from robustlr.models import create_model, list_models  # noqa: E402
from robustlr.runs import load_run  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "load_model", "load_run"]
