"""The ``nn.Unfold`` implementation of the local relation op: the benchmarks' baseline only.

This is how the public ports compute the layer: unfold x into K*K copies, softmax the window
logits, multiply and sum. It is exact but needs ~K*K times the input's memory, saved for backward
by autograd; robustlr's own backends exist to avoid that. Not used by any model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def unfold_local_relation(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    geo: torch.Tensor,
    kernel_size: int,
    stride: int = 1,
    composability: str = "sqdiff",
) -> torch.Tensor:
    """Local relation by unfolding (same function as ``robustlr.ops.local_relation``).

    Shape: x (B, C, H, W), q (B, G, Ho, Wo), k (B, G, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    B, C, H, W = x.shape
    G, K = geo.shape[0], kernel_size
    m = math.ceil(C / G)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    unfold = dict(kernel_size=K, padding=K // 2, stride=stride)
    if G * m != C:
        x = F.pad(x, (0, 0, 0, 0, 0, G * m - C))
    xu = F.unfold(x, **unfold).view(B, G, m, K * K, Ho, Wo)
    ku = F.unfold(k, **unfold).view(B, G, K * K, Ho, Wo)
    inside = F.unfold(x.new_ones(1, 1, H, W), **unfold).view(1, 1, K * K, Ho, Wo) > 0
    qe = q.unsqueeze(2)
    if composability == "sqdiff":
        logits = -(qe - ku).square()
    elif composability == "absdiff":
        logits = -(qe - ku).abs()
    else:
        logits = qe * ku
    logits = logits + geo.reshape(1, G, K * K, 1, 1)
    weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
    y = (weights.unsqueeze(2) * xu).sum(3)
    return y.reshape(B, G * m, Ho, Wo)[:, :C]
