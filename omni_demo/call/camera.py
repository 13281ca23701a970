"""The call's camera: the frames a page sends while its camera is on, checked against the call's
budgets, kept on the call's audio clock, and picked at the model's 2 frames per second for a turn.

The page stamps each frame with the seconds of microphone audio recorded when it was taken (the
clock `TurnDetector` counts in), so a turn's frames are those within its audio:

    camera = Camera(CameraConfig())
    camera.put(True, [(12.3, jpeg_bytes), ...])    # from the page's handler, any thread
    frames = camera.turn_frames(start_s, end_s)    # None while the camera is off: an audio turn

Frame k of a turn shows what the camera saw at `start_s + k / 2`: the newest frame taken by then,
which is a frame from before the turn when the camera sent nothing new (a still picture, a slow
upload), or the first frame after it when the camera came on during the turn.
"""

from __future__ import annotations

import bisect
import collections
import io
import threading
import time
from dataclasses import dataclass

import numpy as np

from omni_demo.errors import InputError
from omni_demo.inputs.clips import VIDEO_FPS, clip_frame_count

MIN_SIDE = 28  # pixels: one vision patch after merging
RATE_WINDOW_S = 4.0  # frames and bytes per second are averaged over this much of the page's sending


@dataclass(frozen=True)
class CameraConfig:
    max_frame_bytes: int = 256_000  # one JPEG as sent (the page sends ~20 KB)
    max_frame_pixels: int = 640 * 480  # one frame's pixels (the page scales to ~100,000: what the model uses)
    max_fps: float = 4.0  # frames per second a page may send (it sends 2)
    max_bytes_per_s: int = 400_000  # JPEG bytes per second a page may send
    max_frames_per_call: int = 2_500  # frames one call may send (2 per second: 20 minutes of camera)
    max_turn_frames: int = 240  # frames one turn keeps (2 per second: 2 minutes)

    def __post_init__(self):
        if min(self.max_frame_bytes, self.max_frame_pixels, self.max_fps, self.max_bytes_per_s,
               self.max_frames_per_call, self.max_turn_frames) <= 0:
            raise ValueError(f"invalid camera settings: {self}")


