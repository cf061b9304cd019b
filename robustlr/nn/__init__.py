"""Neural-network layers built on the ops."""

from robustlr.nn.local_relation2d import GEOMETRIC_PRIORS, LocalRelation2d

__all__ = ["GEOMETRIC_PRIORS", "LocalRelation2d"]
