"""Continuous batching (omni_demo.engine.scheduler) on the tiny checkpoint: concurrent greedy replies
give the text tokens and codec codes of the same replies served alone (every prompt of
tests/test_fidelity.py, both voices, replies joining and leaving the batch mid-way); a reply
cancelled, closed or failing mid-batch ends alone and frees its slot; a reply over `max_batch`
waits its turn, as does one the real-time guard holds back; the CUDA graph's masked step agrees
with the eager one; `threaded=False` serves concurrent callers one after the other.

No assertion depends on timing: replies join at fixed scheduler steps (the `Stagger` observer
holds the loop until the next reply is queued), and events are ordered by one counter over all
threads. Prompts are prepared in the test's thread: preparing them concurrently is its own test
(`test_prompts_prepared_at_once_are_tokenized_alike`).
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from omni_demo.config import BatchConfig, GenerationOptions
from omni_demo.engine import scheduler as scheduler_module
from omni_demo.engine.decode_step import graph_buckets
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.errors import EngineError
from omni_demo.events import Admitted, AudioChunk, Finished, TextDelta, Waiting

from .conftest import text_messages
from .test_fidelity import CASES

LENGTHS = [(20, 60), (35, 90), (50, 120)]  # (text tokens, codec codes) of concurrent replies 0, 1, 2
JOINS = (3, 8)  # replies 1 and 2 are queued after these thinker steps (counted over the whole batch)
WAIT_S = 120.0  # longest wait for another thread (only reached when something is broken)
ORDER = itertools.count()  # one order over the events of every thread
FAIL_SEED = 4242  # the reply whose failure test_a_failing_reply_ends_alone injects


def reply_options(index: int, voice: str = "Chelsie", with_audio: bool = False, **extra) -> GenerationOptions:
    """Greedy options of concurrent reply `index`, its lengths forced (random weights never stop)."""
    tokens, codes = LENGTHS[index % len(LENGTHS)]
    return GenerationOptions(greedy=True, voice=voice, max_new_tokens=tokens, min_new_tokens=tokens,
                             max_audio_tokens=codes, min_audio_tokens=codes, use_audio_in_video=with_audio, **extra)


class Reply:
    """One reply consumed in a thread of its own. `stop`: ("cancel" | "close", n) sets its cancel
    event, or closes its generator, once its n-th audio chunk arrived."""

    def __init__(self, engine, messages, wanted: GenerationOptions, stop: tuple[str, int] | None = None):
        self.engine, self.options, self.stop = engine, wanted, stop
        self.inputs = engine.fit_context(messages, wanted)[0]
        self.cancel = threading.Event()
        self.events: list[tuple[int, object]] = []  # (place in ORDER, event)
        self.error: BaseException | None = None
        self.first_audio = threading.Event()
        self.thread = threading.Thread(target=self._consume, daemon=True)

    def start(self) -> Reply:
        self.thread.start()
        return self

    def _consume(self) -> None:
        stream = self.engine.stream_inputs(self.inputs, self.options, self.cancel)
        chunks = 0
        try:
            for event in stream:
                self.events.append((next(ORDER), event))
                chunks += isinstance(event, AudioChunk)
                if chunks:
                    self.first_audio.set()
                if self.stop is not None and chunks == self.stop[1]:
                    if self.stop[0] == "close":
                        break
                    self.cancel.set()
        except Exception as exc:  # noqa: BLE001 -- the reply's failure, for the test to check
            self.error = exc
        finally:
            stream.close()
            self.first_audio.set()

    def join(self) -> Reply:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the reply never ended"
        return self

    @property
    def finished(self) -> Finished | None:
        last = self.events[-1][1] if self.events else None
        return last if isinstance(last, Finished) else None

    def first(self, kind: type) -> int:
        """Place in ORDER of the reply's first event of `kind`."""
        return next(order for order, event in self.events if isinstance(event, kind))


