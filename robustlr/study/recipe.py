"""Study recipes: one TOML file naming the networks, data, training, attacks and report.

Layout (every table but ``[[network]]`` optional)::

    name = "table9-digits"            # default: the file's stem
    description = "..."
    seeds = [0, 1, 2]                 # training seeds, one run per (network, mode, seed);
                                      # default: [train] seed alone
    [data]                            # dataset, path, image_size, download, val_fraction, ...
    [train]                           # TrainConfig keys shared by every run; [train.model]
    [adversarial]                     # AdversarialTraining keys (eps may be "16/255")
    [[network]]                       # arch, modes, seeds, any TrainConfig key;
                                      # [network.model], [network.adversarial] override
    [eval]                            # suite or [[eval.attack]], limit, batch_size, split,
                                      # checkpoint ("final" or "best"), device, sweep_suite
                                      # (its attacks too, for the runs of sweep_seeds: [0])
    [report]                          # eps, attack_steps, target_policy, plots

``--set section.key=value`` overrides (e.g. ``data.path=/data/cifar10``) edit the parsed TOML
before it is checked, so they obey the same rules.
"""

from __future__ import annotations

import logging
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustlr.attacks.spec import AttackSpec, parse_eps, parse_number
from robustlr.attacks.suites import load_suite
from robustlr.device import DeviceError, check_device_name
from robustlr.errors import UserError
from robustlr.resources import resource_dir
from robustlr.settings import SettingError, apply_assignments, parse_assignment
from robustlr.train.adversarial import AdversarialTraining
from robustlr.train.config import ConfigError, TrainConfig, resolve

log = logging.getLogger(__name__)

MODES = ("regular", "adversarial")
SEEDS_KEY = "seeds"  # the study's training seeds (top level; a [[network]] may override them)
TOP_KEYS = (
    "name",
    "description",
    SEEDS_KEY,
    "data",
    "train",
    "adversarial",
    "network",
    "eval",
    "report",
)
# [data] key -> TrainConfig field
DATA_KEYS = {
    "dataset": "dataset",
    "path": "data",
    "image_size": "image_size",
    "download": "download",
    "val_fraction": "val_fraction",
    "split_seed": "split_seed",
    "augment": "augment",
    "skip_corrupt": "skip_corrupt",
    "num_workers": "num_workers",
}
# TrainConfig fields the study sets itself
RESERVED = ("arch", "mode", "out", "runs_root", "adversarial", "model_options")
EVAL_KEYS = (
    "suite",
    "attack",
    "limit",
    "batch_size",
    "split",
    "checkpoint",
    "device",
    "sweep_suite",
    "sweep_seeds",
)
REPORT_KEYS = ("eps", "attack_steps", "target_policy", "plots")
NUMBER_KEYS = ("eps", "step_size")  # adversarial keys that may be written "16/255"


