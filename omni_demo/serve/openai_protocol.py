"""OpenAI Chat Completions with audio output, as plain functions: a request body becomes Qwen
messages + GenerationOptions (or an ApiError naming the field), and events become response
chunks. No HTTP and no torch here; `serve.py` does the serving, `remote.py` the client side.

Field names follow OpenAI's; where OpenAI has no field, vLLM's (`video_url`, `audio_url`,
`top_k`, `repetition_penalty`, `min_tokens`) or ours (`max_audio_tokens`, `min_audio_tokens`,
`use_audio_in_video`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import mimetypes
import re
import time
import uuid
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, MAX_SEED, SAMPLE_RATE, GenerationOptions
from omni_demo.events import Finished, pcm16

MB = 1 << 20
AUDIO_FORMATS = ("pcm16", "wav")
OPENAI_INPUT_AUDIO_FORMATS = ("wav", "mp3")
INPUT_AUDIO_FORMATS = (*OPENAI_INPUT_AUDIO_FORMATS, "flac", "ogg", "m4a", "webm")  # ffmpeg reads them all
URL_PARTS = {"image": "image_url", "audio": "audio_url", "video": "video_url"}  # Qwen kind -> part with a data URL
MEDIA_PARTS = {**{part: kind for kind, part in URL_PARTS.items()}, "input_audio": "audio"}  # part -> Qwen kind
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "stream_options", "parallel_tool_calls")
# Accepted only at their no-op value, so a client relying on them hears that they are not supported.
NEUTRAL_FIELDS = {"n": (1,), "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,),
                  "top_logprobs": (0,), "stop": ([],), "tools": ([],), "tool_choice": ("none",),
                  "logit_bias": ({},), "response_format": ({"type": "text"},)}
OPTION_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "max_completion_tokens",
                 "min_tokens", "max_audio_tokens", "min_audio_tokens", "seed", "use_audio_in_video", "cache_salt")
MAX_SALT_CHARS = 256
MEDIA_TYPE = re.compile(r"[A-Za-z]+/[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")  # type/subtype, RFC 6838's characters
MAX_JSON_DEPTH = 64  # a chat request nests 6 levels; deeper bodies are refused before anything reads them
KNOWN_FIELDS = {"model", "messages", "modalities", "audio", "stream", *OPTION_FIELDS, *IGNORED_FIELDS,
                *NEUTRAL_FIELDS}
MAX_ERROR_CHARS = 600


class ApiError(Exception):
    """An error with its HTTP status, sent as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        message = message if len(message) <= MAX_ERROR_CHARS else message[:MAX_ERROR_CHARS] + "…"
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param)


@dataclass(frozen=True)
class ApiLimits:
    """What one HTTP request may carry, on top of the engine's own `config.Limits`."""

    max_request_bytes: int = 100 * MB  # the JSON body, refused (413) before it is parsed
    max_media_bytes: int = 64 * MB  # one decoded image, audio or video part (413)
    max_tokens: int = 4096  # ceiling of max_tokens / max_completion_tokens (thinker tokens)
    max_audio_tokens: int = 4096  # ceiling of max_audio_tokens (talker codes, 50 per second of speech)
    upload_timeout_s: float = 120.0  # the whole body must arrive within this (408)

    def __post_init__(self):
        if min(self.max_request_bytes, self.max_media_bytes, self.max_tokens, self.max_audio_tokens,
               self.upload_timeout_s) <= 0:
            raise ValueError("API limits must be positive")


@dataclass(frozen=True)
class Media:
    """A decoded media part, written to a file by `write_media` just before the engine reads it."""

    kind: str  # "image", "audio" or "video"
    data: bytes
    suffix: str  # ".png", ".wav", ...


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # Qwen format; media parts hold Media until `write_media`
    options: GenerationOptions
    stream: bool
    include_usage: bool  # stream_options.include_usage: also send OpenAI's separate usage chunk
    audio_format: str | None  # "pcm16" or "wav"; None: text only
    cache_salt: str | None = None  # as vLLM's: the conversation cache is this salt's (and the API key's) alone


