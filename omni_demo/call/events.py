"""What a voice call yields (omni_demo.call.voice_call.VoiceCall.run): small typed events that the
page turns into chat, player and status updates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omni_demo.events import AudioChunk, ContextTrimmed, Finished


@dataclass(frozen=True)
class Status:
    state: str  # a key of STATES: what the call is doing now
    text: str


@dataclass(frozen=True)
class Tick:
    """Nothing new: the loop hands control back, so that Gradio can end it."""


@dataclass(frozen=True)
class UserTurn:
    audio: np.ndarray  # float32 16 kHz: what the model hears as the user's turn
    path: str | None  # the same as a wav file, when the call was given `save_audio`
    start_s: float  # where the speech began, seconds into the call's audio
    end_s: float  # where it ended
    video: bool = False  # spoken with the camera on: `path` is a video with this sound
    sound: str | None = None  # ... and its sound as a file of its own, where the model reads it beside the video


@dataclass
class TurnLatency:
    """One turn's wait, on the server's clock (time.monotonic). The player's part is the page's."""

    speech_end_at: float  # when the user's last words reached the server (the audio's clock, mapped)
    decided_at: float  # when the pause made the end certain
    first_text_at: float | None = None  # when the call gave them out (never before decided_at)
    first_audio_at: float | None = None
    early_s: float | None = None  # begun at a SpeechPaused: how long before decided_at it began working

    def as_dict(self) -> dict:
        def since(t):
            return None if t is None else round(t - self.decided_at, 3)

        return {"vad_s": round(self.decided_at - self.speech_end_at, 3), "first_text_s": since(self.first_text_at),
                "first_audio_s": since(self.first_audio_at),
                "early_s": None if self.early_s is None else round(self.early_s, 3),
                "speech_end_to_audio_s": None if self.first_audio_at is None
                else round(self.first_audio_at - self.speech_end_at, 3)}


@dataclass(frozen=True)
class ReplyText:
    text: str  # the reply so far


@dataclass(frozen=True)
class ReplyAudio:
    chunk: AudioChunk
    latency: TurnLatency | None  # on the reply's first chunk


@dataclass(frozen=True)
class ReplyEnded:
    text: str  # what was generated (cut where it was interrupted)
    chunks: list  # float32 24 kHz chunks generated
    finished: Finished | None
    interrupted: bool  # the user spoke over it (barge-in)
    latency: TurnLatency
    call_ended: bool = False  # the call ended while it was being made (End call, a limit)


@dataclass(frozen=True)
class PlaybackInterrupted:
    """The user spoke while the last reply, fully generated, was still playing."""


@dataclass(frozen=True)
class TurnFailed:
    message: str  # for the user; the call goes on


@dataclass(frozen=True)
class Trimmed:
    event: ContextTrimmed


@dataclass(frozen=True)
class CallEnded:
    reason: str
