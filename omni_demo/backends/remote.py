"""The UI's backend over HTTP: an OpenAI-compatible server (`python -m omni_demo.serve`, one or
many replicas) instead of a model in this process. No torch here, so a CPU-only Space or a laptop
can front GPU servers:

    python app.py --backend http://gpu-host:8000/v1 --api-key secret

`RemoteBackend.stream` takes the same Qwen messages and GenerationOptions as `OmniEngine.stream`
and yields the same events, decoded from the server's SSE chunks.
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from omni_demo.config import SAMPLE_RATE, GenerationOptions, Limits
from omni_demo.errors import InputError
from omni_demo.events import AudioChunk, ContextTrimmed, Event, Finished, ReplyClock, TextDelta
from omni_demo.inputs.messages import MEDIA_TYPES
from omni_demo.serve.openai_protocol import OPENAI_INPUT_AUDIO_FORMATS, URL_PARTS

log = logging.getLogger(__name__)
CLIENT_ERRORS = (400, 404, 413, 422)  # the request was wrong: shown like local input errors


class RemoteError(RuntimeError):
    """The server failed, refused us, or cannot be reached; the message says which."""


def media_part(kind: str, path: str) -> dict:
    """A Qwen media part (a local file) as an OpenAI content part carrying the file as base64."""
    try:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError as exc:
        raise InputError(f"cannot read {kind} file {Path(path).name}: {exc.strerror}") from exc
    suffix = Path(path).suffix.lower().lstrip(".")
    if kind == "audio" and suffix in OPENAI_INPUT_AUDIO_FORMATS:
        return {"type": "input_audio", "input_audio": {"data": data, "format": suffix}}
    mime = mimetypes.guess_type(path)[0] or f"{kind}/{suffix or 'octet-stream'}"
    name = URL_PARTS[kind]
    return {"type": name, name: {"url": f"data:{mime};base64,{data}"}}


def openai_messages(messages: list[dict]) -> list[dict]:
    converted = []
    for message in messages:
        parts = []
        for part in message["content"]:
            kind = part["type"]
            parts.append({"type": "text", "text": part["text"]} if kind == "text" else media_part(kind, part[kind]))
        converted.append({"role": message["role"], "content": parts})
    return converted


def request_body(model: str, messages: list[dict], options: GenerationOptions) -> dict:
    """A streaming Chat Completions request; non-OpenAI options go as the server's extra fields."""
    if any(part["type"] in MEDIA_TYPES and not isinstance(part[part["type"]], str)
           for message in messages for part in message["content"]):
        raise InputError("only media files can be sent to a remote server")
    body = {"model": model, "messages": openai_messages(messages), "stream": True,
            "max_completion_tokens": options.max_new_tokens, "max_audio_tokens": options.max_audio_tokens,
            "use_audio_in_video": options.use_audio_in_video}
    if options.speech:
        body |= {"modalities": ["text", "audio"], "audio": {"voice": options.voice, "format": "pcm16"}}
    optional = {"temperature": 0 if options.greedy else options.temperature, "top_p": options.top_p,
                "top_k": options.top_k, "repetition_penalty": options.repetition_penalty, "seed": options.seed,
                "min_tokens": options.min_new_tokens or None, "min_audio_tokens": options.min_audio_tokens or None,
                # a browser session's own cache on the server too (the UI's key is every session's)
                "cache_salt": options.cache_scope.party if options.cache_scope.private and options.cache_scope.party
                else None}
    return body | {key: value for key, value in optional.items() if value is not None}


def error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:600]
    except (ValueError, KeyError, TypeError):
        return response.text[:300] or response.reason_phrase


def http_error(response: httpx.Response) -> Exception:
    message = error_message(response)
    if response.status_code in CLIENT_ERRORS:
        return InputError(message)
    if response.status_code == 401:
        return RemoteError(f"the server refused the API key (--api-key): {message}")
    if response.status_code in (429, 503):
        return RemoteError(f"the server is busy, try again shortly: {message}")
    return RemoteError(f"the server failed (HTTP {response.status_code}): {message}")


