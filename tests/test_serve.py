"""The OpenAI-compatible server (`python -m omni_demo.serve`) on loopback, through the official
`openai` client: streamed text + speech equal to the engine's, non-streamed, text only, every
kind of bad input and limit, auth, disconnects, a full queue, and the README's curl commands."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
import wave

import httpx
import numpy as np
import pytest

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, SAMPLES_PER_CODE, GenerationOptions
from omni_demo.events import AudioChunk, Finished, pcm16

from .apphelpers import ROOT
from .conftest import ASSETS, run
from .serverhelpers import API_KEY, METRICS_KEY

openai = pytest.importorskip("openai")

PROMPT = "Tell me about the sea"
MESSAGES = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": PROMPT}]
# Greedy and forced lengths: the random model's reply is long enough for everything asserted.
SPEECH = dict(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"}, temperature=0, seed=7,
              max_completion_tokens=24, extra_body={"min_tokens": 24, "max_audio_tokens": 96, "min_audio_tokens": 96})
ENGINE_OPTIONS = GenerationOptions(voice="Ethan", greedy=True, seed=7, max_new_tokens=24, min_new_tokens=24,
                                   max_audio_tokens=96, min_audio_tokens=96)
LONG = dict(modalities=["text", "audio"], audio={"voice": "Chelsie", "format": "pcm16"}, seed=1, max_tokens=512,
            extra_body={"min_tokens": 512, "max_audio_tokens": 4000, "min_audio_tokens": 4000})


def client(server, **options) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.base_url, api_key=options.pop("api_key", API_KEY), max_retries=0, **options)


def stream_reply(server, messages=MESSAGES, **request) -> dict:
    """One streamed reply, with its chunks as dicts (delta.audio read through model_dump)."""
    api = client(server)
    start, reply = time.monotonic(), {"chunks": [], "text": "", "transcript": "", "pcm": b"", "audio_at": []}
    stream = api.chat.completions.create(model="tiny", messages=messages, stream=True, **request)
    for chunk in stream:
        data = chunk.model_dump()
        reply["chunks"].append(data)
        for choice in data["choices"]:
            audio = choice["delta"].get("audio") or {}
            reply["text"] += choice["delta"].get("content") or ""
            if choice["delta"].get("content") and "first_text_at" not in reply:
                reply["first_text_at"] = time.monotonic() - start
            reply["transcript"] += audio.get("transcript") or ""
            if audio.get("data"):
                reply["pcm"] += base64.b64decode(audio["data"])
                reply["audio_at"].append(time.monotonic() - start)
    reply["done_at"] = time.monotonic() - start
    return reply


@pytest.fixture(scope="module")
def batching_server(tiny_dir):
    """A server that batches up to 4 replies, every one admitted at once (no real-time guard)."""
    from .serverhelpers import ApiServer

    server = ApiServer("--api-key", API_KEY, "--metrics-key", METRICS_KEY, "--max-batch", "4",
                       "--no-realtime-guard").wait()
    yield server
    server.stop()


def test_four_clients_stream_at_once_each_reply_as_alone(batching_server):
    """Four official clients at once: each reply's text equals (greedy) its reply served alone, with
    the same length of speech, and the thinker ran them as one batch of four."""
    def request(n: int) -> dict:
        prompt = [{"role": "user", "content": f"Client {n}: tell me about the number {n}."}]
        return dict(messages=prompt, modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"},
                    temperature=0, seed=n, max_completion_tokens=40,
                    extra_body={"min_tokens": 40, "max_audio_tokens": 120, "min_audio_tokens": 120})

    alone = [stream_reply(batching_server, **request(n)) for n in range(4)]
    url = f"http://127.0.0.1:{batching_server.port}/metrics"
    scrape = lambda: httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10).text  # noqa: E731
    before = scrape()
    together: list[dict] = [{} for _ in range(4)]
    threads = [threading.Thread(target=lambda n=n: together[n].update(stream_reply(batching_server, **request(n))))
               for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for n in range(4):
        assert together[n]["text"] == alone[n]["text"] and len(alone[n]["text"]) > 20
        assert len(together[n]["pcm"]) == len(alone[n]["pcm"]) == 120 * SAMPLES_PER_CODE * 2
    batched = lambda text: float(re.search(r'omni_step_batch_size_count\{stage="thinker"\} (\S+)', text)[1]) - float(
        re.search(r'omni_step_batch_size_bucket\{le="3.0",stage="thinker"\} (\S+)', text)[1])  # noqa: E731
    assert batched(scrape()) - batched(before) > 0, "no thinker step ran the four replies together"
    alone_first = max(reply["first_text_at"] for reply in alone)
    firsts = ", ".join(f"{reply['first_text_at']:.3f}" for reply in together)
    print(f"\nfirst text: alone up to {alone_first:.3f} s; four at once {firsts} s")


@pytest.fixture(scope="module")
def reference(engine):
    """The same prompt through the engine in this process."""
    messages = [{"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
    events = run(engine, messages, ENGINE_OPTIONS)
    pcm = np.concatenate([pcm16(e.samples) for e in events if isinstance(e, AudioChunk)])
    return events[-1], pcm.astype("<i2").tobytes()


def test_streamed_text_and_speech_equal_the_engine(api_server, reference):
    finished, engine_pcm = reference
    assert isinstance(finished, Finished) and len(finished.codec_token_ids) == 96
    reply = stream_reply(api_server, **SPEECH)
    chunks = reply["chunks"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert reply["text"] == finished.text and reply["transcript"] == finished.text
    assert len(reply["pcm"]) // 2 == SAMPLES_PER_CODE * len(finished.codec_token_ids)
    assert np.frombuffer(reply["pcm"], "<i2").any()
    assert reply["pcm"] == engine_pcm, "same greedy codes and DiT noise seed: the same pcm16"
    assert len(reply["audio_at"]) >= 3 and reply["audio_at"][0] < reply["done_at"] - 0.2, "speech arrives in chunks"
    ids = {(c["choices"][0]["delta"].get("audio") or {}).get("id") for c in chunks if c["choices"]} - {None}
    assert len(ids) == 1
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens_details"] == {
        "text_tokens": 24, "audio_tokens": 96, "accepted_prediction_tokens": None, "reasoning_tokens": None,
        "rejected_prediction_tokens": None}
    assert last["usage"]["prompt_tokens"] == finished.stats.prompt_tokens


def test_non_streamed_reply_has_the_whole_wav(api_server, reference):
    finished, engine_pcm = reference
    response = client(api_server).chat.completions.create(
        model="tiny", messages=MESSAGES, **{**SPEECH, "audio": {"voice": "Ethan", "format": "wav"}})
    message = response.choices[0].message
    assert message.content == finished.text and message.audio.transcript == finished.text
    with wave.open(io.BytesIO(base64.b64decode(message.audio.data))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.readframes(wav.getnframes()) == engine_pcm
    assert response.usage.completion_tokens == 24 + 96


def test_text_only(api_server):
    reply = stream_reply(api_server, temperature=0, max_tokens=8, extra_body={"min_tokens": 8},
                         stream_options={"include_usage": True})
    assert reply["text"] and not reply["pcm"] and not reply["transcript"]
    assert not reply["chunks"][-1]["choices"] and reply["chunks"][-1]["usage"]["completion_tokens"] == 8
    response = client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                                          temperature=0, extra_body={"min_tokens": 8})
    assert response.choices[0].message.content == reply["text"] and response.choices[0].message.audio is None


def data_url(path, mime) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


IMAGE = {"type": "image_url", "image_url": {"url": data_url(ASSETS / "shapes.png", "image/png")}}
BAD_REQUESTS = {  # name: (request fields, words the error must contain)
    "temperature over 2": ({"temperature": 2.5}, "temperature"),
    "top_p zero": ({"top_p": 0}, "top_p"),
    "max_tokens zero": ({"max_tokens": 0}, "max_tokens"),
    "max_tokens over the ceiling": ({"max_tokens": 100_000}, "max_tokens"),
    "max_completion_tokens not an integer": ({"max_completion_tokens": 12.5}, "max_completion_tokens"),
    "seed not an integer": ({"seed": "7"}, "seed"),
    "min_tokens over max": ({"max_tokens": 4, "extra_body": {"min_tokens": 5}}, "min_tokens"),
    "max_audio_tokens over the ceiling": ({"extra_body": {"max_audio_tokens": 10**6}}, "max_audio_tokens"),
    "unknown voice": ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "pcm16"}},
                      "audio.voice"),
    "unknown audio format": ({"modalities": ["text", "audio"], "audio": {"voice": "Ethan", "format": "opus"}},
                             "audio.format"),
    "wav when streaming": ({"stream": True, "modalities": ["text", "audio"],
                            "audio": {"voice": "Ethan", "format": "wav"}}, "pcm16"),
    "audio-only modalities": ({"modalities": ["audio"]}, "modalities"),
    "several choices": ({"n": 2}, "n:"),
    "unknown field": ({"extra_body": {"temprature": 1}}, "temprature"),
    "no messages": ({"messages": []}, "messages"),
    "last message not from the user": ({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yes"}]}, "last message"),
    "tool role": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "role"),
    "remote image URL": ({"messages": user({"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}})},
                         "data URL"),
    "bad base64": ({"messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}})},
                   "base64"),
    "undecodable image": ({"messages": user({"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}})}, "could not read image"),
    "unsupported input audio format": ({"messages": user({"type": "input_audio", "input_audio": {
        "data": "AAAA", "format": "aiff"}})}, "input_audio.format"),
    "video URL of an image": ({"messages": user({"type": "video_url", "video_url": {
        "url": data_url(ASSETS / "shapes.png", "image/png")}})}, "video"),
    "too many images in a turn (engine limit)": ({"messages": user(*[IMAGE] * 9)}, "9 images; the limit is 8"),
    "message over the context window": ({"messages": user({"type": "text", "text": "sea " * 400}),
                                         "max_tokens": 4000}, "the limit is"),
    "assistant audio reference": ({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "audio": {"id": "audio_1"}},
                                                {"role": "user", "content": "and?"}]}, "audio"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_a_400_naming_the_problem(api_server, name):
    fields, words = BAD_REQUESTS[name]
    request = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as raised:
        client(api_server).chat.completions.create(**request)
    error = raised.value.body
    assert words in error["message"] and error["type"] == "invalid_request_error", error
    assert api_server.wait_idle() < 1.0


def raw_post(server, content: bytes, key: str = API_KEY) -> httpx.Response:
    return httpx.post(f"{server.base_url}/chat/completions", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@pytest.mark.parametrize("content, words", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    (b'["model", "tiny"]', "JSON object"),
])
def test_malformed_json_is_a_400(api_server, content, words):
    response = raw_post(api_server, content)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_unknown_model_is_a_404(api_server):
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' does not exist"):
        client(api_server).chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_size_limits_are_413(api_server):
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}).encode()
    response = raw_post(api_server, body)
    assert response.status_code == 413 and "2 MB" in response.json()["error"]["message"]
    big_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 800_000}}
    with pytest.raises(openai.APIStatusError) as raised:
        client(api_server).chat.completions.create(model="tiny", messages=user(big_image))
    assert raised.value.status_code == 413 and "content[0].image_url.url" in raised.value.message


def test_api_key(api_server):
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        client(api_server, api_key="wrong-key").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(api_server, api_key="wrong-key").chat.completions.create(model="tiny", messages=MESSAGES)
    without_key = httpx.post(f"{api_server.base_url}/chat/completions", json={}, timeout=10)
    assert without_key.status_code == 401 and without_key.json()["error"]["code"] == "invalid_api_key"
    assert api_server.health()["status"] == "ok"  # the health check needs no key
    card = client(api_server).models.list().data[0].model_dump()
    assert card["id"] == "tiny" and card["voices"] == ["Chelsie", "Ethan"] and card["is_random"] is True
    assert card["precision"] == "float32" and card["quantization"] == "none"


def test_disconnect_stops_the_reply(api_server):
    stream = client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **LONG)
    for chunk in stream:
        if (chunk.model_dump()["choices"][0]["delta"].get("audio") or {}).get("data"):
            break
    assert api_server.health()["running"] == 1
    stream.close()
    stopped_s = api_server.wait_idle()
    print(f"streamed reply stopped {stopped_s:.3f} s after the client disconnected")
    assert stopped_s < 1.0

    with pytest.raises(openai.APITimeoutError):  # a non-streamed request whose client gives up
        client(api_server, timeout=1.5).chat.completions.create(model="tiny", messages=MESSAGES, **LONG)
    assert api_server.wait_idle() < 1.0


def test_full_queue_is_a_503_and_queued_requests_run_next(api_server):
    stream = client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **LONG)
    next(iter(stream))
    queued = {}

    def wait_in_queue():
        queued["reply"] = client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)

    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    deadline = time.monotonic() + 10
    while api_server.health()["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(openai.InternalServerError) as raised:
        client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
    assert raised.value.status_code == 503 and raised.value.body["code"] == "queue_full"
    assert raised.value.response.headers["retry-after"] == "1"
    stream.close()
    waiter.join(30)
    assert queued["reply"].choices[0].finish_reason in ("stop", "length")
    assert api_server.wait_idle() < 1.0


def test_a_slow_upload_holds_no_place_and_ends_at_the_upload_timeout(api_server):
    stream = client(api_server).chat.completions.create(model="tiny", messages=MESSAGES, stream=True, **LONG)
    next(iter(stream))
    with socket.create_connection(("127.0.0.1", api_server.port), timeout=10) as slow:
        slow.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
        time.sleep(0.3)
        assert api_server.health()["waiting"] == 0, "a request still being read is not in line"
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(reply=client(api_server).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=4)))
        waiter.start()  # --max-queue 1: this one takes the place in line, the slow upload holds none
        deadline = time.monotonic() + 10
        while api_server.health()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        started, answer = time.monotonic(), b""
        while b"request_timeout" not in answer and (received := slow.recv(4096)):
            answer += received
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer
    assert time.monotonic() - started < 3, "--upload-timeout-s is 2"
    stream.close()
    waiter.join(30)
    assert queued["reply"].choices[0].message.content is not None
    api_server.wait_idle()


def readme_commands() -> list[str]:
    """The shell blocks of README.md's "HTTP API" section that call curl."""
    section = (ROOT / "README.md").read_text().split("## HTTP API", 1)[1].split("\n## ", 1)[0]
    return [block for block in re.findall(r"```bash\n(.*?)```", section, re.S) if "curl" in block]


