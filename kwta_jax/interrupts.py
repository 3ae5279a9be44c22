"""Ctrl-C in the command-line tools: one line and exit status 130, at any moment.

A ``KeyboardInterrupt`` raised wherever the main thread happens to be is not safe in a JAX
program: raised inside a Python callback that C++ called (nanobind during jaxlib's import,
XLA's garbage-collection callback, orbax's event loop) it aborts the process, is swallowed
("Exception ignored in ``_xla_gc_callback``" and the run goes on), or unwinds while XLA's
threads are still compiling and the interpreter then crashes at exit (SIGSEGV). So the CLIs do
not raise it at all. `install` replaces the handler of SIGINT (and SIGTERM): the handler prints
the CLI's line and leaves with ``os._exit`` (no unwinding, no interpreter shutdown, nothing
left for other threads to trip over), unless the main thread is inside a `deferred` section —
a checkpoint being saved, a file being renamed into place — in which case it leaves as soon as
the section ends. A second Ctrl-C leaves at once (what is half-written then is a temporary
file or directory, never a finished one). The exit status is 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM).

The signal also wakes a watcher thread (`signal.set_wakeup_fd`), so the process leaves even
while the main thread is in C++ that runs no Python (an XLA compilation): Python runs signal
handlers only between bytecodes of the main thread.

Library code only marks its sections (`deferred` does nothing else when no CLI installed the
handler); it never installs a handler itself. A Ctrl-C during the CLI's imports, before
`install` runs, is held back by blocking SIGINT first (see ``train.py``), and `install`
delivers it.

This module imports nothing from the project (the CLIs import it before anything heavy).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["deferred", "exit_now", "install", "on_exit"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_lock = threading.Lock()
_state = {"message": None, "depth": 0, "pending": None, "exiting": False}
_cleanups: list[Callable[[], None]] = []  # `on_exit`, newest last


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def exit_now(status: int, line: str | None = None) -> None:
    """Flushes stdout/stderr, prints ``line`` on stderr (on a line of its own) and leaves the
    process with ``status`` at once (``os._exit``: no interpreter shutdown, no atexit)."""
    # Flushing waits for the stream's lock, which the main thread may hold while it is blocked
    # on a full pipe: flush from a helper thread and give it a second, no more.
    flusher = threading.Thread(target=_flush, name="kwta-jax-flush", daemon=True)
    flusher.start()
    flusher.join(timeout=1.0)
    if line:
        with contextlib.suppress(OSError):
            os.write(2, ("\n" + line + "\n").encode(errors="replace"))
    for cleanup in reversed(list(_cleanups)):
        with contextlib.suppress(Exception):
            cleanup()
    os._exit(status)


def _leave(signum: int) -> None:
    with _lock:
        if _state["exiting"]:
            return
        _state["exiting"] = True
    message = _state["message"]
    line = message(signum) if callable(message) else message
    exit_now(128 + signum, line)


def _on_signal(signum: int) -> None:
    """Leave now, or at the end of the current `deferred` section (a second signal while one
    is pending leaves now)."""
    with _lock:
        later = _state["depth"] > 0 and _state["pending"] is None
        if later:
            _state["pending"] = signum
    if not later:
        _leave(signum)


def _python_handler(signum: int, frame) -> None:
    """The Python-level handler does nothing: it must exist so that the C-level one records the
    signal to the wakeup fd, and the watcher thread acts on it (once per signal)."""


def _watch(read_fd: int) -> None:
    """Watcher thread: acts on every signal the C-level handler records."""
    with contextlib.closing(os.fdopen(read_fd, "rb", buffering=0)) as pipe:
        while data := pipe.read(64):
            for signum in data:
                if signum in _SIGNALS:
                    _on_signal(signum)


def install(message: str | Callable[[int], str]) -> Callable[[], None]:
    """Makes SIGINT and SIGTERM leave the process with one line (``message``, or
    ``message(signum)``) and status 128 + signum; see the module docstring. Call it first
    thing in a CLI's ``main``; it delivers a SIGINT held back during the imports. Returns a
    function that restores the previous handlers (for in-process callers such as tests).
    Outside the main thread (where Python cannot set handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, _python_handler) for s in _SIGNALS}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _state.update(message=message, exiting=False, pending=None)
    threading.Thread(target=_watch, args=(read_fd,), name="kwta-jax-signals", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)  # the watcher reads end-of-file and stops
        _state["message"] = None

    return restore


@contextlib.contextmanager
def on_exit(cleanup: Callable[[], None]) -> Iterator[None]:
    """Runs ``cleanup`` (best effort) if the process leaves through `exit_now` inside the
    ``with`` block: what a ``finally`` would have done (e.g. release a lock file)."""
    _cleanups.append(cleanup)
    try:
        yield
    finally:
        _cleanups.remove(cleanup)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that a Ctrl-C must not cut (a checkpoint save, a file renamed into place):
    under `install`, a signal that arrives inside leaves the process when the outermost section
    ends. Without `install` it does nothing. Nests."""
    with _lock:
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            signum = _state["pending"] if _state["depth"] == 0 else None
            if signum is not None:
                _state["pending"] = None
        if signum is not None and _state["message"] is not None:
            _leave(signum)
