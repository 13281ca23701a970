"""Conversations in Qwen's message format: roles and parts checked, string contents made parts,
and the request's size limits (messages, characters, media per turn) checked before anything is
read. No torch and no Gradio: the page, the call and the HTTP API check requests with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from omni_demo.config import Limits
from omni_demo.errors import InputError

from .clips import VideoClip

MEDIA_TYPES = ("image", "audio", "video")
ROLES = ("system", "user", "assistant")


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
    if isinstance(source, np.ndarray) or (kind == "image" and hasattr(source, "convert")) or (
            kind == "video" and isinstance(source, VideoClip)):
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
