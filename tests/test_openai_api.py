"""The OpenAI mapping as pure functions (no model, no server): request fields to GenerationOptions
by name, OpenAI messages to Qwen messages, response chunks, and the UI's client side of it."""

from __future__ import annotations

import base64
import io
import wave
from pathlib import Path

import numpy as np
import pytest

from omni_demo.backends.remote import ChunkDecoder, request_body
from omni_demo.config import DEFAULT_SYSTEM_PROMPT, GenerationOptions
from omni_demo.events import AudioChunk, Finished, Stats, TextDelta, pcm16
from omni_demo.serve.openai_protocol import ApiError, ApiLimits, ChunkEncoder, Media, parse_chat_request, write_media

ASSETS = Path(__file__).resolve().parent.parent / "assets"
VOICES = ["Chelsie", "Ethan"]


def parse(**fields):
    return parse_chat_request({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}, VOICES)


def test_fields_map_to_generation_options_by_name():
    chat = parse(temperature=0.7, top_p=0.9, max_tokens=99, max_completion_tokens=50, seed=3, top_k=20,
                 repetition_penalty=1.1, min_tokens=5, max_audio_tokens=300, min_audio_tokens=10,
                 use_audio_in_video=True, modalities=["text", "audio"], audio={"voice": "ethan"}, n=1, stop=None)
    assert chat.options == GenerationOptions(
        voice="Ethan", speech=True, temperature=0.7, top_p=0.9, max_new_tokens=50, seed=3, top_k=20,
        repetition_penalty=1.1, min_new_tokens=5, max_audio_tokens=300, min_audio_tokens=10, use_audio_in_video=True)
    assert chat.audio_format == "wav" and not chat.stream
    assert parse(temperature=0).options.greedy
    assert parse(stream=True, modalities=["text", "audio"]).audio_format == "pcm16"
    text_only = parse()
    assert not text_only.options.speech and text_only.audio_format is None
    assert text_only.options.max_new_tokens == 1024 and text_only.options.temperature is None


@pytest.mark.parametrize("fields, param", [
    ({"temperature": True}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"max_tokens": 10**40}, "max_tokens"), ({"seed": 2**70}, "seed"), ({"top_k": 0}, "top_k"),
    ({"stream": "yes"}, "stream"), ({"logprobs": True}, "logprobs"), ({"model": None}, "model"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "system", "content": [{"type": "input_audio", "input_audio": {}}]},
                   {"role": "user", "content": "x"}]}, "messages[0].content[0]"),
])
def test_each_bad_field_is_named(fields, param):
    with pytest.raises(ApiError) as raised:
        parse(**fields)
    assert raised.value.status == 400 and raised.value.param == param and param in raised.value.message


