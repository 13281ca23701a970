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
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from omni_demo.errors import InputError
from omni_demo.inputs.clips import VIDEO_FPS, clip_frame_count, video_frame_size

MIN_SIDE = 28  # pixels: one vision patch after merging
log = logging.getLogger(__name__)
RATE_WINDOW_S = 4.0  # frames per second are counted over this much of the frames' own time stamps
BYTES_WINDOW_S = 10.0  # bytes per second over this much of arrival time (a stalled upload may burst)
LEAD_S = 10.0  # a frame may be stamped at most this far ahead of the audio the call heard (upload lag)
STALE_S = 5.0  # no frame this long before a turn: the camera stopped sending (a turn is then audio only)


@dataclass(frozen=True)
class CameraConfig:
    max_frame_bytes: int = 256_000  # one JPEG as sent (the page sends ~20 KB)
    max_frame_pixels: int = 640 * 480  # one frame's pixels (the page scales to ~110,000: what the model uses)
    max_fps: float = 4.0  # frames per second of the page's own time stamps (it sends 2)
    max_bytes_per_s: int = 400_000  # JPEG bytes per second a page may send
    max_frames_per_call: int = 2_500  # frames one call may send (2 per second: 20 minutes of camera)
    max_turn_frames: int = 240  # frames one turn keeps (2 per second: 2 minutes); also the frames held

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

        with Image.open(io.BytesIO(self.jpeg), formats=["JPEG"]) as image:
            image = image.convert("RGB")
            if size is not None and image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            return np.asarray(image)


def checked_jpeg(jpeg: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) of a baseline JPEG that decodes whole within `max_pixels`: what a page's
    canvas makes. InputError for anything else (another format, a progressive JPEG, a cut file)
    before it is kept, so a turn never meets a frame it cannot read."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                raise InputError(f"a camera frame is {width}×{height}; its sides must be at least {MIN_SIDE} pixels")
            if width * height > max_pixels:
                raise InputError(f"a camera frame is {width}×{height}; the limit is {max_pixels:,} pixels")
            if image.info.get("progressive") or image.info.get("progression"):
                raise InputError("a camera frame must be a baseline JPEG")
            image.load()  # the whole file: a cut one raises here, not in a turn
            return width, height
    except InputError:
        raise
    except Exception as exc:  # PIL raises its own kinds for each broken file
        raise InputError("a camera frame is not a readable JPEG picture") from exc


