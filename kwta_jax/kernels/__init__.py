"""The CPU and Pallas kernels, ``kwta_jax.kernels``, whose source is the top-level
``kernels/`` directory (pyproject.toml installs that directory as this package).

This file is the package as seen from a source checkout: running ``python train.py`` puts the
repository root first on ``sys.path``, so ``kwta_jax`` is imported from the source tree even
when a non-editable install exists, and its ``kernels`` sub-package is this directory. It
points the package's module search at ``kernels/`` and runs ``kernels/__init__.py``, so the
package is the same either way. An install never contains this file.
"""

from pathlib import Path

_HERE = Path(__file__).resolve().parent
if not (_HERE / "kwta_cpu.py").is_file():  # the source tree: the modules are in kernels/
    _SOURCE = _HERE.parents[1] / "kernels"
    __path__ = [str(_SOURCE)]
    exec(compile((_SOURCE / "__init__.py").read_text(), str(_SOURCE / "__init__.py"), "exec"))
