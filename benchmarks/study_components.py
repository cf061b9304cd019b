"""Time the digits study's models by component (docs/study.md): eval forward, attack pass
(eval mode, frozen parameters, input gradient), training step at batch 64 and 128.

    python benchmarks/study_components.py [THREADS]
"""

import sys
import time

import torch

from robustlr.models import create_model

ARCHS = ("resnet26", "resnet50", "lrnet26")


def timed(fn, repeats: int = 4) -> float:
    """Mean milliseconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def measure(arch: str, x64: torch.Tensor, x128: torch.Tensor, y: torch.Tensor) -> str:
    """One line of timings for ``arch``."""
    model = create_model(
        arch, num_classes=10, width=0.25, small_input=True, mean=(0.5,) * 3, std=(0.5,) * 3
    ).to(memory_format=torch.channels_last)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x64)

    def attack_pass() -> None:
        model.eval()
        model.requires_grad_(False)
        x = x64.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), y[:64])
        torch.autograd.grad(loss, x)
        model.requires_grad_(True)

    def train_step(x: torch.Tensor) -> None:
        model.train()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y[: len(x)]).backward()

    f, a = timed(forward), timed(attack_pass)
    t64, t128 = timed(lambda: train_step(x64)), timed(lambda: train_step(x128))
    return (
        f"{arch}: forward {f:.0f} ms, attack pass {a:.0f} ms, train step 64 {t64:.0f} ms, "
        f"train step 128 {t128:.0f} ms; PGD-3 adversarial step ~ {3 * a + f + t128:.0f} ms"
    )


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    cl = torch.channels_last
    x64 = torch.rand(64, 3, 16, 16).contiguous(memory_format=cl)
    x128 = torch.rand(128, 3, 16, 16).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (128,))
    for arch in ARCHS:
        print(measure(arch, x64, x128, y), flush=True)


if __name__ == "__main__":
    main()
