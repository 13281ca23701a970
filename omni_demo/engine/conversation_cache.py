"""The conversation cache: what the engine computed for earlier turns, reused by the next one.

After a reply the engine keeps one `Prefix`: the token ids of the prompt and of the reply tokens
the thinker was fed, their mRoPE positions, which media item sits where, the thinker's KV cache
over all of them, the per-position states the talker's prefill reads (last hidden state + input
embedding, 0 for media), and the talker's KV cache over the prompt it was prefilled with.

A new turn reuses the longest prefix whose token ids, positions and media items (by content) are
all identical to one kept prefix, and computes only the rest. Anything that differs (an edited
turn, another system prompt, a reply that does not re-tokenize to the same ids) only shortens the
reused prefix; it can never make a turn read another conversation's state. Prefixes are shared
by every session (equal prefixes are equal state) and evicted least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from omni_demo.inputs.prompt import MediaSpan, agreeing_tokens

from .decode_step import kv_cache


@dataclass
class Prefix:
    token_ids: list[int]  # T: the prompt, then the reply tokens fed to the thinker
    positions: torch.Tensor  # [3, T] mRoPE positions
    media: dict[int, list[tuple[str, int]]]  # first token of each media item -> its segments
    thinker_kv: object  # DynamicCache over T positions
    states: torch.Tensor  # [1, T, D] talker prefill input per position
    talker_kv: object | None  # DynamicCache over the first `talker_len` positions (None: no talker ran)
    talker_positions: torch.Tensor | None  # [3, talker_len] the talker's mRoPE positions there
    partial: bool = False  # a spoken turn's windows so far (omni_demo.engine.listening): its last token is not reused

    @property
    def talker_len(self) -> int:
        return 0 if self.talker_positions is None else self.talker_positions.shape[1]

    def talker_state(self, reused: int) -> tuple[object | None, torch.Tensor | None]:
        """(talker KV, its positions) for a new prompt that reuses `reused` tokens of this prefix:
        this prefix's own while its talker prompt lies within them, else (None, None)."""
        if 0 < self.talker_len <= reused:
            return self.talker_kv, self.talker_positions
        return None, None

    def superseded_by(self, reused: int, partial: bool) -> bool:
        """Whether a prefix computed from this one holds all it holds: it reused this one whole, or
        this one is a spoken turn's windows (`partial`, as its listener sees it) it grew from."""
        return reused == len(self.token_ids) or partial

    @property
    def nbytes(self) -> int:
        caches = [c for c in (self.thinker_kv, self.talker_kv) if c is not None]
        tensors = [self.states] + [t for cache in caches for layer in cache.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def shared_length(self, token_ids: list[int], positions: torch.Tensor, media: list[MediaSpan]) -> int:
        """How many leading tokens of a new prompt ([3, L] positions) this prefix computed exactly."""
        length = 0
        for ours, theirs in zip(self.token_ids, token_ids):
            if ours != theirs:
                break
            length += 1
        for span in media:  # equal placeholder ids say nothing about equal pictures
            if span.start < length:
                agreeing = agreeing_tokens(self.media.get(span.start, []), span.item.segments)
                if agreeing is not None:
                    length = min(length, span.start + agreeing)
        differs = (self.positions[:, :length] != positions[:, :length]).any(0).nonzero()
        return int(differs[0]) if len(differs) else length


def crop(cache, length: int, config):
    """A DynamicCache with the first `length` positions of `cache`, which stays as it is."""
    return kv_cache([(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in cache.layers], config)


class ConversationCache:
    """Kept prefixes, least recently used first out: at most `max_prefixes`, `max_bytes` in all."""

    def __init__(self, max_prefixes: int, max_bytes: int):
        self.max_prefixes, self.max_bytes = max_prefixes, max_bytes
        self.prefixes: OrderedDict[int, Prefix] = OrderedDict()
        self._next_id = 0

    def longest(self, token_ids: list[int], positions: torch.Tensor, media: list[MediaSpan]) -> tuple[Prefix | None, int]:
        """The kept prefix sharing most leading tokens with a prompt, and how many (at most L - 1:
        the last prompt token is always computed, its logits start the reply)."""
        best, best_length = None, 0
        for key, prefix in self.prefixes.items():
            length = min(prefix.shared_length(token_ids, positions, media), len(token_ids) - 1)
            if length > best_length:
                best, best_length = key, length
        if best is None:
            return None, 0
        self.prefixes.move_to_end(best)
        return self.prefixes[best], best_length

    def add(self, prefix: Prefix, replaces: Prefix | None = None) -> None:
        """Keep `prefix`; `replaces`, a prefix it extends, is then dropped (it holds nothing more)."""
        for key, kept in list(self.prefixes.items()):
            if kept is replaces:
                del self.prefixes[key]
        self.prefixes[self._next_id] = prefix
        self._next_id += 1
        while self.prefixes and (len(self.prefixes) > self.max_prefixes or
                                 sum(p.nbytes for p in self.prefixes.values()) > self.max_bytes):
            self.prefixes.popitem(last=False)

    def clear(self) -> None:
        self.prefixes.clear()
