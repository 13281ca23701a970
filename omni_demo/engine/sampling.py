"""Next-token choice for the thinker and the talker, built from transformers' logits processors
in the order `generate` applies them, so greedy decoding matches the reference exactly."""

from __future__ import annotations

import math

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

MIN_TEMPERATURE = 1e-4  # lower temperatures sample the argmax all the same (logits differ by > 1e-2)
MIN_PENALTY = 1e-3


class Sampler:
    """Picks the next token from logits given every token so far (prompt included, as the
    repetition penalty in `generate` sees it)."""

    def __init__(
        self,
        *,
        do_sample: bool,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        suppress_ids: list[int] = (),
        eos_ids: list[int] = (),
        prompt_len: int = 0,
        min_new_tokens: int = 0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        processors = LogitsProcessorList()
        # transformers' warpers take floats only (an int 2 is refused), and a value so small that
        # logits / value overflows would make NaN probabilities: below the floors nothing changes.
        if repetition_penalty is not None and repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=max(float(repetition_penalty), MIN_PENALTY)))
        if min_new_tokens > 0 and eos_ids:  # as MinNewTokensLengthLogitsProcessor
            processors.append(Suppress(eos_ids, device, prompt_len=prompt_len, until_new_tokens=min_new_tokens))
        if suppress_ids:  # as SuppressTokensLogitsProcessor
            processors.append(Suppress(suppress_ids, device))
        if do_sample:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(max(float(temperature), MIN_TEMPERATURE)))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        self.processors = processors
        self.do_sample = do_sample
        self.generator = generator

    def __call__(self, token_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """token_ids [1, L] long, logits [1, V] -> next token [1] long."""
        scores = logits.float()
        for processor in self.processors:  # as LogitsProcessorList does, without its per-call signature checks
            scores = processor(token_ids, scores)
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


class Suppress:
    """Scores of `ids` to -inf (only while fewer than `until_new_tokens` follow the prompt, if
    given): what transformers' SuppressTokens and MinNewTokensLength processors do, with the same
    values, without building a whole-vocabulary mask on every call (a cost per token per reply)."""

    def __init__(self, ids, device, *, prompt_len: int = 0, until_new_tokens: int | None = None):
        self.ids = torch.tensor(list(ids), dtype=torch.long, device=device)
        self.prompt_len, self.until_new_tokens = prompt_len, until_new_tokens

    def __call__(self, token_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.until_new_tokens is not None and token_ids.shape[-1] - self.prompt_len >= self.until_new_tokens:
            return scores
        return scores.index_fill(-1, self.ids, -math.inf)


def token_id_list(ids) -> list[int]:
    """A generation config's token id field (an int, a list, or None) as a list."""
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


def seeded_generator(device, seed: int | None, offset: int) -> torch.Generator:
    """The reply's own generator: seeded with `seed + offset` (the thinker 0, the talker 1), or at random."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed + offset)
    return generator


def thinker_sampler(thinker, options, prompt_len: int, device) -> Sampler:
    """The thinker's sampler for a reply with `options` (GenerationOptions): each setting the
    request leaves unset is the checkpoint's generation_config's."""
    defaults = thinker.generation_config
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return Sampler(
        do_sample=not options.greedy and bool(options.temperature or defaults.do_sample),
        temperature=pick(options.temperature, defaults.temperature or 1.0),
        top_k=pick(options.top_k, defaults.top_k),
        top_p=pick(options.top_p, defaults.top_p),
        repetition_penalty=pick(options.repetition_penalty, defaults.repetition_penalty),
        eos_ids=token_id_list(defaults.eos_token_id),
        prompt_len=prompt_len,
        min_new_tokens=options.min_new_tokens,
        generator=seeded_generator(device, options.seed, 0),
        device=device,
    )


def talker_sampler(talker, options, prompt_len: int, device) -> Sampler:
    """The talker's sampler: upstream's settings (GenerationOptions' talker_* defaults); it never
    emits codec bos and stops on codec pad or end, as generate's talker_eos_token_id."""
    return Sampler(
        do_sample=not options.greedy,
        temperature=options.talker_temperature,
        top_k=options.talker_top_k,
        top_p=options.talker_top_p,
        repetition_penalty=options.talker_repetition_penalty,
        suppress_ids=[talker.codec_bos_token],
        eos_ids=talker_eos(talker),
        prompt_len=prompt_len,
        min_new_tokens=options.min_audio_tokens,
        generator=seeded_generator(device, options.seed, 1),
        device=device,
    )


def talker_eos(talker) -> list[int]:
    """Upstream stops the talker on codec pad or codec end (generate's talker_eos_token_id)."""
    return [talker.codec_pad_token, talker.codec_eos_token]
