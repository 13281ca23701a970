"""A video call's camera turn as a video file: the frames the page sent, at the model's 2 frames
per second, and the turn's sound, written as an MP4 (H.264 + AAC) that browsers play and that the
rest of the pipeline reads like any recorded clip (omni_demo.inputs.media: one video path for a
webcam recording, an uploaded file and a call turn).

Frame k of a clip shows the camera at `start_s + k / fps`. The planner samples a file at 2 frames
per second (media.VIDEO_FPS, `int(seconds * 2)` frames, an even number), so a clip is written with
exactly that many frames: each one the model sees is one the page sent, none repeated or skipped.
No torch here: av (FFmpeg) writes, numpy and PIL hold the frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from omni_demo.config import INPUT_SAMPLE_RATE as AUDIO_RATE
from omni_demo.errors import InputError

VIDEO_FPS = 2.0  # frames per second of video the model reads (qwen-omni-utils samples at this rate)
PATCH = 28  # pixels per merged vision token side (14 px patches, 2 x 2 merge)
VIDEO_MIN_FRAME_TOKENS = 128  # qwen-omni-utils' floor per frame pair, whatever the budget
VIDEO_MAX_FRAME_TOKENS = 768  # per frame pair (the video processor's max_pixels, 602,112 px)
AUDIO_BITRATE = 128_000  # AAC: speech is transparent here, and browsers play it everywhere


def smart_resize(height: int, width: int, max_pixels: int, min_pixels: int = 4 * PATCH**2) -> tuple[int, int]:
    """qwen-omni-utils' smart_resize: both sides multiples of 28, pixels within [min, max]."""
    if min(height, width) <= 0:
        raise InputError("the picture has no pixels")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"the picture is {width}×{height}: its sides may differ at most 200 times")
    h, w = max(PATCH, round(height / PATCH) * PATCH), max(PATCH, round(width / PATCH) * PATCH)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(PATCH, math.floor(height / beta / PATCH) * PATCH), max(PATCH, math.floor(width / beta / PATCH) * PATCH)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / PATCH) * PATCH, math.ceil(width * beta / PATCH) * PATCH
    return h, w


def video_frame_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) of a video frame as the model reads it within its own frame budget: sides
    multiples of 28 (qwen-omni-utils' smart_resize between 128 and 768 tokens a frame pair)."""
    return smart_resize(height, width, VIDEO_MAX_FRAME_TOKENS * PATCH**2, min_pixels=VIDEO_MIN_FRAME_TOKENS * PATCH**2)


def clip_frame_count(seconds: float) -> int:
    """Frames a clip of `seconds` gets: what the planner will sample from it (an even number, at least 2)."""
    return max(2, int(seconds * VIDEO_FPS) // 2 * 2)


def write_clip(path: str | Path, frames: list[np.ndarray], audio: np.ndarray) -> str:
    """`frames` ([h, w, 3] uint8 RGB, one per 1 / VIDEO_FPS s, even sides) and `audio` (float32
    mono 16 kHz) as an MP4. Deterministic: the same frames and sound make the same bytes (one
    encoder thread, no time stamps from the clock), so a turn rebuilt offline is the call's turn."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        container.metadata.clear()
        video = container.add_stream("libx264", rate=Fraction(VIDEO_FPS).limit_denominator(1000),
                                     options={"crf": "18", "preset": "veryfast", "threads": "1", "bframes": "0"})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.thread_count = 1
        sound = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
        sound.bit_rate = AUDIO_BITRATE
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype=np.uint8), format="rgb24")
            picture.pts = index
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        samples = np.ascontiguousarray(np.clip(audio, -1, 1), dtype=np.float32).reshape(1, -1)
        block = 1024  # the AAC frame size
        for start in range(0, samples.shape[1], block):
            piece = av.AudioFrame.from_ndarray(samples[:, start : start + block], format="flt", layout="mono")
            piece.sample_rate, piece.pts = AUDIO_RATE, start
            container.mux(sound.encode(piece))
        container.mux(sound.encode(None))
    return str(path)


@dataclass(eq=False)
class VideoClip:
    """A video held in memory, as a call's camera turn is read by the model in this process: its
    frames exactly as the page sent them and its sound exactly as the call heard it (the MP4 of
    the same turn is for the chat and for a remote server). A media part `{"type": "video",
    "video": VideoClip(...)}`; omni_demo.inputs.media plans it, omni_demo.inputs.prepare reads it."""

    frames: np.ndarray  # [n, h, w, 3] uint8 RGB at VIDEO_FPS: n even, h and w multiples of PATCH
    audio: np.ndarray  # [samples] float32 mono at 16 kHz

    def __post_init__(self):
        n, height, width, channels = self.frames.shape
        if (self.frames.dtype != np.uint8 or channels != 3 or n < 2 or n % 2 or height % PATCH
                or width % PATCH or self.audio.ndim != 1 or self.audio.dtype != np.float32):
            raise ValueError(f"not a clip of whole frame pairs at multiples of {PATCH} px: "
                             f"{self.frames.shape} {self.frames.dtype}, audio {self.audio.shape} {self.audio.dtype}")

    @property
    def seconds(self) -> float:
        return len(self.audio) / AUDIO_RATE

    def tobytes(self) -> bytes:
        """What its content key digests (omni_demo.inputs.prompt.media_key)."""
        return repr(self.frames.shape).encode() + self.frames.tobytes() + self.audio.tobytes()
