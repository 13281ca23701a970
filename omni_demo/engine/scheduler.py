"""Continuous batching: every running reply advances together, one step at a time.

One loop thread, owned by the engine, runs `step` while there is work (nano-vllm's
`LLMEngine.step` is the model: schedule -> run -> postprocess). One step:

1. drops the replies that were cancelled or whose reader is gone, and admits waiting ones into
   free KV slots while the real-time guard allows it;
2. runs one piece of one admitted reply's prefill (a media item's encoders, or
   `prefill_chunk_tokens` of its prompt), so a long prompt holds the others back by one piece;
3. samples the next text token of every reply still writing, then runs the thinker once over all
   of them (`LeanStep.step_many`: one batched pass, each row over its own slot);
4. runs the talker once over every reply whose next reply part is ready (a reply's first codec
   step is its talker prefill, run on its own), then their new codes through Token2Wav together
   (omni_demo.engine.token2wav.push_many: DiT windows and vocoder spans of one length batched);
5. finishes the replies that are done: keeps their turn in the conversation cache, sends
   Finished, frees their slot.

Work that is not a reply (a listening window's encoder and prefill) is a *job*, run by the loop
between two steps. A reply's own failure ends that reply only. Each reply's arithmetic depends on
its own rows alone, so its tokens are those of the same reply served alone (up to the float
rounding of a batched matmul: greedy tokens are compared in tests/test_batching.py).

With `threaded=False` there is no loop thread: `run_alone` steps one reply in its caller's
thread, one reply at a time (ZeroGPU lends the GPU to one call's process at a time).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from omni_demo.config import BatchConfig
from omni_demo.errors import EngineError
from omni_demo.events import Event

from .batch_step import Stages, engine_error
from .decode_step import LeanStep
from .sequence import Sequence, WaitingLine

log = logging.getLogger(__name__)

MAX_BATCH_CAP = {"cuda": 16, "cpu": 8}  # the derived --max-batch is at most this (CPU: more gains nothing)
KV_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}  # of the free memory, for the slots (the rest: prefills, media, Token2Wav)
ADMIT_LEAD_S = 1.0  # the real-time guard admits a reply while every running speech is this far ahead
IDLE_WAIT_S = 1.0  # the idle loop's longest sleep between looks at its queues
SWITCH_INTERVAL_S = 0.0005  # the process's GIL switch interval once a scheduler runs (see _start)
POLL_S = 1.0  # how often a caller waiting on the loop checks that it still runs
CLOSE_WAIT_S = 30.0  # how long closing a reply's generator waits for the step in progress


class Scheduler:
    def __init__(self, engine, config: BatchConfig, max_batch: int):
        self.engine, self.config, self.max_batch = engine, config, max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch))
        self.line = WaitingLine()  # what the waiting replies are told
        self.jobs: deque[tuple[Callable, Future]] = deque()
        self.observers: list[Callable[[str, int, float], None]] = []  # (stage, batch size, seconds) per step
        self.stages = Stages(engine, end=self._end, observe=self._observe)
        self._changed = threading.Condition()
        self._alone = threading.Lock()  # threaded=False: the one reply or job running
        self._thread: threading.Thread | None = None
        self._closing = False
        self.failure: BaseException | None = None  # what stopped the loop thread, if anything did

    # -- the callers' side ------------------------------------------------------------------------

    def serve(self, sequence: Sequence) -> Iterator[Event]:
        """`sequence`'s events as the scheduler produces them; closing this generator cancels it."""
        if not self.config.threaded:
            yield from self._run_alone(sequence)
            return
        with self._changed:
            self.check_serving()
            self.waiting.append(sequence)
            self._start()
            self._changed.notify_all()
        try:
            yield from sequence.read(lambda: self.alive)
        finally:
            sequence.closed = True
            with self._changed:
                self._changed.notify_all()
            if threading.current_thread() is not self._thread:  # (a generator collected on the loop thread)
                sequence.ended.wait(CLOSE_WAIT_S)  # so a closed reply has stopped when close() returns

    def call(self, fn: Callable, *, skip_if_busy: bool = False):
        """Run `fn()` (model work that is not a reply) between two steps; -> its result. Threaded,
        it waits for the current step; alone, it waits for the running reply unless `skip_if_busy`
        (then: None without running it)."""
        if not self.config.threaded:
            if not self._alone.acquire(blocking=not skip_if_busy):
                return None
            try:
                return fn()
            finally:
                self._alone.release()
        future: Future = Future()
        with self._changed:
            self.check_serving()
            self.jobs.append((fn, future))
            self._start()
            self._changed.notify_all()
        while True:
            try:
                return future.result(timeout=POLL_S)
            except TimeoutError:
                self.check_serving()

    @property
    def alive(self) -> bool:
        """The loop thread is running or not started yet (not stopped by a failure or `close`)."""
        return self.failure is None and not self._closing

    def check_serving(self) -> None:
        if self._closing:
            raise EngineError("the engine is shutting down")
        if self.failure is not None:
            raise EngineError(f"the engine stopped after an internal error: {self.failure}")

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel every reply, running or waiting, and join the loop thread."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) replies."""
        return len(self.running), len(self.waiting)

    # -- the loop -----------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._thread is None:
            # A step is hundreds of short torch calls, each letting go of the GIL; a thread doing
            # Python work (a request's prompt and media) then holds it for up to the switch
            # interval (5 ms by default) before each call goes on: a 1,000-turn history being
            # fitted slowed the steps 10x (omni_demo/tools/hostile.py). 0.5 ms bounds that.
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
            self._thread = threading.Thread(target=self._loop, name="omni-scheduler", daemon=True)
            self._thread.start()
            atexit.register(self.close)  # joined at exit at the latest, never left inside a step

    def _loop(self) -> None:
        try:
            self._serve_until_closed()
        except BaseException as exc:  # a bug, or a CUDA error past recovery: say so to every caller
            log.exception("the scheduler's loop stopped")
            self.failure = exc
        finally:
            with self._changed:
                ended = [*self.running, *self.waiting]
                jobs, self.jobs = list(self.jobs), deque()
            for sequence in ended:
                self._end(sequence, EngineError("the engine is shutting down"))
            for _, future in jobs:
                future.set_exception(EngineError("the engine is shutting down"))

    def _serve_until_closed(self) -> None:
        while True:
            with self._changed:
                while not (self._closing or self.jobs or self.running or self.waiting):
                    self._changed.wait(IDLE_WAIT_S)
                if self._closing:
                    break
                jobs, self.jobs = list(self.jobs), deque()
            for fn, future in jobs:
                self._run_job(fn, future)
            try:
                self.step()
            except Exception as exc:  # a failure of the batch as a whole: its replies end, the loop goes on
                log.exception("a scheduler step failed")
                for sequence in list(self.running):
                    self._end(sequence, engine_error(exc))

    @staticmethod
    def _run_job(fn: Callable, future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _run_alone(self, sequence: Sequence) -> Iterator[Event]:
        """threaded=False: step `sequence` alone in this thread, handing out its events as they come."""
        with self._alone:
            self._bind_slot(sequence, self.free_slots.pop())
            try:
                while True:
                    while not sequence.events.empty():
                        event = sequence.events.get()
                        if isinstance(event, BaseException):
                            raise event
                        yield event
                    if sequence.finished:
                        return
                    try:
                        self._step_running()
                    except Exception as exc:
                        self._end(sequence, engine_error(exc))
            finally:
                sequence.closed = True
                if not sequence.finished:
                    self._step_running()  # drops it: frees its slot

    def step(self) -> None:
        """One step over every running reply (admitting waiting ones first)."""
        with self._changed:
            self._admit()
        self._step_running()

    def _admit(self) -> None:
        """Waiting replies into free slots, in order of arrival, while the guard allows (then one
        per step: a newcomer counts as behind until its speech is out); those left waiting are
        told so, once. Cancelled ones leave the line wherever they stand."""
        for sequence in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(sequence)
            self._end(sequence, None)
        now = time.monotonic()
        guarded = self.config.realtime_guard and bool(self.running)
        while self.waiting and self.free_slots:
            if guarded and min(sequence.lead_s(now) for sequence in self.running) < ADMIT_LEAD_S:
                break
            self._bind_slot(self.waiting.popleft(), self.free_slots.pop(0))
            if self.config.realtime_guard:
                break
        self.line.tell(list(self.waiting), self.running, not self.free_slots, now)

    def _bind_slot(self, sequence: Sequence, slot: int) -> None:
        """`sequence` takes KV slot `slot` and runs from the next step (or ends now, with the error,
        if its streams cannot be made)."""
        sequence.slot = slot
        self.running.append(sequence)
        sequence.admitted_at = time.monotonic()
        self.line.admitted(sequence, sequence.admitted_at)
        try:
            sequence.text = self.engine.text_stream(sequence.inputs, sequence.options, slot)
            sequence.prefill = sequence.text.prefill(self.config.prefill_chunk_tokens)
        except Exception as exc:
            self._end(sequence, engine_error(exc))

    def _step_running(self) -> None:
        for sequence in [s for s in self.running if s.cancelled and not s.finished]:
            self._end(sequence, None)
        prefilling = [s for s in self.running if s.prefill is not None and not s.finished]
        if prefilling:
            self._timed("prefill", 1, self.stages.prefill_piece, prefilling[0])
        writing = [s for s in self.running if s.writing and not s.finished]
        if writing:
            self._timed("thinker", len(writing), self.stages.thinker_step, writing)
        speaking = [s for s in self.running if s.speech is not None and s.speech.ready and not s.finished]
        if speaking:
            sampled = self._timed("talker", len(speaking), self.stages.talker_step, speaking)
            self.stages.synthesize(sampled)  # its DiT and BigVGAN calls are timed one by one ("dit", "bigvgan")
        for sequence in [s for s in self.running if s.done and not s.finished]:
            self._end(sequence, None)

    def _timed(self, stage: str, batch: int, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        self._observe(stage, batch, time.perf_counter() - start)
        return result

    def _observe(self, stage: str, batch: int, seconds: float) -> None:
        for observer in self.observers:
            try:
                observer(stage, batch, seconds)
            except Exception:  # a metrics hook must not end anyone's reply
                log.exception("a scheduler observer failed")

    def _end(self, sequence: Sequence, error: BaseException | None) -> None:
        """Finish `sequence`: its Finished (or `error`) out, its slot back."""
        if sequence.finished:
            return
        sequence.finished = True
        self.line.ended(sequence, time.monotonic(), error is None and not sequence.cancelled)
        try:
            if error is None:
                sequence.emit(self.engine.finished(sequence))
            else:
                sequence.fail(error)
        except Exception as exc:
            log.exception("finishing a reply failed")
            sequence.fail(exc)
        finally:
            if sequence in self.running:
                self.running.remove(sequence)
            if sequence.slot is not None:
                self.free_slots.append(sequence.slot)
                sequence.slot = None
            sequence.ended.set()


def max_batch(config: BatchConfig, stacks: dict, windows: dict[str, int], device: torch.device) -> int:
    """`config.max_batch`, or as many KV slots (thinker and talker, whole windows) as a share of the
    device's free memory holds, at least 1 and at most MAX_BATCH_CAP."""
    if not config.threaded:  # one reply at a time: one slot
        return 1
    if config.max_batch is not None:
        return config.max_batch
    slot = sum(LeanStep.slot_bytes(stack, windows[name]) for name, stack in stacks.items())
    kind = "cuda" if device.type == "cuda" else "cpu"
    free = torch.cuda.mem_get_info(device)[0] if kind == "cuda" else _available_ram()
    return max(1, min(MAX_BATCH_CAP[kind], int(free * KV_MEMORY_SHARE[kind] // slot) - 1))  # less the scratch slot


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
