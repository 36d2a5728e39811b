"""Work in a daemon thread whose exception reaches the thread that waits for it.

A daemon thread, so that a command stopping early (an error, Ctrl-C) exits without waiting for
the work to end: the NaN/Inf scan of a large input (``integrity.require_sound_input``), the
shard surgery beside the re-fit (``surgery.SurgeryAlongside``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Background:
    """``fn()`` running in a daemon thread named ``name``. :meth:`result` waits for it and returns
    its value or raises its exception in the waiting thread; ``error`` holds that exception as
    soon as ``fn`` has raised it (None before), for a caller that checks without waiting."""

    def __init__(self, fn: Callable, name: str):
        self.value = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self.thread.start()

    def _run(self, fn: Callable) -> None:
        try:
            self.value = fn()
        except BaseException as e:  # handed to the waiting thread
            self.error = e

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value
