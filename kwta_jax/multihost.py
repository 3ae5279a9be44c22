"""Processes of a multi-host run: which one writes, where they meet, how they start.

Every CLI runs the same program on every process (one per host, `jax.distributed`); process 0
alone writes run files and logs, and all of them meet at `sync` points before anything that
another process must see.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils

from kwta_jax import training
from kwta_jax.config import ConfigError

__all__ = ["initialize", "is_primary", "sync"]


def is_primary() -> bool:
    """Whether this process writes the run files (process 0; every process checkpoints)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """All processes meet here (multi-host: nobody writes before everybody has checked)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def initialize(distributed: bool | dict | None) -> None:
    """`kwta_jax.training.initialize_distributed` when ``distributed`` is true: ``True`` for
    the cluster of the environment, or a dict of `jax.distributed.initialize` keywords."""
    if not (distributed or isinstance(distributed, dict)):
        return
    try:
        training.initialize_distributed(**(distributed if isinstance(distributed, dict) else {}))
    except (ValueError, TypeError) as e:  # no cluster found, or inconsistent arguments
        raise ConfigError(
            f"--distributed: {str(e).strip().splitlines()[0]} (outside SLURM / Open MPI / "
            "Kubernetes, give --coordinator-address, --num-processes and --process-id)"
        ) from None
