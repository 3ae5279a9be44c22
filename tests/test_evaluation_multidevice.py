"""Multi-device evaluation: on 2 (forced host) CPU devices, every chunk split over the mesh,
`run_suite` gives exactly the single-device results.

XLA_FLAGS must be set before JAX initialises, so the check runs in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
sys.path.insert(0, "tests")
import jax
import numpy as np
from jax.sharding import Mesh
from test_attacks_adaptive import relu_model, toy_data
from kwta_jax import evaluation
from kwta_jax.adapters import from_logits_fn

assert jax.local_device_count() == 2, jax.devices()
x, y, _ = toy_data(37, seed=5)  # 37: the last chunk is padded
models = evaluation.Models(from_logits_fn(relu_model(), name="r"))
out = {}
cases = {
    # Random attacks too: with the same chunks the keys and the random draws are the same.
    "random": (["fgsm", "pgd", "apgd-t", "fmn", "square"], 16),
    # An odd chunk is padded to 16 on 2 devices: other chunks, so deterministic attacks.
    "odd": (["fgsm", "deepfool", "fmn"], 15),
}
for case, (names, bs) in cases.items():
    suite = evaluation.build_suite(names, budget="quick")
    for mode in ("full", "cascade"):
        for n in (1, 2):
            mesh = Mesh(np.asarray(jax.local_devices()[:n]), ("batch",))
            res = evaluation.run_suite(models, x, y, suite=suite, eps_values=[0.2, 0.245, 0.3],
                                       batch_size=bs, progress=False, mode=mode, mesh=mesh)
            out[f"{case}/{mode}/{n}"] = {
                "devices": res.devices,
                "pred": {a: {str(e): p.tolist() for e, p in d.items()}
                         for a, d in res.pred.items()},
                "dist": {a: d.tolist() for a, d in res.min_norm_dist.items()},
                "worst": [res.worst_accuracy(e) for e in res.eps_values],
            }
# The default mesh is every local device.
res = evaluation.run_suite(models, x[:4], y[:4], suite=evaluation.build_suite(["fgsm"]),
                           eps_values=[0.1], progress=False)
out["default_devices"] = res.devices
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_devices_give_the_single_device_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["default_devices"] == 2
    for case in ("random", "odd"):
        for mode in ("full", "cascade"):
            one, two = out[f"{case}/{mode}/1"], out[f"{case}/{mode}/2"]
            assert one["devices"] == 1 and two["devices"] == 2
            assert two["pred"] == one["pred"], (case, mode)
            assert two["dist"].keys() == one["dist"].keys()
            for a in one["dist"]:
                np.testing.assert_allclose(two["dist"][a], one["dist"][a], rtol=1e-5)
            assert two["worst"] == one["worst"], (case, mode)
    # Not trivial: the attacks break some examples and leave others.
    assert 0 < out["random/full/1"]["worst"][1] < 1
