"""Listening while the user speaks: a spoken turn's audio is encoded and prefilled window by
window as it arrives, and the greedy reply is token for token and code for code the reply to the
same clip processed whole, whatever the clip's loudness does."""

import numpy as np
import pytest

from omni_demo.config import BatchConfig, CacheConfig, GenerationOptions, Limits
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.errors import InputError
from omni_demo.events import Finished
from omni_demo.inputs.messages import system_message
from omni_demo.tools.bench import utterance

from .conftest import ASSETS

OPTIONS = GenerationOptions(greedy=True, max_new_tokens=12, max_audio_tokens=30)
CHUNK = 1600  # 0.1 s, as a browser microphone sends it
WINDOW_TOKENS = 50  # 2 s of audio: one encoder window


@pytest.fixture(scope="module")
def engines(loaded):
    """(listening, processing the clip whole)"""
    return OmniEngine(loaded), OmniEngine(loaded, cache=CacheConfig(enabled=False))


def finished(engine, messages) -> Finished:
    return [e for e in engine.stream(messages, OPTIONS) if isinstance(e, Finished)][-1]


@pytest.fixture(scope="module")
def history(engines):
    """One turn with a picture and its reply, already in the listening engine's cache."""
    listening, _ = engines
    first = [system_message("You are Qwen"),
             {"role": "user", "content": [{"type": "image", "image": str(ASSETS / "shapes.png")},
                                          {"type": "text", "text": "Hi"}]}]
    reply = finished(listening, first)
    return first + [{"role": "assistant", "content": reply.text}], reply


def listen(engine, history, clip, exact=False):
    listener = engine.listen(history, OPTIONS, exact=exact)
    for start in range(0, len(clip), CHUNK):
        listener.feed_audio(clip[start : start + CHUNK])
    return listener, listener.end_turn()


def assert_same_reply(engines, history, clip, listener, messages) -> Finished:
    listening, whole = engines
    ours = finished(listening, messages)
    theirs = finished(whole, [*history, {"role": "user", "content": [{"type": "audio", "audio": clip}]}])
    assert ours.text_token_ids == theirs.text_token_ids
    assert ours.codec_token_ids == theirs.codec_token_ids and len(ours.codec_token_ids) >= 24
    return ours


def test_windows_heard_serve_the_reply(engines, history):
    history, first_reply = history
    clip = utterance(7.0)  # 3 whole windows, then 1 s
    listener, messages = listen(engines[0], history, clip)
    assert len(listener.windows) == 3 and listener.windows_kept == 3  # its loudest moment comes early
    reply = assert_same_reply(engines, history, clip, listener, messages)
    # the history (its prompt at least) and every window heard came from the cache
    assert reply.stats.reused_prompt_tokens >= first_reply.stats.prompt_tokens + 3 * WINDOW_TOKENS


def louder_ending():
    """Digital silence, soft speech, then louder speech: the clamp floor rises at the end."""
    return np.concatenate([np.zeros(16_000, np.float32), 0.2 * utterance(4.0, noise=0.0), utterance(2.5, noise=0.0)])


def test_exact_listening_re_encodes_from_the_first_changed_window(engines, history):
    """Digital silence sits at the clamp floor, which moves when a louder part comes later: the
    windows heard before it no longer match and are computed again, so the reply stays exact."""
    history, _ = history
    clip = louder_ending()
    listener, messages = listen(engines[0], history, clip, exact=True)
    assert len(listener.windows) == 3 and listener.windows_kept < 3 and listener.changed_values == 0
    assert "listened" not in messages[-1]["content"][0]
    assert_same_reply(engines, history, clip, listener, messages)


def test_listening_keeps_windows_whose_only_change_is_under_the_floor(engines, history):
    """By default a window heard is kept when the whole clip differs from it only where it clamps
    to its floor; the reply's agreement with the exact one is measured and printed."""
    history, _ = history
    clip = louder_ending()
    listener, messages = listen(engines[0], history, clip)
    assert listener.windows_kept == len(listener.windows) == 3
    assert listener.changed_values > 0 and 0 < listener.max_difference < 2.0  # 8 log10 units / 4 at most
    assert messages[-1]["content"][0]["listened"] == "floor"  # its item has a key of its own
    ours = finished(engines[0], messages)
    assert ours.stats.reused_prompt_tokens >= len(listener.windows) * WINDOW_TOKENS  # the windows came from the cache
    theirs = finished(engines[1], [*history, {"role": "user", "content": [{"type": "audio", "audio": clip}]}])
    text = np.mean([a == b for a, b in zip(ours.text_token_ids, theirs.text_token_ids)])
    codes = np.mean([a == b for a, b in zip(ours.codec_token_ids, theirs.codec_token_ids)])
    print(f"\nlistening (floor): {listener.changed_values} feature values changed, at most {listener.max_difference:.3f}; "
          f"text tokens agree {text:.0%}, codec codes {codes:.0%} with the clip processed whole")
    assert len(ours.text_token_ids) >= 6 and len(ours.codec_token_ids) >= 24  # enough to agree or not


def test_while_another_reply_runs_listening_goes_on_between_its_steps_and_stays_exact(engines, history):
    history, _ = history
    listening, _ = engines
    clip = utterance(5.0, seed=1)
    other = listening.stream([{"role": "user", "content": "tell me everything"}],
                             GenerationOptions(max_new_tokens=400, min_new_tokens=400, speech=False))
    next(other)  # another reply is running
    try:
        listener = listening.listen(history, OPTIONS)
        for start in range(0, len(clip), CHUNK):
            listener.feed_audio(clip[start : start + CHUNK])
        assert len(listener.windows) == 2  # encoded and prefilled as they finished, between the reply's steps
        assert listening.scheduler.running, "the other reply was still running"
    finally:
        other.close()
    assert_same_reply(engines, history, clip, listener, listener.end_turn())