def test_messages_become_qwen_messages_with_media(tmp_path):
    png = base64.b64encode((ASSETS / "shapes.png").read_bytes()).decode()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                     {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                                     {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                     {"type": "text", "text": "What is this?"}]},
    ]
    chat = parse(messages=messages)
    assert chat.messages[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    image, audio, video, text = chat.messages[1]["content"]
    assert image["image"] == Media("image", (ASSETS / "shapes.png").read_bytes(), ".png")
    assert audio["audio"].suffix == ".wav" and video["video"].kind == "video" and text["text"] == "What is this?"
    written = write_media(chat.messages, tmp_path)[1]["content"]
    assert Path(written[0]["image"]).read_bytes() == image["image"].data
    assert [Path(part[part["type"]]).name for part in written[:3]] == [
        "message1-part0-image.png", "message1-part1-audio.wav", "message1-part2-video.mp4"]
    assert parse().messages[0]["content"][0]["text"] == DEFAULT_SYSTEM_PROMPT


def test_media_over_the_limit_is_413():
    big = {"type": "input_audio", "input_audio": {"data": "A" * 4000, "format": "wav"}}
    with pytest.raises(ApiError) as raised:
        parse_chat_request({"model": "tiny", "messages": [{"role": "user", "content": [big]}]}, VOICES,
                           ApiLimits(max_media_bytes=1000))
    assert raised.value.status == 413 and "content[0].input_audio.data" in raised.value.message


def finished(text="Hi there", codes=3) -> Finished:
    stats = Stats(0.1, 0.2, 1.0, codes * 480 / 24000, 1.0, 40, 30, 4, codes)
    return Finished(text, [1, 2, 3, 4], list(range(codes)), codes * 480, "length", stats, [])


def test_chunks_carry_text_audio_and_usage():
    fmt = ChunkEncoder("tiny", "pcm16")
    text = fmt.text_chunk("Hi")["choices"][0]["delta"]
    assert text == {"content": "Hi", "audio": {"id": fmt.audio_id, "transcript": "Hi"}}
    samples = np.linspace(-1, 1, 960, dtype=np.float32)
    audio = fmt.audio_chunk(samples)["choices"][0]["delta"]["audio"]
    assert np.array_equal(np.frombuffer(base64.b64decode(audio["data"]), "<i2"), pcm16(samples))
    last = fmt.last_chunk(finished())
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 7
    assert ChunkEncoder("tiny", None).text_chunk("Hi")["choices"][0]["delta"] == {"content": "Hi"}
    whole = ChunkEncoder("tiny", "wav").completion(finished(), samples)["choices"][0]["message"]
    with wave.open(io.BytesIO(base64.b64decode(whole["audio"]["data"]))) as wav:
        assert wav.getframerate() == 24000 and wav.getnframes() == 960


def test_the_ui_client_sends_what_the_server_parses_back(tmp_path):
    options = GenerationOptions(voice="Ethan", greedy=True, seed=5, max_new_tokens=40, min_new_tokens=8,
                                max_audio_tokens=200, top_k=10, use_audio_in_video=True)
    messages = [{"role": "system", "content": [{"type": "text", "text": "sys"}]},
                {"role": "user", "content": [{"type": "image", "image": str(ASSETS / "shapes.png")},
                                             {"type": "audio", "audio": str(ASSETS / "question.wav")},
                                             {"type": "video", "video": str(ASSETS / "talking_shapes.mp4")},
                                             {"type": "text", "text": "hi"}]}]
    chat = parse_chat_request(request_body("tiny", messages, options), VOICES)
    assert chat.options == options and chat.stream and chat.audio_format == "pcm16"
    for sent, received in zip(messages[1]["content"], write_media(chat.messages, tmp_path)[1]["content"]):
        kind = sent["type"]
        assert kind == received["type"]
        if kind != "text":
            assert Path(received[kind]).read_bytes() == Path(sent[kind]).read_bytes()


def test_the_ui_client_decodes_chunks_into_engine_events():
    fmt, samples = ChunkEncoder("tiny", "pcm16"), np.sin(np.arange(1440, dtype=np.float32) / 10)
    decoder = ChunkDecoder([])
    events = [event for chunk in (fmt.first_chunk(), fmt.text_chunk("Hi "), fmt.audio_chunk(samples[:480]),
                                  fmt.text_chunk("there"), fmt.audio_chunk(samples[480:]), fmt.last_chunk(finished()))
              for event in decoder.feed(chunk)]
    assert [type(e) for e in events] == [TextDelta, AudioChunk, TextDelta, AudioChunk]
    assert events[3].start_sample == 480
    decoded = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    assert np.array_equal(pcm16(decoded), pcm16(samples)), "pcm16 survives the round trip exactly"
    done = decoder.finished()
    assert (done.text, done.audio_samples, done.stop_reason) == ("Hi there", 1440, "length")
    stats = done.stats
    assert (stats.prompt_tokens, stats.reused_prompt_tokens, stats.text_tokens, stats.audio_tokens) == (40, 30, 4, 3)