class Stagger:
    """Scheduler observer: holds the loop after the thinker steps in `joins` until the test has
    queued the next reply (so it joins at that step), and notes the largest batch of each stage."""

    def __init__(self, joins=JOINS):
        self.joins, self.steps = joins, 0
        self.largest: dict[str, int] = {}  # by stage: "prefill", "thinker", "talker", ...
        self.paused, self.resume = threading.Event(), threading.Event()

    def __call__(self, stage: str, batch: int, seconds: float) -> None:
        self.largest[stage] = max(self.largest.get(stage, 0), batch)
        if stage == "thinker":
            self.steps += 1
            if self.steps in self.joins:
                self.paused.set()
                self.resume.wait(WAIT_S)
                self.resume.clear()


def run_staggered(engine, replies: list[Reply], stagger: Stagger | None = None) -> Stagger:
    """Start replies[0], then each next one at the stagger's next join; wait for all of them."""
    stagger = stagger or Stagger()
    scheduler = engine.scheduler
    scheduler.observers.append(stagger)
    try:
        replies[0].start()
        for reply in replies[1:]:
            assert stagger.paused.wait(WAIT_S), "the batch ended before the next reply could join"
            stagger.paused.clear()
            queued = len(scheduler.waiting)
            reply.start()
            deadline = time.monotonic() + WAIT_S
            while len(scheduler.waiting) <= queued and reply.thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.002)
            stagger.resume.set()
        for reply in replies:
            reply.join()
    finally:
        scheduler.observers.remove(stagger)
        stagger.resume.set()
    return stagger


def same_tokens(ours: Finished, alone: Finished) -> None:
    assert ours is not None and ours.stop_reason == "length"
    assert ours.text_token_ids == alone.text_token_ids
    assert ours.codec_token_ids == alone.codec_token_ids
    assert ours.audio_samples == alone.audio_samples


def assert_idle(engine) -> None:
    """Every reply is done and every KV slot is free again."""
    scheduler = engine.scheduler
    assert not scheduler.running and not scheduler.waiting
    assert sorted(scheduler.free_slots) == list(range(engine.max_batch))


@pytest.fixture(scope="module")
def batched(loaded):
    """Admits every reply at once (no real-time guard)."""
    engine = OmniEngine(loaded, batch=BatchConfig(realtime_guard=False))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def alone(batched):
    """(messages, options) -> the Finished of that reply served alone on `batched` (memoised)."""
    memo = {}

    def served_alone(messages, options: GenerationOptions) -> Finished:
        key = (repr(messages), options)
        if key not in memo:
            reply = Reply(batched, messages, options).start().join()
            assert reply.error is None
            memo[key] = reply.finished
        return memo[key]

    return served_alone


@pytest.mark.parametrize("case", list(CASES))
def test_concurrent_replies_equal_replies_served_alone(batched, alone, case):
    messages, with_audio = CASES[case]
    voices = batched.voices
    wanted = [reply_options(i, voices[i % 2], with_audio) for i in range(3)]  # both voices in one batch
    expected = [alone(messages, o) for o in wanted]
    replies = [Reply(batched, messages, o) for o in wanted]
    stagger = run_staggered(batched, replies)
    for reply, reference in zip(replies, expected):
        assert reply.error is None
        same_tokens(reply.finished, reference)
    assert stagger.largest["thinker"] > 1 and stagger.largest["talker"] > 1, f"never together: {stagger.largest}"
    assert_idle(batched)


def test_a_cancelled_or_closed_reply_ends_alone_and_frees_its_slot(batched, alone):
    messages, voices = text_messages(), batched.voices
    first, second = voices
    wanted = [reply_options(2, first), reply_options(1, second), reply_options(2, second), reply_options(1, first)]
    stops = [None, ("cancel", 1), ("close", 1), None]  # after their first audio chunk
    replies = [Reply(batched, messages, o, stop) for o, stop in zip(wanted, stops)]
    run_staggered(batched, replies, Stagger(joins=(3, 6, 9)))
    kept, cancelled, closed, last = replies
    for reply in replies:
        assert reply.error is None
    same_tokens(kept.finished, alone(messages, wanted[0]))
    same_tokens(last.finished, alone(messages, wanted[3]))
    assert cancelled.finished.stop_reason == "cancelled"
    whole = alone(messages, wanted[1])
    assert len(cancelled.finished.codec_token_ids) < len(whole.codec_token_ids)
    assert whole.codec_token_ids[: len(cancelled.finished.codec_token_ids)] == cancelled.finished.codec_token_ids
    assert whole.text_token_ids[: len(cancelled.finished.text_token_ids)] == cancelled.finished.text_token_ids
    assert closed.finished is None and any(isinstance(e, AudioChunk) for _, e in closed.events)
    assert_idle(batched)


