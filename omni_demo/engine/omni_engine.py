"""The streaming engine: the thinker and the talker decoded in lock-step, Token2Wav chunk by
chunk, every running reply in one batch.

Follow one reply: `stream` fits the conversation into the window (omni_demo.inputs.context) in the
caller's thread, `stream_inputs` hands it to the scheduler (omni_demo.engine.scheduler), whose loop
admits it into a KV slot, prefills it, and steps it with every other running reply (one text
token -> its reply part to the speech side -> one codec step when the speech side is ready), and
`finished` reports. The two sides of a reply are `streams.TextStream` and `streams.SpeechStream`;
the decoders under them are in `decoders.py`. `OmniEngine` implements the `Backend` protocol
(omni_demo.backends.protocol).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from omni_demo.config import (
    DEFAULT_SYSTEM_PROMPT,
    SAMPLE_RATE,
    SAMPLES_PER_CODE,
    BatchConfig,
    CacheConfig,
    GenerationOptions,
    Limits,
    StreamingConfig,
)
from omni_demo.errors import Cancelled, InputError
from omni_demo.events import ContextTrimmed, Event, Finished, ReplyClock
from omni_demo.inputs.context import fit_context, plan_conversation
from omni_demo.inputs.messages import system_message
from omni_demo.inputs.prepare import PreparedInputs, prepare_inputs
from omni_demo.inputs.prompt import MediaCache
from omni_demo.models.loading import LoadedModel

from .conversation_cache import ConversationCache, crop
from .decode_step import LeanStep, PlainStep, graph_buckets
from .decoders import DecodeStep, TalkerDecoder, ThinkerDecoder
from .listening import Listener, Watcher
from .sampling import talker_eos, talker_sampler, thinker_sampler, token_id_list
from .scheduler import Scheduler, max_batch
from .sequence import Sequence
from .streams import SpeechStream, TextDetokenizer, TextStream
from .token2wav import StreamingToken2Wav

log = logging.getLogger(__name__)
PREPARE_WORKERS = 8  # requests whose media are read and processed at once (the rest wait for a worker)
PREPARE_NICENESS = 10  # how much lower the CPU priority of that work is than the scheduler's


def lower_priority() -> None:
    """Lower this thread's CPU priority by PREPARE_NICENESS (Linux: a thread's nice value is its own)."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PREPARE_NICENESS))
    except (AttributeError, OSError):  # not Linux, or not allowed: the same priority, as before
        pass


