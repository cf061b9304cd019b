"""Models that robustlr did not train, evaluated like its own (``robustlr eval --model SPEC``).

A SPEC is one of:

* a TorchScript file (``torch.jit.save``) or a ``torch.export`` program (``torch.export.save``,
  usually ``.pt2``); the format is read from the archive's contents, not its suffix;
* ``package.module:factory``: a callable returning an ``nn.Module``, called with the keyword
  arguments of ``--model-arg KEY=VALUE``; ``--weights FILE`` loads a state_dict into it
  (``torch.load(weights_only=True)``, every key must match);
* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, **model_args)`` (the optional extra
  ``robustlr[timm]``; nothing is downloaded), ``--weights`` as above.

The model takes [0, 1] pixels; ``mean``/``std`` wrap it in the toolkit's :class:`Normalize`
when it expects normalised ones, and ``grayscale`` feeds a one-channel model the mean of the
dataset's channels (inside the model, so attacks still act on the dataset's pixels).

Each external model gets a run directory ``<runs>/<name>/`` holding :data:`EXTERNAL_RECORD`
(what was evaluated: SPEC, arguments, SHA-256 of every file, of the weights, dataset,
normalisation) and the same ``eval.csv`` rows as a robustlr run. Its ``checkpoint_sha256``
column holds :attr:`ExternalModelRecord.model_sha256`, the hash of that record's identity
fields, so rows of two different models (or of one file under two normalisations) never pair.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlr import __version__
from robustlr.data import DataError, dataset_info
from robustlr.errors import UserError, one_line
from robustlr.eval.session import file_sha256, load_eval_images
from robustlr.models import list_models
from robustlr.models.normalize import Normalize
from robustlr.runs import EXTERNAL_RECORD
from robustlr.settings import parse_value

log = logging.getLogger(__name__)

KINDS = ("torchscript", "export", "factory", "timm")
TIMM_PREFIX = "timm:"
# training modes an external model can be declared with (they decide its Table 9 columns)
TRAIN_MODES = ("regular", "adversarial")
DEFAULT_TRAIN_MODE = "regular"
NAME_PREFIX = "ext-"  # prefixed to a derived name that is a robustlr architecture's
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


class ExternalModelError(UserError):
    """A SPEC that cannot be loaded, or a model that does not fit the dataset (one line)."""


@dataclass(frozen=True)
class ExternalOptions:
    """What ``robustlr eval --model`` was told about the model and its data."""

    spec: str
    dataset: str = "digits"
    model_args: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    grayscale: bool = False
    image_size: int | None = None
    data: str | None = None
    name: str | None = None
    train_mode: str = DEFAULT_TRAIN_MODE


@dataclass(frozen=True)
class ExternalModelRecord:
    """The run directory's record of an external model (``EXTERNAL_RECORD``, JSON)."""

    name: str
    arch: str
    train_mode: str
    kind: str
    spec: str
    model_args: dict[str, Any]
    files: dict[str, dict[str, str]]  # role ("model", "weights") -> {"path", "sha256"}
    weights_sha256: str  # of the loaded state_dict's names and bytes
    dataset: str
    image_size: int
    num_classes: int
    channels: int
    mean: list[float] | None
    std: list[float] | None
    grayscale: bool
    version: str = __version__

    def identity(self) -> dict[str, Any]:
        """The fields that say which function of the pixels is evaluated."""
        return {
            "kind": self.kind,
            "spec": self.spec,
            "model_args": self.model_args,
            "files": {role: f["sha256"] for role, f in sorted(self.files.items())},
            "weights_sha256": self.weights_sha256,
            "mean": self.mean,
            "std": self.std,
            "grayscale": self.grayscale,
        }

    @property
    def model_sha256(self) -> str:
        """SHA-256 of :meth:`identity` (the rows' ``checkpoint_sha256``)."""
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "model_sha256": self.model_sha256}


