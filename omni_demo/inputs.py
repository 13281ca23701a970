"""Turn a conversation (Qwen message format) into thinker inputs, with clear errors.

Media is read with qwen-omni-utils and processed one part at a time, so an unreadable file is
named in the error and a file seen before is not processed again (omni_demo.prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Limits
from .errors import InputError, first_line

if TYPE_CHECKING:  # omni_demo.prompt imports torch; this module must not (the UI imports it)
    from .prompt import MediaCache, MediaItem, MediaSpan

MEDIA_TYPES = ("image", "audio", "video")
ROLES = ("system", "user", "assistant")


@dataclass
class PreparedInputs:
    tensors: dict  # processor output (input_ids [B, L], attention_mask, pixel_values, ...) on the model device
    messages: list[dict]  # the conversation exactly as given to the processor
    use_audio_in_video: bool  # after checking that every video has a sound track
    media: list[MediaSpan] = field(default_factory=list)  # each media item and its tokens in input_ids

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


def read_media(part: dict, with_audio: bool) -> dict:
    """Read one media part. -> its processor arguments (images=[...], audio=[...], videos=[...];
    a video `with_audio` also gets its sound track as its own audio)."""
    from qwen_omni_utils import fetch_image, fetch_video

    kind, source = part["type"], part[part["type"]]
    try:
        if kind == "image":
            return {"images": [fetch_image(part)]}
        if kind == "audio":
            return {"audio": [_read_audio(part, from_video=False)]}
        if not with_audio:
            return {"videos": [fetch_video(part)]}
        if not _has_sound(source):
            raise InputError(f"video {_describe(source)} has no sound track; switch off 'use audio in video'")
        return {"videos": [fetch_video(part)], "audio": [_read_audio(part, from_video=True)],
                "audio_from_video_indices": [0], "load_audio_from_video": True}
    except InputError:
        raise
    except Exception as exc:  # PIL, av, librosa and torchcodec each raise their own types
        raise InputError(f"could not read {kind} {_describe(source)}: {first_line(exc)}") from exc


def _read_audio(part: dict, *, from_video: bool) -> np.ndarray:
    """[n] float32 at 16 kHz, as qwen-omni-utils reads it."""
    from qwen_omni_utils.v2_5.audio_process import process_audio_info

    samples = process_audio_info([{"role": "user", "content": [part]}], from_video)[0]
    if len(samples) == 0:
        raise InputError(f"{part['type']} {_describe(part[part['type']])} contains no sound")
    return samples


def media_items(processor, messages: list[dict], use_audio_in_video: bool,
                cache: MediaCache | None = None) -> list[MediaItem]:
    """Every media part of the conversation through the processor, in message order; an item
    already in `cache` (same bytes, same reading options) is neither read nor processed again."""
    from .prompt import media_key, process_media

    items = []
    for message in messages:
        for part in message["content"]:
            if part["type"] == "text":
                continue
            with_audio = use_audio_in_video and part["type"] == "video"
            key = media_key(part, with_audio)
            item = cache.get(key) if cache is not None else None
            if item is None:
                try:
                    item = process_media(processor, part["type"], key, read_media(part, with_audio))
                except InputError:
                    raise
                except Exception as exc:
                    raise InputError(f"the processor rejected {part['type']} {_describe(part[part['type']])}: "
                                     f"{first_line(exc)}") from exc
                if cache is not None:
                    cache.put(item)
            items.append(item)
    return items


def prepare_inputs(processor, messages: Any, *, use_audio_in_video: bool, device=None, limits: Limits = Limits(),
                   padding_rows: tuple[list[dict], ...] = (), media_cache: MediaCache | None = None) -> PreparedInputs:
    """Validate, read and process the media, tokenize the chat template (omni_demo.prompt). The
    batch is this conversation alone, or with text-only `padding_rows` after it (transformers'
    reference on its intended, padded path: omni_demo.reference)."""
    from .prompt import build_prompt, join_tensors, pad_rows

    messages = check_limits(normalize_conversation(messages), limits)
    items = media_items(processor, messages, use_audio_in_video, media_cache)
    ids, spans = build_prompt(processor, messages, items)
    rows = [ids] + [build_prompt(processor, normalize_conversation(row), [])[0] for row in padding_rows]
    tokenizer = processor.tokenizer
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, tokenizer.padding_side)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, **join_tensors(items)}
    if device is not None:
        tensors = {name: value.to(device) for name, value in tensors.items()}
    has_video = any(part["type"] == "video" for message in messages for part in message["content"])
    return PreparedInputs(tensors, messages, use_audio_in_video and has_video, spans)
