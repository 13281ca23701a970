"""Next-token choice for the thinker and the talker, built from transformers' logits processors
in the order `generate` applies them, so greedy decoding matches the reference exactly."""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


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
        if repetition_penalty is not None and repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
        if min_new_tokens > 0 and eos_ids:
            processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new_tokens, list(eos_ids), device))
        if suppress_ids:
            processors.append(SuppressTokensLogitsProcessor(list(suppress_ids), device))
        if do_sample:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        self.processors = processors
        self.do_sample = do_sample
        self.generator = generator

    def __call__(self, token_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """token_ids [1, L] long, logits [1, V] -> next token [1] long."""
        scores = self.processors(token_ids, logits.float())
        if not self.do_sample:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)


def token_id_list(ids) -> list[int]:
    """A generation config's token id field (an int, a list, or None) as a list."""
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
