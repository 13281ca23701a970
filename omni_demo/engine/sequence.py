"""One reply inside the scheduler (omni_demo.engine.scheduler): its prepared inputs and options, its
two streams once admitted, its KV slot, and the queue its events go out on.

The scheduler's thread fills the queue; the caller's generator (`OmniEngine.stream_inputs`) reads
it. Closing that generator marks the sequence closed, and the scheduler drops it at its next step.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator

from omni_demo.config import SAMPLE_RATE, GenerationOptions
from omni_demo.errors import EngineError
from omni_demo.events import AudioChunk, Event, Finished, ReplyClock, TextDelta
from omni_demo.inputs.prepare import PreparedInputs

from .streams import SpeechStream, TextStream


FIRST_AUDIO_GRACE_S = 3.0  # how long a new reply without speech yet holds the real-time guard shut
POLL_S = 1.0  # how often a reader waiting for events checks that the scheduler still runs


class Sequence:
    def __init__(self, inputs: PreparedInputs, options: GenerationOptions, cancel: threading.Event | None,
                 clock: ReplyClock):
        self.inputs, self.options, self.cancel, self.clock = inputs, options, cancel, clock
        self.closed = False  # its reader is gone (the generator was closed)
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # Event or the exception that ended it
        self.slot: int | None = None  # its KV slot while admitted
        self.text: TextStream | None = None  # made at admission
        self.speech: SpeechStream | None = None  # made after its first text token, when speech is asked for
        self.prefill: Generator[None, None, None] | None = None  # the prompt's pieces still to run
        self.finished = False
        self.ended = threading.Event()  # set once finished: its slot is free and nothing more runs for it
        self.told_waiting = False  # a Waiting event went out
        self.admitted_at: float | None = None  # time.monotonic() when it took its slot
        self.first_audio_at: float | None = None  # time.monotonic() of its first audio chunk
        self.audio_samples = 0  # samples handed out so far

    @property
    def cancelled(self) -> bool:
        return self.closed or (self.cancel is not None and self.cancel.is_set())

    @property
    def writing(self) -> bool:
        """Prefilled, and its text is still being written."""
        return self.text is not None and self.prefill is None and not self.text.done

    @property
    def done(self) -> bool:
        return (self.text is not None and self.prefill is None and self.text.done
                and (self.speech is None or self.speech.done))

    def emit(self, event: Event) -> None:
        if isinstance(event, (TextDelta, AudioChunk)):
            self.clock.mark(event)
        if isinstance(event, AudioChunk):
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()
            self.audio_samples += len(event.samples)
        self.events.put(event)

    def fail(self, error: BaseException) -> None:
        self.events.put(error)

    def lead_s(self, now: float) -> float:
        """Seconds of speech handed out ahead of playing it in real time from its first chunk.
        Before its first chunk a reply that speaks counts as behind (0), for FIRST_AUDIO_GRACE_S
        after its admission at most; a reply that does not speak, or has said everything, is
        never behind (infinite)."""
        if self.first_audio_at is None:
            starting = self.options.speech and now - (self.admitted_at or now) < FIRST_AUDIO_GRACE_S
            return 0.0 if starting else math.inf
        if self.speech is None or self.speech.done:
            return math.inf
        return self.audio_samples / SAMPLE_RATE - (now - self.first_audio_at)

    def read(self, alive: Callable[[], bool]) -> Iterator[Event]:
        """The events as they come, until Finished; raises the exception that ended the reply, or an
        EngineError if the scheduler stops (`alive()` false) with nothing more for it."""
        while True:
            try:
                item = self.events.get(timeout=POLL_S)
            except queue.Empty:
                if not alive():
                    raise EngineError("the engine stopped before this reply ended") from None
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return