def fail_one_speech(engine, monkeypatch, where: str) -> None:
    """The reply with seed FAIL_SEED raises inside the scheduler: as its speech stream is made
    ("speech_stream"), as its talker samples its 30th code ("talker"), or as that code goes into
    its Token2Wav ("token2wav")."""
    make = engine.speech_stream

    def speech_stream(inputs, options, text, slot):
        if options.seed != FAIL_SEED:
            return make(inputs, options, text, slot)
        if where == "speech_stream":
            raise RuntimeError("injected failure")
        speech = make(inputs, options, text, slot)
        owner, name = (speech, "sample") if where == "talker" else (speech.token2wav, "add")
        setattr(owner, name, fail_at_call(getattr(owner, name), 30))
        return speech

    monkeypatch.setattr(engine, "speech_stream", speech_stream)


def fail_at_call(fn, n: int):
    """`fn`, raising RuntimeError("injected failure") at its n-th call."""
    calls = itertools.count(1)

    def failing(*args, **kwargs):
        if next(calls) == n:
            raise RuntimeError("injected failure")
        return fn(*args, **kwargs)

    return failing


@pytest.mark.parametrize("where", ["speech_stream", "talker", "token2wav"])
def test_a_failing_reply_ends_alone(batched, alone, monkeypatch, where):
    messages, voices = text_messages(), batched.voices
    wanted = [reply_options(2, voices[0]), reply_options(1, voices[1], seed=FAIL_SEED), reply_options(0, voices[1])]
    expected = [alone(messages, o) for o in wanted[::2]]
    fail_one_speech(batched, monkeypatch, where)
    first, failing, last = replies = [Reply(batched, messages, o) for o in wanted]
    run_staggered(batched, replies)
    assert isinstance(failing.error, RuntimeError) and str(failing.error) == "injected failure"
    assert failing.finished is None
    if where != "speech_stream":  # it failed mid-speech, after its first chunk (24 codes)
        assert any(isinstance(e, AudioChunk) for _, e in failing.events)
    for reply, reference in zip((first, last), expected):
        assert reply.error is None
        same_tokens(reply.finished, reference)
    assert_idle(batched)


def test_a_reply_over_max_batch_waits_for_a_free_slot(loaded, alone):
    engine = OmniEngine(loaded, batch=BatchConfig(max_batch=2, realtime_guard=False))
    try:
        messages, voices = text_messages(), engine.voices
        wanted = [reply_options(2, voices[0]), reply_options(1, voices[1]), reply_options(0, voices[1])]
        replies = [Reply(engine, messages, o) for o in wanted]
        run_staggered(engine, replies)
        third = replies[2]
        assert third.events[0][1] == Waiting(ahead=0, running=2, reason="full", estimate_s=None)  # no figures yet
        told = [e for _, e in third.events if isinstance(e, (Waiting, Admitted))]
        assert [type(e) for e in told] == [Waiting, Admitted] and told[1].waited_s > 0
        assert third.first(TextDelta) > min(reply.first(Finished) for reply in replies[:2])
        for reply, o in zip(replies, wanted):
            assert reply.error is None
            same_tokens(reply.finished, alone(messages, o))
        assert_idle(engine)
    finally:
        engine.close()


def test_the_realtime_guard_holds_a_newcomer_while_speech_is_behind(loaded, alone, monkeypatch):
    monkeypatch.setattr(scheduler_module, "ADMIT_LEAD_S", 1e9)  # any speech playing counts as behind
    engine = OmniEngine(loaded, batch=BatchConfig(max_batch=2, realtime_guard=True))
    try:
        messages, voices = text_messages(), engine.voices
        wanted = [reply_options(1, voices[0]), reply_options(0, voices[1])]
        speaking, newcomer = Reply(engine, messages, wanted[0]).start(), Reply(engine, messages, wanted[1])
        assert speaking.first_audio.wait(WAIT_S)
        newcomer.start().join()
        speaking.join()
        assert [e for _, e in newcomer.events if isinstance(e, Waiting)] == [Waiting(0, 1, "realtime", None)]
        assert newcomer.events[0][1] == Waiting(0, 1, "realtime", None)
        assert isinstance(newcomer.events[1][1], Admitted) and len(engine.scheduler.line.guard_waits) == 1
        assert newcomer.first(TextDelta) > speaking.first(Finished)
        for reply, o in zip((speaking, newcomer), wanted):
            assert reply.error is None
            same_tokens(reply.finished, alone(messages, o))
    finally:
        engine.close()


