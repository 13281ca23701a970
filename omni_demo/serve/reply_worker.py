"""One engine, as many replies at once as it batches, for an asyncio server.

The engine's `stream` is a blocking generator, so `workers` threads (the engine's --max-batch)
each iterate one reply's `engine.stream` and hand its events to the request's asyncio queue; the
engine's scheduler steps those replies together. A request that is cancelled (client gone) sets
its `cancel` Event: a running reply stops within one decode step or audio chunk, a waiting one is
skipped. The threads live as long as the server and are joined by `stop`.

A request takes its place (`admit`) once its body has arrived and parsed (the HTTP app bounds the
bodies being read, per client address), so a slow sender holds no place; its place is free again
once its reply has been generated, not once the client has read it, so a slow reader holds none.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from omni_demo.config import GenerationOptions
from omni_demo.errors import EngineError, InputError
from omni_demo.events import Finished

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many replies are waiting; the message says how many."""


@dataclass(eq=False)
class Job:
    """One reply: its request, and the queue its events arrive on (filled from the worker thread)."""

    messages: list[dict]
    options: GenerationOptions
    media_dir: Path | None  # removed by the worker once the reply is over
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the server's event loop is closed: nobody is listening
            self.cancel.set()

    async def next(self):
        """The next event (the last is Finished); raises the reply's exception."""
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        return item


class ReplyWorker:
    """Runs replies on `engine`, `workers` at once (default: the engine's max batch), one thread
    each; admits those running and `max_waiting` more (None: no bound here, where something in
    front bounds them, as Ray Serve does)."""

    def __init__(self, engine, max_waiting: int | None = 16, on_finished=None, workers: int | None = None):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_finished = on_finished  # called with each reply's Finished (the server's metrics)
        self.workers = workers or getattr(engine, "max_batch", 1)
        self._admitted = 0  # requests between `admit` and the end of their reply (or `withdraw`)
        self._jobs: deque[Job] = deque()
        self._changed = threading.Condition()
        self._running: set[Job] = set()
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, name=f"reply-worker-{n}", daemon=True)
                         for n in range(self.workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel every reply, running or waiting (those get an EngineError), and join the thread."""
        with self._changed:
            self._closing = True
            for job in [*self._jobs, *self._running]:
                job.cancel.set()
            self._changed.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def alive(self) -> bool:
        """Every worker thread runs, and so does the engine's scheduler (where it has one)."""
        scheduler = getattr(self.engine, "scheduler", None)
        return all(thread.is_alive() for thread in self._threads) and (scheduler is None or scheduler.alive)

    @property
    def running(self) -> int:
        with self._changed:
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self._changed:
            return sum(not job.cancel.is_set() for job in self._jobs)

    def admit(self) -> None:
        """Take a place for one parsed request; raises QueueFull when none is free.
        `submit` hands the place to the reply; `withdraw` gives it back if the request fails first."""
        with self._changed:
            self._drop_cancelled()
            if self._closing:
                raise QueueFull("the server is shutting down")
            if self.max_waiting is not None and self._admitted >= self.workers + self.max_waiting:
                raise QueueFull(f"the server is busy: {self.workers} replies are running and {self.max_waiting} "
                                "more are waiting or being sent; try again shortly")
            self._admitted += 1

    def withdraw(self) -> None:
        with self._changed:
            self._admitted -= 1

    def submit(self, messages: list[dict], options: GenerationOptions, media_dir: Path | None = None) -> Job:
        """Queue the reply of an admitted request (call from the event loop)."""
        job = Job(messages, options, media_dir, asyncio.get_running_loop())
        with self._changed:
            if self._closing:
                raise QueueFull("the server is shutting down")
            self._jobs.append(job)
            self._changed.notify_all()
        return job

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                self._finish(job)
                with self._changed:
                    self._running.discard(job)

    def _next(self) -> Job | None:
        with self._changed:
            while not self._jobs and not self._closing:
                self._changed.wait()
            if self._closing:
                for job in self._jobs:
                    job.put(EngineError("the server is shutting down"))
                    self._finish(job)
                self._jobs.clear()
                return None
            job = self._jobs.popleft()
            self._running.add(job)
            return job

    def _run(self, job: Job) -> None:
        try:
            if not job.cancel.is_set():  # else its client left while it waited
                with closing(self.engine.stream(job.messages, job.options, job.cancel)) as events:
                    for event in events:
                        job.put(event)
                        if isinstance(event, Finished) and self.on_finished is not None:
                            self.on_finished(event)
                        if job.cancel.is_set():  # no need to wait for the engine's own check
                            break
        except Exception as exc:  # handed to the request, which turns it into an HTTP error
            if not isinstance(exc, InputError):
                log.exception("reply failed")
            job.put(exc)
        else:  # after a Finished nobody reads this; without one (cancelled while its media were read,
            # the server stopping) it ends the request that is still waiting
            job.put(EngineError("the reply was stopped before it finished; the server may be shutting down"))

    def _drop_cancelled(self) -> None:
        """Forget waiting replies whose clients left (called with the lock held)."""
        for job in [job for job in self._jobs if job.cancel.is_set()]:
            self._jobs.remove(job)
            self._finish(job)

    def _finish(self, job: Job) -> None:
        """The reply is over: free its place and its media files."""
        with self._changed:  # re-entrant: also called with the lock held
            self._admitted -= 1
        if job.media_dir is not None:
            shutil.rmtree(job.media_dir, ignore_errors=True)