def test_readme_curl_commands(api_server, tmp_path):
    streamed, whole = readme_commands()
    (tmp_path / "assets").symlink_to(ASSETS)
    env = {"PATH": os.environ["PATH"], "OMNI_API_KEY": API_KEY}
    outputs = []
    for command in (streamed, whole):
        command = command.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{api_server.port}")
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    events = [line for line in outputs[0].splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["usage"]["completion_tokens"] > 0
    assert any('"audio":{"id"' in line and '"data"' in line for line in events), "the streamed reply has speech"
    with wave.open(str(tmp_path / "reply.wav")) as wav:
        assert wav.getframerate() == 24000 and wav.getnframes() > 0


def test_prometheus_metrics_count_replies_tokens_and_times(api_server):
    url = f"http://127.0.0.1:{api_server.port}/metrics"
    assert httpx.get(url, timeout=10).status_code == 401  # other clients' figures are not every client's to read
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).status_code == 401

    def scrape() -> dict[str, float]:
        text = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10).text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    before = scrape()
    reply = stream_reply(api_server, **SPEECH)
    after = scrape()
    grew = lambda name: after.get(name, 0) - before.get(name, 0)  # noqa: E731
    assert grew('omni_replies_total{reason="length"}') == 1
    assert grew("omni_text_tokens_total") == 24 and grew("omni_audio_tokens_total") == 96
    assert grew("omni_speech_seconds_total") == pytest.approx(96 * SAMPLES_PER_CODE / 24_000)
    assert grew("omni_time_to_first_audio_seconds_count") == 1 and grew("omni_speech_real_time_factor_count") == 1
    assert after["omni_replies_running"] == 0 and after["omni_replies_waiting"] == 0
    # the scheduler's steps: 24 thinker steps of one reply (this server's --max-batch is 1), and talker steps
    assert grew('omni_step_batch_size_count{stage="thinker"}') == 24
    assert grew('omni_step_batch_size_sum{stage="thinker"}') == 24
    assert grew('omni_step_seconds_count{stage="talker"}') >= 96 and grew('omni_step_seconds_count{stage="dit"}') >= 1
    assert reply["pcm"]
