"""What the page and the voice call need from whatever makes the replies: the `Backend` protocol.

Three implement it: `OmniEngine` (the model in this process), `RemoteBackend` (an `omni_demo.serve`
server over HTTP) and `ZeroGPUBackend` (the engine on a GPU lent per reply). Neither the page nor
the call imports an implementation: app.py hands them one, so they never import torch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from omni_demo.config import GenerationOptions, Limits
from omni_demo.events import Event


class TurnListener(Protocol):
    """A spoken user turn heard while it arrives (omni_demo.engine.listening.Listener)."""

    def feed_audio(self, pcm: np.ndarray) -> None:
        """Float32 mono 16 kHz samples, any chunk size."""

    def end_turn(self, length: int | None = None) -> list[dict]:
        """The conversation to reply to: the history, then this turn's first `length` samples."""


class TurnWatcher(Protocol):
    """A turn spoken with the camera on, seen and heard while it arrives (omni_demo.engine.listening.Watcher)."""

    def feed(self, frames: np.ndarray, pcm: np.ndarray) -> None:
        """The turn's final frames so far ([n, h, w, 3] uint8, 2 per second) and its newest samples."""

    def end_turn(self, frames: np.ndarray, length: int | None = None) -> list[dict]:
        """The conversation to reply to: the history, then the turn as a video with its sound."""


@runtime_checkable
class Backend(Protocol):
    model_name: str  # what the page's title and /v1/models show
    voices: list[str]  # the speakers a reply may use, the default first
    is_random: bool  # random weights: the page says its replies are nonsense
    precision: str  # what the weights run in: "bfloat16", "bfloat16, int4 decoders" (the page shows it)
    limits: Limits  # what one request may ask; the page refuses more before it queues anything

    def stream(self, messages: list[dict], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """One reply to `messages` (Qwen's format) as TextDelta and AudioChunk events, then Finished.
        Ends within a decode step of `cancel` being set (or of the generator being closed)."""

    def listen(self, history: list[dict], options: GenerationOptions | None = None) -> TurnListener | None:
        """A listener for the next spoken turn, or None where the backend cannot listen (it is then
        sent the whole turn). A call starts a reply during the user's pause only while listening."""

    def watch(self, history: list[dict], options: GenerationOptions | None = None) -> TurnWatcher | None:
        """A watcher for the next turn spoken with the camera on, or None (it is then sent the
        turn's video file whole)."""
