"""Neural-network layers built on the ops."""

from robustlr.nn.local_relation2d import (
    GEOMETRIC_PRIORS,
    PRIOR_INITS,
    LocalRelation2d,
    relation_parameters,
)

__all__ = ["GEOMETRIC_PRIORS", "PRIOR_INITS", "LocalRelation2d", "relation_parameters"]