class ExternalModel(nn.Module):
    """[0, 1] pixels -> (optional channel mean) -> (optional Normalize) -> the loaded network.

    A ``torch.export`` program runs in the mode it was exported in (``fixed_mode``): train()
    and eval() leave it alone. Shape: (B, C, H, W) -> (B, num_classes).
    """

    def __init__(
        self,
        net: nn.Module,
        normalize: nn.Module | None = None,
        grayscale: bool = False,
        fixed_mode: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = normalize if normalize is not None else nn.Identity()
        self.net = net
        self.grayscale = grayscale
        self.fixed_mode = fixed_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grayscale:
            x = x.mean(dim=1, keepdim=True)
        return self.net(self.normalize(x))

    def train(self, mode: bool = True) -> ExternalModel:
        self.training = mode
        self.normalize.train(mode)
        if not self.fixed_mode:
            self.net.train(mode)
        return self


def model_kind(spec: str) -> str:
    """The kind of a SPEC (``KINDS``), read from the file's contents for a file; an
    ExternalModelError when it is none of them."""
    if spec.startswith(TIMM_PREFIX):
        return "timm"
    path = Path(spec)
    if path.is_file():
        return _file_format(path)
    if _FACTORY.match(spec):
        return "factory"
    raise ExternalModelError(
        f"--model {spec}: no such file, and neither timm:NAME nor package.module:factory"
    )


def _file_format(path: Path) -> str:
    """ "torchscript" or "export" from the archive's entries (both are zip archives)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    leaves = {name.split("/", 1)[-1] for name in names}
    if "archive_format" in leaves:
        return "export"
    if "constants.pkl" in leaves or any("/code/" in name for name in names):
        return "torchscript"
    raise ExternalModelError(
        f"{path} is neither a TorchScript file (torch.jit.save) nor a torch.export program "
        "(torch.export.save); a robustlr checkpoint goes to --checkpoint"
    )


def default_name(spec: str, kind: str) -> str:
    """A run name for a SPEC: a file's stem, ``timm-NAME``, or the factory's name; prefixed
    with ``ext-`` when it is a robustlr architecture's name (its rows must not pose as one)."""
    if kind == "timm":
        name = "timm-" + spec[len(TIMM_PREFIX) :]
    elif kind == "factory":
        name = spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    else:
        name = Path(spec).stem
    name = re.sub(r"[^\w.+-]", "-", name).strip("-.") or "model"
    return NAME_PREFIX + name if name in list_models() else name


def _load_state_dict(net: nn.Module, weights: Path) -> None:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ExternalModelError(f"--weights {weights} does not exist") from None
    except Exception as exc:  # pickle, zip and torch errors alike: one line for the user
        raise ExternalModelError(f"cannot read --weights {weights}: {one_line(exc)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExternalModelError(f"--weights {weights} is not a state_dict")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExternalModelError(
            f"--weights {weights} does not fit the model: {one_line(exc)}"
        ) from None


def _import_from_cwd(module_name: str) -> Any:
    """Import ``module_name`` with the working directory first on ``sys.path`` (as ``python -m``
    has it), so that ``mymodels:make`` finds ``./mymodels.py`` from the ``robustlr`` script."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def _call_factory(spec: str, kind: str, args: dict[str, Any]) -> nn.Module:
    if kind == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise ExternalModelError(
                "timm models need timm: pip install 'robustlr[timm]'"
            ) from None
        factory, what = timm.create_model, f"timm.create_model({spec[len(TIMM_PREFIX) :]!r})"
        args = {"pretrained": False, **args}
        call_args: tuple[Any, ...] = (spec[len(TIMM_PREFIX) :],)
    else:
        module_name, attr = spec.split(":", 1)
        try:
            factory = _import_from_cwd(module_name)
        except ImportError as exc:
            raise ExternalModelError(
                f"--model {spec}: cannot import {module_name}: {exc}"
            ) from None
        for part in attr.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise ExternalModelError(f"--model {spec}: {module_name} has no {attr}")
        if not callable(factory):
            raise ExternalModelError(f"--model {spec}: {attr} is not callable")
        what, call_args = spec, ()
    try:
        net = factory(*call_args, **args)
    except Exception as exc:  # the user's code failed: say where, in one line
        raise ExternalModelError(
            f"--model {what} raised {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(net, nn.Module):
        raise ExternalModelError(f"--model {what} returned {type(net).__name__}, not an nn.Module")
    return net


def load_network(
    spec: str, kind: str, model_args: dict[str, Any], weights: Path | None
) -> tuple[nn.Module, bool]:
    """The network a SPEC names, on the CPU, and whether its train/eval mode is fixed."""
    if kind in ("torchscript", "export"):
        if model_args or weights is not None:
            raise ExternalModelError(
                f"--model-arg and --weights apply to factories and timm models, not a {kind} file"
            )
        try:
            if kind == "torchscript":
                with warnings.catch_warnings():  # torch's deprecation notice, not the user's
                    warnings.simplefilter("ignore", FutureWarning)
                    return torch.jit.load(spec, map_location="cpu"), False
            with open(spec, "rb") as fh:
                return torch.export.load(fh).module(), True
        except Exception as exc:  # a damaged archive: one line
            raise ExternalModelError(f"cannot load {kind} file {spec}: {one_line(exc)}") from None
    net = _call_factory(spec, kind, model_args)
    if weights is not None:
        _load_state_dict(net, weights)
    return net, False


def state_sha256(net: nn.Module) -> str:
    """SHA-256 of a module's state_dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _per_channel(
    values: tuple[float, ...] | None, channels: int, option: str
) -> list[float] | None:
    if values is None:
        return None
    if len(values) == 1:
        return list(values) * channels
    if len(values) != channels:
        raise ExternalModelError(
            f"{option} has {len(values)} values; the model's input has {channels} channel(s)"
        )
    return list(values)


