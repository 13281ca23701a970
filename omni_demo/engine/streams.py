"""One reply as two matching streams: `TextStream` (the thinker side) and `SpeechStream` (the
talker side). The engine's loop drives them one step at a time (omni_demo.engine).

The hand-off: talker codec step t consumes reply part t (token t's embedding + last hidden state),
then the `text_eos` embedding once, then `text_pad` forever, exactly as
`Qwen2_5OmniForConditionalGeneration.generate` lays them out. Reply part t exists once the
thinker has fed token t (to produce token t + 1), so the talker runs one step behind the thinker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

import numpy as np
import torch

from omni_demo.config import CacheScope
from omni_demo.events import AudioChunk
from omni_demo.inputs.prepare import PreparedInputs

from .conversation_cache import ConversationCache
from .decoders import TalkerDecoder, ThinkerDecoder
from .sampling import Sampler
from .token2wav import StreamingToken2Wav


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


class TextDetokenizer:
    """Incremental decode that never emits half of a multi-byte character. Each token decodes a
    short window (the ids since the last emitted text, plus those before it, whose text is
    known), not the whole reply: byte-level BPE decodes a run of ids to the concatenation of its
    pieces, so the text is the same, at a constant cost per token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.window = 0  # ids[window:] are decoded for each token: the last delta's ids and those after
        self.emitted = 0  # ids[:emitted] have had their text emitted
        self.known = ""  # the text of ids[window:emitted] (the last delta)

    def push(self, token: int) -> str:
        """The text that `token` completes; "" while a character is still incomplete."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.window :], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self.known):
            return ""
        delta = text[len(self.known) :]
        self.window, self.emitted, self.known = self.emitted, len(self.ids), delta
        self.text += delta
        return delta


class TextStream:
    """The thinker side of one reply: decoder, sampler, detokenizer, the token ids so far.

    `next_token` samples a token (cheap: one host sync); `feed` runs the thinker on it (the
    forward pass), so the token's text can be shown before the forward pass runs."""

    def __init__(self, decoder: ThinkerDecoder, sampler: Sampler, detokenizer: TextDetokenizer,
                 inputs: PreparedInputs, *, max_new_tokens: int, eos: list[int], speech: bool,
                 conversation_cache: ConversationCache | None = None, scope: CacheScope = CacheScope()):
        self.decoder, self.sampler, self.detokenizer = decoder, sampler, detokenizer
        self.inputs, self.conversation_cache, self.scope = inputs, conversation_cache, scope
        self.prompt_len, self.max_new_tokens, self.eos = inputs.prompt_len, max_new_tokens, eos
        self.speech = speech  # the talker needs at least one reply part, even from a one-token reply
        self.tokens = TokenBuffer(inputs.input_ids, self.prompt_len + max_new_tokens)  # prompt + reply
        self.logits: torch.Tensor | None = None  # [1, V]: the next token's, once the prompt is prefilled
        self.token: torch.Tensor | None = None  # [1] on the device: sampled, not yet fed
        self.reply_parts: list[torch.Tensor] = []  # [1, 1, D] of each token fed, in order
        self.done = False
        self.stop_reason: str | None = None  # "eos" or "length", once done

    def prefill(self, chunk_tokens: int | None = None) -> Generator[None, None, None]:
        """Prefill the prompt (omni_demo.engine.decoders.ThinkerDecoder.prefill_chunks), yielding
        between pieces; afterwards the first token can be sampled."""
        self.logits = yield from self.decoder.prefill_chunks(self.inputs, self.conversation_cache, self.scope,
                                                              chunk_tokens)

    @property
    def token_ids(self) -> list[int]:
        """The reply's tokens, its end-of-turn token included."""
        return self.tokens.ids[0, self.prompt_len :].tolist()

    @property
    def first_token(self) -> int:
        return int(self.tokens.buffer[0, self.prompt_len])

    def next_token(self) -> str:
        """Sample the next token. -> its text ("" for end-of-turn or an incomplete character)."""
        self.token = self.sampler(self.tokens.ids, self.logits)
        self.tokens.append(self.token)
        token = int(self.token)  # the one host sync of the step
        is_eos = token in self.eos
        self.done = is_eos or self.tokens.length - self.prompt_len >= self.max_new_tokens
        if self.done:
            self.stop_reason = "eos" if is_eos else "length"
        return "" if is_eos else self.detokenizer.push(token)

    @property
    def wants_feed(self) -> bool:
        """The sampled token goes through the thinker (for the next token's logits and its reply
        part) unless the reply ended with it: the last token is fed only when the talker would
        otherwise get no reply part at all."""
        generated = self.tokens.length - self.prompt_len
        lone_token = self.speech and generated == 1 and self.stop_reason == "length"
        return not self.done or lone_token

    def feed(self) -> torch.Tensor | None:
        """Run the thinker on the sampled token. -> its reply part [1, 1, D], or None (`wants_feed`)."""
        if not self.wants_feed:
            return None
        return self.accept(*self.decoder.step(self.token))

    def accept(self, logits: torch.Tensor, reply_part: torch.Tensor) -> torch.Tensor:
        """The thinker's outputs for the token fed (one row of a batched step, or `feed`'s)."""
        self.logits = logits
        self.reply_parts.append(reply_part)
        return reply_part


