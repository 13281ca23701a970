"""The OpenAI-compatible HTTP app: Chat Completions whose text and speech stream at the same time.

`create_app(engine, config)` is the ASGI app; the same app runs under uvicorn
(`python -m omni_demo.serve`, serve/__main__.py) and in each Ray Serve replica (ray_replicas.py). One reply runs on the engine at a time; others wait (bounded).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from omni_demo.config import CacheScope
from omni_demo.errors import EngineError, InputError
from omni_demo.events import Admitted, AudioChunk, ContextTrimmed, Finished, TextDelta, Waiting

from .metrics import ServerMetrics
from .openai_protocol import (MB, ApiError, ApiLimits, ChatRequest, ChunkEncoder, parse_body, parse_chat_request, sse,
                              write_media)
from .reply_worker import Job, QueueFull, ReplyWorker

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RETRY_AFTER_S = 1  # what a busy server (503) tells clients to wait


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1/*; several, comma-separated,
    # are several parties (each its own conversation cache); None: open
    max_waiting: int | None = 16  # requests admitted besides the running replies; past it: 503. None: no
    # bound here (Ray Serve bounds what reaches a replica with max_ongoing_requests)
    max_uploads_per_client: int = 32  # request bodies one client address may be sending at once; past it: 429
    metrics_key: str | None = None  # GET /metrics wants "Authorization: Bearer <it>"; None: no /metrics
    # (the counters move with every request: what each client sent, and how much the cache served it)
    limits: ApiLimits = ApiLimits()
    model_name: str | None = None  # the id clients send as "model"; None: the loaded model's name
    server_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # x-omni-server

    def __post_init__(self):
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError("max_waiting cannot be negative")
        if self.max_uploads_per_client < 1:
            raise ValueError("max_uploads_per_client must be at least 1")
        if self.api_key is not None and not all(self.api_keys):
            raise ValueError("an API key cannot be empty")

    @property
    def api_keys(self) -> list[str]:
        return [] if self.api_key is None else [key.strip() for key in self.api_key.split(",")]


class UploadSlots:
    """Request bodies being read, per client address: a client sending more at once gets 429, so
    slow senders cannot hold the server's memory (each body is bounded by size and time too)."""

    def __init__(self, per_client: int):
        self.per_client = per_client
        self.reading: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, client: str):
        if self.reading.get(client, 0) >= self.per_client:
            raise ApiError(429, f"this client is already sending {self.per_client} requests; wait for them",
                           code="too_many_uploads")
        self.reading[client] = self.reading.get(client, 0) + 1
        try:
            yield
        finally:
            self.reading[client] -= 1
            if not self.reading[client]:
                del self.reading[client]


class ClientGone(Exception):
    """The client disconnected before its reply was ready."""