class OmniEngine:
    """Owns the loaded model and the scheduler that serves its replies together; `close` stops it."""

    def __init__(self, loaded: LoadedModel, streaming: StreamingConfig | None = None, limits: Limits | None = None,
                 lean: bool = True, cache: CacheConfig | None = None, batch: BatchConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or Limits()
        self.stacks = {"thinker": self.model.thinker.model.language_model}  # the decoder stacks, by name
        if loaded.has_talker:
            self.stacks["talker"] = self.model.talker.model
        self.batch = batch or BatchConfig()
        self.max_batch = max_batch(self.batch, self.stacks, self._windows(), loaded.device) if lean else 1
        self.lean_steps: dict[str, LeanStep] = self._make_lean_steps() if lean else {}
        log.info("serving up to %d replies at once (--max-batch)", self.max_batch)
        self.scheduler = Scheduler(self, self.batch, self.max_batch)
        # Requests' media are read and processed here, at a lower CPU priority than the scheduler's
        # steps: on a small CPU a 4K video being decoded would otherwise hold the running replies back.
        self.preparing = ThreadPoolExecutor(PREPARE_WORKERS, "omni-prepare", initializer=lower_priority)
        cache = cache or CacheConfig()
        self.conversation_cache = self.media_cache = None  # what later turns reuse
        if cache.enabled:
            self.conversation_cache = ConversationCache(cache.max_prefixes, int(cache.max_prefix_mb * 2**20),
                                                        public_ids=self._default_system_ids())
            self.media_cache = MediaCache(int(cache.max_media_mb * 2**20))
        self.thinker_eos = token_id_list(self.model.thinker.generation_config.eos_token_id)
        self.talker_eos = talker_eos(self.model.talker) if loaded.has_talker else []

    def _windows(self) -> dict[str, int]:
        """Positions each decoder's static caches hold per reply: the model's, or --context-window."""
        config, window = self.model.config, self.loaded.context_window
        windows = {"thinker": config.thinker_config.text_config.max_position_embeddings,
                   "talker": config.talker_config.max_position_embeddings}
        return {name: min(size, window or size) for name, size in windows.items()}

    def _make_lean_steps(self) -> dict[str, LeanStep]:
        """Static KV caches over the whole windows, one slot per reply of a batch; on CUDA, the
        steps captured as CUDA graphs now (per batch and cache-length bucket), so the first reply
        does not pay for the capture."""
        windows = self._windows()
        steps = {name: LeanStep(stack, windows[name], self.max_batch) for name, stack in self.stacks.items()}
        if self.loaded.device.type == "cuda":
            for step in steps.values():
                try:
                    step.capture(graph_buckets(self.max_batch, smallest=1), graph_buckets(step.max_len))
                except Exception:  # an eager lean step still beats the plain one
                    log.exception("CUDA graph capture failed; decoding with eager lean steps")
        return steps

    def close(self) -> None:
        """Stop serving: running and waiting replies end with an EngineError; the loop is joined."""
        self.scheduler.close()
        self.preparing.shutdown(wait=False, cancel_futures=True)

    def _default_system_ids(self) -> list[int]:
        """The tokens every prompt with the default system prompt begins with: what all parties share."""
        text = self.processor.apply_chat_template([system_message(DEFAULT_SYSTEM_PROMPT)], tokenize=False)
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def media_cache_of(self, options: GenerationOptions) -> MediaCache | None:
        """The media cache as the request's party sees it (its own items only); None when off, or for a
        shared party (a skipped encoder would tell one client that another sent the same file)."""
        scope = options.cache_scope
        return None if self.media_cache is None or not scope.private else self.media_cache.scoped(scope.party)

    @property
    def lean(self) -> bool:
        return bool(self.lean_steps)

    def decode_step(self, stack: str, slot: int | None = None) -> DecodeStep:
        """The decode step for the "thinker" or "talker" stack: KV slot `slot` of the lean one
        when the engine has it, else (or for slot None) a fresh plain one."""
        if slot is not None and stack in self.lean_steps:
            return self.lean_steps[stack].slot(slot)
        return PlainStep(self.stacks[stack])

    @property
    def voices(self) -> list[str]:
        return self.loaded.voices

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def is_random(self) -> bool:
        return self.loaded.is_random

    def wait_estimate(self, ahead: int) -> float | None:
        """Seconds until a reply `ahead` places behind every free slot would start (see WaitingLine)."""
        return self.scheduler.line.estimate(ahead, "full", list(self.scheduler.running), time.monotonic())

    @property
    def precision(self) -> str:
        return self.loaded.precision

    @property
    def quantization(self) -> str:
        return self.loaded.quantization

    def _check(self, options: GenerationOptions) -> None:
        if options.speech and not self.loaded.has_talker:
            raise InputError("this model was loaded without its talker; ask for text only")
        if options.speech and options.voice not in self.model.speaker_map:
            raise InputError(f"unknown voice {options.voice!r}; choose one of {', '.join(self.voices)}")
        if self.prompt_limit(options) < 1:
            raise InputError(f"max_tokens {options.max_new_tokens}" + (f" and max_audio_tokens {options.max_audio_tokens}"
                             if options.speech else "") + " leave no room for any prompt in this model's window; "
                             "ask for a shorter reply")

    # -- the prompt ------------------------------------------------------------------------------

    def prompt_limit(self, options: GenerationOptions) -> int:
        """Longest prompt that leaves room for the reply in the thinker's (and talker's) window."""
        windows = self._windows()
        limit = windows["thinker"] - options.max_new_tokens
        if options.speech:  # the talker's prompt is the thinker's + 2, then one position per code
            limit = min(limit, windows["talker"] - 2 - options.max_audio_tokens)
        if self.limits.max_context_tokens is not None:
            limit = min(limit, self.limits.max_context_tokens)
        return limit

    def plan_media(self, messages: list[dict], options: GenerationOptions):
        """Each media part's reading plan, as `fit_context` makes them for a reply with `options`."""
        return plan_conversation(self.processor, messages, self.limits, use_audio_in_video=options.use_audio_in_video,
                                 token_limit=self.prompt_limit(options))

    def prepare(self, messages, options: GenerationOptions) -> PreparedInputs:
        """The whole conversation through the processor (no fitting: the bench and tests use it)."""
        self._check(options)
        return prepare_inputs(self.processor, messages, use_audio_in_video=options.use_audio_in_video,
                              device=self.loaded.device, limits=self.limits, media_cache=self.media_cache_of(options),
                              token_budget=self.prompt_limit(options) // 2)

    def fit_context(self, messages, options: GenerationOptions,
                    cancel: threading.Event | None = None) -> tuple[PreparedInputs, int]:
        """The conversation's kept turns, prepared (omni_demo.inputs.context): (inputs, turns left out)."""
        self._check(options)
        return fit_context(self.processor, messages, self.limits, token_limit=self.prompt_limit(options),
                           use_audio_in_video=options.use_audio_in_video, device=self.loaded.device,
                           media_cache=self.media_cache_of(options), cancel=cancel)

    def listen(self, history: list[dict], options: GenerationOptions | None = None, exact: bool = False) -> Listener:
        """A Listener for the next user turn, spoken: it encodes and prefills the audio while it
        arrives (omni_demo.engine.listening). `history` is the conversation before this turn;
        `options` those the reply will have (they decide how the history's media are read); `exact`:
        keep only windows identical to the whole clip's."""
        return Listener(self, history, options or GenerationOptions(), exact)

    def watch(self, history: list[dict], options: GenerationOptions | None = None) -> Watcher | None:
        """A Watcher for the next user turn, spoken with the camera on: its frames and sound encoded
        and prefilled chunk by chunk (omni_demo.engine.listening.Watcher). None without use_audio_in_video
        (its sound is then a part beside its frames: the turn is read whole)."""
        options = options or GenerationOptions()
        return Watcher(self, history, options) if options.use_audio_in_video else None

    # -- the reply -------------------------------------------------------------------------------

    def stream(self, messages, options: GenerationOptions | None = None,
               cancel: threading.Event | None = None) -> Iterator[Event]:
        """Yield TextDelta and AudioChunk events as they are produced, then one Finished.

        Stops within one decode step or one audio chunk of `cancel` being set, or at the next
        yield when the generator is closed. Raises InputError for a request it cannot serve.
        """
        options = options or GenerationOptions()
        clock = ReplyClock()
        self.scheduler.check_serving()
        try:
            inputs, dropped = self.preparing.submit(self.fit_context, messages, options, cancel).result()
        except Cancelled:
            return
        if dropped:
            yield ContextTrimmed(dropped, inputs.prompt_len, self.prompt_limit(options))
        yield from self.stream_inputs(inputs, options, cancel, clock=clock)

    def stream_inputs(self, inputs: PreparedInputs, options: GenerationOptions, cancel: threading.Event | None = None,
                      *, clock: ReplyClock | None = None) -> Iterator[Event]:
        """`stream` for inputs already through the processor (timings count from `clock`'s start).
        Closing the generator cancels the reply at the scheduler's next step."""
        self._check(options)
        yield from self.scheduler.serve(Sequence(inputs, options, cancel, clock or ReplyClock()))

    # -- the scheduler's side: one reply's streams and its end ----------------------------------------

    def text_stream(self, inputs: PreparedInputs, options: GenerationOptions, slot: int | None) -> TextStream:
        decoder = ThinkerDecoder(self.model.thinker, self.decode_step("thinker", slot))
        sampler = thinker_sampler(self.model.thinker, options, inputs.prompt_len, self.loaded.device)
        return TextStream(decoder, sampler, TextDetokenizer(self.processor.tokenizer), inputs,
                          max_new_tokens=options.max_new_tokens, eos=self.thinker_eos, speech=options.speech,
                          conversation_cache=self.conversation_cache, scope=options.cache_scope)

    def speech_stream(self, inputs: PreparedInputs, options: GenerationOptions, text: TextStream,
                      slot: int | None) -> SpeechStream:
        speaker = self.model.speaker_map[options.voice]
        token2wav = StreamingToken2Wav(self.model.token2wav, speaker, self.streaming,
                                       max_codes=options.max_audio_tokens, seed=options.seed)
        sampler = talker_sampler(self.model.talker, options, inputs.prompt_len + 2, self.loaded.device)
        return SpeechStream(TalkerDecoder(self.model, self.decode_step("talker", slot)), token2wav, sampler,
                            inputs=inputs, text=text, speaker_bos=speaker["bos_token"], eos=self.talker_eos,
                            max_codes=options.max_audio_tokens)

    def finished(self, sequence: Sequence) -> Finished:
        """The reply's Finished, once its turn is in the conversation cache: when it was prefilled,
        and not closed by its reader (a voice call drops a reply to words the user went on from:
        of no use to anyone's later turn; a reply cancelled by its `cancel` Event is kept)."""
        text, speech = sequence.text, sequence.speech
        prefilled = text is not None and text.logits is not None
        if self.conversation_cache is not None and prefilled and not sequence.closed:
            self._remember(sequence.inputs, text, speech)
        if sequence.cancelled:
            stop_reason = "cancelled"
        else:
            stop_reason = text.stop_reason
        return self._finished(sequence.inputs, text, speech, stop_reason, sequence.clock)

    def _remember(self, inputs: PreparedInputs, text: TextStream, speech: SpeechStream | None) -> None:
        """Keep this turn's prompt and fed reply tokens in the conversation cache."""
        thinker, fed = text.decoder, len(text.reply_parts)
        talker = None  # the reused prefix's talker state, while still true of this prompt
        if speech is not None and speech.talker.cache is not None:
            talker_config = self.model.config.talker_config
            talker = (crop(speech.talker.cache, inputs.prompt_len, talker_config), speech.talker.positions)
        replaces = thinker.supersedes(thinker.prefix is not None and thinker.prefix.partial)
        kept = thinker.kept_prefix(inputs.input_ids[0].tolist() + text.token_ids[:fed], inputs.media,
                                   text.reply_parts, talker)
        self.conversation_cache.add(kept, replaces=replaces)
        self.media_cache.trim()  # the turn may have added encoder outputs to its items

    def _finished(self, inputs: PreparedInputs, text: TextStream | None, speech: SpeechStream | None,
                  stop_reason: str, clock: ReplyClock) -> Finished:
        codes, samples = (speech.codes, speech.next_sample) if speech else ([], 0)
        token_ids = text.token_ids if text is not None else []
        reused = text.decoder.reused if text is not None and text.decoder.own else 0  # the party's own hits only
        stats = clock.stats(audio_s=samples / SAMPLE_RATE, prompt_tokens=inputs.prompt_len,
                            reused_prompt_tokens=reused, text_tokens=len(token_ids), audio_tokens=len(codes))
        assert samples == SAMPLES_PER_CODE * len(codes) or stop_reason == "cancelled"
        return Finished(text.detokenizer.text if text is not None else "", token_ids, list(codes), samples,
                        stop_reason, stats, inputs.messages)
