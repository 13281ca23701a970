"""Media budgets decided from headers, then bounded reading.

`probe` reads only a file's header (and, when the header has no length, its packets, never
decoding them); `plan_part` turns that into the reading options qwen-omni-utils takes per part
(`max_pixels`, `nframes`, ...) and a token estimate, or refuses the part before any pixel or sample
is decoded. The readers then decode within the plan: an image once at no more than the decode
budget (JPEG scaled down while decoding), a video one sampled frame at a time, each frame resized
at once, an audio track no further than its limit.

Peak memory of reading one part (float32 unless named): an image, its decoded pixels x 4 bytes
(RGBA) + its resized copy; a video, FFmpeg's decoder state (a few full-size YUV frames, 12 MB
each in 4K) + its resized frames (nframes x 3 x h' x w' x 4 bytes, ~9 KB per video token
budgeted); an audio clip, 64 KB per second at 16 kHz.
No torch at import time (torch and torchcodec are imported where a video is read).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_demo.config import INPUT_SAMPLE_RATE, Limits
from omni_demo.errors import InputError, first_line

from .clips import PATCH, VIDEO_FPS, VIDEO_MAX_FRAME_TOKENS, VIDEO_MIN_FRAME_TOKENS, VideoClip, smart_resize

AUDIO_RATE = INPUT_SAMPLE_RATE
AUDIO_TOKENS_PER_S = 25  # 100 mel frames per second, halved by the encoder and again by its pooling


@dataclass(frozen=True)
class Probe:
    """What a media file's header says (no pixel or sample decoded)."""

    width: int = 0
    height: int = 0
    frames: int = 0  # video frames (0: unknown or not a video)
    fps: float = 0.0
    seconds: float | None = None  # duration of the longest stream; None: unknown
    has_video: bool = False
    has_audio: bool = False
    codec: str = ""  # container format or image format, for messages

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class PartPlan:
    """How one media part will be read, and what it will cost."""

    kind: str
    name: str  # file name, for messages
    tokens: int  # estimated prompt tokens (exact for images and videos, +-1 per clip for audio)
    audio_s: float = 0.0  # seconds of sound fed to the model (audio clip, or a video's track)
    max_s: float = 0.0  # reading stops, and the part is refused, past this many seconds (a header may lie)
    options: dict[str, Any] = field(default_factory=dict)  # reading options added to the part
    probe: Probe = field(default_factory=Probe)


def describe(source: Any) -> str:
    return Path(source).name if isinstance(source, (str, Path)) else type(source).__name__


def unreadable(kind: str, path: str, exc: Exception) -> InputError:
    """'could not read audio x.flac: unreadable FLAC file (why)', without the server's paths."""
    fmt = Path(path).suffix.lstrip(".").upper() or kind
    cause = re.sub(r":?\s*'?/[^\s']*'?", "", first_line(exc, 160)).strip() or type(exc).__name__
    return InputError(f"could not read {kind} {describe(path)}: unreadable {fmt} file ({cause})")


def probe(kind: str, path: str, max_scan_s: float) -> Probe:
    """Header facts of an image, audio or video file; InputError naming the cause when there are none."""
    if kind == "image":
        return _probe_image(path)
    import av

    try:
        with av.open(path) as container:
            video = container.streams.video[0] if container.streams.video else None
            audio = container.streams.audio[0] if container.streams.audio else None
            seconds = _header_seconds(container)
            if seconds is None and (video or audio):
                seconds = _scan_seconds(container, video or audio, max_scan_s)
            result = Probe(has_video=video is not None, has_audio=audio is not None, seconds=seconds,
                           codec=container.format.name.split(",")[0])
            if video is not None:
                fps = float(video.average_rate or video.guessed_rate or 0)
                frames = int(video.frames or 0) or (int(round(seconds * fps)) if seconds and fps else 0)
                result = Probe(video.codec_context.width, video.codec_context.height, frames, fps, seconds,
                               True, audio is not None, result.codec)
    except InputError:
        raise
    except Exception as exc:  # av raises its own error types for each container problem
        raise unreadable(kind, path, exc) from exc
    if kind == "video" and not result.has_video:
        raise InputError(f"video {describe(path)} has no video stream" +
                         (" (it is audio only: attach it as audio)" if result.has_audio else " (it is empty)"))
    if kind == "audio" and not result.has_audio:
        raise InputError(f"audio {describe(path)} has no audio track")
    return result