def api_error(exc: BaseException) -> ApiError:
    """Our exceptions as HTTP errors: bad input 400, busy 503, anything unexpected 500."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, QueueFull):
        return ApiError(503, str(exc), code="queue_full")
    if isinstance(exc, EngineError):
        return ApiError(503, str(exc), code="engine_error")
    return ApiError(500, f"internal error ({type(exc).__name__}: {exc}); this is a bug in the server")


def error_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, (ClientGone, ClientDisconnect)):
        return Response(status_code=499)  # nobody reads it
    if isinstance(exc, HTTPException):
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    else:
        error = api_error(exc)
    if error.status >= 500 and error.status != 503:  # a busy server is no error of its own
        log.error("%s %s -> %d: %s", request.method, request.url.path, error.status, error.message)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def read_body(request: Request, limits: ApiLimits) -> bytes:
    """The body; 413 past `limits.max_request_bytes`, 408 when it takes over `limits.upload_timeout_s`
    (a request holds no place in the queue while it is read)."""
    limit = limits.max_request_bytes
    too_large = ApiError(413, f"the request body is over the {limit / MB:g} MB limit; send smaller media",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 2 * limit + MB:
        raise too_large
    try:
        body, size = await asyncio.wait_for(_read_upto(request, limit), limits.upload_timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body took over {limits.upload_timeout_s:g} s to arrive",
                       code="request_timeout") from None
    if size > limit:
        raise too_large
    return body


async def _read_upto(request: Request, limit: int) -> tuple[bytes, int]:
    """(the body's first `limit` bytes, its size). An oversized body is still read, up to twice
    the limit, so that the client gets the 413 instead of a reset connection."""
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 2 * limit + MB:
            break
    return bytes(body), size


async def until_disconnected(request: Request, coro):
    """Await `coro`, unless the client disconnects first (ClientGone)."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def first_event(job: Job):
    """(first text/audio/finished event, the ContextTrimmed event before it or None)."""
    trimmed = None
    while isinstance(event := await job.next(), (ContextTrimmed, Waiting, Admitted)):
        trimmed = event if isinstance(event, ContextTrimmed) else trimmed
    return event, trimmed


async def collect(job: Job, event) -> tuple[Finished, np.ndarray]:
    """The rest of a reply: its Finished event and all its audio samples."""
    chunks = []
    while not isinstance(event, Finished):
        if isinstance(event, AudioChunk):
            chunks.append(event.samples)
        event = await job.next()
    return event, np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


async def sse_events(job: Job, event, fmt: ChunkEncoder, include_usage: bool):
    """The reply as server-sent events, from its first event on; an error after the headers went
    out becomes an error event (the `openai` client raises it)."""
    try:
        yield sse(fmt.first_chunk())
        while not isinstance(event, Finished):
            if isinstance(event, TextDelta) and event.text:
                yield sse(fmt.text_chunk(event.text))
            elif isinstance(event, AudioChunk):
                yield sse(fmt.audio_chunk(event.samples))
            event = await job.next()
        yield sse(fmt.last_chunk(event))
        if include_usage:
            yield sse(fmt.usage_chunk(event))
    except Exception as exc:
        yield sse(api_error(exc).body())
    yield sse("[DONE]")


class EventStreamResponse(StreamingResponse):
    """An SSE response that cancels its reply however it ends: done, client gone, server stopping."""

    def __init__(self, job: Job, content, headers: dict):
        super().__init__(content, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel.set()


class ChatServer:
    """The HTTP handlers, bound to one engine and its reply worker."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.worker = ReplyWorker(engine, config.max_waiting, on_finished=lambda event: self.metrics.observe(event))
        scheduler = getattr(engine, "scheduler", None)  # a test's fake engine has none
        if scheduler is None:
            self.metrics = ServerMetrics(running=lambda: self.worker.running, waiting=lambda: self.worker.waiting)
        else:  # the engine's own count: a reply handed to it may still wait there (the real-time guard)
            self.metrics = ServerMetrics(running=lambda: scheduler.load[0],
                                         waiting=lambda: self.worker.waiting + scheduler.load[1])
            scheduler.observers.append(self.metrics.observe_step)
        self.uploads = UploadSlots(config.max_uploads_per_client)
        self.model_name = config.model_name or engine.model_name

    def authorize(self, request: Request) -> str:
        """The caller's API key ("" on an open server); 401 without a valid one."""
        keys = self.config.api_keys
        if not keys:
            return ""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip().encode()
        matches = [key for key in keys if hmac.compare_digest(token, key.encode())]
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        return matches[0]

    async def health(self, request: Request) -> Response:
        alive = self.worker.alive
        return JSONResponse({"status": "ok" if alive else "reply worker stopped", "model": self.model_name,
                             "running": self.worker.running, "waiting": self.worker.waiting,
                             "server": self.config.server_id}, status_code=200 if alive else 503)

    async def prometheus(self, request: Request) -> Response:
        """Prometheus' scrape, with the metrics key: its counters move with each request, so whoever reads
        them learns how long other clients' prompts were and how much of them the cache served."""
        key = self.config.metrics_key
        if key is None:
            raise ApiError(404, "metrics are off: start the server with --metrics-key (OMNI_METRICS_KEY)")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "GET /metrics needs 'Authorization: Bearer <metrics key>'", code="invalid_api_key")
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "omni-demo",
                "voices": self.engine.voices, "is_random": self.engine.is_random,
                "precision": self.engine.precision, "quantization": self.engine.quantization}
        return JSONResponse({"object": "list", "data": [card]})

    def parse(self, raw: bytes) -> ChatRequest:
        """The request, checked: 400 naming the field for anything malformed (a body the checks did not
        foresee is still a 400, logged, never a 500: no input is the server's fault)."""
        try:
            chat = parse_chat_request(parse_body(raw), self.engine.voices, self.config.limits)
        except (ApiError, InputError):
            raise
        except (ValueError, TypeError, KeyError, IndexError, RecursionError, UnicodeError) as exc:
            log.warning("a request body the checks did not foresee: %s", exc, exc_info=True)
            raise ApiError(400, f"the request could not be read ({type(exc).__name__}); check its fields") from exc
        if chat.model != self.model_name:
            raise ApiError(404, f"model {chat.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return chat

    async def submit(self, chat: ChatRequest) -> Job:
        """Write the request's media to its own temp dir (the worker removes it) and queue the reply."""
        media_dir = Path(tempfile.mkdtemp(prefix="omni-serve-"))
        try:
            messages = await asyncio.to_thread(write_media, chat.messages, media_dir)
            return self.worker.submit(messages, chat.options, media_dir)
        except BaseException:
            shutil.rmtree(media_dir, ignore_errors=True)
            raise

    async def chat_completions(self, request: Request) -> Response:
        key = self.authorize(request)
        async with self.uploads.slot(request.client.host if request.client else ""):
            body = await read_body(request, self.config.limits)
        chat = await asyncio.to_thread(self.parse, body)
        chat = replace(chat, options=replace(chat.options, cache_scope=cache_scope(key, chat.cache_salt)))
        self.worker.admit()  # 503 when the queue is full: only now, with the body here and parsed
        try:
            job = await self.submit(chat)
        except BaseException:
            self.worker.withdraw()
            raise
        try:
            event, trimmed = await until_disconnected(request, first_event(job))
        except BaseException:
            job.cancel.set()
            raise
        headers = {"x-omni-server": self.config.server_id}
        if trimmed:  # the conversation was over the context window: its oldest turns were left out
            headers["x-omni-context-trimmed"] = json.dumps(asdict(trimmed))
        fmt = ChunkEncoder(self.model_name, chat.audio_format)
        if chat.stream:
            return EventStreamResponse(job, sse_events(job, event, fmt, chat.include_usage), headers)
        try:
            finished, samples = await until_disconnected(request, collect(job, event))
        finally:
            job.cancel.set()
        return JSONResponse(fmt.completion(finished, samples), headers=headers)

    @asynccontextmanager
    async def lifespan(self, app):
        self.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.worker.stop)


