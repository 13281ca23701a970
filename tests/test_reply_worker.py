"""The reply worker without a model: places in the queue, cancellation, shutdown. A fake engine
yields one text delta per step until it is cancelled or has given `steps` of them."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omni_demo.config import GenerationOptions
from omni_demo.errors import EngineError, InputError
from omni_demo.events import Finished, Stats, TextDelta
from omni_demo.serve.reply_worker import QueueFull, ReplyWorker

STATS = Stats(None, None, 0.0, 0.0, None, 0, 0, 0, 0)


class FakeEngine:
    def __init__(self, steps: int = 1000, step_s: float = 0.01):
        self.steps, self.step_s = steps, step_s
        self.runs = 0

    def stream(self, messages, options, cancel: threading.Event):
        if messages == "bad":
            raise InputError("bad input")
        self.runs += 1
        for _ in range(self.steps):
            if cancel.is_set():
                break
            time.sleep(self.step_s)
            yield TextDelta("x")
        yield Finished("x", [], [], 0, "eos", STATS)


async def reply(worker: ReplyWorker, messages="hi") -> list:
    """Admit and submit one request, and read its events up to Finished."""
    worker.admit()
    job = worker.submit(messages, GenerationOptions())
    events = [await job.next()]
    while not isinstance(events[-1], Finished):
        events.append(await job.next())
    return events


def run(coro_fn, worker: ReplyWorker):
    async def main():
        worker.start()
        try:
            return await coro_fn()
        finally:
            await asyncio.to_thread(worker.stop)
    return asyncio.run(main())


def test_places_bound_admitted_requests_and_come_back_when_a_reply_is_generated():
    worker = ReplyWorker(FakeEngine(steps=3), max_waiting=1)

    async def scenario():
        worker.admit()
        worker.admit()
        with pytest.raises(QueueFull, match="busy"):
            worker.admit()  # one running + one waiting: full, before anything was read
        worker.withdraw()
        worker.withdraw()
        first, second = await asyncio.gather(reply(worker), reply(worker))
        assert len(first) == len(second) == 4
        worker.admit()  # both replies are done: their places are free
        worker.withdraw()

    run(scenario, worker)


def test_a_cancelled_waiting_reply_frees_its_place_and_never_runs():
    engine = FakeEngine(steps=200)  # 2 s: still running when the test cancels it
    worker = ReplyWorker(engine, max_waiting=1)

    async def scenario():
        worker.admit()
        running = worker.submit("hi", GenerationOptions())
        worker.admit()
        waiting = worker.submit("hi", GenerationOptions())
        await running.next()
        waiting.cancel.set()
        worker.admit()  # the cancelled waiting reply gave its place back
        worker.withdraw()
        assert worker.waiting == 0
        running.cancel.set()
        with pytest.raises(EngineError, match="stopped before it finished"):  # nobody reads it but a test
            while True:
                await running.next()
        assert len(await reply(worker)) > 1
        assert engine.runs == 2, "the cancelled reply never ran"

    run(scenario, worker)


def test_an_input_error_reaches_the_request():
    worker = ReplyWorker(FakeEngine(steps=2))

    async def scenario():
        with pytest.raises(InputError, match="bad input"):
            await reply(worker, "bad")
        assert len(await reply(worker)) == 3  # the worker goes on

    run(scenario, worker)


def test_stopping_ends_running_and_waiting_replies_with_an_engine_error():
    worker = ReplyWorker(FakeEngine(), max_waiting=2)

    async def scenario():
        jobs = []
        for _ in range(2):
            worker.admit()
            jobs.append(worker.submit("hi", GenerationOptions()))
        await jobs[0].next()
        await asyncio.to_thread(worker.stop)
        for job in jobs:
            with pytest.raises(EngineError):
                while True:
                    await job.next()
        with pytest.raises(QueueFull, match="shutting down"):
            worker.admit()
        assert not worker.alive

    run(scenario, worker)