def parse_body(raw: bytes) -> dict:
    """The body as JSON: an object, nested at most MAX_JSON_DEPTH deep, every string and key valid
    Unicode (a lone surrogate cannot be tokenized, written or logged). 400 naming the field otherwise."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except ValueError as exc:  # e.g. an integer of over 4,300 digits
        raise ApiError(400, f"the request body has a value this server does not take: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """Walk the body without recursion: depth, strings and keys (valid Unicode), integers (in range)."""
    todo = [(body, "", 1)]
    while todo:
        value, where, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           param=where or None)
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where or "(top level)")
                todo.append((item, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(value, list):
            todo += [(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1 << 64:
            raise bad(where, "this integer is out of any range this API takes")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(where, "contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode text") from None


def parse_chat_request(body: dict, voices: list[str], limits: ApiLimits = ApiLimits()) -> ChatRequest:
    """Validate a Chat Completions body; every problem is a 400 (413 for oversized media) naming its field."""
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise ApiError(400, f"unrecognized request argument: {unknown[0]}", param=unknown[0])
    for name, allowed in NEUTRAL_FIELDS.items():  # by type too: true is not 1, 0 is not false
        value = body.get(name)
        if value is not None and not any(type(value) is type(ok) and value == ok for ok in allowed):
            raise bad(name, f"not supported by this server (only {json.dumps(allowed[0])})")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "required, a string (see GET /v1/models)")
    stream = _flag(body, "stream")
    speech, voice, audio_format = _audio_output(body, voices, stream)
    options = _options(body, limits, speech=speech, voice=voice)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("stream_options", "must be an object")
    if not isinstance(stream_options.get("include_usage", False), bool):
        raise bad("stream_options.include_usage", "must be true or false")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT_CHARS):
        raise bad("cache_salt", f"must be a non-empty string of at most {MAX_SALT_CHARS} characters")
    return ChatRequest(model, parse_messages(body.get("messages"), limits), options, stream,
                       bool(stream_options.get("include_usage")), audio_format, salt)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(name, "must be true or false")
    return bool(value)


def _audio_output(body: dict, voices: list[str], stream: bool) -> tuple[bool, str, str | None]:
    """(speech on, voice, audio format) from `modalities` and `audio`."""
    modalities = body.get("modalities") or ["text"]
    if (not isinstance(modalities, list) or not all(isinstance(m, str) for m in modalities)
            or not set(modalities) <= {"text", "audio"} or "text" not in modalities):
        raise bad("modalities", 'must be ["text"] or ["text", "audio"]')
    if "audio" not in modalities:
        return False, voices[0], None
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise bad("audio", 'must be an object like {"voice": "Chelsie", "format": "pcm16"}')
    voice = audio.get("voice", voices[0])
    matches = [v for v in voices if isinstance(voice, str) and v.lower() == voice.lower()]
    if not matches:
        raise bad("audio.voice", f"{voice!r} is not a voice of this model; choose one of {', '.join(voices)}")
    audio_format = audio.get("format", "pcm16" if stream else "wav")
    if audio_format not in AUDIO_FORMATS:
        raise bad("audio.format", f"{audio_format!r} is not supported; use pcm16 or wav")
    if stream and audio_format != "pcm16":
        raise bad("audio.format", "streamed audio is pcm16 only (as in OpenAI's API)")
    return True, matches[0], audio_format


def _number(body: dict, name: str, low: float, high: float, *, integer: bool = False,
            low_open: bool = False) -> float | int | None:
    """A finite number in [low, high] ((low, high] with low_open), or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, not {json.dumps(value)[:40]}")
    finite = not isinstance(value, float) or math.isfinite(value)
    if not finite or not low <= value <= high or (low_open and value == low):
        raise bad(name, f"must be {'>' if low_open else '≥'} {low:g} and ≤ {high:g}, not {value}")
    return value


