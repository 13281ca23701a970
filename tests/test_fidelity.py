"""Greedy streaming equals the transformers reference, token for token and code for code.

The reference runs on its intended path: the compared prompt is the longest row of a
left-padded batch, so `generate` keeps the attention mask and the talker gets its codec pad/bos
conditioning and 3-D positions (see omni_demo.tools.reference).
"""

import pytest

from omni_demo.config import GenerationOptions
from omni_demo.events import AudioChunk, Finished, TextDelta
from omni_demo.tools.reference import reference_generate

from .conftest import ASSETS, run, text_messages

SYSTEM = text_messages()[0]
CASES = {
    "text": (text_messages(), False),
    "image+audio": (
        [SYSTEM, {"role": "user", "content": [
            {"type": "image", "image": str(ASSETS / "shapes.png")},
            {"type": "audio", "audio": str(ASSETS / "question.wav")},
            {"type": "text", "text": "Answer the question about the picture."},
        ]}],
        False,
    ),
    "video+its audio": (
        [SYSTEM, {"role": "user", "content": [
            {"type": "video", "video": str(ASSETS / "talking_shapes.mp4")},
            {"type": "text", "text": "What is happening?"},
        ]}],
        True,
    ),
    "multi-turn": (
        [SYSTEM,
         {"role": "user", "content": [{"type": "image", "image": str(ASSETS / "shapes.png")},
                                      {"type": "text", "text": "Hello"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hi! I see shapes."}]},
         {"role": "user", "content": [{"type": "text", "text": "Which colours are they?"}]}],
        False,
    ),
}


def finished(events) -> Finished:
    assert isinstance(events[-1], Finished)
    return events[-1]


@pytest.mark.parametrize("voice", ["Chelsie", "Ethan"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_codes_equal_reference(engine, case, voice):
    messages, use_audio_in_video = CASES[case]
    options = GenerationOptions(greedy=True, voice=voice, max_new_tokens=12, max_audio_tokens=70,
                                use_audio_in_video=use_audio_in_video)
    ours = finished(run(engine, messages, options))
    reference = reference_generate(engine.loaded, messages, options, padded=True)
    assert ours.text_token_ids == reference.text_token_ids
    assert len(ours.codec_token_ids) > 24, "too few codes to exercise the streaming decoder"
    assert ours.codec_token_ids == reference.codec_token_ids


def test_voices_give_different_codes(engine):
    options = GenerationOptions(greedy=True, max_new_tokens=12, max_audio_tokens=70)
    chelsie = finished(run(engine, text_messages(), options)).codec_token_ids
    ethan = finished(run(engine, text_messages(), GenerationOptions(**{**options.__dict__, "voice": "Ethan"})))
    assert chelsie != ethan.codec_token_ids


def test_single_prompt_reference_shows_the_upstream_defect(engine):
    """Called as users call it, `generate` drops the all-ones mask and the talker its conditioning:
    the codes differ from the intended path that the engine follows."""
    options = GenerationOptions(greedy=True, max_new_tokens=12, max_audio_tokens=70)
    intended = reference_generate(engine.loaded, text_messages(), options, padded=True)
    as_called = reference_generate(engine.loaded, text_messages(), options, padded=False)
    assert as_called.text_token_ids == intended.text_token_ids
    assert as_called.codec_token_ids != intended.codec_token_ids


def test_speech_starts_before_the_text_ends(engine):
    options = GenerationOptions(greedy=True, max_new_tokens=60, min_new_tokens=60, max_audio_tokens=120)
    events = run(engine, text_messages(), options)
    kinds = [type(e) for e in events]
    first_audio = kinds.index(AudioChunk)
    last_text = len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert first_audio < last_text, "audio should stream while the thinker is still writing"
    stats = finished(events).stats
    assert stats.time_to_first_audio_s < stats.total_s
    assert finished(events).audio_samples == 480 * len(finished(events).codec_token_ids)


def test_text_only_never_runs_talker_or_token2wav(engine):
    model = engine.model
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1))
             for m in (model.talker, model.talker.model, model.talker.codec_head, model.token2wav.code2wav_dit_model,
                       model.token2wav.code2wav_bigvgan_model)]
    try:
        events = run(engine, text_messages(), GenerationOptions(greedy=True, speech=False, max_new_tokens=12))
    finally:
        for hook in hooks:
            hook.remove()
    assert not calls
    assert not [e for e in events if isinstance(e, AudioChunk)]
    done = finished(events)
    assert done.codec_token_ids == [] and done.stats.time_to_first_audio_s is None
    reference = reference_generate(engine.loaded, text_messages(),
                                   GenerationOptions(greedy=True, speech=False, max_new_tokens=12))
    assert done.text_token_ids == reference.text_token_ids
