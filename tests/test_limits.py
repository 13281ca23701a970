"""Bounded work per request: each limit names itself and says by how much it was exceeded."""

import pytest

from omni_demo.config import GenerationOptions, Limits
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.errors import InputError
from omni_demo.events import ContextTrimmed, Finished

from .conftest import ASSETS, run

TEXT_ONLY = GenerationOptions(speech=False, greedy=True, max_new_tokens=4)


def limited(loaded, **limits) -> OmniEngine:
    return OmniEngine(loaded, limits=Limits(**limits))


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_audio_longer_than_the_limit(loaded):
    engine = limited(loaded, max_audio_s=1.0)
    with pytest.raises(InputError, match=r"audio question.wav is 3.3 s long; the limit is 1 s \(2.3 s over\)"):
        run(engine, user({"type": "audio", "audio": str(ASSETS / "question.wav")}), TEXT_ONLY)


def test_video_longer_than_the_limit(loaded):
    engine = limited(loaded, max_video_s=2.5)
    with pytest.raises(InputError, match=r"video talking_shapes.mp4 is 3.0 s long; the limit is 2.5 s \(0.5 s over\)"):
        run(engine, user({"type": "video", "video": str(ASSETS / "talking_shapes.mp4")}), TEXT_ONLY)


def test_video_frames_are_bounded(loaded):
    video = user({"type": "video", "video": str(ASSETS / "talking_shapes.mp4")}, {"type": "text", "text": "?"})
    full = run(limited(loaded), video, TEXT_ONLY)[-1]
    bounded = run(limited(loaded, max_video_frames=2), video, TEXT_ONLY)[-1]
    assert bounded.messages[-1]["content"][0]["max_frames"] == 2
    assert bounded.stats.prompt_tokens < full.stats.prompt_tokens


def test_too_many_images_in_one_turn(loaded):
    image = {"type": "image", "image": str(ASSETS / "shapes.png")}
    with pytest.raises(InputError, match=r"this turn has 3 images; the limit is 2 \(1 too many\)"):
        run(limited(loaded, max_images_per_turn=2), user(image, image, image), TEXT_ONLY)


def conversation(turns: int):
    messages = [{"role": "system", "content": "You are Qwen."}]
    for index in range(turns):
        messages.append({"role": "user", "content": f"question {index}: " + "tell me more about shapes " * 4})
        messages.append({"role": "assistant", "content": f"answer {index}: " + "circles and squares " * 4})
    messages.append({"role": "user", "content": "and finally?"})
    return messages


def test_long_conversation_drops_oldest_whole_turns_visibly(loaded):
    full = run(limited(loaded), conversation(4), TEXT_ONLY)[-1].stats.prompt_tokens
    engine = limited(loaded, max_context_tokens=full - 20)
    events = run(engine, conversation(4), TEXT_ONLY)
    trimmed = [e for e in events if isinstance(e, ContextTrimmed)]
    assert len(trimmed) == 1 and trimmed[0].dropped_turns == 1 and trimmed[0].limit_tokens == full - 20
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stats.prompt_tokens <= full - 20
    texts = [m["content"][0]["text"] for m in finished.messages]
    assert texts[0] == "You are Qwen." and texts[-1] == "and finally?"
    assert not any(t.startswith(("question 0", "answer 0")) for t in texts)  # a whole turn, never half
    assert any(t.startswith("question 1") for t in texts) and any(t.startswith("answer 1") for t in texts)


@pytest.mark.parametrize("turns", [50, 3200])
def test_fitting_a_long_conversation_is_one_count_and_one_preparation(loaded, monkeypatch, turns):
    """Linear whatever the length: every message is tokenized once (one batched call for the whole
    conversation), and only the kept turns are prepared, once."""
    import omni_demo.inputs.context as context_module

    calls = {"count_tokens": [], "prepare_inputs": []}
    for name in calls:
        real = getattr(context_module, name)
        monkeypatch.setattr(context_module, name, lambda *a, _real=real, _name=name, **k: calls[_name].append(
            len(a[1])) or _real(*a, **k))
    engine = limited(loaded, max_context_tokens=2000)
    inputs, dropped = engine.fit_context(conversation(turns), TEXT_ONLY)
    assert calls["count_tokens"] == [2 * turns + 2]  # every message, once
    assert len(calls["prepare_inputs"]) == 1 and calls["prepare_inputs"][0] == 2 * (turns - dropped) + 2
    assert 0 < inputs.prompt_len <= engine.prompt_limit(TEXT_ONLY) and dropped > turns - 50


def test_one_message_over_the_window_is_refused_with_numbers(loaded):
    engine = limited(loaded, max_context_tokens=30)
    with pytest.raises(InputError, match=r"this message is \d+ tokens with its media; the limit is 30 \(\d+ over\)"):
        run(engine, user({"type": "image", "image": str(ASSETS / "shapes.png")}, {"type": "text", "text": "hi"}),
            TEXT_ONLY)
    with pytest.raises(InputError, match=r"this message is \d+ tokens long; the limit is 30 .*shorter message") as caught:
        run(engine, user({"type": "text", "text": "a long message " * 20}), TEXT_ONLY)
    assert "media" not in str(caught.value)  # it had none


def test_reply_length_counts_against_the_window(loaded):
    engine = limited(loaded)
    window = loaded.model.config.thinker_config.text_config.max_position_embeddings
    with pytest.raises(InputError, match="the limit is"):
        run(engine, user({"type": "text", "text": "hi"}),
            GenerationOptions(speech=False, max_new_tokens=window - 5))
