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
from kwta_jax.training import (StepFns, TrainConfig, TrainState, _put_batch,
                               build_model_from_config, create_optimizer, make_mesh,
                               split_model, train_and_evaluate)

assert jax.device_count() == 2, jax.devices()
ds = data.load_dataset("mnist5k", max_train=256, max_test=96)
out = {"curves": {}}
for act, epochs in (("relu", 3), ("kwta", 2)):
    for n in (1, 2):
        cfg = TrainConfig(act=act, epochs=epochs, batch_size=64)
        r = train_and_evaluate(cfg, f"{sys.argv[1]}/{act}{n}", dataset=ds,
                               mesh=make_mesh(jax.devices()[:n]), progress=False,
                               log=lambda m: None)
        out["curves"][f"{act}{n}"] = [[h["train_loss"], h["test_loss"], h["test_accuracy"]]
                                      for h in r.history]

# Where the arrays live during a 2-device step: batch split, state replicated.
cfg = TrainConfig(act="relu").resolved()
config = {"model": "mlp", "seed": 0, "model_kwargs": dict(act="relu", ratio=0.1,
          num_classes=10, input_shape=[28, 28, 1])}
model = build_model_from_config(config)
tx = create_optimizer(cfg, 10)
_, params, rest = split_model(model)
state = TrainState(jax.numpy.zeros((), "int32"), params, rest, tx.init(params), jax.random.key(0))
steps = StepFns(model, tx, make_mesh())
batch = _put_batch(next(data.iterate_batches(ds.train_images, ds.train_labels, 64)), steps.data)
state, _ = steps.train(jax.device_put(state, steps.replicated), batch)
out["batch_shards"] = sorted(s.data.shape[0] for s in batch["image"].addressable_shards)
leaves = jax.tree.leaves(state.params)
out["params_replicated"] = all(l.sharding.is_fully_replicated and len(l.sharding.device_set) == 2
                               for l in leaves)
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
    assert out["params_replicated"]
    for act in ("relu", "kwta"):
        one, two = np.asarray(out["curves"][f"{act}1"]), np.asarray(out["curves"][f"{act}2"])
        assert one.shape == two.shape and one.shape[0] >= 2
        # Same data, same init: only the order of the cross-device reduction differs.
        np.testing.assert_allclose(two, one, rtol=2e-4, atol=1e-5, err_msg=act)
        assert one[-1, 0] < one[0, 0]  # and it is a real learning curve