def test_a_reply_that_cannot_be_admitted_fails_alone_and_the_loop_goes_idle(batched, alone, monkeypatch):
    messages, voices = text_messages(), batched.voices
    wanted = [reply_options(1, voices[0]), reply_options(0, voices[1], seed=FAIL_SEED)]
    text_stream = batched.text_stream

    def failing(inputs, options, slot):
        if options.seed == FAIL_SEED:
            raise RuntimeError("injected failure at admission")
        return text_stream(inputs, options, slot)

    monkeypatch.setattr(batched, "text_stream", failing)
    first, failed = Reply(batched, messages, wanted[0]), Reply(batched, messages, wanted[1])
    run_staggered(batched, [first, failed], Stagger(joins=(3,)))
    assert isinstance(failed.error, RuntimeError) and not failed.events
    assert first.error is None
    same_tokens(first.finished, alone(messages, wanted[0]))
    assert_idle(batched)  # nothing left behind in `running`: the loop sleeps again


def test_a_cancelled_reply_leaves_the_line_at_once(loaded):
    engine = OmniEngine(loaded, batch=BatchConfig(max_batch=1, realtime_guard=False))
    try:
        long = GenerationOptions(greedy=True, max_new_tokens=400, min_new_tokens=400, speech=False)
        running = engine.stream(text_messages(), long)
        next(running)
        cancel = threading.Event()
        waiting = engine.stream(text_messages("another"), reply_options(0, speech=False), cancel)
        assert next(waiting) == Waiting(ahead=0, running=1, reason="full")
        cancel.set()
        started = time.monotonic()
        assert [e.stop_reason for e in waiting if isinstance(e, Finished)] == ["cancelled"]
        assert time.monotonic() - started < 5 and not engine.scheduler.waiting
        closed = engine.stream(text_messages("a third"), reply_options(0, speech=False))
        assert next(closed) == Waiting(ahead=0, running=1, reason="full")
        started = time.monotonic()
        closed.close()  # returns once the scheduler has let it go, not after the running reply
        assert time.monotonic() - started < 5 and not engine.scheduler.waiting
        assert engine.scheduler.running, "the first reply was still running all along"
        running.close()
    finally:
        engine.close()
    started = time.monotonic()
    with pytest.raises(EngineError, match="shutting down"):
        next(engine.stream(text_messages(), reply_options(0)))
    assert time.monotonic() - started < 5


def test_without_the_loop_thread_concurrent_callers_are_served_one_after_the_other(loaded, alone):
    engine = OmniEngine(loaded, batch=BatchConfig(max_batch=2, threaded=False))
    assert engine.max_batch == 1  # one reply at a time needs one KV slot, whatever max_batch says
    messages, voices = text_messages(), engine.voices
    wanted = [reply_options(1, voices[0]), reply_options(0, voices[1])]
    first, second = Reply(engine, messages, wanted[0]).start(), Reply(engine, messages, wanted[1])
    assert first.first_audio.wait(WAIT_S)
    second.start().join()  # asked for while the first is running: it waits for it
    first.join()
    assert first.events[-1][0] < second.events[0][0], "the two replies ran interleaved"
    for reply, o in zip((first, second), wanted):
        assert reply.error is None
        same_tokens(reply.finished, alone(messages, o))
    assert engine.scheduler._thread is None
    assert engine.scheduler.free_slots == [0]


