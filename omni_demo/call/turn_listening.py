"""The backend listening to the turn being spoken (omni_demo.engine.listening), or, with the camera
on, watching it (omni_demo.engine.listening.Watcher: each 2 s chunk of frames and sound encoded as it
arrives). Listening only saves time: whatever fails here, the turn is read whole at its end."""

from __future__ import annotations

import logging

import numpy as np

from omni_demo.backends.protocol import Backend
from omni_demo.config import INPUT_SAMPLE_RATE, GenerationOptions
from omni_demo.errors import InputError
from omni_demo.inputs.clips import VIDEO_FPS

from .camera import Camera

log = logging.getLogger(__name__)

CHUNK_S = 2.0  # a watched chunk: 4 frames and one audio encoder window
FRAME_LAG_S = 0.5  # a chunk's frames are final this long after its sound (a frame may still be on its way)


class TurnListening:
    """One turn, listened to (or watched, given the call's `camera`) while it is spoken."""

    def __init__(self, backend: Backend, conversation: list[dict], options: GenerationOptions,
                 camera: Camera | None = None, start_s: float = 0.0):
        """`start_s`: where the turn's audio begins on the call's audio clock (the camera's too)."""
        self.listener = None
        self.camera = camera
        self.start_s = start_s
        self.fed = 0  # samples of the turn given to it
        self.chunks = 0  # chunks whose frames were given (watching)
        self.frames = np.zeros((0, 0, 0, 3), np.uint8)
        try:
            self.listener = (backend.watch if camera is not None else backend.listen)(conversation, options)
        except Exception:  # listening only saves time: the turn is then read whole
            log.exception("could not listen to this turn")

    @classmethod
    def begin(cls, backend: Backend, conversation: list[dict], options: GenerationOptions, camera: Camera | None,
              start_s: float) -> TurnListening:
        """Watching the turn where the camera is on and the backend can (this process's engine, with
        use_audio_in_video), else listening where it can; else one that does nothing."""
        if camera is not None:
            watching = cls(backend, conversation, options, camera, start_s)
            if watching.listener is not None:
                return watching
        return cls(backend, conversation, options, None, start_s)

    @property
    def watching(self) -> bool:
        return self.camera is not None and self.listener is not None

    def feed(self, samples: np.ndarray) -> None:
        if self.listener is None or not len(samples):
            return
        try:
            if self.watching:
                self.listener.feed(self._final_frames(self.fed + len(samples)), samples)
            else:
                self.listener.feed_audio(samples)
            self.fed += len(samples)
        except InputError as exc:  # over its audio limit: the turn is then read whole
            log.warning("stopped listening to this turn: %s", exc)
            self.listener = None
        except Exception:  # listening only saves time
            log.exception("listening failed; this turn will be read whole")
            self.listener = None

    def _final_frames(self, heard: int) -> np.ndarray:
        """The turn's frames of the whole chunks that `heard` samples and FRAME_LAG_S make final."""
        chunks = max(0, int((heard / INPUT_SAMPLE_RATE - FRAME_LAG_S) // CHUNK_S))
        if chunks > self.chunks:  # each frame picked and decoded once, with the chunk it completes
            new = self.camera.turn_frames(self.start_s + self.chunks * CHUNK_S, self.start_s + chunks * CHUNK_S,
                                          count=round((chunks - self.chunks) * CHUNK_S * VIDEO_FPS))
            if new is not None and (not self.chunks or new[0].shape == self.frames.shape[1:]):
                self.frames, self.chunks = np.concatenate([self.frames, np.stack(new)]) if self.chunks else np.stack(
                    new), chunks
        return self.frames

    def end_turn(self, audio: np.ndarray, end_s: float) -> list[dict] | None:
        """The conversation ending in the turn `audio` (as the detector cut it: its pre-roll to the
        end of the speech at `end_s`, not the pause after it): its windows heard, or, watching, the
        turn as a video with its sound (the camera's frames of it); None when neither."""
        self.feed(audio[self.fed:])  # what the last chunk added before the pause
        if self.listener is None:
            return None
        try:
            if not self.watching:
                return self.listener.end_turn(len(audio))
            frames = self.camera.turn_frames(end_s - len(audio) / INPUT_SAMPLE_RATE, end_s)
            return None if frames is None else self.listener.end_turn(np.stack(frames), len(audio))
        except Exception:
            log.exception("listening failed at the end of a turn; reading it whole")
            return None
