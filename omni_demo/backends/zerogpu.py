"""Hugging Face ZeroGPU: each reply runs under `@spaces.GPU`, in a worker that holds the GPU only
while it generates. The engine's events are plain numpy/Python data, so they pickle across."""

from __future__ import annotations

import importlib.util
import os

_ENGINE = None  # the worker reaches the engine through this global, never through pickled arguments


def on_zerogpu() -> bool:
    return bool(os.environ.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def _stream_on_gpu(messages, options):
    yield from _ENGINE.stream(messages, options)


class ZeroGPUBackend:
    """The `Backend` (omni_demo.backends.protocol) on ZeroGPU: the engine, one reply per GPU call."""

    def __init__(self, engine, duration_s: int = 120):
        import spaces

        global _ENGINE
        _ENGINE = engine
        self.engine = engine
        self._stream = spaces.GPU(duration=duration_s)(_stream_on_gpu)

    voices = property(lambda self: self.engine.voices)
    model_name = property(lambda self: self.engine.model_name)
    is_random = property(lambda self: self.engine.is_random)
    precision = property(lambda self: self.engine.precision)
    limits = property(lambda self: self.engine.limits)

    def stream(self, messages, options=None, cancel=None):
        """The engine's reply in the GPU worker. `cancel` cannot reach the worker: the caller gives up
        on the reply after STOP_GRACE_S (omni_demo.config) and the worker ends when its time is up."""
        return self._stream(messages, options)

    def listen(self, history, options=None) -> None:
        """No listening: the GPU is lent per reply, so a turn's windows cannot be prefilled ahead."""
        return None

    def watch(self, history, options=None) -> None:
        """Nor watching, for the same reason: a camera turn is sent as its video file."""
        return None
