"""The local relation op and its backends."""

from robustlr.ops.contract import COMPOSABILITIES, LocalRelationShape, check_inputs
from robustlr.ops.dispatch import (
    BACKEND_ENV,
    BACKEND_TABLE,
    BACKENDS,
    Backend,
    local_relation,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "BACKEND_TABLE",
    "COMPOSABILITIES",
    "Backend",
    "LocalRelationShape",
    "check_inputs",
    "local_relation",
    "resolve_backend",
]