class ChunkDecoder:
    """Turns one reply's SSE chunks into engine events; `finished` builds the closing Finished."""

    def __init__(self, messages: list[dict]):
        self.messages = messages
        self.text, self.samples = "", 0
        self.clock = ReplyClock()
        self.usage: dict = {}
        self.finish_reason: str | None = None

    def feed(self, chunk: dict) -> Iterator[Event]:
        if chunk.get("error"):
            error = chunk["error"]
            raise RemoteError(f"the reply failed on the server: {error.get('message', error)}")
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            audio = delta.get("audio") or {}
            text = delta.get("content") if delta.get("content") is not None else audio.get("transcript")
            if text:
                self.text += text
                yield self._marked(TextDelta(text))
            if audio.get("data"):
                pcm = np.frombuffer(base64.b64decode(audio["data"]), dtype="<i2")
                yield self._marked(AudioChunk(pcm.astype(np.float32) / 32767.0, self.samples))
                self.samples += len(pcm)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def _marked(self, event: TextDelta | AudioChunk) -> TextDelta | AudioChunk:
        self.clock.mark(event)
        return event

    def finished(self, cancelled: bool = False) -> Finished:
        details = self.usage.get("completion_tokens_details") or {}
        stats = self.clock.stats(
            audio_s=self.samples / SAMPLE_RATE, prompt_tokens=self.usage.get("prompt_tokens", 0),
            reused_prompt_tokens=(self.usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            text_tokens=details.get("text_tokens", 0), audio_tokens=details.get("audio_tokens", 0))
        reason = "cancelled" if cancelled else "length" if self.finish_reason == "length" else "eos"
        return Finished(self.text, [], [], self.samples, reason, stats, self.messages)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (single-line data, as OpenAI-style servers send)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


class RemoteBackend:
    """The `Backend` (omni_demo.backends.protocol) over HTTP: an `omni_demo.serve` server's replies."""

    def __init__(self, base_url: str, api_key: str | None = None, *, wait_s: float = 30.0, timeout_s: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))
        card = self._model_card(wait_s)
        self.model_name: str = card["id"]
        self.voices: list[str] = list(card.get("voices") or [GenerationOptions.voice])
        self.is_random: bool = bool(card.get("is_random", False))
        self.precision: str = str(card.get("precision", ""))
        self.limits = Limits()  # the page's own checks; the server applies its own limits too

    def _model_card(self, wait_s: float) -> dict:
        """The server's first model (GET /models), waiting up to `wait_s` for the server to come up."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                response = self.client.get("/models")
                break
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    raise RemoteError(f"cannot reach the backend at {self.base_url}: {exc}") from exc
                log.info("waiting for the backend at %s", self.base_url)
                time.sleep(1.0)
        if response.status_code != 200:
            raise RemoteError(f"GET {self.base_url}/models failed: {error_message(response)}")
        models = response.json().get("data") or []
        if not models:
            raise RemoteError(f"the backend at {self.base_url} serves no model")
        return models[0]

    def stream(self, messages: list[dict], options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """Like OmniEngine.stream. Closing the generator closes the connection, which stops the
        reply on the server within one decode step or audio chunk."""
        body = request_body(self.model_name, messages, options or GenerationOptions())
        decoder = ChunkDecoder(messages)
        try:
            with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise http_error(response)
                if trimmed := response.headers.get("x-omni-context-trimmed"):
                    yield ContextTrimmed(**json.loads(trimmed))
                for data in sse_data(response.iter_lines()):
                    if cancel is not None and cancel.is_set():
                        yield decoder.finished(cancelled=True)
                        return
                    if data == "[DONE]":
                        break
                    yield from decoder.feed(json.loads(data))
        except httpx.TransportError as exc:
            raise RemoteError(f"lost the backend at {self.base_url}: {exc}") from exc
        yield decoder.finished()

    def listen(self, history: list[dict], options: GenerationOptions | None = None) -> None:
        """A remote server cannot listen: each spoken turn is sent whole when it ends."""
        return None

    def watch(self, history: list[dict], options: GenerationOptions | None = None) -> None:
        """Nor watch: a camera turn is sent as its video file when it ends."""
        return None
