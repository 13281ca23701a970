"""Many users on one model, cancels, faults, hostile paths, auth: the in-process app, real HTTP."""

import inspect
import json
import threading
import time

import httpx
import pytest
import soundfile as sf
import torch
from gradio_client import Client

from omni_demo.app.page import build_demo
from omni_demo.call.vad import load_vad
from omni_demo.events import Finished

from .apphelpers import SETTINGS, assistant_text, collect, file_path, free_port, is_speech, send
from .conftest import ASSETS


class RecordingBackend:
    """The engine, plus a record of every reply: when it ran, what it said, how many ran at once."""

    def __init__(self, engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.replies = []  # dicts: prompt, started, ended, finished

    voices = property(lambda self: self.engine.voices)
    model_name = property(lambda self: self.engine.model_name)
    is_random = property(lambda self: self.engine.is_random)
    precision = property(lambda self: self.engine.precision)
    limits = property(lambda self: self.engine.limits)

    def listen(self, history, options=None):
        return None  # as a remote backend: each spoken turn arrives whole

    def stream(self, messages, options, cancel=None):
        record = {"prompt": messages[-1]["content"][-1].get("text"), "started": time.monotonic(),
                  "ended": None, "finished": None}
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.replies.append(record)
        try:
            for event in self.engine.stream(messages, options, cancel):
                if isinstance(event, Finished):
                    record["finished"] = event
                yield event
        finally:
            record["ended"] = time.monotonic()
            with self.lock:
                self.active -= 1


class ForwardClock:
    """Timestamps of every forward pass: thinker and talker output heads (run on every step, plain
    or lean), DiT and vocoder."""

    def __init__(self, model):
        self.times = []
        modules = (model.thinker.lm_head, model.talker.codec_head, model.token2wav.code2wav_dit_model,
                   model.token2wav.code2wav_bigvgan_model)
        self.hooks = [m.register_forward_pre_hook(lambda *_: self.times.append(time.monotonic())) for m in modules]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def launch(backend, **launch_kwargs):
    max_size = launch_kwargs.pop("max_size", 16)
    demo = build_demo(backend, load_vad)
    demo.queue(default_concurrency_limit=1, max_size=max_size)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="5mb", **launch_kwargs)
    return demo, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(engine):
    backend = RecordingBackend(engine)
    demo, url = launch(backend)
    yield url, backend
    demo.close()


def test_eight_sessions_are_served_whole_in_order_one_at_a_time(live):
    url, backend = live
    backend.replies.clear()
    clients = [Client(url, verbose=False) for _ in range(8)]
    jobs = []
    for index, client in enumerate(clients):
        jobs.append(send(client, f"caller {index} says hello", max_new_tokens=16, max_speech_s=5))
        joined(jobs[-1][0])  # a defined arrival order: the next caller comes once the server has this one
    saw_queue_position = False
    while not jobs[-1][0].done():
        status = jobs[-1][0].status()
        saw_queue_position |= status.code.name == "IN_QUEUE" and (status.rank or 0) > 0
        time.sleep(0.05)
    replies = [collect(job, start) for job, start in jobs]
    assert saw_queue_position, "a waiting user should see their queue position"
    assert backend.max_active == 1, "two replies ran on the model at once"
    assert [r["prompt"] for r in backend.replies] == [f"caller {i} says hello" for i in range(8)]
    by_prompt = {r["prompt"]: r["finished"] for r in backend.replies}
    for index, reply in enumerate(replies):
        finished = by_prompt[f"caller {index} says hello"]
        # the Chatbot shows text through inspect.cleandoc (leading/trailing whitespace per line)
        assert assistant_text(reply.chat) == inspect.cleandoc(finished.text), "a reply was cut or mixed up"
        users = [m for m in reply.chat if m["role"] == "user"]
        assert users[-1]["content"][0]["text"] == f"caller {index} says hello"
        wavs = [file_path(p) for m in reply.chat if m["role"] == "assistant" for p in m["content"]
                if p.get("type") == "file"]
        assert len(wavs) == (finished.audio_samples > 0)  # a reply may end at once; then it has no audio
        assert all(sf.info(wav).frames == finished.audio_samples for wav in wavs)
    print(f"served 8 concurrent sessions, {len(replies)} replies whole, max 1 on the model at once")


