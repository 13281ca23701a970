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
   step is its talker prefill, run on its own), and pushes each new code through that reply's
   streaming Token2Wav;
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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import torch

from omni_demo.config import BatchConfig
from omni_demo.errors import EngineError
from omni_demo.events import Event, TextDelta, Waiting

from .decode_step import LeanStep, SlotStep
from .sequence import Sequence
from .token2wav import push_many

log = logging.getLogger(__name__)

MAX_BATCH_CAP = {"cuda": 16, "cpu": 8}  # the derived --max-batch is at most this (CPU: more gains nothing)
KV_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}  # of the free memory, for the slots (the rest: prefills, media, Token2Wav)
ADMIT_LEAD_S = 1.0  # the real-time guard admits a reply while every running speech is this far ahead
IDLE_WAIT_S = 1.0  # the idle loop's longest sleep between looks at its queues
CLOSE_WAIT_S = 30.0  # how long closing a reply's generator waits for the step in progress


class Scheduler:
    def __init__(self, engine, config: BatchConfig, max_batch: int):
        self.engine, self.config, self.max_batch = engine, config, max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(max_batch))
        self.jobs: deque[tuple[Callable, Future]] = deque()
        self.observers: list[Callable[[str, int, float], None]] = []  # (stage, batch size, seconds) per step
        self._changed = threading.Condition()
        self._alone = threading.Lock()  # threaded=False: the one reply or job running
        self._thread: threading.Thread | None = None
        self._closing = False

    # -- the callers' side ------------------------------------------------------------------------

    def serve(self, sequence: Sequence) -> Iterator[Event]:
        """`sequence`'s events as the scheduler produces them; closing this generator cancels it."""
        if not self.config.threaded:
            yield from self._run_alone(sequence)
            return
        try:
            with self._changed:
                if self._closing:
                    raise EngineError("the engine is shutting down")
                self.waiting.append(sequence)
                self._start()
                self._changed.notify_all()
            yield from sequence.read()
        finally:
            sequence.closed = True
            with self._changed:
                self._changed.notify_all()
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
            if self._closing:
                raise EngineError("the engine is shutting down")
            self.jobs.append((fn, future))
            self._start()
            self._changed.notify_all()
        return future.result()

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
            self._thread = threading.Thread(target=self._loop, name="omni-scheduler", daemon=True)
            self._thread.start()
            atexit.register(self.close)  # joined at exit at the latest, never left inside a step

    def _loop(self) -> None:
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
        for sequence in [*self.running, *self.waiting]:
            self._end(sequence, EngineError("the engine is shutting down"))
        for _, future in self.jobs:
            future.set_exception(EngineError("the engine is shutting down"))

    @staticmethod
    def _run_job(fn: Callable, future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _run_alone(self, sequence: Sequence) -> Iterator[Event]:
        with self._alone:
            self.running.append(self._admitted(sequence, self.free_slots.pop()))
            try:
                while not sequence.finished:
                    self._step_running()
                    while not sequence.events.empty():
                        event = sequence.events.get()
                        if isinstance(event, BaseException):
                            raise event
                        yield event
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
        """Waiting replies into free slots, in order of arrival, while the guard allows; those left
        waiting are told so, once."""
        now = time.monotonic()
        while self.waiting and self.free_slots:
            if self.waiting[0].cancelled:
                self._end(self.waiting.popleft(), None)
                continue
            guarded = self.config.realtime_guard and self.running
            if guarded and min(sequence.lead_s(now) for sequence in self.running) < ADMIT_LEAD_S:
                break
            self.running.append(self._admitted(self.waiting.popleft(), self.free_slots.pop(0)))
        for ahead, sequence in enumerate(self.waiting):
            if not sequence.told_waiting:
                sequence.told_waiting = True
                sequence.emit(Waiting(ahead))

    def _admitted(self, sequence: Sequence, slot: int) -> Sequence:
        sequence.slot = slot
        try:
            sequence.text = self.engine.text_stream(sequence.inputs, sequence.options, slot)
            sequence.prefill = sequence.text.prefill(self.config.prefill_chunk_tokens)
        except Exception as exc:
            self._end(sequence, exc)
        return sequence

    def _step_running(self) -> None:
        for sequence in [s for s in self.running if s.cancelled and not s.finished]:
            self._end(sequence, None)
        prefilling = [s for s in self.running if s.prefill is not None and not s.finished]
        if prefilling:
            self._timed("prefill", 1, self._prefill_piece, prefilling[0])
        writing = [s for s in self.running if s.writing and not s.finished]
        if writing:
            self._timed("thinker", len(writing), self._thinker_step, writing)
        speaking = [s for s in self.running if s.speech is not None and s.speech.ready and not s.finished]
        if speaking:
            self._timed("talker", len(speaking), self._talker_step, speaking)
        for sequence in [s for s in self.running if s.done and not s.finished]:
            self._end(sequence, None)

    def _timed(self, stage: str, batch: int, fn: Callable, *args) -> None:
        start = time.perf_counter()
        fn(*args)
        self._observe(stage, batch, time.perf_counter() - start)

    def _observe(self, stage: str, batch: int, seconds: float) -> None:
        for observer in self.observers:
            observer(stage, batch, seconds)

    # -- the stages -----------------------------------------------------------------------------

    def _prefill_piece(self, sequence: Sequence) -> None:
        try:
            next(sequence.prefill)
        except StopIteration:
            sequence.prefill = None
        except Exception as exc:
            self._end(sequence, engine_error(exc))

    def _thinker_step(self, writing: list[Sequence]) -> None:
        for sequence in writing:
            self._guarded(sequence, self._sample_text, sequence)
        feeding = [s for s in writing if not s.finished and s.text.wants_feed]
        if feeding:
            decoders = [s.text.decoder for s in feeding]
            embeds = torch.cat([d.input_embeds(s.text.token) for d, s in zip(decoders, feeding)])
            logits, parts = decoders[0].outputs(_decode([d.decode_step for d in decoders], embeds), embeds)
            for row, sequence in enumerate(feeding):
                part = sequence.text.accept(logits[row : row + 1], parts[row : row + 1])
                if sequence.speech is not None:
                    sequence.speech.feed(part)
        for sequence in writing:
            if sequence.speech is not None and sequence.text.done and not sequence.finished:
                sequence.speech.end_of_text()

    def _sample_text(self, sequence: Sequence) -> None:
        if delta := sequence.text.next_token():
            sequence.emit(TextDelta(delta))
        if sequence.options.speech and sequence.speech is None:
            sequence.speech = self.engine.speech_stream(sequence.inputs, sequence.options, sequence.text, sequence.slot)

    def _talker_step(self, speaking: list[Sequence]) -> None:
        """One codec step for every reply in `speaking`, then their new codes through Token2Wav together."""
        sampled: list[tuple[Sequence, list[int]]] = []
        batched = [s for s in speaking if s.speech.prefilled]
        for sequence in speaking:
            if not sequence.speech.prefilled:  # its talker prefill: the prompt's states, on its own
                self._guarded(sequence, self._sample_code, sequence, None, sampled)
        if batched:
            speech = [s.speech for s in batched]
            embeds = torch.cat([stream.next_input() for stream in speech])
            logits = speech[0].talker.logits(_decode([stream.talker.decode_step for stream in speech], embeds))
            for row, sequence in enumerate(batched):
                self._guarded(sequence, self._sample_code, sequence, logits[row : row + 1], sampled)
        self._synthesize([(s, codes) for s, codes in sampled if not s.finished])

    def _synthesize(self, sampled: list[tuple[Sequence, list[int]]]) -> None:
        """The new codes of several replies through their streaming Token2Wav, batched (DiT windows and
        vocoder spans of the same shape run together); each reply's new samples go out as its chunk."""
        items = [(s.speech.token2wav, codes, s.speech.done) for s, codes in sampled]
        try:
            samples = push_many(items, timer=self._observe)
        except Exception as exc:
            for sequence, _ in sampled:
                self._end(sequence, engine_error(exc))
            return
        for (sequence, _), new in zip(sampled, samples):
            if chunk := sequence.speech.chunk(new):
                sequence.emit(chunk)

    @staticmethod
    def _sample_code(sequence: Sequence, logits: torch.Tensor | None, sampled: list) -> None:
        """Sample the reply's next code from `logits` [1, V] (None: its talker prefill gives them)."""
        speech = sequence.speech
        sampled.append((sequence, speech.sample(speech.logits_alone() if logits is None else logits)))

    def _guarded(self, sequence: Sequence, fn: Callable, *args) -> None:
        """Run one reply's own work; its failure ends that reply only."""
        try:
            fn(*args)
        except Exception as exc:
            self._end(sequence, engine_error(exc))

    def _end(self, sequence: Sequence, error: BaseException | None) -> None:
        """Finish `sequence`: its Finished (or `error`) out, its slot back."""
        if sequence.finished:
            return
        sequence.finished = True
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


def _decode(steps: list, embeds: torch.Tensor) -> torch.Tensor:
    """One token for each reply's decode step: embeds [B, 1, D] -> hidden [B, 1, D]. Slots of one
    LeanStep go through it in one batched pass; plain steps one by one."""
    first = steps[0]
    if isinstance(first, SlotStep) and all(isinstance(s, SlotStep) and s.lean is first.lean for s in steps):
        return first.lean.step_many([s.slot for s in steps], embeds)
    return torch.cat([step.step(embeds[row : row + 1]) for row, step in enumerate(steps)])


def max_batch(config: BatchConfig, stacks: dict, windows: dict[str, int], device: torch.device) -> int:
    """`config.max_batch`, or as many KV slots (thinker and talker, whole windows) as a share of the
    device's free memory holds, at least 1 and at most MAX_BATCH_CAP."""
    if config.max_batch is not None:
        return config.max_batch
    slot = sum(LeanStep.slot_bytes(stack, windows[name]) for name, stack in stacks.items())
    kind = "cuda" if device.type == "cuda" else "cpu"
    free = torch.cuda.mem_get_info(device)[0] if kind == "cuda" else _available_ram()
    return max(1, min(MAX_BATCH_CAP[kind], int(free * KV_MEMORY_SHARE[kind] // slot)))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def engine_error(exc: BaseException) -> BaseException:
    """A reply's failure as its caller should see it (an out-of-memory says what to do)."""
    if isinstance(exc, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the failed request's memory back for the next one
        return EngineError("the GPU ran out of memory on this request; try shorter or fewer media, "
                           "or a shorter reply")
    return exc
