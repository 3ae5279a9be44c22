"""Shared fixtures: one tiny finished train.py run, trained once per session for the CLI and
fault tests (copy it before changing it: `run_copy`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The smallest useful train.py run: 256 training images, 4 steps per epoch.
SMALL = ["--max-train", "256", "--max-test", "128", "--batch-size", "64", "--eps", "0.1",
         "--no-progress"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> Path:
    """``OUT`` of a finished 2-epoch ReLU + k-WTA ``train.py`` run (``SMALL``). Read only."""
    sys.path.insert(0, str(REPO))
    import train

    out = tmp_path_factory.mktemp("trained") / "runs"
    assert train.main([*SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(trained_runs, tmp_path) -> Path:
    """A copy of `trained_runs` that the test may change."""
    out = tmp_path / "runs"
    shutil.copytree(trained_runs, out)
    return out