def joined(job, timeout=30):
    """Wait until the server has queued (or started) a submitted job. A fixed sleep is not enough on
    a loaded machine: the other clients decoding their speech messages can delay a submit."""
    deadline = time.monotonic() + timeout
    while job.status().code.name in ("STARTING", "JOINING_QUEUE") and time.monotonic() < deadline:
        time.sleep(0.02)


def test_full_queue_says_busy_try_again(engine):
    from gradio_client.exceptions import AppError

    backend = RecordingBackend(engine)
    demo, url = launch(backend, max_size=1)
    try:
        running = send(Client(url, verbose=False), "long one", max_new_tokens=256, max_speech_s=20)
        while not backend.replies:
            time.sleep(0.05)
        waiting = send(Client(url, verbose=False), "second", max_new_tokens=16, max_speech_s=5)
        time.sleep(0.5)
        with pytest.raises((AppError, Exception), match="Queue is full"):
            Client(url, verbose=False).predict(message={"text": "third", "files": []}, history=[], webcam=None,
                                               **SETTINGS, api_name="/chat")
        running[0].cancel()
        assert collect(*waiting).texts[-1]
    finally:
        demo.close()


def test_cancel_frees_the_model_within_one_chunk_and_the_next_user_starts(live, engine):
    url, backend = live
    backend.replies.clear()
    clock = ForwardClock(engine.model)
    try:
        first, first_start = send(Client(url, verbose=False), "first caller", max_new_tokens=2048, max_speech_s=80)
        for _t, _c, _w, audio, _s in first:
            if is_speech(audio):
                break
        second = send(Client(url, verbose=False), "second caller", max_new_tokens=16, max_speech_s=5)
        time.sleep(0.3)
        cancelled_at = time.monotonic()
        first.cancel()
        reply = collect(*second)
    finally:
        clock.remove()
    first_record, second_record = backend.replies
    assert first_record["finished"] is None, "the cancelled reply should not run to its end"
    assert first_record["ended"] - cancelled_at < 2.0, "the model should stop within one audio chunk"
    last_forward_of_first = max(t for t in clock.times if t < second_record["started"])
    print(f"cancel: first reply's last forward pass {last_forward_of_first - cancelled_at:+.2f} s after cancel, "
          f"next user started {second_record['started'] - cancelled_at:.2f} s after cancel")
    assert second_record["started"] - cancelled_at < 3.0
    assert reply.texts[-1]


def test_a_fault_mid_reply_keeps_the_chat_and_the_server(live, engine):
    from gradio_client.exceptions import AppError

    url, _ = live
    client = Client(url, verbose=False)
    first = collect(*send(client, "hello", max_new_tokens=16, max_speech_s=5))
    calls = {"n": 0}

    def out_of_memory(*_):
        calls["n"] += 1
        if calls["n"] == 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.model.talker.codec_head.register_forward_pre_hook(out_of_memory)  # runs on every talker step
    shown = None
    try:
        job, start = send(client, "this one breaks", history=first.chat, max_new_tokens=64, max_speech_s=10)
        with pytest.raises(AppError, match="ran out of memory"):
            for _t, chat, _w, _a, _s in job:
                if not (isinstance(chat, dict) and chat.get("__type__") == "update"):
                    shown = chat
            job.result()
    finally:
        hook.remove()
    assert shown[: len(first.chat)] == first.chat, "the history before the fault must stay"
    assert "ran out of memory" in assistant_text(shown)
    again = collect(*send(client, "and now?", history=first.chat, max_new_tokens=16, max_speech_s=5))
    assert again.texts[-1]


def call_raw(url, data, session="attacker-session"):
    """POST to the HTTP API without gradio_client, as a crafted request would."""
    response = httpx.post(f"{url}/gradio_api/call/chat", json={"data": data, "session_hash": session}, timeout=30)
    if response.status_code != 200:
        return "error", response.text
    event_id = response.json()["event_id"]
    with httpx.stream("GET", f"{url}/gradio_api/call/chat/{event_id}", timeout=60) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("error", "complete"):
                return event, line.split(":", 1)[1].strip()
    return event, ""


