"""Turn a conversation (Qwen message format) into thinker inputs, with clear errors.

Every media part is planned from its header first (omni_demo.inputs.media: sizes, durations, counts,
refusals), then read within that plan and processed one part at a time, so an unreadable file is
named in the error and a file seen before is not processed again (omni_demo.inputs.prompt).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omni_demo.config import Limits
from omni_demo.errors import Cancelled, InputError, first_line

from .clips import VideoClip
from .media import PartPlan, describe, plan_part, read_audio, read_image, read_video
from .messages import check_request, normalize_conversation
from .prompt import MediaCache, MediaItem, MediaSpan, build_prompt, join_tensors, media_key, pad_rows, process_media


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


def image_max_pixels(processor) -> int:
    """The image processor's own max_pixels budget (Qwen2-VL: 12,845,056 px = 16,384 tokens)."""
    image_processor = processor.image_processor
    value = getattr(image_processor, "max_pixels", None) or (getattr(image_processor, "size", None) or {}).get("longest_edge")
    return int(value or 16384 * 28 * 28)


def plan_media(messages: list[dict], limits: Limits, *, use_audio_in_video: bool, token_budget: int,
               max_image_pixels: int) -> list[list[PartPlan]]:
    """Each message's media parts planned from their headers (omni_demo.inputs.media), in order; the
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
        return _read_in_memory(part, with_audio)
    except InputError:
        raise
    except Exception as exc:  # PIL, av and torchcodec each raise their own types
        raise InputError(f"could not read {kind} {describe(source)}: {first_line(exc)}") from exc


def _read_in_memory(part: dict, with_audio: bool) -> dict:
    """Arrays, PIL images and clips given directly (CLI, tests, a call's camera turns): through
    qwen-omni-utils as they are; a clip's frames as read_video returns a file's."""
    from qwen_omni_utils import fetch_image

    if isinstance(part[part["type"]], VideoClip):
        clip = part["video"]
        videos = {"videos": [clip_tensor(clip.frames, part.get("nframes"), part.get("resized_height"),
                                         part.get("resized_width"))]}
        return videos | {"audio": [clip.audio], "audio_from_video_indices": [0],
                         "load_audio_from_video": True} if with_audio else videos
    if part["type"] == "image":
        return {"images": [fetch_image(part)]}
    if part["type"] == "audio":
        from qwen_omni_utils.v2_5.audio_process import process_audio_info

        return {"audio": [process_audio_info([{"role": "user", "content": [part]}], False)[0]]}
    raise InputError(f"a {part['type']} part needs a file")


def clip_tensor(frames, nframes: int | None = None, height: int | None = None, width: int | None = None):
    """[n, h, w, 3] uint8 frames -> [n, 3, h, w] float32 (0..255), as read_video gives a file's;
    with a plan's options, `nframes` of them evenly spaced, resized to `height` x `width`."""
    import torch

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if nframes is not None and nframes != len(video):
        video = video[torch.linspace(0, len(video) - 1, nframes).round().long()]
    if height is not None and (height, width) != tuple(video.shape[2:]):
        video = torch.nn.functional.interpolate(video, size=(height, width), mode="bicubic", antialias=True)
        video = video.clamp(0, 255)
    return video


def media_items(processor, messages: list[dict], plans: list[list[PartPlan]], use_audio_in_video: bool,
                cache: MediaCache | None = None, cancel: threading.Event | None = None) -> list[MediaItem]:
    """Every media part of the conversation through the processor, in message order; an item
    already in `cache` (same bytes, same reading options) is neither read nor processed again."""
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
    (omni_demo.inputs.prompt). `messages` with `plans` were checked and planned already (the engine does
    that once for the whole conversation). The batch is this conversation alone, or with text-only
    `padding_rows` after it (transformers' reference on its intended, padded path: omni_demo.tools.reference)."""
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
