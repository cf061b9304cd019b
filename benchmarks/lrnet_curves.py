"""Training-loss curves of LR-Net-26 and ResNet-26 on CIFAR-10 (docs/lrnet-training.md).

A short run of each (32x32, small-input stem, width 0.25, batch 32, a few hundred steps of one
cosine cycle) through the real training engine, plus LR-Net-26 with the first round's
centre-peaked prior (``prior_init=centre``) and with robustlr 0.1's start
(``prior_init=default``, ``relation_lr_scale=1``) to show what the fix changes. Writes
``curves.csv`` (per-step loss), ``accuracy.csv`` (accuracy on the first test images) and
``curves.png``.

    python benchmarks/lrnet_curves.py --data ../shared/data/cifar10.npz --steps 300 --out DIR
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from robustlr.runs import load_run
from robustlr.train import StepEnded, resolve, train

RUNS = {
    "resnet26": ("resnet26", {}),
    "lrnet26": ("lrnet26", {}),
    "lrnet26 (centre prior)": ("lrnet26", {"model_options": {"prior_init": "centre"}}),
    "lrnet26 (0.1 start)": (
        "lrnet26",
        {"model_options": {"prior_init": "default"}, "relation_lr_scale": 1.0},
    ),
}


def run_one(name: str, args: argparse.Namespace) -> tuple[list[float], float]:
    arch, changes = RUNS[name]
    cfg = dict(
        arch=arch,
        dataset="cifar10",
        data=str(args.data),
        small_input=True,
        width=args.width,
        epochs=1,
        batch_size=args.batch_size,
        max_steps_per_epoch=args.steps,
        val_fraction=0.01,
        warmup_epochs=0.05,
        out=str(args.out / name.replace(" ", "_").replace("(", "").replace(")", "")),
        seed=args.seed,
        device="cpu",
        **{k: v for k, v in changes.items() if k != "model_options"},
        model_options=changes.get("model_options", {}),
    )
    losses: list[float] = []

    def sink(event: object) -> None:
        if isinstance(event, StepEnded):
            losses.append(event.loss)
            if len(losses) % 25 == 0:
                print(f"{name}: step {len(losses)} loss {sum(losses[-25:]) / 25:.3f}", flush=True)

    result = train(resolve(cfg), on_event=sink)
    run = load_run(result.run_dir)  # its best checkpoint and the test split it was trained for
    x, y = run.test_set.__getitems__(list(range(args.test_images)))
    with torch.no_grad():
        accuracy = (run.model(x).argmax(1) == y).float().mean().item()
    return losses, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("lrnet-curves"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    curves, accuracy = {}, {}
    for name in args.runs.split(","):
        curves[name], accuracy[name] = run_one(name, args)
        print(f"{name}: test accuracy {100 * accuracy[name]:.1f}% on {args.test_images} images")
    with open(args.out / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        for step in range(max(len(c) for c in curves.values())):
            writer.writerow(
                [step + 1, *(c[step] if step < len(c) else "" for c in curves.values())]
            )
    with open(args.out / "accuracy.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "test_images", "accuracy"])
        for name, acc in accuracy.items():
            writer.writerow([name, args.test_images, f"{acc:.4f}"])
    plot(curves, args.out / "curves.png", args)


def plot(curves: dict[str, list[float]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    window = 20
    for name, losses in curves.items():
        values = torch.tensor(losses)
        smooth = values.unfold(0, window, 1).mean(1) if len(values) >= window else values
        ax.plot(range(len(smooth)), smooth.numpy(), label=name)
    ax.axhline(torch.log(torch.tensor(10.0)).item(), color="grey", linestyle=":", label="ln 10")
    ax.set_xlabel(f"step (batch {args.batch_size}; moving average of {window})")
    ax.set_ylabel("training loss")
    ax.set_title(f"CIFAR-10 32x32, width {args.width}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
