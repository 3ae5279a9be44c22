"""Both install modes run the CLIs from any directory: a non-editable ``pip install .`` used
from the repository root (where the source ``kwta_jax/`` comes first on ``sys.path``) and from
elsewhere. The editable install is what the rest of the suite runs on."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_non_editable_install_runs_the_clis_from_any_directory(tmp_path):
    target = tmp_path / "installed"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    assert (target / "kwta_jax" / "kernels" / "kwta_cpu.py").is_file()
    # No site processing (-S): the editable install's finder (a .pth file) stays out, so
    # kwta_jax comes from the install, or from the source tree where the script's folder
    # is first on sys.path; the dependencies come from this environment.
    path = os.pathsep.join([str(target), *site.getsitepackages()])
    env = dict(os.environ, PYTHONPATH=path)
    for cwd in (REPO, tmp_path):
        for cli in ("train.py", "attack.py"):
            proc = subprocess.run(
                [sys.executable, "-S", str(REPO / cli), "--help"], cwd=cwd, env=env,
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, (cwd, cli, proc.stderr[-2000:])
            assert proc.stdout.startswith(f"usage: {cli}")
    probe = "import kwta_jax, kwta_jax.kernels.kwta_cpu as k; print(kwta_jax.__file__, k.__file__)"
    where = {}
    for cwd in (REPO, tmp_path):
        proc = subprocess.run(
            [sys.executable, "-S", "-c", probe], cwd=cwd, env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        where[cwd] = proc.stdout.split()
    assert all(p.startswith(str(target)) for p in where[tmp_path])  # elsewhere: the install
    # From the root: the source package, its kernels from the top-level kernels/.
    assert where[REPO] == [str(REPO / "kwta_jax" / "__init__.py"),
                           str(REPO / "kernels" / "kwta_cpu.py")]  # fmt: skip
