"""Evaluate a model on a set of images under a list of attacks: per-example outcomes, accuracy
with Wilson intervals, and every column of the threat model (DESIGN.md §5)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from robustlr import __version__
from robustlr.attacks.modes import eval_mode
from robustlr.attacks.run import run_attack, settings_of
from robustlr.attacks.spec import AttackSpec
from robustlr.attacks.targets import draw_random_targets, save_targets, targets_sha256
from robustlr.errors import UserError
from robustlr.eval.stats import wilson_interval
from robustlr.runs import atomic_write

log = logging.getLogger(__name__)

# the columns every eval.csv row carries, in order (more may follow)
RESULT_COLUMNS = (
    "run",
    "arch",
    "train_mode",
    "train_seed",  # the checkpoint's training seed ("" when it records none): a replicate
    "dataset",
    "split",
    "n",
    "subset_sha256",
    "data_sha256",
    "attack",
    "norm",
    "eps",
    "step_size",
    "steps",
    "restarts",
    "target_policy",
    "targets_seed",
    "targets_sha256",
    "precision",
    "attack_settings",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "target_success",
    "zero_grad_fraction",
    "seconds",
    "passes",
    "checkpoint_sha256",
    "outcomes_file",
    "version",
)
# the columns that identify what an outcomes file holds: its images, model and full threat
# model (an outcomes file records them and is read only for a row with equal values)
THREAT_KEY_COLUMNS = (
    "dataset",
    "split",
    "n",
    "subset_sha256",
    "checkpoint_sha256",
    "attack",
    "norm",
    "eps",
    "step_size",
    "steps",
    "restarts",
    "target_policy",
    "targets_seed",
    "targets_sha256",
    "precision",
    "attack_settings",
)


class ModelOutputError(UserError):
    """The evaluated model's output is unusable (NaN or inf logits)."""


@dataclass
class AttackResult:
    """One attack over the whole evaluated set."""

    spec: AttackSpec
    correct: np.ndarray  # (N,) bool: prediction == true label after the attack
    success: np.ndarray  # (N,) bool: the attack's own success (target reached, or wrong)
    targets: np.ndarray | None  # (N,) targets of a targeted attack
    passes: int
    seconds: float
    zero_grad_fraction: float = 0.0
    targets_sha256: str = ""
    example_ids: np.ndarray | None = None  # (N,) dataset indices of the images
    settings: str = ""  # the exact settings of a torchattacks or minimum-norm attack
    norms: np.ndarray | None = None  # (N,) a minimum-norm attack's smallest norms (inf: none)

    def finish(self, targets_dir: str | Path | None = None) -> None:
        """Hash the targets (and save them in ``targets_dir`` for random targets)."""
        if self.targets is None:
            return
        targets = torch.from_numpy(np.asarray(self.targets))
        self.targets_sha256 = targets_sha256(targets)
        if targets_dir is not None and self.spec.target == "random":
            name = f"targets-{self.spec.seed}-{self.targets_sha256[:12]}.npy"
            save_targets(Path(targets_dir) / name, targets)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.n else float("nan")

    def row(self, meta: dict[str, Any]) -> dict[str, Any]:
        """One eval.csv row: ``meta`` (run, arch, dataset, ...) plus this attack's columns.
        Options the attack does not use (registry ``takes``) are left empty."""
        low, high = wilson_interval(int(self.correct.sum()), self.n)
        spec = self.spec
        info = spec.info
        attacked = info.family != "clean"
        step = spec.resolved_step_size
        return {
            **{c: meta.get(c, "") for c in RESULT_COLUMNS},
            "n": self.n,
            "attack": spec.name,
            "norm": spec.norm if attacked else "",
            "eps": spec.eps if attacked else 0.0,
            "step_size": step if step is not None else "",
            "steps": spec.steps if "steps" in info.takes else (0 if not attacked else ""),
            "restarts": spec.restarts if "restarts" in info.takes else (0 if not attacked else ""),
            "target_policy": spec.target if attacked else "",
            "targets_seed": spec.seed if spec.target == "random" else "",
            "targets_sha256": self.targets_sha256,
            "precision": spec.precision,
            "attack_settings": self.settings,
            "accuracy": round(100 * self.accuracy, 4),
            "accuracy_low": round(100 * low, 4),
            "accuracy_high": round(100 * high, 4),
            "target_success": round(100 * float(self.success.mean()), 4) if spec.targeted else "",
            "zero_grad_fraction": round(self.zero_grad_fraction, 6),
            "seconds": round(self.seconds, 3),
            "passes": self.passes,
            "version": __version__,
        }


