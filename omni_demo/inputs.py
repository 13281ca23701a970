"""Turn a conversation (Qwen message format) into thinker inputs, with clear errors.

Media is read with qwen-omni-utils one part at a time, so an unreadable file is named in the
error, then everything goes through the Qwen processor in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import Limits
from .errors import InputError, first_line

MEDIA_TYPES = ("image", "audio", "video")
ROLES = ("system", "user", "assistant")


@dataclass
class PreparedInputs:
    tensors: dict  # processor output (input_ids [B, L], attention_mask, pixel_values, ...) on the model device
    messages: list[dict]  # the conversation exactly as given to the processor
    use_audio_in_video: bool  # after checking that every video has a sound track

    @property
    def input_ids(self):
        return self.tensors["input_ids"]

    @property
    def prompt_len(self) -> int:
        return int(self.tensors["input_ids"].shape[1])


def system_message(text: str) -> dict:
    return {"role": "system", "content": [{"type": "text", "text": text}]}


def normalize_conversation(messages: Any) -> list[dict]:
    """Check roles and parts; string contents become one text part. Returns new message and part
    dicts (the caller's are never changed)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("the conversation is empty: send at least one user message")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(f"message {index} needs a role of {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise InputError(f"message {index} ({message['role']}) has no content list")
        parts = [_normalize_part(part, index) for part in content]
        parts = [part for part in parts if part is not None]
        if message["role"] == "user" and not parts:
            raise InputError(f"message {index} (user) is empty: type something or attach a file")
        normalized.append({"role": message["role"], "content": parts})
    if normalized[-1]["role"] != "user":
        raise InputError("the last message must come from the user")
    return normalized


def _normalize_part(part: Any, index: int) -> dict | None:
    if not isinstance(part, dict) or part.get("type") not in ("text", *MEDIA_TYPES):
        raise InputError(f"message {index} has a part that is not text, image, audio or video: {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"message {index} has a text part without text")
        return dict(part) if text.strip() else None
    source = part.get(kind)
    if isinstance(source, np.ndarray) or (kind == "image" and hasattr(source, "convert")):
        return dict(part)
    if not isinstance(source, (str, Path)) or not str(source):
        raise InputError(f"message {index} has a {kind} part without a file")
    path = Path(str(source).removeprefix("file://")).expanduser()
    if not path.is_file():
        raise InputError(f"{kind} file not found: {path}")
    return {**part, kind: str(path)}


def check_limits(messages: list[dict], limits: Limits) -> list[dict]:
    """Refuse media over the limits (before decoding any of it); bound the frames read per video."""
    for message in messages:
        images = sum(part["type"] == "image" for part in message["content"])
        if images > limits.max_images_per_turn:
            raise InputError(f"this turn has {images} images; the limit is {limits.max_images_per_turn} "
                             f"({images - limits.max_images_per_turn} too many)")
        for part in message["content"]:
            kind = part["type"]
            if kind in ("audio", "video") and isinstance(part[kind], str):
                limit = limits.max_audio_s if kind == "audio" else limits.max_video_s
                seconds = _duration(part[kind])
                if seconds is not None and seconds > limit:
                    raise InputError(f"{kind} {_describe(part[kind])} is {seconds:.1f} s long; the limit is "
                                     f"{limit:g} s ({seconds - limit:.1f} s over)")
            if kind == "video":
                part["max_frames"] = min(int(part.get("max_frames", limits.max_video_frames)), limits.max_video_frames)
    return messages


def _duration(path: str) -> float | None:
    """Container duration in seconds, read from the header; None when it cannot be probed (the
    media reader then reports the file as unreadable)."""
    import av

    try:
        with av.open(path) as container:
            if container.duration is not None:
                return container.duration / av.time_base
            streams = [s for s in container.streams if s.duration is not None and s.time_base is not None]
            return max((float(s.duration * s.time_base) for s in streams), default=None)
    except Exception:
        return None


def _describe(source: Any) -> str:
    return Path(source).name if isinstance(source, str) else type(source).__name__


def _has_sound(path: str) -> bool:
    import av

    with av.open(path) as container:
        return any(stream.type == "audio" for stream in container.streams)


def load_media(messages: list[dict], use_audio_in_video: bool) -> dict:
    """Read every media part in message order. Returns the processor's media arguments."""
    from qwen_omni_utils import fetch_image, fetch_video

    images, videos, audios, audio_from_video = [], [], [], []
    for message in messages:
        for part in message["content"]:
            kind = part["type"]
            if kind == "text":
                continue
            source = part[kind]
            try:
                if kind == "image":
                    images.append(fetch_image(part))
                elif kind == "audio":
                    audios.append(_read_audio(part, from_video=False))
                    audio_from_video.append(None)
                else:
                    videos.append(fetch_video(part))
                    if use_audio_in_video:
                        if not _has_sound(source):
                            raise InputError(
                                f"video {_describe(source)} has no sound track; switch off 'use audio in video'"
                            )
                        audios.append(_read_audio(part, from_video=True))
                        audio_from_video.append(len(videos) - 1)
            except InputError:
                raise
            except Exception as exc:  # PIL, av, librosa and torchcodec each raise their own types
                raise InputError(f"could not read {kind} {_describe(source)}: {first_line(exc)}") from exc
    return {
        "images": images or None,
        "videos": videos or None,
        "audio": audios or None,
        "audio_from_video_indices": audio_from_video if use_audio_in_video and videos else None,
    }


def _read_audio(part: dict, *, from_video: bool) -> np.ndarray:
    """[n] float32 at 16 kHz, as qwen-omni-utils reads it."""
    from qwen_omni_utils.v2_5.audio_process import process_audio_info

    samples = process_audio_info([{"role": "user", "content": [part]}], from_video)[0]
    if len(samples) == 0:
        raise InputError(f"{part['type']} {_describe(part[part['type']])} contains no sound")
    return samples


def prepare_inputs(processor, messages: Any, *, use_audio_in_video: bool, device=None, limits: Limits = Limits(),
                   padding_rows: tuple[list[dict], ...] = ()) -> PreparedInputs:
    """Validate, read media, apply the chat template and run the processor. The batch is this
    conversation alone, or with text-only `padding_rows` after it (transformers' reference on its
    intended, left-padded path: omni_demo.reference)."""
    messages = check_limits(normalize_conversation(messages), limits)
    media = load_media(messages, use_audio_in_video)
    use_audio_in_video = use_audio_in_video and media["videos"] is not None
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in (messages, *padding_rows)]
    kwargs = {"load_audio_from_video": True} if use_audio_in_video else {}
    if not use_audio_in_video:
        media.pop("audio_from_video_indices")
    try:
        tensors = processor(text=texts, return_tensors="pt", padding=True, **media, **kwargs)
    except Exception as exc:
        raise InputError(f"the processor rejected this input: {first_line(exc)}") from exc
    if device is not None:
        tensors = tensors.to(device)
    return PreparedInputs(dict(tensors), messages, use_audio_in_video)
