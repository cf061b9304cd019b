"""Report figures (matplotlib, Agg, PNG): accuracy vs eps and vs steps (a marker and its
interval at every measured point, lines only between measured points), a
grid of clean / adversarial / perturbation images, and the learnt geometric priors after
softmax, one panel per stage (the paper's Figure 4)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from robustlr.attacks.registry import names_where
from robustlr.nn import LocalRelation2d
from robustlr.report.results import RUN_KEY, TRAIN_SEED
from robustlr.runs import CHECKPOINT_PREFERENCE

log = logging.getLogger(__name__)

PGD = names_where(family="pgd")


MIN_LINE_POINTS = 3  # fewer measured points are drawn as markers only, without a line


def _curves(rows: pd.DataFrame, x: str) -> dict[str, pd.DataFrame]:
    """Per (network, training mode, seed): the strongest row per ``x`` value, sorted by ``x``."""
    curves = {}
    for (arch, mode, seed), group in rows.groupby(["arch", "train_mode", TRAIN_SEED], sort=True):
        best = group.sort_values("accuracy").groupby(x, sort=True).head(1).sort_values(x)
        label = f"{arch} ({mode}" + (f", seed {seed})" if seed else ")")
        curves[label] = best
    return curves


def _line_plot(
    curves: dict[str, pd.DataFrame], x: str, xlabel: str, title: str, path: Path, log_x: bool
) -> Path | None:
    """A marker with its 95% interval (Wilson, per image) at every measured point; lines join
    neighbouring measured points of a curve, and only when it has ``MIN_LINE_POINTS``."""
    if not curves:
        log.info("no data for %s", path.name)
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for label, curve in curves.items():
        xs = curve[x].to_numpy(dtype=float) * (255 if x == "eps" else 1)
        acc = curve["accuracy"].to_numpy(dtype=float)
        errors = [acc - curve["accuracy_low"].to_numpy(), curve["accuracy_high"].to_numpy() - acc]
        ax.errorbar(
            xs,
            acc,
            yerr=errors,
            marker="o",
            markersize=4,
            capsize=3,
            linewidth=1,
            linestyle="-" if len(curve) >= MIN_LINE_POINTS else "none",
            label=f"{label}, {len(curve)} points",
        )
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({float(v) for c in curves.values() for v in c[x]})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def sweep_steps(pgd: pd.DataFrame) -> int | None:
    """The step count of the eps sweep: the one with the most distinct eps values per run
    (ties: fewer steps); None when there are no PGD rows."""
    if pgd.empty:
        return None
    spread = pgd.groupby([RUN_KEY, "steps"])["eps"].nunique().groupby("steps").max()
    return int(spread[spread == spread.max()].index.min())


def eps_curves(
    results: pd.DataFrame, target_policy: str = "none", precision: str = "fp32"
) -> tuple[int | None, dict[str, pd.DataFrame]]:
    """The eps sweep's step count and its curves (``_curves``; clean rows at eps 0): PGD rows
    of that step count with one random start, so every point is the same attack."""
    pgd = results[
        results["attack"].isin(PGD)
        & (results["target_policy"] == target_policy)
        & (results["precision"] == precision)
        & (results["restarts"] == 1)
    ]
    steps = sweep_steps(pgd)
    if steps is None:
        return None, {}
    pgd = pgd[pgd["steps"] == steps]
    clean = results[(results["attack"] == "clean") & results[RUN_KEY].isin(set(pgd[RUN_KEY]))]
    return steps, _curves(pd.concat([clean.assign(eps=0.0), pgd]), "eps")


def plot_accuracy_vs_eps(
    results: pd.DataFrame, path: str | Path, target_policy: str = "none", precision: str = "fp32"
) -> Path | None:
    """Accuracy vs eps x 255 (``eps_curves``), one curve per network, training mode and seed.
    None (nothing written) when there is no PGD row."""
    steps, curves = eps_curves(results, target_policy, precision)
    if steps is None:
        return None
    kind = "untargeted" if target_policy == "none" else f"targeted ({target_policy})"
    return _line_plot(
        curves,
        "eps",
        "eps (x 1/255)",
        f"Accuracy vs eps, {kind} PGD-{steps} (measured points only)",
        Path(path),
        False,
    )


def plot_accuracy_vs_steps(
    results: pd.DataFrame,
    path: str | Path,
    eps: float,
    target_policy: str = "none",
    precision: str = "fp32",
) -> Path | None:
    """Accuracy (strongest PGD row per step count, one random start) at ``eps`` vs steps
    (log x), one curve per network, training mode and seed. None when there is no matching
    row."""
    rows = results[
        results["attack"].isin(PGD)
        & ((results["eps"] - eps).abs() < 1e-6)
        & (results["target_policy"] == target_policy)
        & (results["precision"] == precision)
        & (results["restarts"] == 1)
    ]
    if rows.empty:
        return None
    kind = "untargeted" if target_policy == "none" else f"targeted ({target_policy})"
    title = f"Accuracy vs PGD steps, {kind}, eps {eps * 255:.3g}/255 (measured points only)"
    return _line_plot(_curves(rows, "steps"), "steps", "attack steps", title, Path(path), True)


def plot_image_grid(
    clean: torch.Tensor,
    adversarial: torch.Tensor,
    path: str | Path,
    max_images: int = 8,
    titles: list[str] | None = None,
) -> Path:
    """Rows: clean images, adversarial images, perturbations (scaled to fill [0, 1], grey = 0).

    Shape: clean (N, C, H, W) on [0, 1], adversarial (N, C, H, W) on [0, 1].
    """
    if clean.shape != adversarial.shape or clean.dim() != 4:
        raise ValueError(
            f"expected two (N, C, H, W) tensors of one shape, got {tuple(clean.shape)} and "
            f"{tuple(adversarial.shape)}"
        )
    n = min(max_images, clean.shape[0])
    if n == 0:
        raise ValueError("no images to plot")
    x, x_adv = clean[:n].detach().float().cpu(), adversarial[:n].detach().float().cpu()
    delta = x_adv - x
    scale = float(delta.abs().max()) or 1.0
    rows = {
        "clean": x,
        "adversarial": x_adv,
        f"perturbation (x{0.5 / scale:.3g})": delta / (2 * scale) + 0.5,
    }
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), dpi=120, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            image = images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            if image.shape[2] == 1:
                ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and titles is not None and c < len(titles):
                ax.set_title(titles[c], fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def stage_name(module_name: str) -> str:
    """``stem.3`` -> "res1 (stem)"; ``stages.0.1.layers.1.0`` -> "res2" (the paper's stage
    names: res1 is the stem, res2..res5 the four stages)."""
    match = re.match(r"stages\.(\d+)\.", module_name)
    if match:
        return f"res{int(match.group(1)) + 2}"
    if module_name.startswith("stem"):
        return "res1 (stem)"
    return module_name.rsplit(".", 1)[0] or module_name


@torch.no_grad()
def geo_prior_maps(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learnt geometric priors after softmax over the K x K window, averaged over groups
    and over the LR layers of each stage, in network order (empty: no LocalRelation2d).

    Shape: {stage: (K, K)}, each map summing to 1.
    """
    sums: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LocalRelation2d):
            continue
        logits = module.prior_logits(torch.float32, torch.device("cpu"))
        groups, k, _ = logits.shape
        probs = torch.softmax(logits.float().cpu().reshape(groups, k * k), dim=1)
        sums.setdefault(stage_name(name), []).append(probs.mean(0).reshape(k, k))
    maps = {}
    for stage, layers in sums.items():
        if len({tuple(t.shape) for t in layers}) > 1:
            for i, layer in enumerate(layers):
                maps[f"{stage}.{i}"] = layer
        else:
            maps[stage] = torch.stack(layers).mean(0)
    return maps


