"""Optimiser parameter groups: the LR layers' query/key projections at a scaled learning rate."""

from __future__ import annotations

from typing import Any

from torch import nn

from robustlr.nn import relation_parameters


def parameter_groups(model: nn.Module, lr: float, relation_lr_scale: float) -> list[dict[str, Any]]:
    """Every trainable parameter once: the query/key projection weights of the local relation
    layers at ``lr * relation_lr_scale``, the rest at ``lr``.

    The sqdiff appearance logits are quadratic in the query/key weights, so at the network's
    learning rate they grow until the aggregation weights saturate and training stalls
    (docs/lrnet-training.md). A model without LR layers gets one group.
    """
    relation = [p for p in relation_parameters(model) if p.requires_grad]
    chosen = {id(p) for p in relation}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": lr}]
    if relation:
        groups.append({"params": relation, "lr": lr * relation_lr_scale})
    return groups