def settings_list():
    return [SETTINGS[k] for k in ("voice", "speech", "system_prompt", "temperature", "top_p", "max_new_tokens",
                                  "max_speech_s", "use_audio_in_video", "seed")]


def file_data(path):
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": path.rsplit("/", 1)[-1]}


@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/gradio/../../etc/passwd", "../../../../etc/hostname"])
def test_crafted_paths_are_refused(live, path):
    url, backend = live
    before = len(backend.replies)
    in_history = [{"role": "user", "content": [{"type": "file", "file": file_data(path)}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    as_input = {"text": "read it", "files": [file_data(path)]}
    for data in ([{"text": "what was in it?", "files": []}, in_history, None, *settings_list()],
                 [as_input, [], None, *settings_list()],
                 [{"text": "hi", "files": []}, [], file_data(path), *settings_list()]):
        event, payload = call_raw(url, data)
        assert event == "error", f"{path} was accepted: {payload[:200]}"
    assert len(backend.replies) == before, "no reply may start on a crafted path"


def test_another_sessions_upload_is_refused(live):
    url, backend = live
    victim = Client(url, verbose=False)
    reply = collect(*send(victim, "my picture", files=[ASSETS / "shapes.png"], max_new_tokens=16, max_speech_s=5))
    uploaded = [file_path(p) for m in reply.chat if m["role"] == "user" for p in m["content"]
                if p.get("type") == "file"]
    # the server-side path of the victim's upload, as it would appear in the victim's history
    server_path = json.loads(json.dumps(uploaded))[0]
    before = len(backend.replies)
    stolen = [{"role": "user", "content": [{"type": "file", "file": file_data(server_path)}]},
              {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    event, payload = call_raw(url, [{"text": "describe it", "files": []}, stolen, None, *settings_list()])
    assert event == "error" and len(backend.replies) == before, payload[:200]


def test_auth_protects_the_app(engine):
    backend = RecordingBackend(engine)
    demo, url = launch(backend, auth=("alice", "s3cret"))
    try:
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(message={"text": "hi", "files": []}, history=[], webcam=None,
                                               **SETTINGS, api_name="/chat")
        assert backend.replies == []
        client = Client(url, auth=("alice", "s3cret"), verbose=False)
        assert collect(*send(client, "hi", max_new_tokens=16, max_speech_s=5)).texts[-1]
    finally:
        demo.close()


def test_uploads_still_work_for_their_owner(live):
    url, _ = live
    client = Client(url, verbose=False)
    first = collect(*send(client, "look", files=[ASSETS / "shapes.png"], max_new_tokens=16, max_speech_s=5))
    second = collect(*send(client, "again", history=first.chat, files=[ASSETS / "question.wav"],
                           max_new_tokens=16, max_speech_s=5))
    assert "1 image, 1 audio clip" in second.stats


def test_closing_the_browser_tab_frees_the_model(live, engine):
    from .browser import CHROMIUM, chromium_page, open_app, send, wait_state

    if not __import__("pathlib").Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed")
    url, backend = live
    backend.replies.clear()
    clock = ForwardClock(engine.model)
    try:
        with chromium_page() as page:
            open_app(page, url, max_speech_s=80, seed=None)
            page.locator("#settings").get_by_text("Settings").click()
            page.get_by_label("Max new tokens").first.fill("2048")
            send(page, "a very long answer please")
            wait_state(page, "speaking", timeout=60)
            page.close()
            closed_at = time.monotonic()
        deadline = time.monotonic() + 30
        while backend.replies[0]["ended"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        clock.remove()
    record = backend.replies[0]
    # Gradio's unload (the page's heartbeat closing) stops it ("cancelled"), or Gradio closes it
    stopped = record["finished"] is None or record["finished"].stop_reason == "cancelled"
    assert stopped and record["ended"] is not None, "the reply kept running after the tab closed"
    print(f"tab closed: model stopped {record['ended'] - closed_at:.2f} s later, "
          f"last forward pass {max(clock.times) - closed_at:+.2f} s")
    assert max(clock.times) - closed_at < 5.0