def prefilled_slots(engine, stack: str) -> list[torch.Tensor]:
    """Slots 0, 1, 2 of `stack`'s LeanStep loaded by real prefills of three prompts of different
    lengths (the talker's after its own prefill). -> each slot's next input embeds [1, 1, D]."""
    embeds = []
    for slot, case in enumerate(("text", "multi-turn", "image+audio")):
        messages, with_audio = CASES[case]
        wanted = GenerationOptions(greedy=True, max_new_tokens=8, max_audio_tokens=8, use_audio_in_video=with_audio)
        inputs = engine.fit_context(messages, wanted)[0]
        text = engine.text_stream(inputs, wanted, slot)
        for _ in text.prefill():
            pass
        text.next_token()
        if stack == "thinker":
            embeds.append(text.decoder.input_embeds(text.token))
            continue
        speech = engine.speech_stream(inputs, wanted, text, slot)
        speech.feed(text.feed())
        speech.step()  # the talker's prefill, into its slot
        embeds.append(speech.next_input())
    return embeds


@pytest.mark.parametrize("stack", ["thinker", "talker"])
def test_the_masked_graph_body_agrees_with_the_eager_step(batched, stack):
    lean, slots = batched.lean_steps[stack], [0, 1, 2]
    embeds = torch.cat(prefilled_slots(batched, stack))
    lengths = [lean.lengths[slot] for slot in slots]
    positions = [length + lean.rope_offsets[slot] for slot, length in zip(slots, lengths)]
    assert len(set(lengths)) == 3
    head = batched.model.thinker.lm_head if stack == "thinker" else batched.model.talker.codec_head
    saved = lean.keys.clone(), lean.values.clone()
    with torch.inference_mode():
        eager = lean._step(embeds, slots, lean.cos[positions], lean.sin[positions], lengths)
        eager_kv = lean.keys.clone(), lean.values.clone()
        lean.keys.copy_(saved[0]), lean.values.copy_(saved[1])
        # as a CUDA graph runs it: a padding row on the scratch slot, attention over a whole bucket
        span = next(bucket for bucket in graph_buckets(lean.max_len) if bucket > max(lengths))
        slot_ids = torch.tensor([*slots, lean.slots])
        position, index = torch.tensor([*positions, 0]), torch.tensor([*lengths, 0])
        padded = torch.cat([embeds, torch.zeros_like(embeds[:1])])
        masked = lean._step_masked(padded, slot_ids, lean.cos.index_select(0, position),
                                   lean.sin.index_select(0, position), index, span)[:3]
        masked_kv = lean.keys[:, slots].clone(), lean.values[:, slots].clone()
        lean.keys.copy_(saved[0]), lean.values.copy_(saved[1])
        torch.testing.assert_close(masked, eager, atol=1e-5, rtol=1e-5)
        assert torch.equal(head(masked[:, -1]).argmax(-1), head(eager[:, -1]).argmax(-1))
    torch.testing.assert_close(masked_kv[0], eager_kv[0][:, slots], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_kv[1], eager_kv[1][:, slots], atol=1e-5, rtol=1e-5)


class WorstInterleaving:
    """Stands in for the tokenizer's Rust backend (`tokenizer._tokenizer`). Each time the victim
    thread encodes with special tokens kept whole, another request (`other`, in a thread of its
    own) first runs up to its first encode with special tokens split, and holds there until the
    victim's encode is done: the worst interleaving of two requests prepared at once, made
    deterministic. Where tokenization is serialised `other` cannot get there: after WAIT_S the
    victim goes on alone, and from then on no other request is let in."""

    WAIT_S = 2.0

    def __init__(self, backend, other):
        for name, value in (("_backend", backend), ("_other", other), ("_turns", {}), ("_serialised", False),
                            ("_victim", threading.current_thread())):
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def __setattr__(self, name, value):
        setattr(self._backend, name, value)

    def encode_batch(self, *args, **kwargs):
        me, backend = threading.current_thread(), self._backend
        if me is self._victim and not backend.encode_special_tokens and not self._serialised:
            split, encoded = threading.Event(), threading.Event()
            other = threading.Thread(target=self._other, daemon=True)
            self._turns[other] = (split, encoded)  # other's thread -> (it has split, the victim encoded)
            other.start()
            object.__setattr__(self, "_serialised", not split.wait(self.WAIT_S))
            try:
                return backend.encode_batch(*args, **kwargs)
            finally:
                encoded.set()
                other.join(self.WAIT_S)
        split, encoded = self._turns.get(me, (None, None))
        if split is not None and backend.encode_special_tokens and not split.is_set():
            split.set()
            encoded.wait(self.WAIT_S)
        return backend.encode_batch(*args, **kwargs)