class Camera:
    """One call's camera frames. `put` from the page's handler thread, the rest from the call's loop."""

    def __init__(self, config: CameraConfig | None = None):
        self.config = config or CameraConfig()
        self.on = False  # the page says its camera is on
        self.frames: list[Frame] = []  # by at_s; those older than the last turn's start are dropped
        self.received = 0  # frames this call was sent
        self.stamps: collections.deque = collections.deque()  # at_s of the frames within RATE_WINDOW_S
        self.arrivals: collections.deque = collections.deque()  # (arrived, bytes) within BYTES_WINDOW_S
        self.seq = -1  # the newest message taken: an older one, overtaken on the way, changes nothing
        self.refused: str | None = None  # why the camera was refused; it stays off for the call
        self.lock = threading.Lock()

    def put(self, on: bool, frames: list[tuple[float, bytes]], seq: int | None = None,
            heard_s: float | None = None) -> None:
        """The page's camera state and the frames it took since its last message (`seq`: the page's
        count of its messages; `heard_s`: the call's audio heard so far). Over a budget:
        InputError, and the camera is off for the rest of the call (its microphone goes on)."""
        with self.lock:
            if self.refused is not None:
                raise InputError(self.refused)
            if seq is not None:
                if seq <= self.seq:
                    return  # overtaken by a newer message (camera off, then a late frame from before)
                self.seq = seq
            try:
                checked = [self._check(at_s, jpeg, heard_s) for at_s, jpeg in frames]
            except InputError as exc:
                self.refuse(str(exc))
                raise InputError(self.refused) from exc
            self.on = bool(on)
            if not self.on:
                self.frames = []  # off means off: the next turn is audio only
                return
            for frame in checked:
                bisect.insort(self.frames, frame, key=lambda f: f.at_s)
            del self.frames[: -self.config.max_turn_frames]  # what one turn can use, at most

    def refuse(self, reason: str) -> None:
        """The camera is off for the rest of the call: its frames go, later ones are refused."""
        self.refused, self.on, self.frames = f"Camera switched off for this call: {reason}", False, []

    def _check(self, at_s: float, jpeg: bytes, heard_s: float | None) -> Frame:
        config = self.config
        if (not isinstance(at_s, (int, float)) or isinstance(at_s, bool) or not 0 <= at_s < 86_400
                or (heard_s is not None and at_s > heard_s + LEAD_S)):
            raise InputError("a camera frame has no valid time stamp")
        if not isinstance(jpeg, bytes) or len(jpeg) > config.max_frame_bytes:
            raise InputError(f"a camera frame is over {config.max_frame_bytes // 1000} KB")
        self.received += 1
        if self.received > config.max_frames_per_call:
            raise InputError(f"this call sent over {config.max_frames_per_call} camera frames")
        self.stamps.append(float(at_s))
        while self.stamps and self.stamps[0] < at_s - RATE_WINDOW_S:
            self.stamps.popleft()
        if sum(stamp > at_s - RATE_WINDOW_S for stamp in self.stamps) > config.max_fps * RATE_WINDOW_S:
            raise InputError(f"the page sent over {config.max_fps:g} camera frames per second")
        now = time.monotonic()
        self.arrivals.append((now, len(jpeg)))
        while self.arrivals and now - self.arrivals[0][0] > BYTES_WINDOW_S:
            self.arrivals.popleft()
        if sum(size for _, size in self.arrivals) > config.max_bytes_per_s * BYTES_WINDOW_S:
            raise InputError(f"the page sent over {config.max_bytes_per_s // 1000} KB of camera frames per second")
        checked_jpeg(jpeg, config.max_frame_pixels)
        return Frame(float(at_s), jpeg)

    def turn_frames(self, start_s: float, end_s: float, count: int | None = None) -> list[np.ndarray] | None:
        """The turn from `start_s` to `end_s` of the call's audio as frames at VIDEO_FPS (`count`, or
        as many as its clip gets: clip_frame_count), all the size of the newest; None while the camera
        is off, or when its newest frame is over STALE_S older than the turn (it stopped sending)."""
        with self.lock:
            if not self.on or not self.frames or self.frames[-1].at_s < start_s - STALE_S:
                return None
            frames = list(self.frames)
        count = min(count or clip_frame_count(end_s - start_s), self.config.max_turn_frames // 2 * 2)
        times = [frame.at_s for frame in frames]
        picked = []
        for k in range(count):
            index = bisect.bisect_right(times, start_s + k / VIDEO_FPS) - 1  # the newest taken by then
            picked.append(frames[max(index, 0)])
        height, width = video_frame_size(*picked[-1].decode().shape[:2])
        size = (width, height)  # as the model reads a frame: sides multiples of 28
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


def camera_turn(camera: Camera, start_s: float, end_s: float, audio: np.ndarray, use_audio_in_video: bool,
                save_video, save_audio=None) -> tuple[dict, list[str]] | None:
    """The turn from `start_s` to `end_s` of the call's audio (its sound: `audio`) as a user message
    with its video, and the files made for it (the video, then its sound where that is a part of
    its own); None while the camera is off. A turn that cannot be made a video stays an audio
    turn, and the camera is off for the rest of the call."""
    frames = camera.turn_frames(start_s, end_s)
    path = None if frames is None else save_clip(camera, save_video, frames, audio)
    if path is None:
        return None
    message = video_turn(path, audio, use_audio_in_video, save_audio)
    return message, [part[part["type"]] for part in message["content"] if isinstance(part[part["type"]], str)]


def save_clip(camera: Camera, save_video, frames: list[np.ndarray], audio: np.ndarray) -> str | None:
    """`save_video(frames, audio)`: the turn's video file; None where it cannot be made (the turn
    stays an audio turn, and the camera is off for the rest of the call)."""
    try:
        return save_video(frames, audio)
    except Exception as exc:  # a camera only adds to a turn: it goes on as audio
        log.exception("could not make a video of this turn")
        camera.refuse(f"its frames could not be made a video ({type(exc).__name__})")
        return None
