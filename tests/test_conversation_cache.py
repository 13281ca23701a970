"""The conversation cache: a turn served from what earlier turns computed is token for token and
code for code the turn computed from scratch, and no edit, clear, other session, setting or
cancelled reply can make it answer a different conversation."""

import threading
from dataclasses import replace

import pytest
import torch

from omni_demo.config import CacheConfig, CacheScope, GenerationOptions
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.events import AudioChunk, Finished, TextDelta
from omni_demo.inputs.messages import system_message

from .conftest import ASSETS

OPTIONS = GenerationOptions(greedy=True, max_new_tokens=12, max_audio_tokens=30, use_audio_in_video=True)
MEDIA_TURNS = [
    [{"type": "text", "text": "Hello there"}],
    [{"type": "image", "image": str(ASSETS / "shapes.png")}, {"type": "text", "text": "What is this?"}],
    [{"type": "audio", "audio": str(ASSETS / "question.wav")}],
    [{"type": "video", "video": str(ASSETS / "talking_shapes.mp4")}, {"type": "text", "text": "And this?"}],
    [{"type": "text", "text": "Thanks"}],
]


@pytest.fixture(scope="module")
def engines(loaded):
    """(cached, from scratch) for lean and plain decode steps."""
    return {lean: (OmniEngine(loaded, lean=lean), OmniEngine(loaded, lean=lean, cache=CacheConfig(enabled=False)))
            for lean in (True, False)}


def finished(engine, conversation, options=OPTIONS) -> Finished:
    return [e for e in engine.stream(conversation, options) if isinstance(e, Finished)][-1]


def assert_same_turn(cached, scratch, conversation, options=OPTIONS) -> Finished:
    ours, theirs = finished(cached, conversation, options), finished(scratch, conversation, options)
    assert theirs.stats.reused_prompt_tokens == 0
    assert ours.text_token_ids == theirs.text_token_ids
    assert ours.codec_token_ids == theirs.codec_token_ids
    assert len(ours.codec_token_ids) >= 24, "too few codes to reach the talker's later steps"
    return ours


def play(cached, scratch, turns, options=OPTIONS, system="You are Qwen"):
    """Play the turns; each reply goes into the history as text. -> each turn's Finished."""
    conversation, results = [system_message(system)], []
    for content in turns:
        conversation = conversation + [{"role": "user", "content": content}]
        done = assert_same_turn(cached, scratch, conversation, options)
        conversation = conversation + [{"role": "assistant", "content": [{"type": "text", "text": done.text}]}]
        results.append(done)
    return conversation, results


@pytest.mark.parametrize(("lean", "voice"), [(True, "Chelsie"), (True, "Ethan"), (False, "Chelsie")])
def test_media_conversation_from_the_cache_equals_from_scratch(engines, lean, voice):
    cached, scratch = engines[lean]
    cached.conversation_cache.clear()
    options = GenerationOptions(**{**OPTIONS.__dict__, "voice": voice})
    _, results = play(cached, scratch, MEDIA_TURNS, options)
    for previous, turn in zip(results, results[1:]):
        # At least the whole previous prompt. (Its reply is reused only when its text tokenizes
        # back to its tokens, which random weights, splitting characters' bytes, almost never do.)
        assert turn.stats.reused_prompt_tokens >= previous.stats.prompt_tokens


