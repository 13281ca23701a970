"""The streaming engine: Thinker and Talker decoded in lock-step, Token2Wav chunk by chunk.

Talker codec step t consumes thinker "reply part" t = embedding + last hidden state of generated
token t (the state of the forward pass that *feeds* token t), then the `text_eos` embedding once,
then `text_pad` forever, exactly as `Qwen2_5OmniForConditionalGeneration.generate` lays them out.
Reply part t exists once the thinker has fed token t, which it does to produce token t + 1, so
the talker runs one step behind the thinker and speech starts after a couple of text tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from .config import SAMPLES_PER_CODE, SAMPLE_RATE, GenerationOptions, Limits, StreamingConfig
from .events import AudioChunk, ContextTrimmed, Event, Finished, Stats, TextDelta
from .fast import StaticDecoder, graph_buckets
from .inputs import InputError, PreparedInputs, prepare_inputs
from .loading import LoadedModel
from .sampling import Sampler
from .token2wav import StreamingToken2Wav

log = logging.getLogger(__name__)
BUSY_WAIT_S = 30.0  # how long a reply waits for the previous one to let go of the engine


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def _position_ids(past_len: int, rope_delta: torch.Tensor) -> torch.Tensor:
    """Decode-step mRoPE position: all three axes advance together. -> [3, 1, 1]."""
    return (rope_delta + past_len).view(1, 1, 1).expand(3, 1, 1)


class TokenBuffer:
    """Token ids so far in a preallocated [1, capacity] tensor: appending writes in place (no
    per-step allocation), `ids` is a view for the logits processors."""

    def __init__(self, initial: torch.Tensor, capacity: int):
        self.buffer = initial.new_zeros(1, capacity)
        self.length = initial.shape[1]
        self.buffer[:, : self.length] = initial

    def append(self, token: torch.Tensor) -> None:
        self.buffer[:, self.length] = token
        self.length += 1

    @property
    def ids(self) -> torch.Tensor:
        return self.buffer[:, : self.length]


class ThinkerDecoder:
    """Prefill the prompt, then feed one token at a time. Keeps its own KV cache and mRoPE delta."""

    def __init__(self, thinker, inputs: PreparedInputs, static: StaticDecoder | None = None):
        self.thinker = thinker
        self.inputs = inputs
        self.static = static  # lean decode steps after the prefill (omni_demo.fast)
        self.embed = thinker.get_input_embeddings()
        self.cache = DynamicCache(config=thinker.config.text_config)
        self.past_len = 0
        self.rope_delta = None
        self.prompt_embeds = None  # [1, L, D] input embeddings after the multimodal merge
        self.prompt_hidden = None  # [1, L, D] last-layer hidden states (after the final norm)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        t = self.inputs.tensors
        audio_lengths = t["feature_attention_mask"].sum(-1) if "feature_attention_mask" in t else None
        positions, self.rope_delta = self.thinker.get_rope_index(
            t["input_ids"],
            t.get("image_grid_thw"),
            t.get("video_grid_thw"),
            t["attention_mask"],
            self.inputs.use_audio_in_video,
            audio_lengths,
            t.get("video_second_per_grid"),
        )
        model_inputs = {k: v for k, v in t.items() if k != "attention_mask"}
        out = self.thinker.model(
            **model_inputs,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            use_audio_in_video=self.inputs.use_audio_in_video,
            output_hidden_states=True,
        )
        self.prompt_embeds, self.prompt_hidden = out.hidden_states[0], out.last_hidden_state
        self.past_len = t["input_ids"].shape[1]
        if self.static is not None:
            self.static.load(self.cache, int(self.rope_delta))  # one host sync, not one per step
            self.cache = None
        return self.thinker.lm_head(out.last_hidden_state[:, -1])  # [1, V]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `token` ([1] long, on the device); return (next-token logits [1, V], its reply part [1, 1, D])."""
        ids = token.view(1, 1)
        if self.static is not None:
            embeds = self.embed(ids)
            hidden = self.static.step(embeds)
            self.past_len += 1
            return self.thinker.lm_head(hidden[:, -1]), hidden + embeds
        out = self.thinker.model(
            input_ids=ids,
            position_ids=_position_ids(self.past_len, self.rope_delta),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.past_len += 1
        reply_part = out.last_hidden_state + self.embed(ids)
        return self.thinker.lm_head(out.last_hidden_state[:, -1]), reply_part


class TalkerDecoder:
    """The codec-token decoder, on the conditioning upstream intends for every prompt: codec
    pad/bos embeddings added to the last two prefill positions and 3-D mRoPE positions. (In
    transformers 5.x `generate` drops an all-ones attention mask and the talker then skips both;
    see generation/utils.py, "We can drop the mask altogether".)"""

    def __init__(self, model, inputs: PreparedInputs, static: StaticDecoder | None = None):
        self.talker = model.talker
        self.static = static
        self.config = model.config
        self.text_embed = model.thinker.get_input_embeddings()
        self.codec_embed = self.talker.get_input_embeddings()
        self.inputs = inputs
        self.cache = DynamicCache(config=self.talker.config)
        self.past_len = 0
        self.rope_delta = None

    def prompt_codes(self) -> list[int]:
        """The codec ids `generate` puts under the prompt: what its repetition penalty sees."""
        talker = self.talker
        return [talker.codec_mask_token] * self.inputs.prompt_len + [talker.codec_pad_token, talker.codec_bos_token]

    def text_embedding(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.talker.device)
        return self.text_embed(ids)  # [1, 1, D]

    @torch.inference_mode()
    def prefill(self, thinker: ThinkerDecoder, speaker_bos: int, first_token: int, first_part) -> torch.Tensor:
        t = self.inputs.tensors
        input_ids = t["input_ids"]
        cfg = self.config.thinker_config
        # Media placeholders carry no text embedding for the talker (upstream zeroes them too).
        is_media = torch.isin(
            input_ids,
            torch.tensor([cfg.audio_token_index, cfg.image_token_index, cfg.video_token_index], device=input_ids.device),
        )
        prompt = thinker.prompt_hidden + thinker.prompt_embeds.masked_fill(is_media.unsqueeze(-1), 0.0)
        embeds = torch.cat([prompt, self.text_embedding(speaker_bos), first_part], dim=1)  # [1, L + 2, D]
        embeds[:, -1] += self.codec_embed.weight[self.talker.codec_bos_token]
        embeds[:, -2] += self.codec_embed.weight[self.talker.codec_pad_token]
        positions, self.rope_delta = self.talker.get_rope_index(
            torch.cat([input_ids, input_ids.new_tensor([[speaker_bos, self._position_safe(first_token)]])], dim=1),
            t.get("image_grid_thw"),
            t.get("video_grid_thw"),
            torch.ones(1, input_ids.shape[1] + 2, dtype=torch.long, device=input_ids.device),
            self.inputs.use_audio_in_video,
            t["feature_attention_mask"].sum(-1) if "feature_attention_mask" in t else None,
            t.get("video_second_per_grid"),
        )
        self.past_len = embeds.shape[1]
        logits = self._forward(embeds, positions)
        if self.static is not None:
            self.static.load(self.cache, int(self.rope_delta))
            self.cache = None
        return logits

    def _position_safe(self, token: int) -> int:
        """A random thinker can open its reply with <|vision_bos|> or <|audio_bos|>; the position
        code would then look for media after it and crash. Position it as plain text instead."""
        starts = {self.config.thinker_config.vision_start_token_id, self.config.thinker_config.audio_start_token_id}
        return self.config.talker_config.tts_text_start_token_id if token in starts else token

    @torch.inference_mode()
    def step(self, code: torch.Tensor, reply_input: torch.Tensor) -> torch.Tensor:
        """Feed codec token `code` ([1] long, on the device) with its thinker reply input [1, 1, D];
        return logits [1, V]."""
        embeds = self.codec_embed(code.view(1, 1)) + reply_input
        if self.static is not None:
            hidden = self.static.step(self.talker.thinker_to_talker_proj(embeds))
            logits = self.talker.codec_head(hidden[:, -1]).float()
        else:
            logits = self._forward(embeds, _position_ids(self.past_len, self.rope_delta))
        self.past_len += 1
        return logits

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.talker.model(
            inputs_embeds=self.talker.thinker_to_talker_proj(embeds),
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return self.talker.codec_head(out.last_hidden_state[:, -1]).float()


class TextDetokenizer:
    """Incremental decode that never emits half of a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


@dataclass
class _Clock:
    start: float
    first_text: float | None = None
    first_audio: float | None = None

    def since_start(self, mark: float | None) -> float | None:
        return None if mark is None else mark - self.start


class _Speech:
    """The talker side of one reply: its decoder, the hand-off queue of thinker reply inputs,
    the codes so far and the streaming Token2Wav."""

    def __init__(self, talker: TalkerDecoder, decoder: StreamingToken2Wav, sampler: Sampler, eos: list[int],
                 max_codes: int, speaker_bos: int, first_token: int):
        self.talker, self.decoder, self.sampler = talker, decoder, sampler
        self.eos, self.max_codes = eos, max_codes
        self.speaker_bos, self.first_token = speaker_bos, first_token
        self.reply_inputs: deque[torch.Tensor] = deque()  # [1, 1, D] each, consumed one per step
        self.text_pad = talker.text_embedding(talker.talker.text_pad_token)
        prompt = torch.tensor([talker.prompt_codes()], device=self.text_pad.device)
        self.codec_ids = TokenBuffer(prompt, prompt.shape[1] + max_codes + 1)  # [1, L + 2 + codes]
        self.last_code = None  # [1] on the device
        self.codes: list[int] = []
        self.started = self.done = False
        self.audio_pos = 0

    def end_of_text(self) -> None:
        """The thinker has finished: text_eos follows its last reply part (then text_pad forever).
        A reply that produced no reply part at all has nothing to say."""
        if not self.reply_inputs and not self.started:
            self.done = True
        else:
            self.reply_inputs.append(self.talker.text_embedding(self.talker.talker.text_eos_token))

    def step(self, thinker: ThinkerDecoder) -> np.ndarray:
        """One codec token; returns the samples that became final ([n] float32, maybe empty)."""
        reply = self.reply_inputs.popleft() if self.reply_inputs else self.text_pad
        if self.started:
            logits = self.talker.step(self.last_code, reply)
        else:
            logits = self.talker.prefill(thinker, self.speaker_bos, self.first_token, reply)
            self.started = True
        self.last_code = self.sampler(self.codec_ids.ids, logits)
        self.codec_ids.append(self.last_code)
        code = int(self.last_code)  # the one host sync of the step
        samples = np.zeros(0, dtype=np.float32)
        if code not in self.eos:
            self.codes.append(code)
            samples = self.decoder.push([code])
        self.done = code in self.eos or len(self.codes) >= self.max_codes
        if self.done:
            samples = np.concatenate([samples, self.decoder.flush()])
        return samples


class EngineError(RuntimeError):
    """A request failed inside the engine; the engine itself stays usable."""


def _without_oldest_turn(messages: list[dict]) -> list[dict] | None:
    """Drop the first user message after the system prompt and everything up to the next user
    message; None when only the last turn is left."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    users = [i for i, m in enumerate(messages) if m["role"] == "user" and i >= start]
    if len(users) < 2:
        return None
    return messages[:start] + messages[users[1]:]


class OmniEngine:
    """Owns the loaded model; `stream` serves one request at a time."""

    def __init__(self, loaded: LoadedModel, streaming: StreamingConfig | None = None, limits: Limits | None = None,
                 fast: bool = True):
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.streaming = streaming or StreamingConfig()
        self.limits = limits or Limits()
        self._busy = threading.Lock()  # the lean decoders' static caches serve one reply at a time
        self.thinker_static = self.talker_static = None
        if fast:
            self._make_static_decoders()
        self.thinker_eos = _as_list(self.model.thinker.generation_config.eos_token_id)
        if self.loaded.has_talker:
            talker = self.model.talker
            # Upstream stops the talker on codec pad or codec end (generate's talker_eos_token_id).
            self.talker_eos = [talker.codec_pad_token, talker.codec_eos_token]

    def _make_static_decoders(self) -> None:
        """Static KV caches over the whole windows; on CUDA, decode steps captured as CUDA graphs now,
        so the first reply does not pay for the capture."""
        config = self.model.config
        self.thinker_static = StaticDecoder(self.model.thinker.model.language_model,
                                            config.thinker_config.text_config.max_position_embeddings)
        if self.loaded.has_talker:
            self.talker_static = StaticDecoder(self.model.talker.model, config.talker_config.max_position_embeddings)
        if self.loaded.device.type != "cuda":
            return
        for decoder in (self.thinker_static, self.talker_static):
            if decoder is None:
                continue
            try:
                decoder.capture(graph_buckets(decoder.max_len))
            except Exception:  # an eager lean step still beats the plain one
                log.exception("CUDA graph capture failed; decoding with eager lean steps")

    @property
    def fast(self) -> bool:
        return self.thinker_static is not None

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
                              device=self.loaded.device, limits=self.limits)

    def prompt_limit(self, options: GenerationOptions) -> int:
        """Longest prompt that leaves room for the reply in the thinker's (and talker's) window."""
        config = self.model.config
        limit = config.thinker_config.text_config.max_position_embeddings - options.max_new_tokens
        if options.speech:  # the talker's prompt is the thinker's + 2, then one position per code
            limit = min(limit, config.talker_config.max_position_embeddings - 2 - options.max_audio_tokens)
        if self.limits.max_context_tokens is not None:
            limit = min(limit, self.limits.max_context_tokens)
        return limit

    def fit_context(self, messages, options: GenerationOptions) -> tuple[PreparedInputs, int]:
        """Prepare the conversation; while it is over the window, leave out its oldest whole turn
        (a user message and the replies to it). Returns (inputs, turns left out)."""
        limit = self.prompt_limit(options)
        inputs, dropped = self.prepare(messages, options), 0
        while inputs.prompt_len > limit:
            shorter = _without_oldest_turn(inputs.messages)
            if shorter is None:
                raise InputError(
                    f"this message is {inputs.prompt_len} tokens with its media; the limit is {limit} "
                    f"({inputs.prompt_len - limit} over). Send less media, a shorter clip, or lower max new tokens."
                )
            inputs, dropped = self.prepare(shorter, options), dropped + 1
        return inputs, dropped

    def stream(
        self, messages, options: GenerationOptions | None = None, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Yield TextDelta and AudioChunk events as they are produced, then one Finished.

        Stops within one decode step or one audio chunk of `cancel` being set, or at the next
        yield when the generator is closed. Raises InputError for a request it cannot serve.
        """
        options = options or GenerationOptions()
        start = time.perf_counter()
        inputs, dropped = self.fit_context(messages, options)
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
            yield from self._stream_locked(inputs, options, cancel, start)
        finally:
            self._busy.release()

    def _stream_locked(self, inputs, options, cancel, start) -> Iterator[Event]:
        clock = _Clock(start or time.perf_counter())
        prompt_len = inputs.prompt_len
        thinker = ThinkerDecoder(self.model.thinker, inputs, self.thinker_static)
        text_sampler = self._thinker_sampler(options, prompt_len)
        detok = TextDetokenizer(self.processor.tokenizer)
        text_ids = TokenBuffer(inputs.input_ids, prompt_len + options.max_new_tokens)  # what the processors see
        logits = thinker.prefill()
        speech: _Speech | None = None  # set up after the first text token, so it never delays it
        thinker_done, stop_reason = False, "length"

        while not (thinker_done and (speech is None or speech.done)):
            if cancel is not None and cancel.is_set():
                stop_reason = "cancelled"
                break
            if not thinker_done:  # one thinker step
                next_token = text_sampler(text_ids.ids, logits)  # [1] on the device
                text_ids.append(next_token)
                token = int(next_token)  # the one host sync of the step
                generated = text_ids.length - prompt_len
                is_eos = token in self.thinker_eos
                if not is_eos and (delta := detok.push(token)):
                    clock.first_text = clock.first_text or time.perf_counter()
                    yield TextDelta(delta, (token,))
                if options.speech and speech is None:
                    speech = self._start_speech(inputs, options, first_token=token)
                thinker_done = is_eos or generated >= options.max_new_tokens
                # The last token is fed only when the talker would otherwise get no reply part at all.
                if not thinker_done or (speech and generated == 1 and not is_eos):
                    logits, part = thinker.step(next_token)
                    if speech:
                        speech.reply_inputs.append(part)
                if thinker_done:
                    stop_reason = "eos" if is_eos else "length"
                    if speech:
                        speech.end_of_text()
            if speech is None or speech.done or not (speech.reply_inputs or thinker_done):
                continue
            samples = speech.step(thinker)  # one talker step
            if len(samples):
                clock.first_audio = clock.first_audio or time.perf_counter()
                yield AudioChunk(samples, speech.audio_pos)
                speech.audio_pos += len(samples)

        codes, audio_pos = (speech.codes, speech.audio_pos) if speech else ([], 0)
        yield self._finished(inputs, detok, text_ids.ids[0, prompt_len:].tolist(), codes, audio_pos, stop_reason, clock)

    def _start_speech(self, inputs: PreparedInputs, options: GenerationOptions, first_token: int) -> "_Speech":
        talker = TalkerDecoder(self.model, inputs, self.talker_static)
        decoder = StreamingToken2Wav(
            self.model.token2wav,
            self.model.speaker_map[options.voice],
            self.streaming,
            max_codes=options.max_audio_tokens,
            seed=options.seed,
        )
        sampler = self._talker_sampler(options, inputs.prompt_len + 2)
        return _Speech(talker, decoder, sampler, self.talker_eos, options.max_audio_tokens,
                       self.model.speaker_map[options.voice]["bos_token"], first_token)

    def _finished(self, inputs, detok, text_ids, codes, samples, stop_reason, clock) -> Finished:
        total = time.perf_counter() - clock.start
        audio_s = samples / SAMPLE_RATE
        stats = Stats(
            time_to_first_text_s=clock.since_start(clock.first_text),
            time_to_first_audio_s=clock.since_start(clock.first_audio),
            total_s=total,
            audio_s=audio_s,
            rtf=total / audio_s if audio_s else None,
            prompt_tokens=inputs.prompt_len,
            text_tokens=len(text_ids),
            audio_tokens=len(codes),
        )
        assert samples == SAMPLES_PER_CODE * len(codes) or stop_reason == "cancelled"
        return Finished(detok.text, text_ids, list(codes), samples, stop_reason, stats, inputs.messages)