def _probe_image(path: str) -> Probe:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return Probe(image.width, image.height, codec=image.format or "image")
    except Exception as exc:
        raise unreadable("image", path, exc) from exc


def _header_seconds(container) -> float | None:
    import av

    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    streams = [s for s in container.streams if s.duration and s.time_base is not None]
    return max((float(s.duration * s.time_base) for s in streams), default=None)


def _scan_seconds(container, stream, max_scan_s: float) -> float | None:
    """Duration from the packets' time stamps (demuxed, not decoded) when the header has none, as
    in a FLAC written to a pipe or a browser's webm recording; stops once past `max_scan_s`."""
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is None or packet.time_base is None:
            continue
        end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
        if end > max_scan_s:
            break
    return end or None


def plan_part(part: dict, limits: Limits, *, with_audio: bool, token_budget: int,
              image_max_pixels: int) -> PartPlan:
    """The reading plan of one media part, decided from its header; InputError when it is over a limit.
    `token_budget`: most tokens one image or video may take (the rest of the window decides the rest)."""
    kind, source = part["type"], part[part["type"]]
    if isinstance(source, VideoClip):
        return _plan_clip(source, limits, with_audio, token_budget)
    if not isinstance(source, (str, Path)):  # in-memory arrays and images (CLI/tests): already decoded
        return _plan_in_memory(part, kind, source)
    name = describe(source)
    max_s = limits.max_audio_s if kind == "audio" else limits.max_video_s
    info = probe(kind, str(source), max_scan_s=max_s + 1)
    if kind != "image" and info.seconds is not None and info.seconds > max_s:
        raise InputError(f"{kind} {name} is {info.seconds:.1f} s long; the limit is {max_s:g} s "
                         f"({info.seconds - max_s:.1f} s over)")
    if kind == "image":
        return _plan_image(name, info, limits, min(image_max_pixels, limits.max_image_tokens * PATCH**2,
                                                    max(token_budget, 4) * PATCH**2))
    if kind == "audio":
        seconds = min(info.seconds or max_s, max_s)
        return PartPlan("audio", name, audio_tokens(seconds), seconds, max_s, {}, info)
    return _plan_video(part, name, info, limits, with_audio, min(limits.max_video_tokens, token_budget))


