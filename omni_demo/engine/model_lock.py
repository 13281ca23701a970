"""The model's one user at a time. The lean steps' static KV caches serve one reply at a time, and
a listening window's prefill uses the model too: each holds the `ModelLock` while it runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from omni_demo.errors import EngineError

BUSY_WAIT_S = 30.0  # how long a reply waits for the previous one to let go of the model


class ModelLock:
    def __init__(self, wait_s: float = BUSY_WAIT_S):
        self.wait_s = wait_s  # a cancelled reply lets go within one decode step; the next may already wait
        self._lock = threading.Lock()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the model for a reply; EngineError when another holds it past `wait_s`."""
        if not self._lock.acquire(timeout=self.wait_s):
            raise EngineError("the engine is busy with another reply; run one reply at a time per engine")
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def try_hold(self, wait_s: float = 0.0) -> Iterator[bool]:
        """Hold the model if it is free within `wait_s` (0: only if free now); yields whether it is held.
        For work that may be skipped or done later, as listening's."""
        held = self._lock.acquire(timeout=wait_s) if wait_s > 0 else self._lock.acquire(blocking=False)
        try:
            yield held
        finally:
            if held:
                self._lock.release()