def _options(body: dict, limits: ApiLimits, *, speech: bool, voice: str) -> GenerationOptions:
    defaults = GenerationOptions()
    temperature = _number(body, "temperature", 0, 2)
    max_tokens = _number(body, "max_completion_tokens", 1, limits.max_tokens, integer=True)
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _number(body, "max_tokens", 1, limits.max_tokens, integer=True), "max_tokens"
    max_tokens = max_tokens or min(defaults.max_new_tokens, limits.max_tokens)
    max_audio = _number(body, "max_audio_tokens", 1, limits.max_audio_tokens, integer=True) or min(
        defaults.max_audio_tokens, limits.max_audio_tokens)
    use_audio_in_video = _flag(body, "use_audio_in_video")
    try:
        return GenerationOptions(
            voice=voice, speech=speech, greedy=temperature == 0, temperature=temperature or None,
            top_p=_number(body, "top_p", 0, 1, low_open=True),
            top_k=_number(body, "top_k", 1, 1 << 20, integer=True),
            repetition_penalty=_number(body, "repetition_penalty", 0, 10, low_open=True),
            max_new_tokens=max_tokens, min_new_tokens=_number(body, "min_tokens", 0, max_tokens, integer=True) or 0,
            max_audio_tokens=max_audio,
            min_audio_tokens=_number(body, "min_audio_tokens", 0, max_audio, integer=True) or 0,
            use_audio_in_video=use_audio_in_video,
            seed=_number(body, "seed", 0, MAX_SEED, integer=True),
        )
    except ValueError as exc:  # GenerationOptions' own cross-field checks
        raise ApiError(400, f"{exc}", param=param) from exc


def parse_messages(messages: Any, limits: ApiLimits) -> list[dict]:
    """OpenAI messages -> Qwen messages, with Qwen's default system prompt when none is given
    (the model only speaks with it)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "required, a non-empty list")
    parsed = [_message(message, f"messages[{i}]", limits) for i, message in enumerate(messages)]
    if parsed[-1]["role"] != "user":
        raise bad(f"messages[{len(parsed) - 1}]", "the last message must come from the user")
    if not any(m["role"] == "system" for m in parsed):
        parsed.insert(0, {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]})
    return parsed


def _message(message: Any, where: str, limits: ApiLimits) -> dict:
    if not isinstance(message, dict):
        raise bad(where, "must be an object with role and content")
    role = message.get("role")
    role = "system" if role == "developer" else role
    if not isinstance(role, str) or role not in ("system", "user", "assistant"):
        raise bad(f"{where}.role", f"{message.get('role')!r} is not supported; use system, user or assistant "
                                   "(this server has no tool calling)")
    if message.get("tool_calls"):
        raise bad(f"{where}.tool_calls", "tool calling is not supported")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("audio"):
        raise bad(f"{where}.audio", "this server keeps no replies, so audio ids cannot be resolved; "
                                    "send the reply's transcript as content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content", "must be a string or a list of parts")
    parts = [_part(part, f"{where}.content[{i}]", role, limits) for i, part in enumerate(content)]
    parts = [part for part in parts if part is not None]
    if role == "user" and not parts:
        raise bad(f"{where}.content", "is empty: send text or media")
    return {"role": role, "content": parts}


def _part(part: Any, where: str, role: str, limits: ApiLimits) -> dict | None:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}.text", "must be a string")
        return {"type": "text", "text": part["text"]} if part["text"].strip() else None
    if not isinstance(kind, str) or kind not in MEDIA_PARTS:
        raise bad(f"{where}.type", f"{str(kind)[:40]!r} is not supported; use text, {', '.join(MEDIA_PARTS)}")
    if role != "user":
        raise bad(where, f"media parts are only accepted in user messages, not {role}")
    media_kind = MEDIA_PARTS[kind]
    value = part.get(kind)
    if kind == "input_audio":
        media = _input_audio(value, f"{where}.input_audio", limits)
    else:
        url = value.get("url") if isinstance(value, dict) else None
        media = _data_url(url, media_kind, f"{where}.{kind}.url", limits)
    return {"type": media_kind, media_kind: media}


def _input_audio(value: Any, where: str, limits: ApiLimits) -> Media:
    if not isinstance(value, dict):
        raise bad(where, 'must be an object like {"data": "<base64>", "format": "wav"}')
    audio_format = value.get("format")
    if audio_format not in INPUT_AUDIO_FORMATS:
        raise bad(f"{where}.format", f"{audio_format!r} is not supported; use {', '.join(INPUT_AUDIO_FORMATS)}")
    return Media("audio", _base64(value.get("data"), f"{where}.data", limits), f".{audio_format}")


def _data_url(url: Any, kind: str, where: str, limits: ApiLimits) -> Media:
    """`data:<kind>/<subtype>;base64,<data>`. Other URLs are refused: this server fetches nothing."""
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = f"{url[:40]!r}" if isinstance(url, str) else "missing"
        raise bad(where, f"must be a data URL (data:{kind}/...;base64,...); got {shown}. "
                         "This server does not fetch remote URLs or read its own files")
    header, sep, payload = url[5:].partition(",")
    mime, *params = header.split(";")
    if not sep or not params or params[-1] != "base64":
        raise bad(where, "the data URL must be base64-encoded (data:<type>;base64,<data>)")
    if not MEDIA_TYPE.fullmatch(mime) or mime.split("/")[0].lower() != kind:
        raise bad(where, f"the data URL's type {mime[:40] or '(none)'!r} is not a media type {kind}/<subtype>")
    suffix = mimetypes.guess_extension(mime.lower()) or f".{mime.split('/')[-1][:10].lower()}"
    return Media(kind, _base64(payload, where, limits), suffix)


def _base64(data: Any, where: str, limits: ApiLimits) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(where, "must be a non-empty base64 string")
    if len(data) * 3 // 4 > limits.max_media_bytes:
        raise ApiError(413, f"{where}: this part is about {len(data) * 3 // 4 / MB:.1f} MB; the limit is "
                            f"{limits.max_media_bytes / MB:g} MB", param=where, code="media_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad(where, f"is not valid base64 ({exc})") from exc


def write_media(messages: list[dict], directory: Path) -> list[dict]:
    """Write each Media part to a file in `directory` (named after its place in the request, so
    the engine's errors point at it) and return the messages with paths."""
    written = []
    for i, message in enumerate(messages):
        parts = []
        for j, part in enumerate(message["content"]):
            media = part.get(part["type"])
            if isinstance(media, Media):
                path = directory / f"message{i}-part{j}-{media.kind}{media.suffix}"
                path.write_bytes(media.data)
                part = {"type": media.kind, media.kind: str(path)}
            parts.append(part)
        written.append({"role": message["role"], "content": parts})
    return written


def encode_audio(samples: np.ndarray, audio_format: str) -> str:
    """base64 of float samples at 24 kHz as little-endian pcm16, or as a whole wav file."""
    pcm = pcm16(samples).astype("<i2").tobytes()
    if audio_format == "wav":
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(SAMPLE_RATE)
            wav.writeframes(pcm)
        pcm = buffer.getvalue()
    return base64.b64encode(pcm).decode("ascii")


def usage(finished: Finished) -> dict:
    s = finished.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.text_tokens + s.audio_tokens,
            "total_tokens": s.prompt_tokens + s.text_tokens + s.audio_tokens,
            "prompt_tokens_details": {"cached_tokens": s.reused_prompt_tokens},  # from the conversation cache
            "completion_tokens_details": {"text_tokens": s.text_tokens, "audio_tokens": s.audio_tokens}}


