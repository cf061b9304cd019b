"""Neural-network layers built on the ops."""

from robustlr.nn.local_relation2d import (
    DEFAULT_PRIOR_INIT,
    GEOMETRIC_PRIORS,
    PRIOR_INITS,
    LocalRelation2d,
    relation_parameters,
)

__all__ = [
    "DEFAULT_PRIOR_INIT",
    "GEOMETRIC_PRIORS",
    "PRIOR_INITS",
    "LocalRelation2d",
    "relation_parameters",
]
