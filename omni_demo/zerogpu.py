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
    """The UI's backend on ZeroGPU: the same interface as OmniEngine."""

    def __init__(self, engine, duration_s: int = 120):
        import spaces

        global _ENGINE
        _ENGINE = engine
        self.engine = engine
        self._stream = spaces.GPU(duration=duration_s)(_stream_on_gpu)

    voices = property(lambda self: self.engine.voices)
    model_name = property(lambda self: self.engine.model_name)
    is_random = property(lambda self: self.engine.is_random)

    def stream(self, messages, options, cancel=None):
        return self._stream(messages, options)
