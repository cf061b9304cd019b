"""Per-LR-layer diagnostics of LR-Net-26 on digits, at initialisation and after a few steps.

For every local relation layer: the resolution it runs at, the entropy of its aggregation
weights as a fraction of a uniform window's (1 = uniform average, 0 = one-hot), the standard
deviation of the appearance term phi(q, k) and of the prior logits over the valid window, the
relative gradient norms |grad| / |weight| of the query/key/1x1 weights, and the per-channel
standard deviation of the layer's output (what the BatchNorm after it divides by).

    python benchmarks/lrnet_diagnostics.py --image-size 16 --steps 60 [--old]

``--old`` starts as robustlr 0.1 did (prior_init=default, relation_lr_scale=1, PyTorch's init
of the 1x1 after aggregation).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import robustlr
from robustlr.data import load
from robustlr.nn import LocalRelation2d
from robustlr.train.param_groups import parameter_groups


def layer_stats(layer: LocalRelation2d, x: torch.Tensor) -> dict[str, float]:
    """Aggregation statistics of ``layer`` on its input ``x`` (sqdiff/absdiff/mul, qk_dim 1).

    Shape: x (B, C, H, W).
    """
    size, stride = layer.kernel_size, layer.stride
    q = layer.query(x[:, :, ::stride, ::stride])
    k = layer.key(x)
    geo = layer.prior_logits(x.dtype, x.device)
    batch, groups, height, width = k.shape
    keys = F.unfold(k, size, padding=size // 2, stride=stride).view(batch, groups, size * size, -1)
    ones = torch.ones(1, 1, height, width)
    valid = F.unfold(ones, size, padding=size // 2, stride=stride).view(1, 1, size * size, -1) > 0
    query = q.flatten(2).unsqueeze(2)
    phi = {
        "sqdiff": -((query - keys) ** 2),
        "absdiff": -(query - keys).abs(),
        "mul": query * keys,
    }[layer.composability]
    prior = geo.reshape(1, groups, size * size, 1).expand_as(phi)
    weights = (phi + prior).masked_fill(~valid, float("-inf")).softmax(2)
    entropy = -(weights * weights.clamp_min(1e-30).log()).sum(2)
    count = valid.sum(2).float()
    multi = count > 1
    ratio = (entropy / count.clamp_min(2).log())[multi.expand_as(entropy)]
    mask = valid.expand_as(phi)
    return {
        "entropy": ratio.mean().item() if ratio.numel() else float("nan"),
        "phi_sd": phi[mask].std().item(),
        "prior_sd": prior[mask].std().item(),
    }


def diagnose(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LocalRelation2d)}

    def keep(name: str):  # a forward hook returning None leaves the output as it is
        def hook(module: torch.nn.Module, inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
            inputs[name], outputs[name] = inp[0], out

        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    model.train()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    rows = []
    for name, layer in layers.items():
        with torch.no_grad():
            stats = layer_stats(layer, inputs[name].detach())

        def rel(p: torch.Tensor) -> float:
            return (p.grad.norm() / p.norm().clamp_min(1e-12)).item() if p.grad is not None else 0

        rows.append(
            f"{name:24s} {inputs[name].shape[-1]:>2d}x{inputs[name].shape[-2]:<2d} "
            f"{stats['entropy']:7.2f} {stats['phi_sd']:8.3f} {stats['prior_sd']:8.3f} "
            f"{rel(layer.query.weight):8.2f} {rel(layer.key.weight):8.2f} "
            f"{rel(layer.project.weight):8.2f} {outputs[name].std((0, 2, 3)).mean().item():8.3f}"
        )
    header = (
        f"{'layer':24s} {'HxW':5s} {'entropy':>7s} {'phi_sd':>8s} {'prior_sd':>8s} "
        f"{'g_q':>8s} {'g_k':>8s} {'g_1x1':>8s} {'out_sd':>8s}"
    )
    return [header, *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.025)
    parser.add_argument("--old", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    train_set = load("digits", "train", image_size=args.image_size)
    info = train_set.info
    options = {"prior_init": "default"} if args.old else {}
    model = robustlr.create_model(
        "lrnet26",
        num_classes=10,
        mean=info.mean,
        std=info.std,
        small_input=True,
        width=0.25,
        **options,
    )
    if args.old:
        for layer in model.modules():
            if isinstance(layer, LocalRelation2d):
                layer.project.reset_parameters()
    probe_x, probe_y = train_set.__getitems__(list(range(64)))
    print(f"== at initialisation (image {args.image_size}, {'0.1 start' if args.old else 'fixed'})")
    print("\n".join(diagnose(model, probe_x, probe_y)))
    scale = 1.0 if args.old else 0.1
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.lr, scale), lr=args.lr, momentum=0.9, weight_decay=1e-4
    )
    losses = []
    for step in range(args.steps):
        index = torch.randint(len(train_set), (64,)).tolist()
        x, y = train_set.__getitems__(index)
        for group, base in zip(optimizer.param_groups, (args.lr, args.lr * scale), strict=True):
            group["lr"] = base * min(1.0, (step + 1) / 20)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-20:]
    print(
        f"== after {args.steps} steps: mean loss of the last 20 {sum(tail) / len(tail):.3f} "
        f"(ln 10 = {math.log(10):.3f})"
    )
    print("\n".join(diagnose(model, probe_x, probe_y)))


if __name__ == "__main__":
    main()
