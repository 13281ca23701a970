"""The page's speech player (web/player.js) as the server sees it: one message per state change or
audio chunk, and each finished reply's audio as a wav file in the chat."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, SAMPLE_RATE, GenerationOptions
from omni_demo.errors import InputError
from omni_demo.events import AudioChunk

from .chat_history import STOPPED_MARK
from .files import save_reply_audio

NOT_SENT = "Not sent: your message is back in the box."


class PlayerMessages:
    """The live player's messages for one reply: its state line, and the speech as base64 int16 PCM
    (mono, little-endian, 24 kHz), one message per engine chunk. `seq` makes every message a new
    value, so each one reaches the page."""

    def __init__(self, reply_id: str | None = None, seq: int = 0, **extra):
        self.id = reply_id or uuid.uuid4().hex[:12]
        self.seq = seq
        self.extra = extra  # in every message (a call's replies say `in_call`)

    def __call__(self, state: str, text: str = "", pcm: np.ndarray | None = None) -> dict:
        self.seq += 1
        message = {"reply": self.id, "seq": self.seq, "state": state, "text": text, **self.extra}
        if pcm is not None:  # made_at: the server's clock (Unix s), for first-sound figures in tests
            message |= {"pcm": base64.b64encode(pcm.astype("<i2").tobytes()).decode(), "rate": SAMPLE_RATE,
                        "made_at": time.time()}
        return message


def player_stopped(reply_id: str) -> dict:
    """The player's line for a turn stopped before it was sent."""
    return PlayerMessages(reply_id, seq=1_000_000)("stopped", NOT_SENT)


def finalize(chat: list[dict], text: str, chunks: list[np.ndarray], stopped: bool) -> list[dict]:
    """The finished turn in the chat: the reply text (marked when stopped), then its audio."""
    if stopped:
        text = f"{text} {STOPPED_MARK}".strip()
    final = chat + ([{"role": "assistant", "content": text}] if text else [])
    if chunks:
        final.append({"role": "assistant", "content": {"path": save_reply_audio(chunks)}})
    return final


PREVIEW_PROMPT = "Hello! Please introduce yourself in one short sentence."
PREVIEW_OPTIONS = dict(seed=7, max_new_tokens=40, max_audio_tokens=200)  # at most 4 s of speech


class VoicePreviews:
    """A short spoken sample of each voice, for the voice picker: made by the backend the first time
    a voice is asked for (as any reply, in the queue), then kept and replayed at once."""

    def __init__(self, backend):
        self.backend = backend
        self.samples: dict[str, list[np.ndarray]] = {}  # voice -> its sample's int16 chunks
        self.lock = threading.Lock()

    def play(self, voice: str) -> Iterator[dict]:
        """The player's messages: the sample, chunk by chunk, then done."""
        if voice not in self.backend.voices:
            yield {"notice": f"Unknown voice {voice!r:.40}."}
            return
        player = PlayerMessages(preview=True)
        with self.lock:
            kept = self.samples.get(voice)
        if kept is None:
            kept, messages = [], [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
                                  {"role": "user", "content": [{"type": "text", "text": PREVIEW_PROMPT}]}]
            try:
                for event in self.backend.stream(messages, GenerationOptions(voice=voice, **PREVIEW_OPTIONS)):
                    if isinstance(event, AudioChunk):
                        kept.append(event.pcm16())
                        yield player("speaking", f"Voice preview: {voice}", kept[-1])
            except InputError as exc:
                yield {"notice": f"No preview: {exc}"}
                return
            with self.lock:
                self.samples[voice] = kept
        else:
            for pcm in kept:
                yield player("speaking", f"Voice preview: {voice}", pcm)
        yield player("done", f"That was {voice}." if kept else f"{voice} said nothing this time.")

