"""A/B of adversarial training's per-step attack with and without BatchNorm folding
(docs/study.md): targeted PGD-3 on 64 random 16x16 images, train-mode digits models at width
0.25, 1 thread; mean milliseconds of 5 calls after a warm-up, each variant twice.

    python benchmarks/fold_attack_ab.py
"""

import time

import torch

from robustlr.attacks.run import run_attack
from robustlr.attacks.spec import AttackSpec
from robustlr.models import create_model
from robustlr.models.fold import fold_batchnorm


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 16, 16), torch.randint(0, 10, (64,))
    targets = (y + 1) % 10
    spec = AttackSpec("pgd-targeted", eps=48 / 255, step_size=20 / 255, steps=3, seed=1)
    for arch in ("resnet26", "resnet50", "lrnet26"):
        model = create_model(
            arch, num_classes=10, width=0.25, small_input=True, mean=(0.5,) * 3, std=(0.5,) * 3
        ).to(memory_format=torch.channels_last)
        model.train()
        variants = {
            "plain": lambda m=model: run_attack(m, x, y, spec, targets=targets),
            "folded": lambda m=model: run_attack(fold_batchnorm(m), x, y, spec, targets=targets),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):
            for name, step in variants.items():
                step()
                start = time.perf_counter()
                for _ in range(5):
                    step()
                times[name].append((time.perf_counter() - start) / 5 * 1000)
        print(arch, {name: [round(t) for t in ts] for name, ts in times.items()})


if __name__ == "__main__":
    main()