def cache_scope(api_key: str, cache_salt: str | None) -> CacheScope:
    """The party a request's conversation cache belongs to: its API key, private with a cache_salt."""
    key = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    digest = hashlib.sha256(f"{api_key}\0{cache_salt or ''}".encode()).hexdigest()[:32]
    return CacheScope(party=f"api:{digest}", private=cache_salt is not None, owner=f"api:{key}")  # salts: the key's share


def answered(handler):
    """The handler, its errors answered as OpenAI's error JSON inside the route: Starlette re-raises an
    exception that reaches its handler for Exception after the response, and the server then drops
    the kept-alive connection (the client's next request on it was reset)."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as exc:
            if not isinstance(exc, (ApiError, InputError, QueueFull, EngineError, ClientGone, ClientDisconnect)):
                log.exception("%s %s failed", request.method, request.url.path)
            return error_response(request, exc)

    return route


def create_app(engine, config: ServerConfig = ServerConfig()) -> Starlette:
    server = ChatServer(engine, config)
    routes = [
        Route("/health", server.health),
        Route("/metrics", answered(server.prometheus)),
        Route("/v1/models", answered(server.models)),
        Route("/v1/chat/completions", answered(server.chat_completions), methods=["POST"]),
    ]
    # The routes answer their own errors (`answered`); these cover what happens outside them (a
    # method not allowed, a path not found).
    kinds = (ApiError, InputError, QueueFull, EngineError, HTTPException, ClientGone, ClientDisconnect, Exception)
    handlers = {kind: error_response for kind in kinds}
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers=handlers)
    app.state.server = server
    return app