class RecipeError(UserError):
    """A recipe that cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Network:
    """One network of the study and the training modes it is run in."""

    arch: str
    modes: tuple[str, ...]
    train: dict[str, Any]  # TrainConfig layer over the shared one (model_options merge)
    adversarial: dict[str, Any]  # AdversarialTraining keys over the shared ones
    seeds: tuple[int, ...] | None = None  # this network's training seeds (over the study's)


@dataclass(frozen=True)
class EvalSettings:
    """How every trained run is evaluated."""

    attacks: tuple[AttackSpec, ...]
    suite: str  # the suite's name, or "inline"
    limit: int | None = None
    batch_size: int = 128
    split: str = "test"
    checkpoint: str = "final"  # "final" (checkpoint.pt) or "best" (best.pt)
    device: str = "auto"
    sweep_suite: str | None = None
    sweep_attacks: tuple[AttackSpec, ...] = ()
    sweep_seeds: tuple[int, ...] = (0,)

    def attacks_for(self, seed: int) -> tuple[AttackSpec, ...]:
        """The attacks of a run trained with ``seed``: the suite's, plus the sweep suite's
        (those not already in the suite) when ``seed`` is one of ``sweep_seeds``."""
        if seed not in self.sweep_seeds:
            return self.attacks
        return self.attacks + tuple(
            dict.fromkeys(a for a in self.sweep_attacks if a not in self.attacks)
        )


@dataclass(frozen=True)
class ReportOptions:
    """The ``robustlr report`` settings of the study."""

    eps: float | None = None
    attack_steps: int | None = None
    target_policy: str = "random"
    plots: bool = True


@dataclass(frozen=True)
class Recipe:
    """A parsed, checked study recipe."""

    name: str
    description: str
    path: Path
    train: dict[str, Any]  # [data] + [train] as one TrainConfig layer
    adversarial: dict[str, Any]
    networks: tuple[Network, ...]
    eval: EvalSettings
    report: ReportOptions = field(default_factory=ReportOptions)
    seeds: tuple[int, ...] | None = None  # None: the [train] seed alone
    overrides: tuple[str, ...] = ()  # the --set pairs it was loaded with

    def network(self, arch: str) -> Network:
        return next(n for n in self.networks if n.arch == arch)

    def seeds_for(self, network: Network) -> tuple[int, ...]:
        """The training seeds of ``network``: its own, else the study's, else [train] seed."""
        seeds = network.seeds or self.seeds
        if seeds is not None:
            return seeds
        return (resolve(self.train, network.train).seed,)

    def adversarial_settings(self, network: Network) -> AdversarialTraining:
        return AdversarialTraining(**{**self.adversarial, **network.adversarial})

    def train_config(
        self, network: Network, mode: str, run_dir: Path, seed: int | None = None
    ) -> TrainConfig:
        """The config of ``network`` trained in ``mode`` with ``seed`` (default: its first
        seed) into ``run_dir``."""
        seed = self.seeds_for(network)[0] if seed is None else seed
        layer: dict[str, Any] = {
            "arch": network.arch,
            "mode": mode,
            "out": str(run_dir),
            "seed": seed,
        }
        if mode == "adversarial":
            layer["adversarial"] = self.adversarial_settings(network).as_dict()
        return resolve(self.train, network.train, layer)


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file: the given path, or a shipped recipe by name (``table9-digits``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.suffix in ("", ".toml") and path.parent == Path("."):
        shipped = resource_dir("recipes") / f"{path.stem}.toml"
        if shipped.is_file():
            return shipped
    known = sorted(p.stem for p in resource_dir("recipes").glob("*.toml"))
    raise RecipeError(f"no recipe {str(name_or_path)!r}: give a .toml file or one of {known}")


def apply_overrides(data: dict[str, Any], pairs: Iterable[str]) -> dict[str, Any]:
    """``["data.path=/x", "train.epochs=2"]`` set into the parsed TOML (tables created), in
    the one ``--set`` grammar (:mod:`robustlr.settings`)."""
    pairs = list(pairs)
    for pair in pairs:
        try:
            parts, value = parse_assignment(pair)
        except SettingError:
            parts, value = (), None
        if parts == (SEEDS_KEY,):
            continue  # the study's training seeds: checked with the recipe (``_seeds``)
        if len(parts) < 2:
            raise RecipeError(
                f"--set expects section.key=value (or {SEEDS_KEY}=[...]), got {pair!r}"
            )
        if parts == ("train", "seed") and SEEDS_KEY in data:
            # one training seed asked for: it replaces the study's list (new run directories,
            # the runs of the other seeds untouched)
            log.info("--set train.seed=%r replaces the recipe's %s", value, SEEDS_KEY)
            data = {k: v for k, v in data.items() if k != SEEDS_KEY}
        if parts[0] == "network":
            raise RecipeError(
                f"--set {'.'.join(parts)}: a network's keys are set in the recipe file"
            )
        check_set_value(parts, value)
    return apply_assignments(data, pairs)


# --set keys whose numbers must be > 0 (every other number of the schema must be >= 0)
POSITIVE_KEYS = frozenset(
    (
        "epochs",
        "batch_size",
        "eval_batch_size",
        "lr",
        "image_size",
        "width",
        "steps",
        "limit",
        "attack_steps",
        "max_steps_per_epoch",
    )
)


def _schema(section: str) -> dict[str, Any]:
    """The type of every key of a recipe section (from the dataclass it fills)."""
    if section in ("train", "data"):
        hints = typing.get_type_hints(TrainConfig)
        if section == "data":
            return {key: hints[field] for key, field in DATA_KEYS.items()}
        return hints
    source = {"adversarial": AdversarialTraining, "eval": EvalSettings, "report": ReportOptions}
    return typing.get_type_hints(source[section]) if section in source else {}


def check_set_value(parts: tuple[str, ...], value: Any) -> None:
    """RecipeError unless a ``--set section.key=value`` value has the type the recipe schema
    gives the key (a boolean is a boolean, an int an int, a number a number: never a string
    read as one) and, for a number, is >= 0 (> 0 for :data:`POSITIVE_KEYS`). Keys the schema
    does not know are left to the recipe check (which names them)."""
    if len(parts) != 2:
        return  # model options (train.model.x): checked when the model is built
    section, key = parts
    hint = _schema(section).get(key)
    if hint is None:
        return
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed = {typing.get_origin(a) or a for a in args} - {type(None)}
    name = f"--set {section}.{key}"
    if key in NUMBER_KEYS and isinstance(value, str):
        try:
            value = parse_number(value)  # "16/255"
        except ValueError as exc:
            raise RecipeError(f"{name}: {exc}") from None
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = bool(allowed & {int, float})
    elif isinstance(value, float):
        ok = float in allowed
    else:
        ok = any(isinstance(value, t) for t in allowed if t not in (int, float, bool))
    if not ok:
        expected = " or ".join(sorted(t.__name__ for t in allowed))
        raise RecipeError(f"{name} expects {expected}, got {value!r} ({type(value).__name__})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value) or value < 0 or (key in POSITIVE_KEYS and value == 0):
        bound = "> 0" if key in POSITIVE_KEYS else ">= 0"
        raise RecipeError(f"{name} must be a finite number {bound}, got {value!r}")


def load_recipe(name_or_path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read and check a recipe; :class:`RecipeError` (one line) on any problem."""
    path = recipe_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {path} is not valid TOML: {exc}") from None
    overrides = tuple(overrides)
    try:
        return parse_recipe(apply_overrides(data, overrides), path, overrides)
    except (ConfigError, TypeError, ValueError) as exc:
        if isinstance(exc, RecipeError):
            raise
        raise RecipeError(f"recipe {path}: {exc}") from None


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: {key!r} must be a table")
    return dict(value)


def _check_keys(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    known = tuple(known)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def _train_layer(table: dict[str, Any], where: str) -> dict[str, Any]:
    """TrainConfig keys of a [train] or [[network]] table; ``model`` -> ``model_options``."""
    model = _table(table, "model", where)
    layer = {k: v for k, v in table.items() if k != "model"}
    reserved = sorted(set(layer) & set(RESERVED))
    if reserved:
        raise RecipeError(f"{where}: {', '.join(reserved)} cannot be set here (the study sets it)")
    _check_keys(layer, (f for f in TrainConfig.__dataclass_fields__ if f not in RESERVED), where)
    if model:
        layer["model_options"] = model
    return layer


def _adversarial(table: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(table, AdversarialTraining.__dataclass_fields__, where)
    return {k: parse_number(v) if k in NUMBER_KEYS else v for k, v in table.items()}


def _networks(entries: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: no networks: add at least one [[network]] table with an arch")
    networks = []
    for i, entry in enumerate(entries, 1):
        at = f"{where}: network #{i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("arch"), str):
            raise RecipeError(f'{at}: needs arch = "<model name>"')
        entry = dict(entry)
        arch = entry.pop("arch")
        modes = entry.pop("modes", list(MODES))
        if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
            raise RecipeError(f"{at}: modes must be a non-empty list of {MODES}, got {modes!r}")
        adversarial = _adversarial(_table(entry, "adversarial", at), f"{at} [adversarial]")
        entry.pop("adversarial", None)
        seeds = _seeds(entry.pop("seeds", None), at)
        if seeds is not None and "seed" in entry:
            raise RecipeError(f"{at}: give seeds = [...] or seed, not both")
        networks.append(Network(arch, tuple(modes), _train_layer(entry, at), adversarial, seeds))
    archs = [n.arch for n in networks]
    repeated = sorted({a for a in archs if archs.count(a) > 1})
    if repeated:
        raise RecipeError(f"{where}: arch {', '.join(repeated)} listed twice (one network each)")
    return tuple(networks)


def _seeds(value: Any, where: str) -> tuple[int, ...] | None:
    """A ``seeds = [0, 1, 2]`` list (None when absent): distinct non-negative integers."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value)
        or len(set(value)) != len(value)
    ):
        raise RecipeError(
            f"{where}: seeds must be a non-empty list of distinct integers >= 0, got {value!r}"
        )
    return tuple(value)


def _eval(table: dict[str, Any], where: str) -> EvalSettings:
    _check_keys(table, EVAL_KEYS, where)
    suite, inline = table.get("suite"), table.get("attack")
    if (suite is None) == (inline is None):
        raise RecipeError(f'{where}: give either suite = "<name or file>" or [[eval.attack]]')
    if suite is not None:
        specs = load_suite(suite)
    else:
        if not isinstance(inline, list) or not inline:
            raise RecipeError(f"{where}: [[eval.attack]] needs at least one table")
        specs = [AttackSpec.from_dict(dict(a)) for a in inline]
    checkpoint = table.get("checkpoint", "final")
    if checkpoint not in ("final", "best"):
        raise RecipeError(f'{where}: checkpoint must be "final" or "best", not {checkpoint!r}')
    limit = table.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise RecipeError(f"{where}: limit must be a positive integer, not {limit!r}")
    batch_size = table.get("batch_size", 128)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RecipeError(f"{where}: batch_size must be a positive integer, not {batch_size!r}")
    split = table.get("split", "test")
    if split not in ("test", "val"):
        raise RecipeError(f'{where}: split must be "test" or "val", not {split!r}')
    device = str(table.get("device", "auto"))
    try:
        check_device_name(device)
    except DeviceError as exc:
        raise RecipeError(f"{where}: {exc}") from None
    sweep_suite = table.get("sweep_suite")
    if sweep_suite is not None and not isinstance(sweep_suite, str):
        raise RecipeError(f"{where}: sweep_suite must be a suite name or file, not {sweep_suite!r}")
    sweep_seeds = _seeds(table.get("sweep_seeds", [0]), f"{where} sweep_seeds")
    assert sweep_seeds is not None
    return EvalSettings(
        attacks=tuple(specs),
        suite=str(suite) if suite is not None else "inline",
        limit=limit,
        batch_size=batch_size,
        split=split,
        checkpoint=checkpoint,
        device=device,
        sweep_suite=sweep_suite,
        sweep_attacks=tuple(load_suite(sweep_suite)) if sweep_suite is not None else (),
        sweep_seeds=sweep_seeds,
    )


def _report(table: dict[str, Any], where: str) -> ReportOptions:
    _check_keys(table, REPORT_KEYS, where)
    eps = table.get("eps")
    policy = table.get("target_policy", "random")
    if policy not in ("random", "least-likely"):
        raise RecipeError(f"{where}: target_policy must be random or least-likely")
    return ReportOptions(
        eps=parse_eps(eps) if eps is not None else None,
        attack_steps=table.get("attack_steps"),
        target_policy=policy,
        plots=bool(table.get("plots", True)),
    )


def parse_recipe(data: dict[str, Any], path: Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Check a parsed recipe and build every run's config once (so errors surface early)."""
    where = f"recipe {path}"
    _check_keys(data, TOP_KEYS, where)
    data_table = _table(data, "data", where)
    _check_keys(data_table, DATA_KEYS, f"{where} [data]")
    train = {DATA_KEYS[k]: v for k, v in data_table.items()}
    train.update(_train_layer(_table(data, "train", where), f"{where} [train]"))
    seeds = _seeds(data.get(SEEDS_KEY), where)
    if seeds is not None and "seed" in train:
        raise RecipeError(
            f"{where}: seeds = {list(seeds)} sets the training seeds; remove [train] seed"
        )
    recipe = Recipe(
        name=str(data.get("name") or path.stem),
        description=str(data.get("description", "")),
        path=path,
        train=train,
        adversarial=_adversarial(_table(data, "adversarial", where), f"{where} [adversarial]"),
        networks=_networks(data.get("network"), where),
        eval=_eval(_table(data, "eval", where), f"{where} [eval]"),
        report=_report(_table(data, "report", where), f"{where} [report]"),
        seeds=seeds,
        overrides=overrides,
    )
    if "/" in recipe.name or recipe.name in ("", ".", ".."):
        raise RecipeError(f"{where}: name {recipe.name!r} cannot be a directory name")
    from robustlr.models import list_models

    for network in recipe.networks:
        if network.arch not in list_models():
            raise RecipeError(
                f"{where}: unknown arch {network.arch!r}; known: {', '.join(list_models())}"
            )
        for mode in network.modes:
            for seed in recipe.seeds_for(network):
                recipe.train_config(network, mode, Path("."), seed)  # raises on a bad value
    return recipe