def test_prompts_prepared_at_once_are_tokenized_alike(batched, monkeypatch):
    wanted = reply_options(0)
    expected = batched.fit_context(text_messages(), wanted)[0].input_ids
    other = [{"role": "user", "content": [{"type": "text", "text": "Another request, from another user"}]}]
    tokenizer = batched.processor.tokenizer
    interleaving = WorstInterleaving(tokenizer._tokenizer, lambda: batched.fit_context(other, wanted))
    monkeypatch.setattr(tokenizer, "_tokenizer", interleaving)
    ours = batched.fit_context(text_messages(), wanted)[0].input_ids
    monkeypatch.undo()
    assert ours.shape == expected.shape and torch.equal(ours, expected), \
        f"{ours.shape[1] - expected.shape[1]} more prompt tokens when another request was prepared meanwhile"


@pytest.mark.gpu
def test_cuda_graph_batches_equal_replies_served_alone_on_gpu(tiny_dir):
    """On CUDA the batched steps replay graphs per (batch, cache length) bucket; greedy replies served
    together still equal those served alone (float32, so the comparison is as on the CPU)."""
    from omni_demo.config import ModelConfig
    from omni_demo.models.loading import load_model

    engine = OmniEngine(load_model(ModelConfig(model="tiny", device="cuda", dtype="float32")),
                        batch=BatchConfig(realtime_guard=False, max_batch=4))
    try:
        assert any(batch > 1 for batch, _ in engine.lean_steps["thinker"].graphs), "no batched graph was captured"
        messages, voices = text_messages(), engine.voices
        wanted = [reply_options(i, voices[i % 2]) for i in range(3)]
        expected = [Reply(engine, messages, o).start().join().finished for o in wanted]
        replies = [Reply(engine, messages, o) for o in wanted]
        stagger = run_staggered(engine, replies)
        for reply, reference in zip(replies, expected):
            assert reply.error is None
            same_tokens(reply.finished, reference)
        assert stagger.largest["thinker"] > 1
    finally:
        engine.close()


class _Told:
    """What WaitingLine reads and writes of a sequence."""

    def __init__(self, admitted_at=None):
        self.admitted_at, self.told, self.told_at, self.sent, self.queued_at = admitted_at, None, 0.0, [], 90.0

    def emit(self, event):
        self.sent.append(event)


def test_the_waiting_line_estimates_from_recent_replies_and_retells_only_changes():
    from omni_demo.engine.sequence import WaitingLine

    line, now = WaitingLine(), 100.0
    running = [_Told(admitted_at=now - 4), _Told(admitted_at=now - 8)]
    assert line.estimate(0, "full", running, now) is None  # no reply has run out yet
    line.runs.extend([10.0, 10.0, 12.0])  # median 10 s: the slots free in 6 s and 2 s
    assert [line.estimate(ahead, "full", running, now) for ahead in range(3)] == [2.0, 6.0, 12.0]
    assert line.estimate(0, "full", [_Told(admitted_at=now - 30)], now) == 1.0  # overdue: any moment
    assert line.estimate(0, "realtime", running, now) is None
    line.guard_waits.extend([3.0, 5.0])
    assert line.estimate(1, "realtime", running, now) == 8.0
    waiting = [_Told(), _Told()]
    line.tell(waiting, running, slots_full=True, now=now)
    assert [s.sent for s in waiting] == [[Waiting(0, 2, "full", 2.0)], [Waiting(1, 2, "full", 6.0)]]
    line.tell(waiting, running, slots_full=True, now=now + 0.5)  # half a second later: estimates moved 0.5 s
    assert [len(s.sent) for s in waiting] == [1, 1]
    line.tell(waiting[1:], running, slots_full=True, now=now + 0.6)  # the first left the line: the second moves up
    assert waiting[1].sent[-1] == Waiting(0, 2, "full", 1.4)
    line.tell(waiting[1:], running, slots_full=False, now=now + 0.7)  # a slot is free, the guard holds it
    assert waiting[1].sent[-1] == Waiting(0, 2, "realtime", 4.0)
    line.admitted(waiting[1], now + 2)
    assert waiting[1].sent[-1] == Admitted(12.0) and list(line.guard_waits) == [3.0, 5.0, 12.0]

