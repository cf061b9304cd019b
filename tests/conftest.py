"""Test configuration: the shared helpers' directory on the path, and the tiers.

Tiers (markers in pyproject.toml): the default run (``python -m pytest``) leaves out ``slow``
(subprocess-heavy: torchrun, kill-and-resume, whole studies) and ``cuda`` tests; the full run
(``python -m pytest -m "slow or not slow"``, what ``.ci/run`` does) selects every test, and a
``cuda`` test then skips, with its reason, wherever there is no CUDA GPU.
"""

import sys
from pathlib import Path

import pytest
import torch

# the shared test helpers (helpers.py, lr_naive.py) are imported as plain modules
sys.path.insert(0, str(Path(__file__).parent))

from helpers import digits_linear_model

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


@pytest.fixture(scope="session")
def digits_model():
    """(model, images, labels): a linear digits classifier trained once per session and 100
    held-out images (``helpers.digits_linear_model``)."""
    return digits_linear_model()
