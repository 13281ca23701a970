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

from fractions import Fraction
from pathlib import Path

import numpy as np

from omni_demo.config import INPUT_SAMPLE_RATE as AUDIO_RATE

VIDEO_FPS = 2.0  # frames per second of video the model reads (qwen-omni-utils samples at this rate)
AUDIO_BITRATE = 128_000  # AAC: speech is transparent here, and browsers play it everywhere


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