class SpeechStream:
    """The talker side of one reply: decoder, sampler, the reply parts handed over by the thinker,
    the codes so far, the streaming Token2Wav and the position of the next sample."""

    def __init__(self, talker: TalkerDecoder, token2wav: StreamingToken2Wav, sampler: Sampler, *,
                 inputs: PreparedInputs, text: TextStream, speaker_bos: int, eos: list[int], max_codes: int):
        self.talker, self.token2wav, self.sampler = talker, token2wav, sampler
        self.inputs, self.text, self.speaker_bos = inputs, text, speaker_bos
        self.eos, self.max_codes = eos, max_codes
        self.pending: deque[torch.Tensor] = deque()  # reply parts [1, 1, D] handed over, not yet consumed
        self.text_ended = False
        self.text_pad = talker.text_embedding(talker.talker.text_pad_token)  # [1, 1, D]
        prompt_codes = torch.tensor([talker.prompt_codes(inputs.prompt_len)], device=self.text_pad.device)
        self.codec_ids = TokenBuffer(prompt_codes, prompt_codes.shape[1] + max_codes + 1)
        self.last_code: torch.Tensor | None = None  # [1] on the device; None until the prefill
        self.codes: list[int] = []
        self.next_sample = 0  # position of the next sample in the reply's audio (480 per code)
        self.done = False

    def feed(self, reply_part: torch.Tensor) -> None:
        self.pending.append(reply_part)

    def end_of_text(self) -> None:
        """The thinker has finished: text_eos follows its last reply part, then text_pad forever.
        A reply that handed over no reply part at all has nothing to say."""
        self.text_ended = True
        if self.last_code is None and not self.pending:
            self.done = True
        else:
            self.pending.append(self.talker.text_embedding(self.talker.talker.text_eos_token))

    @property
    def ready(self) -> bool:
        """One step behind the thinker: codec step t waits for reply part t until the text has ended."""
        return not self.done and (bool(self.pending) or self.text_ended)

    @property
    def prefilled(self) -> bool:
        return self.last_code is not None

    def _next_part(self) -> torch.Tensor:
        return self.pending.popleft() if self.pending else self.text_pad

    def step(self) -> AudioChunk | None:
        """One codec token (the talker's prefill first). -> the samples that became final, if any."""
        return self.take(self.logits_alone())

    def logits_alone(self) -> torch.Tensor:
        """The next codec logits [1, V] from this reply alone: the talker's prefill, or one step."""
        reply_part = self._next_part()
        if self.last_code is None:
            return self.talker.prefill(self.inputs, self.text.decoder, self.speaker_bos, self.text.first_token,
                                       reply_part)
        return self.talker.step(self.last_code, reply_part)

    def next_input(self) -> torch.Tensor:
        """After the prefill: the talker stack's input for the next codec step [1, 1, D_talker] (its
        logits come back from one row of a batched step, to `sample`)."""
        return self.talker.input_embeds(self.last_code, self._next_part())

    def take(self, logits: torch.Tensor) -> AudioChunk | None:
        """Sample a codec token from `logits` [1, V] and decode it. -> the samples that became final, if any."""
        new = self.sample(logits)
        samples = self.token2wav.push(new)
        if self.done:
            samples = np.concatenate([samples, self.token2wav.flush()])
        return self.chunk(samples)

    def sample(self, logits: torch.Tensor) -> list[int]:
        """Sample a codec token from `logits` [1, V]. -> the new code ([] for end-of-speech)."""
        self.last_code = self.sampler(self.codec_ids.ids, logits)
        self.codec_ids.append(self.last_code)
        code = int(self.last_code)  # the one host sync of the step
        new = [] if code in self.eos else [code]
        self.codes.extend(new)
        self.done = code in self.eos or len(self.codes) >= self.max_codes
        return new

    def chunk(self, samples: np.ndarray) -> AudioChunk | None:
        """The samples Token2Wav made final as the reply's next chunk (None: none yet)."""
        if not len(samples):
            return None
        chunk = AudioChunk(samples, self.next_sample)
        self.next_sample += len(samples)
        return chunk