@dataclass(frozen=True)
class Frame:
    at_s: float  # seconds into the call's audio when it was taken
    jpeg: bytes

    def decode(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """[h, w, 3] uint8 RGB; `size` (width, height): resized to it (a turn's frames share one size)."""
        from PIL import Image

        with Image.open(io.BytesIO(self.jpeg)) as image:
            image = image.convert("RGB")
            if size is not None and image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            return np.asarray(image)


def frame_size(jpeg: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's header; InputError when it is no JPEG."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            if image.format != "JPEG":
                raise InputError(f"a camera frame must be a JPEG, not {image.format}")
            return image.size
    except InputError:
        raise
    except Exception as exc:  # PIL raises its own kinds for each broken file
        raise InputError("a camera frame is not a readable picture") from exc


class Camera:
    """One call's camera frames. `put` from the page's handler thread, the rest from the call's loop."""

    def __init__(self, config: CameraConfig | None = None):
        self.config = config or CameraConfig()
        self.on = False  # the page says its camera is on
        self.frames: list[Frame] = []  # by at_s; those older than the last turn's start are dropped
        self.received = 0  # frames this call was sent
        self.recent: collections.deque = collections.deque()  # (arrived, bytes) within RATE_WINDOW_S
        self.refused: str | None = None  # why the camera was refused; it stays off for the call
        self.lock = threading.Lock()

    def put(self, on: bool, frames: list[tuple[float, bytes]]) -> None:
        """The page's camera state and the frames it took since its last message. Over a budget:
        InputError, and the camera is off for the rest of the call (its microphone goes on)."""
        with self.lock:
            if self.refused is not None:
                raise InputError(self.refused)
            try:
                checked = [self._check(at_s, jpeg) for at_s, jpeg in frames]
            except InputError as exc:
                self.refused, self.on, self.frames = f"Camera switched off for this call: {exc}", False, []
                raise InputError(self.refused) from exc
            self.on = bool(on)
            if not self.on:
                self.frames = []  # off means off: the next turn is audio only
                return
            for frame in checked:
                bisect.insort(self.frames, frame, key=lambda f: f.at_s)

    def _check(self, at_s: float, jpeg: bytes) -> Frame:
        config, now = self.config, time.monotonic()
        if not isinstance(at_s, (int, float)) or isinstance(at_s, bool) or not 0 <= at_s < 86_400:
            raise InputError("a camera frame has no valid time stamp")
        if not isinstance(jpeg, bytes) or len(jpeg) > config.max_frame_bytes:
            raise InputError(f"a camera frame is over {config.max_frame_bytes // 1000} KB")
        width, height = frame_size(jpeg)
        if min(width, height) < MIN_SIDE:
            raise InputError(f"a camera frame is {width}×{height}; its sides must be at least {MIN_SIDE} pixels")
        if width * height > config.max_frame_pixels:
            raise InputError(f"a camera frame is {width}×{height}; the limit is {config.max_frame_pixels:,} pixels")
        self.received += 1
        if self.received > config.max_frames_per_call:
            raise InputError(f"this call sent over {config.max_frames_per_call} camera frames")
        while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
            self.recent.popleft()
        self.recent.append((now, len(jpeg)))
        if len(self.recent) > config.max_fps * RATE_WINDOW_S:
            raise InputError(f"the page sent over {config.max_fps:g} camera frames per second")
        if sum(size for _, size in self.recent) > config.max_bytes_per_s * RATE_WINDOW_S:
            raise InputError(f"the page sent over {config.max_bytes_per_s // 1000} KB of camera frames per second")
        return Frame(float(at_s), jpeg)

    def turn_frames(self, start_s: float, end_s: float) -> list[np.ndarray] | None:
        """The turn from `start_s` to `end_s` of the call's audio as frames at VIDEO_FPS (as many as
        its clip gets: clip_frame_count), all the size of the newest; None while the camera is off."""
        with self.lock:
            if not self.on or not self.frames:
                return None
            frames = list(self.frames)
        count = min(clip_frame_count(end_s - start_s), self.config.max_turn_frames // 2 * 2)
        times = [frame.at_s for frame in frames]
        picked = []
        for k in range(count):
            index = bisect.bisect_right(times, start_s + k / VIDEO_FPS) - 1  # the newest taken by then
            picked.append(frames[max(index, 0)])
        width, height = frame_size(picked[-1].jpeg)
        size = (width // 2 * 2, height // 2 * 2)  # even sides, as the video encoder's 4:2:0 needs
        decoded: dict[int, np.ndarray] = {}  # a frame picked twice is decoded once
        for frame in picked:
            if id(frame) not in decoded:
                decoded[id(frame)] = frame.decode(size)
        return [decoded[id(frame)] for frame in picked]

    def forget_before(self, at_s: float) -> None:
        """A turn began at `at_s`: frames before it are no longer needed, but for the newest of them
        (what the camera shows until it sends another)."""
        with self.lock:
            keep = max(bisect.bisect_right([f.at_s for f in self.frames], at_s) - 1, 0)
            del self.frames[:keep]


def video_turn(path: str, audio: np.ndarray, use_audio_in_video: bool, save_audio=None) -> dict:
    """The user message of a turn spoken with the camera on: its video (`path`, the frames with the
    turn's sound as their track). Without use_audio_in_video the model reads no video's sound, so
    the turn's sound goes beside it as its own part (its file where `save_audio` makes one)."""
    parts = [{"type": "video", "video": path}]
    if not use_audio_in_video:
        parts.append({"type": "audio", "audio": save_audio(audio) if save_audio is not None else audio})
    return {"role": "user", "content": parts}
