"""A call's replies as the call's loop holds them: the one being streamed (`ActiveReply`), and one
begun during the user's pause, before the turn's end is certain (`EarlyReply`)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni_demo.config import STOP_GRACE_S
from omni_demo.events import AudioChunk, Finished, TextDelta

from .events import TurnLatency
from .turns import SpeechPaused, TurnEnded

log = logging.getLogger(__name__)


@dataclass
class ActiveReply:
    """The reply being streamed: the backend's events, so far."""

    events: object  # the backend's event iterator
    cancel: threading.Event
    latency: TurnLatency
    text: str = ""
    chunks: list = field(default_factory=list)  # float32 24 kHz
    finished: Finished | None = None
    started: bool = False  # its events were asked for (the backend began: prompt, prefill)

    def stop(self) -> None:
        """Barge-in: cancel it and close it. The engine stops within one decode step and yields its
        Finished (the text it wrote before it saw the cancel is kept, so the transcript is the text as
        far as it was generated); a backend that goes on (ZeroGPU's worker) is closed after
        STOP_GRACE_S, and a reply not begun yet is closed at once."""
        self.cancel.set()
        if self.started:
            deadline = time.monotonic() + STOP_GRACE_S
            try:
                for event in self.events:
                    if isinstance(event, TextDelta):
                        self.text += event.text
                    if isinstance(event, Finished):
                        self.finished = event
                    if time.monotonic() > deadline:
                        break
            except Exception:
                log.exception("a cancelled reply failed")
        self.events.close()


@dataclass
class EarlyReply:
    """A reply begun at a SpeechPaused: its engine events are held back until TurnEnded (then they
    go out first) or SpeechResumed (then it is dropped)."""

    turn: SpeechPaused
    messages: list[dict]  # the conversation it answers
    events: object
    cancel: threading.Event
    held: list = field(default_factory=list)  # engine events, through the first audio chunk
    began_at: float | None = None  # its first step (prompt, prefill)
    ended: bool = False  # its events ran out
    failure: Exception | None = None
    files: list = field(default_factory=list)  # the turn's video (and sound) files, with the camera on

    @property
    def ready(self) -> bool:
        """Nothing more to do before the turn is certain: its first audio is here, or it ended."""
        return self.ended or self.failure is not None or (bool(self.held) and isinstance(self.held[-1], AudioChunk))

    def answers(self, turn: TurnEnded) -> bool:
        if (self.turn.start_s, self.turn.end_s) != (turn.start_s, turn.end_s) or not np.array_equal(self.turn.audio,
                                                                                                   turn.audio):
            return False
        return bool(self.files) or same_audio(self.messages, turn)

    def held_events(self) -> list:
        """The events held, each run of text deltas joined into one."""
        events: list = []
        for event in self.held:
            if isinstance(event, TextDelta) and events and isinstance(events[-1], TextDelta):
                events[-1] = TextDelta(events[-1].text + event.text)
            else:
                events.append(event)
        return events

    def step(self) -> None:
        """One event of the reply, held."""
        self.began_at = self.began_at or time.monotonic()
        try:
            self.held.append(next(self.events))
        except StopIteration:
            self.ended = True
        except Exception as exc:  # told when the turn is certain, as a reply begun then would be
            self.failure = exc

    def drop(self) -> None:
        """Closed where it stands, never cancelled: closing the generator ends it at its last yield,
        so nothing of a reply to words that went on is kept (the engine keeps a cancelled reply in
        its conversation cache), and one not begun never prefills."""
        if self.failure is not None:
            log.warning("an early reply failed before it was dropped", exc_info=self.failure)
        self.events.close()
        for path in self.files:  # the clip of words that went on: nobody will see it
            Path(path).unlink(missing_ok=True)

    def promote(self, latency: TurnLatency, now: float) -> ActiveReply:
        """The turn is certain and this reply answers it: it goes on as the call's reply."""
        latency.early_s = 0.0 if self.began_at is None else now - self.began_at
        return ActiveReply(self.events, self.cancel, latency, started=self.began_at is not None)


def same_audio(messages: list[dict], turn) -> bool:
    """Whether the last user turn of `messages` is `turn`'s audio, sample for sample."""
    return np.array_equal(messages[-1]["content"][0]["audio"], turn.audio)
