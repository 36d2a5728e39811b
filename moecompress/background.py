"""Work in a daemon thread whose exception reaches the thread that waits for it.

A daemon thread, so that a command stopping early (an error, Ctrl-C) does not wait for the work
to end: the NaN/Inf scan of a large input (``integrity.require_sound_input``), the shard surgery
beside the re-fit (``surgery.SurgeryAlongside``). At exit, work still running is asked to stop
(``stop``, which it checks between steps) and waited for: a daemon thread still inside torch's
or safetensors' native code while the interpreter tears down aborts the process ("terminate
called without an active exception", exit 134), as ``prune --keep 99`` on the testbed did
after its one-line error, with the input scan still running.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable

_running: set["Background"] = set()


class Background:
    """``fn(stop)`` running in a daemon thread named ``name`` (``stop``: this job's event, set at
    exit, that long work checks between steps). :meth:`result` waits for it and returns
    its value or raises its exception in the waiting thread; ``error`` holds that exception as
    soon as ``fn`` has raised it (None before), for a caller that checks without waiting."""

    def __init__(self, fn: Callable, name: str):
        self.value = None
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set at exit: long work checks it between steps and ends
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        _running.add(self)
        self.thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self.value = fn(self.stop)
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            _running.discard(self)

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


@atexit.register
def stop_running() -> None:
    """Ask every running :class:`Background` to stop, and wait for each (module docstring)."""
    jobs = list(_running)
    for job in jobs:
        job.stop.set()
    for job in jobs:
        job.thread.join()
