"""The page's speech player (web/player.js) as the server sees it: one message per state change or
audio chunk, and each finished reply's audio as a wav file in the chat."""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np

from omni_demo.config import SAMPLE_RATE

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