def plot_geo_priors(model: nn.Module, path: str | Path, title: str | None = None) -> Path:
    """One heat map per stage of the learnt geometric prior (after softmax), like the paper's
    Figure 4. ValueError when the model has no local relation layers."""
    maps = geo_prior_maps(model)
    if not maps:
        raise ValueError("the model has no local relation layers (no geometric priors to show)")
    fig, axes = plt.subplots(1, len(maps), figsize=(2.6 * len(maps), 2.9), dpi=120, squeeze=False)
    for ax, (stage, prior) in zip(axes[0], maps.items(), strict=True):
        image = ax.imshow(prior.numpy(), cmap="viridis")
        ax.set_title(stage, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "Learnt geometric priors (softmax, mean over groups)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def report_plots(results: pd.DataFrame, directory: str | Path, eps: float) -> list[Path]:
    """The report's result plots (accuracy vs eps and vs steps, untargeted and targeted) in
    ``directory``; plots without data are not written."""
    directory = Path(directory)
    written = []
    for policy, suffix in (("none", ""), ("random", "_targeted")):
        for made in (
            plot_accuracy_vs_eps(results, directory / f"accuracy_vs_eps{suffix}.png", policy),
            plot_accuracy_vs_steps(
                results, directory / f"accuracy_vs_steps{suffix}.png", eps, policy
            ),
        ):
            if made is not None:
                written.append(made)
    return written


def run_geo_prior_plots(
    runs: dict[tuple[str, str], str],
    directory: Path,
    checkpoint_names: tuple[str, ...] = CHECKPOINT_PREFERENCE,
) -> list[Path]:
    """Figure-4 plots for report runs ({(network, mode): run dir}) whose model has local
    relation layers, from the first of ``checkpoint_names`` each run has; unreadable
    checkpoints are skipped with a warning."""
    from robustlr.checkpoint import CheckpointError, build_model, load_checkpoint

    written = []
    for (network, mode), run_key in sorted(runs.items()):
        run = Path(run_key)
        checkpoint = next((run / n for n in checkpoint_names if (run / n).is_file()), None)
        if checkpoint is None:
            continue
        try:
            model = build_model(load_checkpoint(checkpoint))
        except CheckpointError as exc:
            log.warning("skipping geometric priors of %s: %s", checkpoint, exc)
            continue
        if not geo_prior_maps(model):
            continue
        title = f"Learnt geometric priors, {network} ({mode})"
        written.append(plot_geo_priors(model, directory / f"geo_prior_{network}_{mode}.png", title))
    return written
