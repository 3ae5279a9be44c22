"""Device meshes and host data put on them, for one process or several (`jax.distributed`).

Training (`kwta_jax.training`) and evaluation (`kwta_jax.evaluation`) share one convention: a
1-D mesh with axis ``"batch"``, and host values that are the same on every process (each
process loads the same data) put on it as global arrays. This module imports nothing from
the project.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, Sharding

__all__ = ["make_mesh", "put_global"]


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("batch",))


def put_global(tree, sharding: Sharding):
    """``tree`` (the same values on every process) as global arrays laid out by ``sharding``
    (replicated or split): each process fills the shards its own devices hold, since
    `jax.device_put` itself only reaches this process's devices. PRNG key arrays travel as
    their raw bits and are wrapped again."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
