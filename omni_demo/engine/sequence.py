"""One reply inside the scheduler (omni_demo.engine.scheduler): its prepared inputs and options, its
two streams once admitted, its KV slot, and the queue its events go out on.

The scheduler's thread fills the queue; the caller's generator (`OmniEngine.stream_inputs`) reads
it. Closing that generator marks the sequence closed, and the scheduler drops it at its next step.
"""

from __future__ import annotations

import heapq
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator

from omni_demo.config import SAMPLE_RATE, GenerationOptions
from omni_demo.errors import EngineError
from omni_demo.events import Admitted, AudioChunk, Event, Finished, ReplyClock, TextDelta, Waiting
from omni_demo.inputs.prepare import PreparedInputs

from .streams import SpeechStream, TextStream


FIRST_AUDIO_GRACE_S = 3.0  # how long a new reply without speech yet holds the real-time guard shut
RECENT = 32  # replies whose run and wait times the estimates are made from
RETELL_S = 1.0  # a waiting reply is told a changed estimate at most this often
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
        self.queued_at = time.monotonic()
        self.told: Waiting | None = None  # the last Waiting event it was sent
        self.told_at = 0.0
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


class WaitingLine:
    """What replies left waiting are told: their place, why, and when they should start, estimated
    from the replies this engine served recently (how long they ran, how long the real-time guard
    held newcomers back)."""

    def __init__(self):
        self.runs: deque[float] = deque(maxlen=RECENT)  # seconds from admission to the end, replies that ran out
        self.guard_waits: deque[float] = deque(maxlen=RECENT)  # seconds waited by replies the guard held back

    def tell(self, waiting: list[Sequence], running: list[Sequence], slots_full: bool, now: float) -> None:
        """Send each waiting reply its `Waiting`, when it is new or has changed."""
        reason = "full" if slots_full else "realtime"
        for ahead, sequence in enumerate(waiting):
            estimate = self.estimate(ahead, reason, running, now)
            told = Waiting(ahead, len(running), reason, None if estimate is None else round(estimate, 1))
            if _worth_telling(sequence.told, told, now - sequence.told_at):
                sequence.told, sequence.told_at = told, now
                sequence.emit(told)

    def estimate(self, ahead: int, reason: str, running: list[Sequence], now: float) -> float | None:
        """Seconds until the reply `ahead` places back starts. Slots full: each running reply is
        taken to run the median of the recent runs, and each freed slot goes to the next in line.
        The guard: the median of its recent waits, once per reply ahead."""
        if reason == "realtime":
            return statistics.median(self.guard_waits) * (ahead + 1) if self.guard_waits else None
        if not self.runs or not running:
            return None
        typical = statistics.median(self.runs)
        free = [max(0.0, typical - (now - (s.admitted_at or now))) for s in running]
        heapq.heapify(free)
        for _ in range(ahead):
            heapq.heappush(free, heapq.heappop(free) + typical)
        return max(1.0, free[0])

    def admitted(self, sequence: Sequence, now: float) -> None:
        if sequence.told is not None:
            if sequence.told.reason == "realtime":
                self.guard_waits.append(now - sequence.queued_at)
            sequence.emit(Admitted(now - sequence.queued_at))

    def ended(self, sequence: Sequence, now: float, completed: bool) -> None:
        if completed and sequence.admitted_at is not None:
            self.runs.append(now - sequence.admitted_at)


def _worth_telling(last: Waiting | None, new: Waiting, since_s: float) -> bool:
    """A first `Waiting`, a changed place or reason, an estimate that appears, or one that moved by
    a second or more (at most once per RETELL_S)."""
    if last is None or (last.ahead, last.running, last.reason) != (new.ahead, new.running, new.reason):
        return True
    if (last.estimate_s is None) != (new.estimate_s is None):
        return True
    return new.estimate_s is not None and abs(new.estimate_s - last.estimate_s) >= 1.0 and since_s >= RETELL_S
