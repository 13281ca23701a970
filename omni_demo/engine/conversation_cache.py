"""The conversation cache: what the engine computed for earlier turns, reused by the next one.

After a reply the engine keeps one `Prefix`: the token ids of the prompt and of the reply tokens
the thinker was fed, their mRoPE positions, which media item sits where, the thinker's KV cache
over all of them, the per-position states the talker's prefill reads (last hidden state + input
embedding, 0 for media), and the talker's KV cache over the prompt it was prefilled with.

A new turn reuses the longest prefix whose token ids, positions and media items (by content) are
all identical to one kept prefix, and computes only the rest. Anything that differs (an edited
turn, another system prompt, a reply that does not re-tokenize to the same ids) only shortens the
reused prefix; it can never make a turn read another conversation's state. Prefixes are evicted
least recently used first.

Who may reuse what (`CacheScope`, omni_demo.config): equal tokens are equal state, but a reuse is
also an answer: "someone sent these tokens before", in the usage figures and in the time to first
text. So a prefix is reused in full only by its own private party (a browser session, an API key
with a cache_salt, the one local user of the CLI or the bench); a shared party (an API key many
clients hold) reuses its own prefixes only up to the end of one of their whole prompts, never into
a reply, so a prompt that agrees with part of another client's message (or with a whole message
and part of its reply) learns nothing of it; and across parties only the default system prompt's
tokens are shared.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from omni_demo.config import CacheScope
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
    scope: CacheScope = CacheScope()  # the party that computed it
    prompt_len: int = 0  # of token_ids, the prompt's (the rest: reply tokens); 0: all of them
    public_len: int = 0  # its leading tokens that every party may reuse (the default system prompt's)
    prompt_ends: tuple[int, ...] = ()  # where a whole prompt ends in token_ids: its own, and those of the
    # prefixes it replaced (a shared party may reuse up to any of them)

    def __post_init__(self):
        self.prompt_len = self.prompt_len or len(self.token_ids)
        self.prompt_ends = self.prompt_ends or (self.prompt_len,)

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


@dataclass(frozen=True)
class Reuse:
    """What a prompt may take from the cache: `length` leading tokens of `prefix`; `own`: the
    prefix is its own party's, reused as such (the usage figures count only those)."""

    prefix: Prefix | None
    length: int
    own: bool


def crop(cache, length: int, config):
    """A DynamicCache with the first `length` positions of `cache`, which stays as it is."""
    return kv_cache([(layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in cache.layers], config)


class ConversationCache:
    """Kept prefixes, least recently used first out: at most `max_prefixes`, `max_bytes` in all, and
    at most half of the prefixes per party (per API key, all its salts together), so that a flood
    evicts the flooder's own entries first."""

    def __init__(self, max_prefixes: int, max_bytes: int, public_ids: list[int] = ()):
        self.max_prefixes, self.max_bytes = max_prefixes, max_bytes
        self.public_ids = list(public_ids)  # what every party may reuse: the default system prompt's tokens
        self.prefixes: OrderedDict[int, Prefix] = OrderedDict()
        self._next_id = 0

    def longest(self, token_ids: list[int], positions: torch.Tensor, media: list[MediaSpan],
                scope: CacheScope = CacheScope()) -> Reuse:
        """The kept prefix that `scope` may reuse most leading tokens of for a prompt, and how many (at
        most L - 1: the last prompt token is always computed, its logits start the reply)."""
        best, best_reuse = None, Reuse(None, 0, False)
        for key, prefix in self.prefixes.items():
            shared = min(prefix.shared_length(token_ids, positions, media), len(token_ids) - 1)
            reuse = self._allowed(prefix, shared, scope)
            if reuse.length > best_reuse.length:
                best, best_reuse = key, reuse
        if best is not None and best_reuse.own:  # another party's use says nothing of this entry's worth
            self.prefixes.move_to_end(best)
        return best_reuse

    @staticmethod
    def _allowed(prefix: Prefix, shared: int, scope: CacheScope) -> Reuse:
        """Its own private party: all it shares. Its own shared party: up to the end of a whole prompt of
        the prefix, never into a reply (a prompt's last token is always computed again, so that is its
        length - 1): a guess that matches part of a message, or a whole message and part of the reply
        another client got, saves nothing. Others: the public part."""
        if prefix.scope == scope:
            if scope.private:
                return Reuse(prefix, shared, True)
            whole = [end - 1 for end in prefix.prompt_ends if prefix.public_len < end - 1 <= shared]
            if whole:
                return Reuse(prefix, max(whole), True)
        return Reuse(prefix, min(shared, prefix.public_len), False)

    def add(self, prefix: Prefix, replaces: Prefix | None = None) -> None:
        """Keep `prefix`; `replaces`, a prefix it extends, is then dropped (it holds nothing more)."""
        public = self.public_ids
        prefix.public_len = len(public) if public and prefix.token_ids[: len(public)] == public else 0
        for key, kept in list(self.prefixes.items()):
            if kept is replaces:
                del self.prefixes[key]
                prefix.prompt_ends = tuple(sorted({*kept.prompt_ends, *prefix.prompt_ends}))
        holder = prefix.scope.quota_holder  # a key's salted parties share its half: a flood of salts evicts its own
        own = [key for key, kept in self.prefixes.items() if kept.scope.quota_holder == holder]
        while len(own) >= max(1, self.max_prefixes // 2):
            del self.prefixes[own.pop(0)]
        self.prefixes[self._next_id] = prefix
        self._next_id += 1
        while self.prefixes and (len(self.prefixes) > self.max_prefixes or
                                 sum(p.nbytes for p in self.prefixes.values()) > self.max_bytes):
            self.prefixes.popitem(last=False)

    def clear(self) -> None:
        self.prefixes.clear()