def test_one_reply_at_a_time_listening_waits_for_the_running_reply(loaded, history):
    history, _ = history
    alone = OmniEngine(loaded, batch=BatchConfig(threaded=False))
    clip = utterance(5.0, seed=1)
    other = alone.stream([{"role": "user", "content": "hi"}], GenerationOptions(max_new_tokens=50, speech=False))
    next(other)
    listener = alone.listen(history, OPTIONS)
    for start in range(0, len(clip), CHUNK):
        listener.feed_audio(clip[start : start + CHUNK])
    assert listener.windows == []  # skipped, not waited for: the turn is then processed whole
    other.close()
    listener.feed_audio(np.zeros(CHUNK, np.float32))
    assert len(listener.windows) == 2


def test_a_turn_over_the_audio_limit_or_without_audio_is_refused(loaded):
    engine = OmniEngine(loaded, limits=Limits(max_audio_s=3.0))
    listener = engine.listen([system_message("You are Qwen")])
    with pytest.raises(InputError, match="no audio was heard"):
        listener.end_turn()
    listener.feed_audio(np.zeros(2 * 16_000, np.float32))
    with pytest.raises(InputError, match="over the limit of 3 s"):
        listener.feed_audio(np.zeros(2 * 16_000, np.float32))
    with pytest.raises(ValueError, match="conversation cache"):
        OmniEngine(loaded, cache=CacheConfig(enabled=False)).listen([])


# At 6.0 s the third window is not heard yet: its last frame reads 12.5 ms past the clip's end.
@pytest.mark.parametrize(("seconds", "windows"), [(2.5, 1), (4.37, 2), (6.0, 2)])
def test_the_clip_heard_is_the_item_the_processor_makes(engines, seconds, windows):
    """Token count and feature mask equal the processor's whole-clip item; encoder outputs equal
    it up to float rounding."""
    import torch

    from omni_demo.engine.decoders import item_features
    from omni_demo.inputs.prompt import media_key, process_media

    listening, _ = engines
    clip = utterance(seconds, seed=2)
    listener, messages = listen(listening, [system_message("You are Qwen")], clip)
    part = messages[-1]["content"][0]
    heard = listening.media_cache.get(media_key(part, with_audio=False))
    whole = process_media(listening.processor, "audio", "whole", {"audio": [clip]})
    assert heard.token_ids == whole.token_ids
    assert torch.equal(heard.tensors["feature_attention_mask"], whole.tensors["feature_attention_mask"])
    thinker, audio_token = listening.model.thinker.model, listener.audio_token
    # Equal up to float rounding: a window multiplied alone rounds differently than inside the
    # whole clip's batch (matmul blocking depends on the shapes), by ~1e-7 of the values' scale.
    ours, theirs = item_features(thinker, heard)[audio_token], item_features(thinker, whole)[audio_token]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert listener.windows_kept == len(listener.windows) == windows


def test_a_turn_cut_at_its_end_is_the_shorter_clip_processed_whole(engines, history):
    """A voice call hears the pause that ends a turn, but the turn is the speech before it:
    end_turn(length) leaves the rest out, with the windows that read it, and the reply is the
    reply to the shorter clip processed whole."""
    history, _ = history
    clip = np.concatenate([utterance(4.5), np.zeros(int(1.8 * 16_000), np.float32)])  # 2 windows, then the pause
    listener = engines[0].listen(history, OPTIONS)
    for start in range(0, len(clip), CHUNK):
        listener.feed_audio(clip[start : start + CHUNK])
    assert len(listener.windows) == 3  # the third one is mostly the pause
    length = int(4.5 * 16_000)
    messages = listener.end_turn(length)
    assert len(messages[-1]["content"][0]["audio"]) == length and listener.windows_kept == 2
    assert_same_reply(engines, history, clip[:length], listener, messages)


def test_a_turn_ended_early_goes_on_when_the_user_does(engines, history):
    """A voice call ends the turn at a short pause to start its reply early; if the user goes on,
    the listener is fed on and the turn ended again: the reply is then the reply to the whole,
    longer clip processed whole (nothing of the first ending is left in the listener)."""
    history, _ = history
    speech = utterance(3.0)
    clip = np.concatenate([speech, np.zeros(int(0.3 * 16_000), np.float32), utterance(3.5, seed=1)])
    listener = engines[0].listen(history, OPTIONS)
    paused = len(speech) + int(0.3 * 16_000)
    for start in range(0, paused, CHUNK):
        listener.feed_audio(clip[start : start + CHUNK])
    early = listener.end_turn(len(speech))
    assert len(early[-1]["content"][0]["audio"]) == len(speech) and listener.windows_kept == 1
    finished(engines[0], early)  # the early reply runs (the call cancels it; a whole one is as good here)
    for start in range(paused, len(clip), CHUNK):
        listener.feed_audio(clip[start : start + CHUNK])
    assert listener.heard == len(clip) and len(listener.windows) == 3
    messages = listener.end_turn()
    assert listener.windows_kept == 3
    assert_same_reply(engines, history, clip, listener, messages)
