"""Cost of the digits suite's APGD-CE-20 against one PGD-10, side by side in one process
(docs/benchmarks.md, issue 14). Usage: python benchmarks/apgd_cost.py [arch ...]"""

from __future__ import annotations

import sys

import torch

from robustlr.attacks import AttackSpec
from robustlr.eval.runner import evaluate
from robustlr.models import create_model


def main(archs: list[str]) -> None:
    torch.set_num_threads(2)
    x = torch.rand(128, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    specs = [
        AttackSpec("pgd-untargeted", eps=48 / 255, steps=10),
        AttackSpec("apgd-ce", eps=48 / 255, steps=20),
    ]
    for arch in archs:
        model = create_model(arch, num_classes=10, small_input=True, width=0.25).eval()
        pgd, apgd = evaluate(model, x, y, specs, batch_size=128)
        print(
            f"{arch}: {pgd.spec.describe()} {pgd.seconds:.2f} s, {apgd.spec.describe()} "
            f"{apgd.seconds:.2f} s, ratio {apgd.seconds / pgd.seconds:.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet26"])