def finish_reason(finished: Finished) -> str:
    return "length" if finished.stop_reason == "length" else "stop"


@dataclass
class ChunkEncoder:
    """Builds the response objects of one reply (ids and timestamps shared by its chunks)."""

    model: str
    audio_format: str | None  # None: text only
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    audio_id: str = field(default_factory=lambda: f"audio_{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict, reason: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}

    def first_chunk(self) -> dict:
        return self.chunk({"role": "assistant", "content": ""})

    def text_chunk(self, text: str) -> dict:
        """The text in `content`; with speech on, also as the audio's transcript (where OpenAI puts it)."""
        delta = {"content": text}
        if self.audio_format:
            delta["audio"] = {"id": self.audio_id, "transcript": text}
        return self.chunk(delta)

    def audio_chunk(self, samples: np.ndarray) -> dict:
        return self.chunk({"audio": {"id": self.audio_id, "data": encode_audio(samples, "pcm16")}})

    def last_chunk(self, finished: Finished) -> dict:
        delta = {"audio": {"id": self.audio_id, "expires_at": self.created}} if self.audio_format else {}
        return self.chunk(delta, finish_reason(finished), usage=usage(finished))

    def usage_chunk(self, finished: Finished) -> dict:
        """OpenAI's trailing chunk for stream_options.include_usage."""
        return {**self.chunk({}), "choices": [], "usage": usage(finished)}

    def completion(self, finished: Finished, samples: np.ndarray) -> dict:
        message = {"role": "assistant", "content": finished.text}
        if self.audio_format:
            message["audio"] = {"id": self.audio_id, "data": encode_audio(samples, self.audio_format),
                                "transcript": finished.text, "expires_at": self.created}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(finished)}],
                "usage": usage(finished)}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()