def _plan_in_memory(part: dict, kind: str, source: Any) -> PartPlan:
    if kind == "audio":
        seconds = len(source) / AUDIO_RATE
        return PartPlan(kind, describe(source), audio_tokens(seconds), seconds)
    if kind == "image" and hasattr(source, "size"):
        h, w = smart_resize(source.size[1], source.size[0], part.get("max_pixels", 16384 * PATCH**2))
        return PartPlan(kind, describe(source), (h // PATCH) * (w // PATCH))
    return PartPlan(kind, describe(source), 0)


def _plan_clip(clip: VideoClip, limits: Limits, with_audio: bool, token_budget: int) -> PartPlan:
    """A clip in memory is planned as a file of its frames and length would be. Within the budget
    that reads it as it is: all its frames at their size, with no reading options (so its content
    key is the clip's own: a call's watched turn is found under it); over it, fewer and smaller
    frames, as for a file."""
    n, height, width, _ = clip.frames.shape
    if clip.seconds > limits.max_video_s:
        raise InputError(f"this video is {clip.seconds:.1f} s long; the limit is {limits.max_video_s:g} s")
    info = Probe(width, height, n, VIDEO_FPS, clip.seconds, True, True, "in memory")
    plan = _plan_video({}, "a camera turn", info, limits, with_audio, min(limits.max_video_tokens, token_budget))
    if plan.options == {"nframes": n, "resized_height": height, "resized_width": width}:
        plan.options = {}
    return plan


def _plan_image(name: str, info: Probe, limits: Limits, max_pixels: int) -> PartPlan:
    h, w = smart_resize(info.height, info.width, max_pixels)
    decoded = info.pixels
    if info.codec == "JPEG":  # decoded at 1/2, 1/4 or 1/8 scale while still at least h x w (PIL's draft)
        scale = max(s for s in (1, 2, 4, 8) if info.width // s >= w and info.height // s >= h or s == 1)
        decoded = math.ceil(info.width / scale) * math.ceil(info.height / scale)
    if decoded > limits.max_image_pixels:
        raise InputError(f"image {name} is {info.width}×{info.height} ({info.pixels / 1e6:.1f} MP); the limit is "
                         f"{limits.max_image_pixels / 1e6:g} MP before resizing. Send a smaller picture.")
    return PartPlan("image", name, (h // PATCH) * (w // PATCH), 0.0, 0.0, {"max_pixels": max_pixels}, info)


def _plan_video(part: dict, name: str, info: Probe, limits: Limits, with_audio: bool, token_budget: int) -> PartPlan:
    if info.pixels > limits.max_frame_pixels:
        raise InputError(f"video {name} is {info.width}×{info.height} ({info.pixels / 1e6:.1f} MP per frame); "
                         f"the limit is {limits.max_frame_pixels / 1e6:g} MP per frame")
    if with_audio and not info.has_audio:
        raise InputError(f"video {name} has no audio track; switch off 'use audio in video'")
    seconds = info.seconds or (info.frames / info.fps if info.fps else 0)
    # Frame pairs the budget affords at the smallest frame size, and no more than the limit.
    affordable = 2 * max(token_budget // VIDEO_MIN_FRAME_TOKENS, 1)
    max_frames = min(int(part.get("max_frames", limits.max_video_frames)), limits.max_video_frames, affordable)
    wanted = int(seconds * VIDEO_FPS) if seconds else max_frames
    nframes = max(2, min(max_frames, wanted, info.frames or max_frames) // 2 * 2)
    max_pixels = max(min(VIDEO_MAX_FRAME_TOKENS * PATCH**2, token_budget * PATCH**2 * 2 // nframes),
                     int(VIDEO_MIN_FRAME_TOKENS * PATCH**2 * 1.05))
    h, w = smart_resize(info.height, info.width, max_pixels, min_pixels=VIDEO_MIN_FRAME_TOKENS * PATCH**2)
    tokens = nframes // 2 * (h // PATCH) * (w // PATCH)
    audio_s = min(seconds, limits.max_video_s) if with_audio else 0.0
    return PartPlan("video", name, tokens + (audio_tokens(audio_s) if with_audio else 0), audio_s, limits.max_video_s,
                    {"nframes": nframes, "resized_height": h, "resized_width": w}, info)


def audio_tokens(seconds: float) -> int:
    """The audio encoder's output length for `seconds` of sound (feature frames, halved twice)."""
    frames = math.ceil(seconds * 100)
    return max(((frames - 1) // 2 + 1 - 2) // 2 + 1, 1)


def read_image(path: str, plan: PartPlan):
    """A PIL image within the plan: decoded once (JPEG at a reduced scale), converted to RGB."""
    from PIL import Image
    from qwen_omni_utils import fetch_image

    with Image.open(path) as image:
        if image.format == "JPEG":
            h, w = smart_resize(image.height, image.width, plan.options["max_pixels"])
            image.draft("RGB", (w, h))  # decode at the smallest DCT scale still at least w x h
        if image.width * image.height > plan.probe.pixels:  # the header lied about the size
            raise InputError(f"image {plan.name} decodes larger than its header says")
        image.load()
        return fetch_image({"image": image, "max_pixels": plan.options["max_pixels"]})


def read_video(path: str, plan: PartPlan):
    """[nframes, 3, h, w] float32 (0..255), as qwen-omni-utils' fetch_video returns it, but resized
    while decoding (FFmpeg scales each sampled frame before it becomes an RGB tensor; bilinear with
    antialiasing where fetch_video resizes the full-size frames afterwards, bicubic)."""
    import torch
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    size = (plan.options["resized_height"], plan.options["resized_width"])
    decoder = VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate", transforms=[Resize(size)])
    total = decoder.metadata.num_frames or plan.probe.frames
    if not total:
        raise InputError(f"video {plan.name} has no frames")
    nframes = plan.options["nframes"]
    indices = torch.linspace(0, total - 1, nframes).round().long().clamp(max=total - 1).tolist()
    return decoder.get_frames_at(indices=indices).data.float()  # [nframes, 3, h, w]


def read_audio(path: str, name: str, max_s: float, *, what: str = "audio") -> np.ndarray:
    """[n] float32 mono at 16 kHz; decoding stops, and the clip is refused, once past `max_s`."""
    import av

    chunks, samples, limit = [], 0, int(max_s * AUDIO_RATE)
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise InputError(f"{what} {name} has no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    samples += len(chunk)
                if samples > limit + AUDIO_RATE // 10:  # a little slack for resampler delay
                    raise InputError(f"{what} {name} is longer than the limit of {max_s:g} s")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except InputError:
        raise
    except Exception as exc:
        raise unreadable(what, path, exc) from exc
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if len(audio) == 0:
        raise InputError(f"{what} {name} contains no sound")
    return audio
