"""Engine behaviour beyond fidelity: cancellation, bad input, sampling settings, text decoding."""

import threading

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omni_demo.config import GenerationOptions
from omni_demo.engine.sampling import talker_sampler
from omni_demo.engine.streams import TextDetokenizer
from omni_demo.errors import InputError
from omni_demo.events import AudioChunk, Finished, TextDelta

from .conftest import run, text_messages

LONG = GenerationOptions(greedy=True, max_new_tokens=200, min_new_tokens=200, max_audio_tokens=1000,
                         min_audio_tokens=1000)


class ForwardCounter:
    """Counts forward passes: thinker and talker output heads (every step, plain or lean) and both
    Token2Wav halves."""

    def __init__(self, model):
        self.count = 0
        modules = (model.thinker.lm_head, model.talker.codec_head, model.token2wav.code2wav_dit_model,
                   model.token2wav.code2wav_bigvgan_model)
        self.hooks = [m.register_forward_pre_hook(self._hit) for m in modules]

    def _hit(self, *_):
        self.count += 1

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def test_closing_the_generator_stops_all_work(engine):
    counter = ForwardCounter(engine.model)
    try:
        stream = engine.stream(text_messages(), LONG)
        chunks = 0
        for event in stream:
            chunks += isinstance(event, AudioChunk)
            if chunks == 2:
                break
        stream.close()
        after_close = counter.count
        with pytest.raises(StopIteration):
            next(stream)
        threading.Event().wait(0.3)  # nothing runs in the background either
        assert counter.count == after_close
    finally:
        counter.remove()


def test_cancel_event_stops_within_one_step(engine):
    cancel = threading.Event()
    counter = ForwardCounter(engine.model)
    events, at_cancel = [], None
    try:
        for event in engine.stream(text_messages(), LONG, cancel):
            events.append(event)
            if isinstance(event, AudioChunk) and at_cancel is None:
                cancel.set()
                at_cancel = counter.count
    finally:
        counter.remove()
    assert isinstance(events[-1], Finished) and events[-1].stop_reason == "cancelled"
    # the scheduler's step in progress when cancel is set may end (one thinker, talker and vocoder
    # pass at most); no step starts after it
    assert counter.count - at_cancel <= 3, "no forward pass may start after cancel is seen"
    assert len(events[-1].codec_token_ids) < 100
    # the engine serves the next request normally
    done = run(engine, text_messages(), GenerationOptions(greedy=True, max_new_tokens=5, max_audio_tokens=30))[-1]
    assert done.stop_reason == "length" and done.audio_samples == 30 * 480


@pytest.mark.parametrize(
    ("messages", "options", "expected"),
    [
        ([], GenerationOptions(), "conversation is empty"),
        ([{"role": "user", "content": []}], GenerationOptions(), "is empty"),
        ([{"role": "user", "content": "  "}], GenerationOptions(), "is empty"),
        ([{"role": "robot", "content": "hi"}], GenerationOptions(), "needs a role"),
        ([{"role": "user", "content": [{"type": "smell", "smell": "x"}]}], GenerationOptions(), "not text, image"),
        (text_messages()[:1], GenerationOptions(), "last message must come from the user"),
        ([{"role": "user", "content": [{"type": "image", "image": "/nope/missing.png"}]}], GenerationOptions(),
         "image file not found: /nope/missing.png"),
        (text_messages(), GenerationOptions(voice="Bob"), "unknown voice 'Bob'; choose one of Chelsie, Ethan"),
    ],
)
def test_bad_requests_are_named(engine, messages, options, expected):
    with pytest.raises(InputError, match=expected):
        run(engine, messages, options)


@pytest.mark.parametrize("kind", ["image", "audio", "video"])
def test_unreadable_media_is_named(engine, tmp_path, kind):
    broken = tmp_path / f"broken.{ {'image': 'png', 'audio': 'wav', 'video': 'mp4'}[kind] }"
    broken.write_bytes(b"this is not a media file" * 10)
    messages = [{"role": "user", "content": [{"type": kind, kind: str(broken)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(InputError, match=f"could not read {kind} {broken.name}"):
        run(engine, messages, GenerationOptions(max_new_tokens=2, speech=False))


def test_silent_video_with_audio_in_video_is_explained(engine, tmp_path):
    import subprocess

    silent = tmp_path / "silent.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=4", "-t", "1",
                    "-pix_fmt", "yuv420p", str(silent)], check=True)
    messages = [{"role": "user", "content": [{"type": "video", "video": str(silent)}]}]
    with pytest.raises(InputError, match="silent.mp4 has no audio track; switch off .use audio in video."):
        run(engine, messages, GenerationOptions(use_audio_in_video=True, speech=False, max_new_tokens=2))
    done = run(engine, messages, GenerationOptions(speech=False, max_new_tokens=2))[-1]
    assert done.stats.prompt_tokens > 20


def test_talker_sampling_defaults_are_upstreams(engine):
    sampler = talker_sampler(engine.model.talker, GenerationOptions(), 10, engine.loaded.device)
    kinds = {type(p): p for p in sampler.processors}
    assert kinds[RepetitionPenaltyLogitsProcessor].penalty == 1.05
    assert kinds[TemperatureLogitsWarper].temperature == 0.9
    assert kinds[TopKLogitsWarper].top_k == 40
    assert kinds[TopPLogitsWarper].top_p == 0.8
    assert sampler.do_sample


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    def reply(seed):
        options = GenerationOptions(seed=seed, temperature=1.0, top_p=0.9, max_new_tokens=10, max_audio_tokens=40)
        return run(engine, text_messages(), options)[-1]

    first, again, other = reply(7), reply(7), reply(8)
    assert first.text_token_ids == again.text_token_ids and first.codec_token_ids == again.codec_token_ids
    assert (first.text_token_ids, first.codec_token_ids) != (other.text_token_ids, other.codec_token_ids)


def test_events_are_typed_and_consistent(engine):
    events = run(engine, text_messages(), GenerationOptions(greedy=True, max_new_tokens=20, max_audio_tokens=80))
    done = events[-1]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == done.text
    audio = [e for e in events if isinstance(e, AudioChunk)]
    assert [a.start_sample for a in audio] == [sum(len(b.samples) for b in audio[:i]) for i in range(len(audio))]
    assert sum(len(a.samples) for a in audio) == done.audio_samples == 480 * len(done.codec_token_ids)
    assert audio[0].pcm16().dtype.name == "int16"
    stats = done.stats
    assert 0 < stats.time_to_first_text_s <= stats.time_to_first_audio_s <= stats.total_s
    assert stats.audio_s == pytest.approx(done.audio_samples / 24000)
    assert stats.rtf == pytest.approx(stats.total_s / stats.audio_s)
    assert done.messages[-1]["role"] == "user"


def test_detokenizer_holds_back_half_characters(loaded):
    tokenizer = loaded.processor.tokenizer
    ids = tokenizer("héllo wörld ✓")["input_ids"]
    detok = TextDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == "héllo wörld ✓"
    assert all("\ufffd" not in piece for piece in pieces)


def test_one_token_replies_still_speak(engine):
    done = run(engine, text_messages(), GenerationOptions(greedy=True, max_new_tokens=1, max_audio_tokens=30))[-1]
    assert len(done.text_token_ids) == 1 and done.audio_samples == 480 * len(done.codec_token_ids) > 0


def test_cpu_tensors_only_in_events(engine):
    for event in run(engine, text_messages(), GenerationOptions(greedy=True, max_new_tokens=4, max_audio_tokens=30)):
        for value in vars(event).values():
            assert not isinstance(value, torch.Tensor)
