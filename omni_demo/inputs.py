"""Turn a conversation (Qwen message format) into thinker inputs, with clear errors.

Every media part is planned from its header first (omni_demo.media: sizes, durations, counts,
refusals), then read within that plan and processed one part at a time, so an unreadable file is
named in the error and a file seen before is not processed again (omni_demo.prompt).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Limits
from .errors import Cancelled, InputError, first_line
from .media import PartPlan, describe, plan_part, read_audio, read_image, read_video

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


def check_request(messages: list[dict], limits: Limits) -> None:
    """Refuse a request over its size limits (messages, characters, media parts per turn) before
    anything is read. Turns are user messages; a user turn's parts are counted together."""
    if len(messages) > limits.max_messages:
        raise InputError(f"this conversation has {len(messages)} messages; the limit is {limits.max_messages}")
    chars = sum(len(part["text"]) for message in messages for part in message["content"] if part["type"] == "text")
    if chars > limits.max_text_chars:
        raise InputError(f"this conversation has {chars} characters of text; the limit is {limits.max_text_chars}")
    per_turn = {"image": ("images", limits.max_images_per_turn), "audio": ("audio clips", limits.max_audio_clips_per_turn),
                "video": ("videos", limits.max_videos_per_turn)}
    for message in messages:
        for kind, (noun, limit) in per_turn.items():
            count = sum(part["type"] == kind for part in message["content"])
            if count > limit:
                raise InputError(f"this turn has {count} {noun}; the limit is {limit} ({count - limit} too many)")


def image_max_pixels(processor) -> int:
    """The image processor's own max_pixels budget (Qwen2-VL: 12,845,056 px = 16,384 tokens)."""
    image_processor = processor.image_processor
    value = getattr(image_processor, "max_pixels", None) or (getattr(image_processor, "size", None) or {}).get("longest_edge")
    return int(value or 16384 * 28 * 28)


def plan_media(messages: list[dict], limits: Limits, *, use_audio_in_video: bool, token_budget: int,
               max_image_pixels: int) -> list[list[PartPlan]]:
    """Each message's media parts planned from their headers (omni_demo.media), in order; the
    reading options go into the parts. Nothing is decoded here."""
    plans = []
    for message in messages:
        row = []
        for part in message["content"]:
            if part["type"] == "text":
                continue
            with_audio = use_audio_in_video and part["type"] == "video"
            plan = plan_part(part, limits, with_audio=with_audio, token_budget=token_budget,
                             image_max_pixels=max_image_pixels)
            part.update(plan.options)
            if "nframes" in plan.options:
                part["max_frames"] = plan.options["nframes"]
            row.append(plan)
        plans.append(row)
    return plans


def read_media(part: dict, plan: PartPlan, with_audio: bool) -> dict:
    """Read one media part within its plan. -> its processor arguments (images=[...], audio=[...],
    videos=[...]; a video `with_audio` also gets its sound track as its own audio)."""
    kind, source = part["type"], part[part["type"]]
    try:
        if isinstance(source, (str, Path)):
            if kind == "image":
                return {"images": [read_image(str(source), plan)]}
            if kind == "audio":
                return {"audio": [read_audio(str(source), plan.name, max_s=plan.max_s)]}
            video = read_video(str(source), plan)
            if not with_audio:
                return {"videos": [video]}
            audio = read_audio(str(source), plan.name, max_s=plan.max_s, what="video")
            return {"videos": [video], "audio": [audio], "audio_from_video_indices": [0], "load_audio_from_video": True}
        return _read_in_memory(part)
    except InputError:
        raise
    except Exception as exc:  # PIL, av and torchcodec each raise their own types
        raise InputError(f"could not read {kind} {describe(source)}: {first_line(exc)}") from exc


def _read_in_memory(part: dict) -> dict:
    """Arrays and PIL images given directly (CLI, tests): through qwen-omni-utils as they are."""
    from qwen_omni_utils import fetch_image

    if part["type"] == "image":
        return {"images": [fetch_image(part)]}
    if part["type"] == "audio":
        from qwen_omni_utils.v2_5.audio_process import process_audio_info

        return {"audio": [process_audio_info([{"role": "user", "content": [part]}], False)[0]]}
    raise InputError(f"a {part['type']} part needs a file")


def media_items(processor, messages: list[dict], plans: list[list[PartPlan]], use_audio_in_video: bool,
                cache: MediaCache | None = None, cancel: threading.Event | None = None) -> list[MediaItem]:
    """Every media part of the conversation through the processor, in message order; an item
    already in `cache` (same bytes, same reading options) is neither read nor processed again."""
    from .prompt import media_key, process_media

    items = []
    for message, row in zip(messages, plans):
        for part, plan in zip((p for p in message["content"] if p["type"] != "text"), row):
            with_audio = use_audio_in_video and part["type"] == "video"
            key = media_key(part, with_audio)
            item = cache.get(key) if cache is not None else None
            if item is None:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                media = read_media(part, plan, with_audio)
                try:
                    item = process_media(processor, part["type"], key, media)
                except Exception as exc:
                    raise InputError(f"the processor rejected {part['type']} {plan.name}: {first_line(exc)}") from exc
                if cache is not None:
                    cache.put(item)
            items.append(item)
    return items


def prepare_inputs(processor, messages: Any, *, use_audio_in_video: bool, device=None, limits: Limits = Limits(),
                   padding_rows: tuple[list[dict], ...] = (), media_cache: MediaCache | None = None,
                   token_budget: int | None = None, plans: list[list[PartPlan]] | None = None,
                   cancel: threading.Event | None = None) -> PreparedInputs:
    """Validate, plan and read the media within its budgets, tokenize the chat template
    (omni_demo.prompt). `messages` with `plans` were checked and planned already (the engine does
    that once for the whole conversation). The batch is this conversation alone, or with text-only
    `padding_rows` after it (transformers' reference on its intended, padded path: omni_demo.reference)."""
    from .prompt import build_prompt, join_tensors, pad_rows

    if plans is None:
        messages = normalize_conversation(messages)
        check_request(messages, limits)
        plans = plan_media(messages, limits, use_audio_in_video=use_audio_in_video,
                           token_budget=token_budget or limits.max_video_tokens, max_image_pixels=image_max_pixels(processor))
    items = media_items(processor, messages, plans, use_audio_in_video, media_cache, cancel)
    ids, spans = build_prompt(processor, messages, items)
    rows = [ids] + [build_prompt(processor, normalize_conversation(row), [])[0] for row in padding_rows]
    tokenizer = processor.tokenizer
    input_ids, attention_mask = pad_rows(rows, tokenizer.pad_token_id, tokenizer.padding_side)
    tensors = {"input_ids": input_ids, "attention_mask": attention_mask, **join_tensors(items)}
    if device is not None:
        tensors = {name: value.to(device) for name, value in tensors.items()}
    has_video = any(part["type"] == "video" for message in messages for part in message["content"])
    return PreparedInputs(tensors, messages, use_audio_in_video and has_video, spans)
