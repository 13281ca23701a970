"""The streaming engine: one reply at a time, the thinker and the talker decoded in lock-step,
Token2Wav chunk by chunk.

Follow one reply: `stream` fits the conversation into the window and prepares it, `_reply` runs
the loop (cancel? -> one text token -> hand its reply part to the speech side -> one codec step
if the speech side is ready -> yield), and `_finished` reports. The two sides are
`streams.TextStream` and `streams.SpeechStream`; the decoders under them are in `decoders.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import SAMPLE_RATE, SAMPLES_PER_CODE, CacheConfig, GenerationOptions, Limits, StreamingConfig
from .decode_step import LeanStep, PlainStep, graph_buckets
from .decoders import DecodeStep, TalkerDecoder, ThinkerDecoder
from .errors import Cancelled, EngineError, InputError
from .events import ContextTrimmed, Event, Finished, Stats, TextDelta
from .inputs import PreparedInputs, check_request, image_max_pixels, normalize_conversation, plan_media, prepare_inputs
from .loading import LoadedModel
from .prefix_cache import Prefix, PrefixCache, crop
from .prompt import MediaCache, count_tokens
from .sampling import Sampler, token_id_list
from .streams import SpeechStream, TextDetokenizer, TextStream
from .token2wav import StreamingToken2Wav

log = logging.getLogger(__name__)
BUSY_WAIT_S = 30.0  # how long a reply waits for the previous one to let go of the engine


@dataclass
class _Clock:
    start: float
    first_text: float | None = None
    first_audio: float | None = None

    def mark(self, event: str) -> None:
        """Note the first "text" or "audio" event."""
        name = f"first_{event}"
        if getattr(self, name) is None:
            setattr(self, name, time.perf_counter())

    def since_start(self, mark: float | None) -> float | None:
        return None if mark is None else mark - self.start


@dataclass
class _Budget:
    """What the kept turns of a conversation take, counted from the newest turn back."""

    limits: Limits
    tokens: int
    images: int = 0
    videos: int = 0
    audio_s: float = 0.0

    def add(self, tokens: int, plans: list) -> None:
        self.tokens += tokens
        self.images += sum(p.kind == "image" for p in plans)
        self.videos += sum(p.kind == "video" for p in plans)
        self.audio_s += sum(p.audio_s for p in plans)

    def over(self, token_limit: int) -> str | None:
        """What is over its budget, in words; None when nothing is."""
        limits = self.limits
        if self.tokens > token_limit:
            return (f"this message is {self.tokens} tokens with its media; the limit is {token_limit} "
                    f"({self.tokens - token_limit} over). Send less media, a shorter clip, or lower max new tokens.")
        if self.images > limits.max_images_per_conversation:
            return f"this turn has {self.images} images; the limit is {limits.max_images_per_conversation}"
        if self.videos > limits.max_videos_per_conversation:
            return f"this turn has {self.videos} videos; the limit is {limits.max_videos_per_conversation}"
        if self.audio_s > limits.max_audio_s_per_conversation:
            return (f"this turn has {self.audio_s:.1f} s of sound; the limit is "
                    f"{limits.max_audio_s_per_conversation:g} s per conversation")
        return None


def turn_starts(messages: list[dict]) -> tuple[int, list[int]]:
    """(messages kept whatever is trimmed: the system prompt or nothing, index of each turn's first
    message). A turn is a user message and everything up to the next one."""
    head = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= head]
    return head, [head] + users[1:]


class OmniEngine:
    """Owns the loaded model; `stream` serves one request at a time."""

    def __init__(self, loaded: LoadedModel, streaming: StreamingConfig | None = None, limits: Limits | None = None,
                 lean: bool = True, cache: CacheConfig | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or Limits()
        self._busy = threading.Lock()  # the lean steps' static caches serve one reply at a time
        self.stacks = {"thinker": self.model.thinker.model.language_model}  # the decoder stacks, by name
        if loaded.has_talker:
            self.stacks["talker"] = self.model.talker.model
        self.lean_steps: dict[str, LeanStep] = self._make_lean_steps() if lean else {}
        cache = cache or CacheConfig()
        self.prefix_cache = self.media_cache = None  # the conversation cache: what later turns reuse
        if cache.enabled:
            self.prefix_cache = PrefixCache(cache.max_prefixes, int(cache.max_prefix_mb * 2**20))
            self.media_cache = MediaCache(int(cache.max_media_mb * 2**20))
        self.thinker_eos = token_id_list(self.model.thinker.generation_config.eos_token_id)
        if loaded.has_talker:
            talker = self.model.talker
            # Upstream stops the talker on codec pad or codec end (generate's talker_eos_token_id).
            self.talker_eos = [talker.codec_pad_token, talker.codec_eos_token]

    def _make_lean_steps(self) -> dict[str, LeanStep]:
        """Static KV caches over the whole windows; on CUDA, the steps captured as CUDA graphs now,
        so the first reply does not pay for the capture."""
        config = self.model.config
        windows = {"thinker": config.thinker_config.text_config.max_position_embeddings,
                   "talker": config.talker_config.max_position_embeddings}
        steps = {name: LeanStep(stack, windows[name]) for name, stack in self.stacks.items()}
        if self.loaded.device.type == "cuda":
            for step in steps.values():
                try:
                    step.capture(graph_buckets(step.max_len))
                except Exception:  # an eager lean step still beats the plain one
                    log.exception("CUDA graph capture failed; decoding with eager lean steps")
        return steps

    @property
    def lean(self) -> bool:
        return bool(self.lean_steps)

    def decode_step(self, stack: str, lean: bool = True) -> DecodeStep:
        """The decode step for the "thinker" or "talker" stack: the shared lean one when the engine
        has it (and `lean`), else a fresh plain one."""
        if lean and stack in self.lean_steps:
            return self.lean_steps[stack]
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

    def _check(self, options: GenerationOptions) -> None:
        if options.speech and not self.loaded.has_talker:
            raise InputError("this model was loaded without its talker; ask for text only")
        if options.speech and options.voice not in self.model.speaker_map:
            raise InputError(f"unknown voice {options.voice!r}; choose one of {', '.join(self.voices)}")

    def _generator(self, options: GenerationOptions, offset: int) -> torch.Generator:
        generator = torch.Generator(device=self.loaded.device)
        if options.seed is None:
            generator.seed()
        else:
            generator.manual_seed(options.seed + offset)
        return generator

    def _thinker_sampler(self, options: GenerationOptions, prompt_len: int) -> Sampler:
        defaults = self.model.thinker.generation_config
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return Sampler(
            do_sample=not options.greedy and bool(options.temperature or defaults.do_sample),
            temperature=pick(options.temperature, defaults.temperature or 1.0),
            top_k=pick(options.top_k, defaults.top_k),
            top_p=pick(options.top_p, defaults.top_p),
            repetition_penalty=pick(options.repetition_penalty, defaults.repetition_penalty),
            eos_ids=self.thinker_eos,
            prompt_len=prompt_len,
            min_new_tokens=options.min_new_tokens,
            generator=self._generator(options, 0),
            device=self.loaded.device,
        )

    def _talker_sampler(self, options: GenerationOptions, prompt_len: int) -> Sampler:
        return Sampler(
            do_sample=not options.greedy,
            temperature=options.talker_temperature,
            top_k=options.talker_top_k,
            top_p=options.talker_top_p,
            repetition_penalty=options.talker_repetition_penalty,
            suppress_ids=[self.model.talker.codec_bos_token],
            eos_ids=self.talker_eos,
            prompt_len=prompt_len,
            min_new_tokens=options.min_audio_tokens,
            generator=self._generator(options, 1),
            device=self.loaded.device,
        )

    def prepare(self, messages, options: GenerationOptions) -> PreparedInputs:
        self._check(options)
        return prepare_inputs(self.processor, messages, use_audio_in_video=options.use_audio_in_video,
                              device=self.loaded.device, limits=self.limits, media_cache=self.media_cache,
                              token_budget=self.prompt_limit(options) // 2)

    def listen(self, history: list[dict], options: GenerationOptions | None = None, exact: bool = False):
        """A Listener for the next user turn, spoken: it encodes and prefills the audio while it
        arrives (omni_demo.listening). `history` is the conversation before this turn; `options`
        those the reply will have (they decide how the history's media are read); `exact`: keep
        only windows identical to the whole clip's."""
        from .listening import Listener

        return Listener(self, history, options or GenerationOptions(), exact)

    def prompt_limit(self, options: GenerationOptions) -> int:
        """Longest prompt that leaves room for the reply in the thinker's (and talker's) window."""
        config = self.model.config
        limit = config.thinker_config.text_config.max_position_embeddings - options.max_new_tokens
        if options.speech:  # the talker's prompt is the thinker's + 2, then one position per code
            limit = min(limit, config.talker_config.max_position_embeddings - 2 - options.max_audio_tokens)
        if self.limits.max_context_tokens is not None:
            limit = min(limit, self.limits.max_context_tokens)
        return limit

    def plan_media(self, messages: list[dict], options: GenerationOptions):
        """Each media part's reading plan (omni_demo.media), its options written into the part: no
        image or video takes more than half of the prompt window."""
        return plan_media(messages, self.limits, use_audio_in_video=options.use_audio_in_video,
                          token_budget=self.prompt_limit(options) // 2, max_image_pixels=image_max_pixels(self.processor))

    def fit_context(self, messages, options: GenerationOptions,
                    cancel: threading.Event | None = None) -> tuple[PreparedInputs, int]:
        """Plan the conversation's media from their headers, count each message's tokens once, leave
        out its oldest whole turns while it is over the window or a per-conversation media budget,
        then read and prepare what is left, once: linear in the conversation, and nothing of a
        left-out turn is decoded. Returns (inputs, turns left out); raises Cancelled once `cancel` is
        set between two media parts."""
        self._check(options)
        limit, limits = self.prompt_limit(options), self.limits
        messages = normalize_conversation(messages)
        check_request(messages, limits)
        plans = self.plan_media(messages, options)
        sizes, overhead = count_tokens(self.processor, messages, [plan.tokens for row in plans for plan in row])
        head, starts = turn_starts(messages)
        ends = starts[1:] + [len(messages)]
        turn_tokens = [sum(sizes[starts[t]:ends[t]]) for t in range(len(starts))]
        budget, first = _Budget(limits, overhead + sum(sizes[:head])), len(starts)
        for turn in reversed(range(len(starts))):
            budget.add(turn_tokens[turn], [plan for i in range(starts[turn], ends[turn]) for plan in plans[i]])
            if (refusal := budget.over(limit)) is not None:
                if first == len(starts):
                    raise InputError(refusal)
                break
            first = turn
        while True:
            kept = [*range(head), *range(starts[first], len(messages))]
            inputs = prepare_inputs(self.processor, [messages[i] for i in kept], use_audio_in_video=options.use_audio_in_video,
                                    device=self.loaded.device, media_cache=self.media_cache, plans=[plans[i] for i in kept],
                                    cancel=cancel)
            over = inputs.prompt_len - limit
            if over <= 0:
                return inputs, first
            if first == len(starts) - 1:  # the estimate was short and only the last turn is left
                raise InputError(_Budget(limits, inputs.prompt_len).over(limit))
            while over > 0 and first < len(starts) - 1:  # estimates were short: leave out what covers it
                over, first = over - turn_tokens[first], first + 1

    def stream(
        self, messages, options: GenerationOptions | None = None, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Yield TextDelta and AudioChunk events as they are produced, then one Finished.

        Stops within one decode step or one audio chunk of `cancel` being set, or at the next
        yield when the generator is closed. Raises InputError for a request it cannot serve.
        """
        options = options or GenerationOptions()
        start = time.perf_counter()
        try:
            inputs, dropped = self.fit_context(messages, options, cancel)
        except Cancelled:
            return
        if dropped:
            yield ContextTrimmed(dropped, inputs.prompt_len, self.prompt_limit(options))
        try:
            yield from self.stream_inputs(inputs, options, cancel, start=start)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # hand the failed request's memory back for the next one
            raise EngineError("the GPU ran out of memory on this request; try shorter or fewer media, "
                              "or a shorter reply") from exc

    def stream_inputs(
        self,
        inputs: PreparedInputs,
        options: GenerationOptions,
        cancel: threading.Event | None = None,
        *,
        start: float | None = None,
    ) -> Iterator[Event]:
        """`stream` for inputs already through the processor (timings count from `start`)."""
        self._check(options)
        # A cancelled reply releases the engine when its generator is closed, within one decode
        # step; the next queued reply may already be here, so it waits for that.
        if not self._busy.acquire(timeout=BUSY_WAIT_S):
            raise EngineError("the engine is busy with another reply; run one reply at a time per engine")
        try:
            yield from self._reply(inputs, options, cancel, _Clock(start or time.perf_counter()))
        finally:
            self._busy.release()

    def _reply(self, inputs: PreparedInputs, options: GenerationOptions, cancel: threading.Event | None,
               clock: _Clock) -> Iterator[Event]:
        """The streaming loop: one text token, then one codec step when the speech side is ready."""
        text = self._text_stream(inputs, options)
        speech: SpeechStream | None = None  # set up after the first text token, so it never delays it
        cancelled = False
        while not (text.done and (speech is None or speech.done)):
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            if not text.done:
                if delta := text.next_token():
                    clock.mark("text")
                    yield TextDelta(delta)
                if options.speech and speech is None:
                    speech = self._speech_stream(inputs, options, text)
                reply_part = text.feed()
                if speech is not None and reply_part is not None:
                    speech.feed(reply_part)
                if speech is not None and text.done:
                    speech.end_of_text()
            if speech is not None and speech.ready and (chunk := speech.step()):
                clock.mark("audio")
                yield chunk
        if self.prefix_cache is not None:
            self._remember(inputs, text, speech)
        yield self._finished(inputs, text, speech, "cancelled" if cancelled else text.stop_reason, clock)

    def _text_stream(self, inputs: PreparedInputs, options: GenerationOptions) -> TextStream:
        decoder = ThinkerDecoder(self.model.thinker, self.decode_step("thinker"))
        return TextStream(decoder, self._thinker_sampler(options, inputs.prompt_len),
                          TextDetokenizer(self.processor.tokenizer), inputs,
                          max_new_tokens=options.max_new_tokens, eos=self.thinker_eos, speech=options.speech,
                          prefix_cache=self.prefix_cache)

    def _speech_stream(self, inputs: PreparedInputs, options: GenerationOptions, text: TextStream) -> SpeechStream:
        speaker = self.model.speaker_map[options.voice]
        token2wav = StreamingToken2Wav(self.model.token2wav, speaker, self.streaming,
                                       max_codes=options.max_audio_tokens, seed=options.seed)
        return SpeechStream(
            TalkerDecoder(self.model, self.decode_step("talker")), token2wav,
            self._talker_sampler(options, inputs.prompt_len + 2),
            inputs=inputs, text=text, speaker_bos=speaker["bos_token"], eos=self.talker_eos,
            max_codes=options.max_audio_tokens,
        )

    def _remember(self, inputs: PreparedInputs, text: TextStream, speech: SpeechStream | None) -> None:
        """Keep this turn's prompt and fed reply tokens in the conversation cache."""
        thinker, fed = text.decoder, len(text.reply_parts)
        prompt_len, device = inputs.prompt_len, thinker.positions.device
        decode_positions = (torch.arange(prompt_len, prompt_len + fed, device=device) + thinker.rope_delta).expand(3, -1)
        prefix, talker_config = thinker.prefix, self.model.config.talker_config
        if speech is not None and speech.talker.cache is not None:
            talker_kv, talker_positions = crop(speech.talker.cache, prompt_len, talker_config), speech.talker.positions
        elif prefix is not None and 0 < prefix.talker_len <= thinker.reused:  # still true of this prompt
            talker_kv, talker_positions = prefix.talker_kv, prefix.talker_positions
        else:
            talker_kv = talker_positions = None
        self.prefix_cache.add(
            Prefix(
                token_ids=inputs.input_ids[0].tolist() + text.token_ids[:fed],
                positions=torch.cat([thinker.positions, decode_positions], 1),
                media={span.start: span.item.segments for span in inputs.media},
                thinker_kv=thinker.decode_step.snapshot(),
                states=torch.cat([thinker.prompt_states, *text.reply_parts], 1),
                talker_kv=talker_kv,
                talker_positions=talker_positions,
            ),
            replaces=prefix if prefix is not None and (thinker.reused == len(prefix.token_ids) or prefix.partial)
            else None,
        )
        self.media_cache.trim()  # the turn may have added encoder outputs to its items

    def _finished(self, inputs: PreparedInputs, text: TextStream, speech: SpeechStream | None, stop_reason: str,
                  clock: _Clock) -> Finished:
        total = time.perf_counter() - clock.start
        codes, samples = (speech.codes, speech.next_sample) if speech else ([], 0)
        audio_s = samples / SAMPLE_RATE
        token_ids = text.token_ids
        stats = Stats(
            time_to_first_text_s=clock.since_start(clock.first_text),
            time_to_first_audio_s=clock.since_start(clock.first_audio),
            total_s=total,
            audio_s=audio_s,
            rtf=total / audio_s if audio_s else None,
            prompt_tokens=inputs.prompt_len,
            reused_prompt_tokens=text.decoder.reused,
            text_tokens=len(token_ids),
            audio_tokens=len(codes),
        )
        assert samples == SAMPLES_PER_CODE * len(codes) or stop_reason == "cancelled"
        return Finished(text.detokenizer.text, token_ids, list(codes), samples, stop_reason, stats, inputs.messages)
