"""Test configuration: the shared helpers' directory on the path, and the tiers.

Tiers (markers in pyproject.toml): the default run (``python -m pytest``, about 2 minutes on 2
cores) leaves out ``slow`` (subprocess-heavy: torchrun, kill-and-resume, whole studies; and any
test or case that takes more than about a second, its cheaper cases left in the default run) and
``cuda`` tests; the full run
(``python -m pytest -m "slow or not slow"``, what ``.ci/run`` does) selects every test, and a
``cuda`` test then skips, with its reason, wherever there is no CUDA GPU.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# the shared test helpers (helpers.py, lr_naive.py) are imported as plain modules
sys.path.insert(0, str(Path(__file__).parent))

from helpers import digits_linear_model, random_batch

# The tests' tensors are tiny: one intra-op thread does the same work without the threads'
# synchronisation, which on a busy 2-core machine cost 6x the CPU time (a one-epoch training
# test: 40 s of CPU with 2 threads, 6.6 s with 1). Subprocesses get OMP_NUM_THREADS=1
# (helpers.cli_env).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


#: Host builds of the kernels (tests/host_shim) each test file needs.
HOST_BUILDS = {
    "test_kernels_host.py": ("plain",),
    "test_kernels_emulator.py": ("plain", "asan", "tsan"),
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the g++ builds the selected emulator tests need (about a minute cold) in the
    background, beside the tests that run before them."""
    variants = {v for item in session.items for v in HOST_BUILDS.get(item.path.name, ())}
    if variants:
        from host_shim.host_launcher import prebuild

        prebuild(tuple(sorted(variants)))


@pytest.fixture
def batch():
    """16 random 8x8 RGB images and labels (``helpers.random_batch``) for ``small_model``."""
    return random_batch()


@pytest.fixture(scope="session")
def digits_model():
    """(model, images, labels): a linear digits classifier trained once per session and 100
    held-out images (``helpers.digits_linear_model``)."""
    return digits_linear_model()


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state (torch, NumPy, random): a test that
    draws from the global generators is reproducible."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# --- CI: no skip but a cuda test's --------------------------------------------------------
# ``.ci/run`` sets this variable: a skipped test is then a failure of the run unless it is a
# ``cuda`` test (marked, or in a module whose ``pytestmark`` is the cuda marker and which skips
# itself at import), so a test that cannot run where CI runs is never silently green.
NO_SKIPS = "ROBUSTLR_NO_SKIPS"
_unexpected_skips: list[str] = []


def _module_is_cuda(path: Path) -> bool:
    """Whether a test module declares ``pytestmark = pytest.mark.cuda`` (read, not imported)."""
    import ast

    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return False
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets
        ):
            return ast.unparse(node.value) == "pytest.mark.cuda"
    return False


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if os.environ.get(NO_SKIPS) and report.skipped:
        module = Path(report.fspath)
        if not (module.suffix == ".py" and _module_is_cuda(module)):
            _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not (os.environ.get(NO_SKIPS) and report.skipped) or hasattr(report, "wasxfail"):
        return
    if "cuda" not in report.keywords:
        _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected_skips:
        terminalreporter.section(f"skipped outside the cuda marker ({NO_SKIPS} is set)")
        for line in _unexpected_skips:
            terminalreporter.line(line)