def check_outputs(
    model: nn.Module, channels: int, image_size: int, num_classes: int, dataset: str
) -> None:
    """Run ``model`` on two blank images of the dataset's shape: an ExternalModelError when it
    fails or its output is not (2, ``num_classes``)."""
    probe = torch.zeros(2, channels, image_size, image_size)
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:  # the model's own error, in one line
        raise ExternalModelError(
            f"the model fails on {dataset} images {tuple(probe.shape[1:])}: {one_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ExternalModelError(f"the model returns {shape} for 2 images, not (2, classes) logits")
    if out.shape[1] != num_classes:
        raise ExternalModelError(
            f"the model outputs {out.shape[1]} classes; {dataset} has {num_classes}"
        )


def parse_model_args(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("num_classes=10", "in_chans=1")`` -> ``{"num_classes": 10, "in_chans": 1}`` (TOML
    values, a bare word being a string); ExternalModelError for a pair without ``=``."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ExternalModelError(
                f"--model-arg expects KEY=VALUE (e.g. num_classes=10), got {pair!r}"
            )
        args[key.strip()] = parse_value(text.strip())
    return args


@dataclass
class ExternalTarget:
    """An external model ready for evaluation, with the metadata every result row carries
    (the interface of :class:`robustlr.eval.session.EvalTarget` that evaluation uses)."""

    model: nn.Module
    meta: dict[str, Any]
    run_dir: Path
    record: ExternalModelRecord
    data_root: str | None

    @property
    def image_size(self) -> int:
        return self.record.image_size

    def load_images(
        self, split: str = "test", root: str | Path | None = None, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The dataset's ``split`` images at the record's size (see ``load_eval_images``)."""
        return load_eval_images(
            self.record.dataset,
            split,
            root if root is not None else self.data_root,
            self.record.image_size,
            limit,
        )


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's external-model record, or None when it has none."""
    path = run_dir / EXTERNAL_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExternalModelError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def write_record(run_dir: Path, record: ExternalModelRecord) -> Path:
    """Write ``EXTERNAL_RECORD`` atomically (a uniquely named temp file, then rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / EXTERNAL_RECORD
    fd, tmp = tempfile.mkstemp(prefix=f".{EXTERNAL_RECORD}.", dir=run_dir)
    with os.fdopen(fd, "w") as fh:
        json.dump(record.to_json(), fh, indent=2, default=str)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _check_same_model(run_dir: Path, record: ExternalModelRecord) -> None:
    """An existing run directory must hold this very model on this dataset (rows append)."""
    old = read_record(run_dir)
    if old is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ExternalModelError(
                f"{run_dir} exists and is not an external model's run; choose another --name"
            )
        return
    if old.get("model_sha256") != record.model_sha256:
        new = record.identity()
        known = {**old, "files": {r: f.get("sha256") for r, f in old.get("files", {}).items()}}
        differ = [k for k in new if known.get(k) != new[k]] or ["model_sha256"]
        raise ExternalModelError(
            f"{run_dir} holds another model ({old.get('spec')}; differs in "
            f"{', '.join(differ)}); choose another --name"
        )
    for key in ("dataset", "image_size"):
        if old.get(key) != getattr(record, key):
            raise ExternalModelError(
                f"{run_dir} evaluated this model on {key} {old.get(key)}, not "
                f"{getattr(record, key)}; choose another --name"
            )


def open_external(
    options: ExternalOptions, runs_root: Path, device: torch.device, *, write: bool = True
) -> ExternalTarget:
    """Load the model a SPEC names, check it against the dataset, and (``write``) record it
    in ``<runs_root>/<name>/``. ExternalModelError (or DataError) on bad input."""
    if options.train_mode not in TRAIN_MODES:
        raise ExternalModelError(f"--train-mode must be one of {', '.join(TRAIN_MODES)}")
    kind = model_kind(options.spec)
    name = options.name or default_name(options.spec, kind)
    if not _NAME.match(name) or name in list_models():
        raise ExternalModelError(
            f"--name {name!r}: use letters, digits, '-', '_', '.', not a robustlr architecture"
        )
    try:
        info = dataset_info(options.dataset, options.data, options.image_size)
    except DataError as exc:
        raise ExternalModelError(one_line(exc)) from None
    net, fixed_mode = load_network(options.spec, kind, options.model_args, options.weights)
    channels = 1 if options.grayscale else info.channels
    mean = _per_channel(options.mean, channels, "--mean")
    std = _per_channel(options.std, channels, "--std")
    if (mean is None) != (std is None):
        raise ExternalModelError("give both --mean and --std, or neither")
    normalize = Normalize(mean, std) if mean is not None and std is not None else None
    model = ExternalModel(net, normalize, options.grayscale, fixed_mode).eval()
    check_outputs(model, info.channels, info.image_size, info.num_classes, options.dataset)
    files = {"model": Path(options.spec)} if kind in ("torchscript", "export") else {}
    if options.weights is not None:
        files["weights"] = options.weights
    record = ExternalModelRecord(
        name=name,
        arch=name,
        train_mode=options.train_mode,
        kind=kind,
        spec=options.spec,
        model_args=dict(options.model_args),
        files={
            role: {"path": str(p.resolve()), "sha256": file_sha256(p)} for role, p in files.items()
        },
        weights_sha256=state_sha256(net),
        dataset=options.dataset,
        image_size=info.image_size,
        num_classes=info.num_classes,
        channels=info.channels,
        mean=mean,
        std=std,
        grayscale=options.grayscale,
    )
    run_dir = Path(runs_root) / name
    _check_same_model(run_dir, record)
    if write:
        write_record(run_dir, record)
    meta = {
        "run": name,
        "arch": record.arch,
        "train_mode": record.train_mode,
        "dataset": record.dataset,
        "checkpoint_sha256": record.model_sha256,
    }
    log.info("external model %s (%s) -> %s", options.spec, kind, run_dir)
    return ExternalTarget(model.to(device), meta, run_dir, record, options.data)


__all__ = [
    "DEFAULT_TRAIN_MODE",
    "KINDS",
    "TRAIN_MODES",
    "ExternalModel",
    "ExternalModelError",
    "ExternalModelRecord",
    "ExternalOptions",
    "ExternalTarget",
    "check_outputs",
    "default_name",
    "load_network",
    "model_kind",
    "open_external",
    "parse_model_args",
    "read_record",
    "state_sha256",
    "write_record",
]
