"""Processes of a multi-host run: which one writes, where they meet, how they start and what
happens when one of them is gone.

Every CLI runs the same program on every process (one per host, `jax.distributed`); process 0
alone writes run files and logs, and all of them meet at `sync` points before anything that
another process must see.

Left to itself, JAX waits 5 minutes for a process that never starts and then aborts
(SIGABRT, a C++ stack trace), and a process whose peer died fails in its next collective and
then waits at JAX's shutdown barrier until the peer's heartbeats time out, and aborts too.
`initialize` bounds both waits and turns them into one line:

* start-up: a timer of ``init_timeout`` seconds around `jax.distributed.initialize` (whose
  own, longer timeout never fires first); when it expires the line names the process that
  did not join and the process leaves with status 2;
* afterwards: a watchdog thread writes a heartbeat to the coordinator's key-value store every
  ``peer_timeout / 5`` seconds and reads the others'; a process whose heartbeat stops for
  ``peer_timeout`` seconds (killed, frozen, its host gone) is named in one line and this
  process leaves with status 2 (JAX's own heartbeat timeout is set longer, so it never aborts
  first). A process that finishes normally says so first (`atexit`), so a slower peer does
  not mistake it for a lost one;
* a process that fails (an error line, Ctrl-C) leaves at once (`leave`), without waiting at
  JAX's shutdown barrier for peers that are still computing: they see its heartbeat stop.

Whatever is lost is at most the epoch in progress: checkpoints are saved by all processes
together and renamed into place only when complete, so ``--resume`` continues from the last
one. One case stays out of reach: when process 0 itself dies, the coordinator dies with it and
JAX aborts the others at once (its error callback cannot be replaced from Python).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax
from jax._src import distributed as jax_distributed  # its client: the coordinator's KV store
from jax.experimental import multihost_utils

from kwta_jax import interrupts, training
from kwta_jax.config import ConfigError

__all__ = [
    "INIT_TIMEOUT",
    "PEER_TIMEOUT",
    "initialize",
    "is_primary",
    "leave",
    "sync",
    "wait_for_lost_peer",
]

INIT_TIMEOUT = 300.0  # seconds for every process to join (JAX's own default)
PEER_TIMEOUT = 60.0  # seconds without a heartbeat before a process counts as gone
_KEY = "kwta_jax/heartbeat"
_watchdogs: list[_Watchdog] = []  # the one of this process's cluster, once started


def is_primary() -> bool:
    """Whether this process writes the run files (process 0; every process checkpoints)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """All processes meet here (multi-host: nobody writes before everybody has checked)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def leave(status: int, line: str | None = None) -> None:
    """Ends a multi-host process now with ``status`` (after printing ``line``), without JAX's
    shutdown barrier, which would wait for peers that are still computing or gone. With one
    process it does nothing (the caller returns as usual)."""
    if jax.distributed.is_initialized():
        interrupts.exit_now(status, line)


def wait_for_lost_peer() -> None:
    """After an error in a multi-host run (a collective or a checkpoint save fails when a peer
    dies): gives the watchdog the time to name the lost process (it then ends this one with its
    line). Returns as soon as every other process has sent a heartbeat since the error (they
    live: the error is this process's own), at most 1.5 peer timeouts later."""
    for watchdog in _watchdogs:
        watchdog.wait_for_news()


def _fail(message: str) -> None:
    """Ends this process (from any thread) with the CLI's one error line and status 2."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    interrupts.exit_now(2, f"{program}: error: {message}")


def _check_backend() -> None:
    """Starts JAX's backend now, so that a platform that is not there (``JAX_PLATFORMS=cuda``
    on a machine without CUDA) is one start-up error, not a traceback later."""
    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 - jax raises RuntimeError, or AssertionError
        text = str(e).strip()
        reason = text.splitlines()[0] if text else "that platform is not installed here"
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms
        raise ConfigError(
            f"JAX cannot start a backend (JAX_PLATFORMS={platforms!r}): {reason}; install the "
            "jaxlib for that platform, or unset JAX_PLATFORMS to use the devices that are here."
        ) from None


def _not_joined(options: dict, timeout: float) -> str:
    """The start-up error line: who did not join."""
    address = options.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n, me = options.get("num_processes"), options.get("process_id")
    if n == 2 and me in (0, 1):
        who = "process 1" if me == 0 else f"process 0 (the coordinator at {address})"
    else:
        who = f"one of the {n or 'expected'} processes"
    return (
        f"--distributed: {who} did not join within {timeout:g} s; start every process with "
        "the same --coordinator-address and --num-processes (--init-timeout sets the wait)."
    )


class _Watchdog:
    """Heartbeats through the coordinator's key-value store; see the module docstring."""

    def __init__(self, client, timeout: float, hint: str):
        self.client, self.timeout, self.hint = client, timeout, hint
        self.me, self.n = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kwta-jax-watchdog", daemon=True)
        # Per other process: its last heartbeat value and when it changed (gone once "done").
        self.seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
        self.news = threading.Condition()

    def start(self) -> None:
        self.thread.start()
        atexit.register(self.finish)

    def finish(self) -> None:
        """A normal exit: tell the others, then stop beating."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.thread.join()
        try:
            self.client.key_value_set(f"{_KEY}/{self.me}", "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001,S110 - the coordinator is already gone: nothing to tell
            pass

    def wait_for_news(self) -> None:
        """Waits until every other process is known to be alive now (or done): its heartbeat
        counter 3 beats past the one last seen (one beat could have been written just before
        it died, and seen only now), at most 1.5 timeouts (a lost one is declared, and this
        process ended, before that)."""

        def beats() -> dict[int, int]:
            return {p: int(v) if v and v.isdigit() else -1 for p, (v, _) in self.seen.items()}

        with self.news:
            base = beats()
            self.news.wait_for(
                lambda: all(b >= base[p] + 3 for p, b in beats().items() if p in base),
                self.timeout * 1.5,
            )

    def _run(self) -> None:
        seen = self.seen
        beat = 0
        while not self.stopped.wait(self.timeout / 5):
            beat += 1
            try:
                self.client.key_value_set(f"{_KEY}/{self.me}", str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(f"{_KEY}/"))
            except Exception as e:  # noqa: BLE001 - the coordinator does not answer
                if not self.stopped.is_set():
                    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                    _fail(self._line(f"process 0 (the coordinator) does not answer ({reason})"))
                return
            now = time.monotonic()
            with self.news:
                for p, (last, since) in list(seen.items()):
                    value = values.get(f"{_KEY}/{p}")
                    if value == "done":
                        del seen[p]
                    elif value != last:
                        seen[p] = (value, now)
                    elif now - since > self.timeout and not self.stopped.is_set():
                        _fail(self._line(f"process {p} of {self.n} stopped (no heartbeat "
                                         f"for {self.timeout:g} s)"))  # fmt: skip
                self.news.notify_all()

    def _line(self, what: str) -> str:
        return f"{what}; process {self.me} stops too. {self.hint}".strip()


def initialize(
    distributed: bool | dict | None,
    *,
    init_timeout: float = INIT_TIMEOUT,
    peer_timeout: float = PEER_TIMEOUT,
    hint: str = "",
) -> None:
    """Starts JAX for this process: its backend, and with ``distributed`` the multi-host
    cluster (`kwta_jax.training.initialize_distributed`) with bounded waits (module
    docstring). ``distributed``: ``True`` for the cluster of the environment, or a dict of
    `jax.distributed.initialize` keywords, where ``init_timeout`` and ``peer_timeout`` (seconds)
    override the arguments. ``hint``: what the line about a lost process adds (e.g. how to
    resume).

    Raises:
      ConfigError: no cluster found, inconsistent arguments, or no backend (one line).
    """
    if distributed or isinstance(distributed, dict):
        options = dict(distributed) if isinstance(distributed, dict) else {}
        init_timeout = float(options.pop("init_timeout", None) or init_timeout)
        peer_timeout = float(options.pop("peer_timeout", None) or peer_timeout)
        timer = threading.Timer(init_timeout, _fail, args=(_not_joined(options, init_timeout),))
        timer.daemon = True
        timer.start()
        try:
            training.initialize_distributed(
                **options, initialization_timeout=int(init_timeout) + 30,
                heartbeat_timeout_seconds=int(2 * peer_timeout) + 10,
            )  # fmt: skip
        except (ValueError, TypeError) as e:  # no cluster found, or inconsistent arguments
            raise ConfigError(
                f"--distributed: {str(e).strip().splitlines()[0]} (outside SLURM / Open MPI / "
                "Kubernetes, give --coordinator-address, --num-processes and --process-id)"
            ) from None
        finally:
            timer.cancel()
        client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
        if client is not None and jax.process_count() > 1:
            _watchdogs.append(_Watchdog(client, peer_timeout, hint))
            _watchdogs[-1].start()
    _check_backend()