def with_reply_tokens(engine, conversation, reply: Finished):
    """The next turn's inputs with the reply's own tokens where its re-tokenized text stands, as a
    client that keeps token ids would send it (the reply must be the last assistant turn)."""
    from omni_demo.inputs.prepare import PreparedInputs

    inputs = engine.prepare(conversation, OPTIONS)
    ids = inputs.input_ids[0].tolist()
    start = reply.stats.prompt_tokens
    end = ids.index(engine.thinker_eos[0], start)  # the reply's <|im_end|>
    fed = [t for t in reply.text_token_ids if t not in engine.thinker_eos]
    ids = torch.tensor([ids[:start] + fed + ids[end:]])
    assert all(span.end <= start for span in inputs.media), "media after the reply would move"
    tensors = {**inputs.tensors, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return PreparedInputs(tensors, inputs.messages, inputs.use_audio_in_video, inputs.media)


@pytest.mark.parametrize("lean", [True, False])
def test_reply_tokens_are_reused_with_their_talker_states(engines, lean):
    """The reply's own KV and talker states (not only the prompt's) serve the next turn."""
    cached, scratch = engines[lean]
    cached.conversation_cache.clear()
    conversation, results = play(cached, scratch, MEDIA_TURNS[:2])
    reply = results[-1]
    conversation += [{"role": "user", "content": [{"type": "text", "text": "Say more"}]}]
    turns = [[e for e in engine.stream_inputs(with_reply_tokens(engine, conversation, reply), OPTIONS)][-1]
             for engine in (cached, scratch)]
    ours, theirs = turns
    assert ours.text_token_ids == theirs.text_token_ids and ours.codec_token_ids == theirs.codec_token_ids
    assert len(ours.codec_token_ids) >= 24
    fed = len(reply.text_token_ids) - 1  # a length-stopped reply's last token is never fed
    assert reply.stop_reason == "length" and ours.stats.reused_prompt_tokens == reply.stats.prompt_tokens + fed

def test_edited_earlier_turn_and_swapped_picture_fall_back_exactly(engines, tmp_path):
    from PIL import Image

    cached, scratch = engines[True]
    conversation, _ = play(cached, scratch, MEDIA_TURNS[:2])
    # the same conversation with another picture of the same size: same placeholder ids, other pixels
    other = tmp_path / "other.png"
    Image.open(ASSETS / "shapes.png").convert("RGB").rotate(180).save(other)
    swapped = [*conversation[:3], {"role": "user", "content": [{"type": "image", "image": str(other)},
                                                               {"type": "text", "text": "What is this?"}]},
               {"role": "user", "content": [{"type": "text", "text": "Again"}]}]
    swapped_turn = assert_same_turn(cached, scratch, swapped)
    edited = [conversation[0], {"role": "user", "content": [{"type": "text", "text": "Hello world"}]},
              *conversation[2:], {"role": "user", "content": [{"type": "text", "text": "Again"}]}]
    edited_turn = assert_same_turn(cached, scratch, edited)
    assert edited_turn.stats.reused_prompt_tokens < 20  # the system prompt and the start of turn 1
    assert swapped_turn.stats.reused_prompt_tokens < edited_turn.stats.prompt_tokens


def test_interleaved_sessions_new_system_prompt_and_clear(engines):
    cached, scratch = engines[True]
    a = [system_message("You are Qwen"), {"role": "user", "content": "Tell me about cats"}]
    b = [system_message("You are Qwen"), {"role": "user", "content": "Tell me about dogs"}]
    scopes = {name: replace(OPTIONS, cache_scope=CacheScope(f"session:{name}", private=True)) for name in "ab"}
    for _ in range(2):  # a, b, a + 1 turn, b + 1 turn
        for name, conversation in (("a", a), ("b", b)):
            done = assert_same_turn(cached, scratch, conversation, scopes[name])
            conversation += [{"role": "assistant", "content": done.text}, {"role": "user", "content": f"More, {name}"}]
    other_system = [system_message("You are a pirate"), *a[1:]]
    reused = assert_same_turn(cached, scratch, other_system, scopes["a"]).stats.reused_prompt_tokens
    same_start = cached.processor.tokenizer("<|im_start|>system\nYou are a")["input_ids"]  # "... Qwen" / "... pirate"
    assert 0 < reused <= len(same_start)  # not a token past where the system prompts part
    cleared = [system_message("You are Qwen"), {"role": "user", "content": "Tell me about cats"}]  # after Clear
    assert_same_turn(cached, scratch, cleared, scopes["a"])


@pytest.mark.parametrize("cancel_at", [TextDelta, AudioChunk])  # before the talker ran, and after
def test_a_cancelled_reply_then_the_next_turn(engines, cancel_at):
    cached, scratch = engines[False]
    cached.conversation_cache.clear()
    conversation = [system_message("You are Qwen"), {"role": "user", "content": "Tell me a long story"}]
    cancel, text = threading.Event(), ""
    long = GenerationOptions(greedy=True, max_new_tokens=200, min_new_tokens=200, max_audio_tokens=400)
    for event in cached.stream(conversation, long, cancel):
        if isinstance(event, cancel_at):
            cancel.set()
        if isinstance(event, Finished):
            assert event.stop_reason == "cancelled"
            text = event.text
    assert text, "the reply should have produced text before it was stopped"
    conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on"}]
    assert assert_same_turn(cached, scratch, conversation).stats.reused_prompt_tokens > 20

def test_the_cache_stays_within_its_budget(loaded):
    engine = OmniEngine(loaded, cache=CacheConfig(max_prefixes=4))
    for topic in ("cats", "dogs", "birds"):  # one party keeps at most half of the prefixes
        finished(engine, [system_message("You are Qwen"), {"role": "user", "content": f"About {topic}"}])
    assert len(engine.conversation_cache.prefixes) == 2
    for party in ("b", "c"):
        options = replace(OPTIONS, cache_scope=CacheScope(party))
        for topic in ("cats", "dogs", "birds"):
            finished(engine, [system_message("You are Qwen"), {"role": "user", "content": f"About {topic}"}], options)
    kept = engine.conversation_cache.prefixes.values()
    assert len(kept) == 4 and {prefix.scope.party for prefix in kept} == {"b", "c"}
    tight = OmniEngine(loaded, cache=CacheConfig(max_prefix_mb=0.001))
    finished(tight, [system_message("You are Qwen"), {"role": "user", "content": "About cats"}])
    assert not tight.conversation_cache.prefixes
