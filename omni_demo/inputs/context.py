"""Fitting a conversation into the model's window: every media part planned from its header,
every message's tokens counted once, the oldest whole turns left out while the conversation is
over the window or a per-conversation media budget, then what is left read and prepared once.
Linear in the conversation, and nothing of a left-out turn is decoded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from omni_demo.config import Limits
from omni_demo.errors import InputError

from .media import PartPlan
from .messages import check_request, normalize_conversation
from .prepare import PreparedInputs, image_max_pixels, plan_media, prepare_inputs
from .prompt import MediaCache, count_tokens


@dataclass
class ContextBudget:
    """What the kept turns of a conversation take, counted from the newest turn back."""

    limits: Limits
    tokens: int
    images: int = 0
    videos: int = 0
    audio_s: float = 0.0

    def add(self, tokens: int, plans: list[PartPlan]) -> None:
        self.tokens += tokens
        self.images += sum(p.kind == "image" for p in plans)
        self.videos += sum(p.kind == "video" for p in plans)
        self.audio_s += sum(p.audio_s for p in plans)

    def over(self, token_limit: int) -> str | None:
        """What is over its budget, in words; None when nothing is."""
        limits = self.limits
        if self.tokens > token_limit:
            over = f"the limit is {token_limit} ({self.tokens - token_limit} over)"
            if not (self.images or self.videos or self.audio_s):
                return (f"this message is {self.tokens} tokens long; {over}. Send a shorter message, or lower "
                        "max new tokens.")
            return (f"this message is {self.tokens} tokens with its media; {over}. Send less media, a shorter clip, "
                    "or lower max new tokens.")
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


def plan_conversation(processor, messages: list[dict], limits: Limits, *, use_audio_in_video: bool,
                      token_limit: int) -> list[list[PartPlan]]:
    """Each media part's reading plan (omni_demo.inputs.media), its options written into the part:
    no image or video takes more than half of the prompt window."""
    return plan_media(messages, limits, use_audio_in_video=use_audio_in_video, token_budget=token_limit // 2,
                      max_image_pixels=image_max_pixels(processor))


def fit_context(processor, messages, limits: Limits, *, token_limit: int, use_audio_in_video: bool, device=None,
                media_cache: MediaCache | None = None,
                cancel: threading.Event | None = None) -> tuple[PreparedInputs, int]:
    """The conversation's kept turns, prepared: (inputs, turns left out). Raises InputError when the
    last turn alone is over a budget, Cancelled once `cancel` is set between two media parts."""
    messages = normalize_conversation(messages)
    check_request(messages, limits)
    plans = plan_conversation(processor, messages, limits, use_audio_in_video=use_audio_in_video,
                              token_limit=token_limit)
    sizes, overhead = count_tokens(processor, messages, [plan.tokens for row in plans for plan in row])
    head, starts = turn_starts(messages)
    ends = starts[1:] + [len(messages)]
    turn_tokens = [sum(sizes[starts[t]:ends[t]]) for t in range(len(starts))]
    budget, first = ContextBudget(limits, overhead + sum(sizes[:head])), len(starts)
    for turn in reversed(range(len(starts))):
        budget.add(turn_tokens[turn], [plan for i in range(starts[turn], ends[turn]) for plan in plans[i]])
        if (refusal := budget.over(token_limit)) is not None:
            if first == len(starts):
                raise InputError(refusal)
            break
        first = turn
    while True:
        kept = [*range(head), *range(starts[first], len(messages))]
        inputs = prepare_inputs(processor, [messages[i] for i in kept], use_audio_in_video=use_audio_in_video,
                                device=device, media_cache=media_cache, plans=[plans[i] for i in kept], cancel=cancel)
        over = inputs.prompt_len - token_limit
        if over <= 0:
            return inputs, first
        if first == len(starts) - 1:  # the estimate was short and only the last turn is left
            raise InputError(ContextBudget(limits, inputs.prompt_len).over(token_limit))
        while over > 0 and first < len(starts) - 1:  # estimates were short: leave out what covers it
            over, first = over - turn_tokens[first], first + 1