KEY_DEFAULTS = {"target_policy": "none", "precision": "fp32"}
KEY_NUMBERS = ("n", "eps", "step_size", "steps", "restarts", "targets_seed")


def _canonical(value: object, number: bool) -> str:
    """A row value as text that survives a CSV round trip (numbers: 10 == 10.0 == "10")."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    text = str(value).strip()
    if not number or not text:
        return text
    try:
        parsed = float(text)
    except ValueError:
        return text
    return "" if math.isnan(parsed) else format(parsed, ".9g")


def threat_key(row: Mapping[str, Any]) -> dict[str, str]:
    """The identity of a result row's outcomes: ``THREAT_KEY_COLUMNS`` as canonical text (a
    row written by ``AttackResult.row`` and the same row read back from eval.csv agree)."""
    key = {c: _canonical(row.get(c, ""), c in KEY_NUMBERS) for c in THREAT_KEY_COLUMNS}
    for column, default in KEY_DEFAULTS.items():  # as the report reads empty cells
        key[column] = key[column] or default
    return key


def threat_sha256(row: Mapping[str, Any]) -> str:
    """SHA-256 of ``threat_key(row)``: equal exactly when the threat keys are equal."""
    text = json.dumps(threat_key(row), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def outcome_filename(row: Mapping[str, Any]) -> str:
    """The outcomes file name of a result row: the attack and its threat-key hash, so that two
    rows share a file only when images, checkpoint and full threat model are all equal."""
    return f"{row['attack']}-{threat_sha256(row)[:16]}.npz"


def save_outcomes(path: str | Path, result: AttackResult, row: Mapping[str, Any]) -> Path:
    """Per-example outcomes of one attack as ``.npz``: ``correct``, ``success``, ``targets``
    (empty when untargeted), ``norms`` (a minimum-norm attack's smallest adversarial norm per
    image, 0 where the clean image is wrong, inf where none was found; empty for the other
    attacks) and ``threat``, the threat key of its eval.csv ``row`` (images,
    checkpoint and full threat model) that readers check with ``verify_outcomes``."""
    key = threat_key(row)
    arrays = dict(
        correct=result.correct,
        success=result.success,
        targets=result.targets if result.targets is not None else np.zeros(0, dtype=np.int64),
        norms=result.norms if result.norms is not None else np.zeros(0, dtype=np.float32),
        subset_sha256=np.array(key["subset_sha256"]),
        targets_sha256=np.array(result.targets_sha256),
        threat=np.array(json.dumps(key, sort_keys=True)),
    )
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def load_outcomes(path: str | Path) -> dict[str, Any]:
    """Read a file written by ``save_outcomes`` (no pickles); ``threat`` is {} for files of
    older versions, which recorded no threat model."""
    with np.load(Path(path), allow_pickle=False) as data:
        out: dict[str, Any] = {k: data[k] for k in ("correct", "success", "targets")}
        out["subset_sha256"] = str(data["subset_sha256"])
        out["targets_sha256"] = str(data["targets_sha256"])
        out["threat"] = json.loads(str(data["threat"])) if "threat" in data.files else {}
        out["norms"] = data["norms"] if "norms" in data.files else np.zeros(0, dtype=np.float32)
    return out


def verify_outcomes(data: Mapping[str, Any], row: Mapping[str, Any], path: str | Path) -> str:
    """Why the outcomes ``data`` (``load_outcomes``) do not belong to result ``row``, as one
    line; "" when they do (same images, checkpoint and full threat model, same length)."""
    recorded = data.get("threat") or {}
    if not recorded:
        return f"outcomes file {path} records no threat model (older robustlr): re-run eval"
    expected = threat_key(row)
    differ = [c for c in THREAT_KEY_COLUMNS if recorded.get(c, "") != expected[c]]
    if differ:
        shown = "; ".join(
            f"{c} {recorded.get(c, '') or '-'} in the file, {expected[c] or '-'} in the row"
            for c in differ[:3]
        )
        return f"outcomes file {path} belongs to another threat model than its row ({shown})"
    n = expected["n"]
    if n and len(data["correct"]) != int(float(n)):
        return f"outcomes file {path} holds {len(data['correct'])} images, its row {n}"
    return ""


def subset_sha256(labels: torch.Tensor, indices: Sequence[int]) -> str:
    """Identity of the evaluated subset: the dataset indices and their labels."""
    digest = hashlib.sha256()
    digest.update(np.asarray(indices, dtype="<i8").tobytes())
    digest.update(labels.detach().cpu().long().numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    specs: Sequence[AttackSpec],
    *,
    example_ids: torch.Tensor | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    targets_dir: str | Path | None = None,
    on_batch: Callable[[AttackSpec, int], None] | None = None,
) -> list[AttackResult]:
    """Attack every image with every spec, batch by batch.

    ``example_ids`` (default 0..N-1) are the images' dataset indices: image i's random target is
    the i-th draw of the spec's seed (``draw_random_targets`` over the ids), and its random
    starts are keyed by (seed, restart, id), so a result of robustlr's own attacks (registry
    ``batch_independent``) never depends on batch size, on which subset is evaluated, or on how
    images are sharded across processes; torchattacks attacks seed once per batch, so theirs
    may change with the batch size and the sharding. Every model evaluated
    on these images faces the same targets; with ``targets_dir`` they are saved there as
    ``targets-<seed>-<sha12>.npy``. ``on_batch(spec, n_done)`` reports progress.
    Shape: images (N, C, H, W) on [0, 1], labels (N,), example_ids (N,).
    """
    device = torch.device(device)
    ids = torch.arange(len(labels)) if example_ids is None else example_ids.long().cpu()
    for spec in specs:
        try:
            spec.check_images(tuple(images.shape[1:]))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    results = []
    num_classes = _num_classes(model, images[:1].to(device)) if len(ids) else 0
    for spec in specs:
        targets = None
        if spec.target == "random" and len(ids):
            targets = draw_random_targets(labels, num_classes, spec.seed, ids)
        correct, success, chosen, norms = [], [], [], []
        passes, zero, start = 0, 0.0, time.perf_counter()
        for lo in range(0, len(images), batch_size):
            x = images[lo : lo + batch_size].to(device)
            y = labels[lo : lo + batch_size].to(device)
            t = targets[lo : lo + batch_size] if targets is not None else None
            outcome = run_attack(
                model, x, y, spec, targets=t, example_ids=ids[lo : lo + batch_size]
            )
            if not bool(torch.isfinite(outcome.logits).all()):
                raise ModelOutputError(
                    f"the model gives NaN/inf logits ({spec.describe()}, images {lo}.."
                    f"{lo + len(x) - 1}): its results would be meaningless"
                )
            correct.append((outcome.logits.argmax(1) == y).cpu())
            success.append(outcome.success.cpu())
            if outcome.targets is not None:
                chosen.append(outcome.targets.cpu())
            if outcome.norms is not None:
                norms.append(outcome.norms.float().cpu())
            passes += outcome.passes * len(x) if outcome.passes > 0 else 0
            zero += outcome.zero_grad_fraction * len(x)
            if on_batch:
                on_batch(spec, lo + len(x))
        result = AttackResult(
            spec=spec,
            correct=_cat_bool(correct),
            success=_cat_bool(success),
            targets=torch.cat(chosen).numpy() if chosen else None,
            passes=passes,
            seconds=time.perf_counter() - start,
            zero_grad_fraction=zero / max(len(images), 1),
            example_ids=ids.numpy(),
            settings=settings_of(spec, num_classes) if num_classes else "",
            norms=torch.cat(norms).numpy() if norms else None,
        )
        result.finish(targets_dir)
        log.info(
            "%s: accuracy %.2f%% on %d images", spec.describe(), 100 * result.accuracy, result.n
        )
        results.append(result)
    return results


def merge_shards(
    shards: Sequence[AttackResult], targets_dir: str | Path | None = None
) -> AttackResult:
    """One result from the per-process results of one spec, in example-id order."""
    ids = np.concatenate([r.example_ids for r in shards])
    order = np.argsort(ids, kind="stable")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in shards])[order]

    n = max(len(ids), 1)
    merged = AttackResult(
        spec=shards[0].spec,
        correct=cat("correct"),
        success=cat("success"),
        targets=cat("targets") if shards[0].targets is not None else None,
        passes=sum(r.passes for r in shards),
        seconds=max(r.seconds for r in shards),
        zero_grad_fraction=sum(r.zero_grad_fraction * r.n for r in shards) / n,
        example_ids=ids[order],
        settings=shards[0].settings,
        norms=cat("norms") if shards[0].norms is not None else None,
    )
    merged.finish(targets_dir)
    return merged


def _cat_bool(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(parts).numpy() if parts else np.zeros(0, dtype=bool)


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with eval_mode(model), torch.no_grad():
        return int(model(x).shape[1])
