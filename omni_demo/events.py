"""What the streaming engine yields: small typed events, all CPU data (safe to pickle across
processes, as ZeroGPU requires)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    text: str  # the text one thinker token completed (never empty)


@dataclass(frozen=True)
class AudioChunk:
    samples: np.ndarray  # [n] float32 in [-1, 1], mono, 24 kHz
    start_sample: int  # offset of samples[0] in the reply's audio

    def pcm16(self) -> np.ndarray:
        """int16 PCM, what Gradio's streaming audio wants (float chunks get peak-normalised)."""
        return pcm16(self.samples)


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype(np.int16)


@dataclass(frozen=True)
class Stats:
    time_to_first_text_s: float | None  # request start -> first text delta
    time_to_first_audio_s: float | None  # request start -> first audio chunk (None: no speech)
    total_s: float
    audio_s: float  # seconds of speech produced
    rtf: float | None  # total_s / audio_s (below 1: faster than real time)
    prompt_tokens: int
    reused_prompt_tokens: int  # of them, served from the conversation cache (not prefilled again)
    text_tokens: int
    audio_tokens: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ReplyClock:
    """One reply's times (time.perf_counter): its start and its first text and audio, then its Stats."""

    start: float = field(default_factory=time.perf_counter)
    first_text: float | None = None
    first_audio: float | None = None

    def mark(self, event: TextDelta | AudioChunk) -> None:
        """Note the time of the reply's first text delta or audio chunk."""
        now = time.perf_counter()
        if isinstance(event, TextDelta) and self.first_text is None:
            self.first_text = now
        elif isinstance(event, AudioChunk) and self.first_audio is None:
            self.first_audio = now

    def stats(self, *, audio_s: float, prompt_tokens: int, reused_prompt_tokens: int, text_tokens: int,
              audio_tokens: int) -> Stats:
        """The reply's Stats, now that it has ended."""
        total = time.perf_counter() - self.start
        since = lambda mark: None if mark is None else mark - self.start  # noqa: E731
        return Stats(time_to_first_text_s=since(self.first_text), time_to_first_audio_s=since(self.first_audio),
                     total_s=total, audio_s=audio_s, rtf=total / audio_s if audio_s else None,
                     prompt_tokens=prompt_tokens, reused_prompt_tokens=reused_prompt_tokens, text_tokens=text_tokens,
                     audio_tokens=audio_tokens)


@dataclass(frozen=True)
class Finished:
    text: str
    text_token_ids: list[int]
    codec_token_ids: list[int]
    audio_samples: int  # total samples streamed (= 480 x codec tokens)
    stop_reason: str  # "eos", "length" or "cancelled"
    stats: Stats
    messages: list = field(default_factory=list)  # the conversation as sent to the processor


@dataclass(frozen=True)
class ContextTrimmed:
    """The conversation was over the context window: its oldest turns were left out of this reply."""

    dropped_turns: int
    prompt_tokens: int  # after trimming
    limit_tokens: int


@dataclass(frozen=True)
class Waiting:
    """The engine cannot start this reply yet; told again when its place, its reason or its
    estimate changes, and followed by `Admitted` when it starts."""

    ahead: int  # replies that will start before it
    running: int = 0  # replies the engine is serving now
    reason: str = "full"  # "full": every reply slot is taken; "realtime": one more reply now would make the
    # running replies' speech fall behind real time
    estimate_s: float | None = None  # seconds until it starts, from the server's recent replies; None: no figures yet


@dataclass(frozen=True)
class Admitted:
    """A reply that was told `Waiting` has its place now: it is being read and written."""

    waited_s: float


Event = TextDelta | AudioChunk | ContextTrimmed | Waiting | Admitted | Finished
