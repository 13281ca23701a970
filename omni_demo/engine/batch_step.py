"""The stages of one scheduler step over the running replies (omni_demo.engine.scheduler), as
nano-vllm's ModelRunner is to its Scheduler: a piece of one prefill, one batched thinker step,
one batched talker step and the Token2Wav work it makes due. A reply's own failure ends that
reply only (`end`), the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from omni_demo.errors import EngineError
from omni_demo.events import TextDelta

from .decode_step import SlotStep
from .sequence import Sequence
from .token2wav import push_many

log = logging.getLogger(__name__)


class Stages:
    def __init__(self, engine, *, end: Callable[[Sequence, BaseException | None], None],
                 observe: Callable[[str, int, float], None]):
        self.engine = engine
        self.end = end  # finish a reply: its Finished, or the error that ended it
        self.observe = observe  # (stage, batch size, seconds) of the Token2Wav calls

    def prefill_piece(self, sequence: Sequence) -> None:
        try:
            next(sequence.prefill)
        except StopIteration:
            sequence.prefill = None
        except Exception as exc:
            self.end(sequence, engine_error(exc))

    def thinker_step(self, writing: list[Sequence]) -> None:
        for sequence in writing:
            self._guarded(sequence, self._sample_text, sequence)
        feeding = [s for s in writing if not s.finished and s.text.wants_feed]
        if feeding:
            decoders = [s.text.decoder for s in feeding]
            embeds = decoders[0].input_embeds(torch.cat([s.text.token for s in feeding]))
            logits, parts = decoders[0].outputs(_decode([d.decode_step for d in decoders], embeds), embeds)
            for row, sequence in enumerate(feeding):
                # its own copy: a view would keep the whole batch's tensor alive as long as the reply
                part = sequence.text.accept(logits[row : row + 1], parts[row : row + 1].clone())
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

    def talker_step(self, speaking: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """One codec step for every reply in `speaking`. -> (reply, its new codes) for `synthesize`."""
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
        return [(s, codes) for s, codes in sampled if not s.finished]

    def synthesize(self, sampled: list[tuple[Sequence, list[int]]]) -> None:
        """The new codes of several replies through their streaming Token2Wav, batched (DiT windows and
        vocoder spans of the same shape run together); each reply's new samples go out as its chunk."""
        items = [(s.speech.token2wav, codes, s.speech.done) for s, codes in sampled]
        for (sequence, _), new in zip(sampled, push_many(items, timer=self.observe)):
            if isinstance(new, Exception):
                self.end(sequence, engine_error(new))
            elif chunk := sequence.speech.chunk(new):
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
            self.end(sequence, engine_error(exc))


def _decode(steps: list, embeds: torch.Tensor) -> torch.Tensor:
    """One token for each reply's decode step: embeds [B, 1, D] -> hidden [B, 1, D]. Slots of one
    LeanStep go through it in one batched pass; plain steps one by one."""
    first = steps[0]
    if isinstance(first, SlotStep) and all(isinstance(s, SlotStep) and s.lean is first.lean for s in steps):
        return first.lean.step_many([s.slot for s in steps], embeds)
    return torch.cat([step.step(embeds[row : row + 1]) for row, step in enumerate(steps)])


def engine_error(exc: BaseException) -> BaseException:
    """A reply's failure as its caller should see it (an out-of-memory says what to do)."""
    if isinstance(exc, torch.OutOfMemoryError):
        try:
            torch.cuda.empty_cache()  # hand the failed request's memory back for the next one
        except Exception:  # a device past recovery: the error below still says what happened
            log.exception("emptying the CUDA cache failed")
        return EngineError("the GPU ran out of memory on this request; try shorter or fewer media, "
                           "or a shorter reply")
    return exc
