"""Data parallelism: 2 (forced host) CPU devices give the loss curve of 1 device.

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
import jax
import numpy as np
from kwta_jax import data
from kwta_jax.sharding import make_mesh
from kwta_jax.training import TrainConfig, _put_batch
from kwta_jax.train_workflow import train_and_evaluate

assert jax.device_count() == 2, jax.devices()
ds = data.load_dataset("mnist5k", max_train=256, max_test=96)
out = {"curves": {}}
# ReLU only: k-WTA competes within a sample, so splitting the batch cannot change it, and
# every extra run is mostly compile time.
for act, epochs in (("relu", 3),):
    for n in (1, 2):
        cfg = TrainConfig(act=act, epochs=epochs, batch_size=64)
        r = train_and_evaluate(cfg, f"{sys.argv[1]}/{act}{n}", dataset=ds,
                               mesh=make_mesh(jax.devices()[:n]), progress=False,
                               log=lambda m: None)
        out["curves"][f"{act}{n}"] = [[h["train_loss"], h["test_loss"], h["test_accuracy"]]
                                      for h in r.history]

# Where a batch lives on the 2-device mesh: split in halves over the batch axis. (The state's
# replication is declared by the step's out_shardings.)
from jax.sharding import NamedSharding, PartitionSpec as P
sharding = NamedSharding(make_mesh(), P("batch"))
batch = _put_batch(next(data.iterate_batches(ds.train_images, ds.train_labels, 64)), sharding)
out["batch_shards"] = sorted(s.data.shape[0] for s in batch["image"].addressable_shards)
out["batch_devices"] = len(batch["image"].sharding.device_set)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_two_devices_give_the_single_device_loss_curve(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["batch_shards"] == [32, 32]
    assert out["batch_devices"] == 2
    for act in ("relu",):
        one, two = np.asarray(out["curves"][f"{act}1"]), np.asarray(out["curves"][f"{act}2"])
        assert one.shape == two.shape and one.shape[0] >= 2
        # Same data, same init: only the order of the cross-device reduction differs.
        np.testing.assert_allclose(two, one, rtol=2e-4, atol=1e-5, err_msg=act)
        assert one[-1, 0] < one[0, 0]  # and it is a real learning curve
