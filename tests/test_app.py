"""End to end: the real app on the tiny model, driven through gradio_client."""

import time

import pytest
from gradio_client import Client, handle_file

from .apphelpers import SETTINGS, AppServer, collect, file_path, is_speech, send
from .conftest import ASSETS


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = AppServer("--max-upload-mb", "1").wait()
    yield app
    app.stop()


@pytest.fixture()
def client(server):
    return Client(server.url, verbose=False)


def reply_files(chat):
    return [file_path(part) for message in chat if message["role"] == "assistant"
            for part in message["content"] if part.get("type") == "file"]


def test_text_and_speech_stream_and_the_reply_audio_stays(client):
    reply = collect(*send(client, "Tell me a story", max_new_tokens=40, max_speech_s=5))
    distinct = [t for i, t in enumerate(reply.texts) if t and (i == 0 or t != reply.texts[i - 1])]
    assert len(distinct) >= 3, "the text should grow over several updates"
    assert all(later.startswith(earlier) for earlier, later in zip(distinct, distinct[1:]))
    before_end = [t for t in reply.audio_updates if t < reply.done_at - 0.05]
    assert len(before_end) >= 2, f"audio chunks should stream during the reply: {reply.audio_updates}"
    wavs = reply_files(reply.chat)
    assert len(wavs) == 1 and wavs[0].endswith(".wav")
    assert "first audio" in reply.stats and "real-time factor" in reply.stats


def test_text_only_mode_yields_no_audio(client):
    reply = collect(*send(client, "Hello", speech=False, max_new_tokens=16))
    assert reply.audio_updates == [] and reply_files(reply.chat) == []
    assert reply.texts[-1] and "first audio" not in reply.stats


def test_stop_cancels_and_the_next_message_works(client):
    job, start = send(client, "Talk for a long time", max_new_tokens=2048, max_speech_s=80)
    for _textbox, _chat, _webcam, audio, _stats in job:
        if is_speech(audio):
            break
    job.cancel()
    stopped_at = time.monotonic() - start
    assert stopped_at < 60
    reply = collect(*send(client, "Are you there?", max_new_tokens=16, max_speech_s=5))
    assert reply.texts[-1] and len(reply_files(reply.chat)) == 1


def test_second_turn_sees_the_first_turns_media(client):
    first = collect(*send(client, "What is this?", files=[ASSETS / "shapes.png"], max_speech_s=5))
    assert "1 image" in first.stats
    second = collect(*send(client, "And its colours?", history=first.chat, max_speech_s=5))
    assert "1 image" in second.stats, second.stats
    users = [m for m in second.chat if m["role"] == "user"]
    assert any(part.get("type") == "file" for m in users for part in m["content"])
    assert len([m for m in second.chat if m["role"] == "assistant"]) == 4  # two texts, two reply wavs


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp: {"text": "   "}, "Nothing to send"),
        (lambda tmp: {"files": [_write(tmp / "notes.txt", b"plain text")]}, "Invalid file type|Unsupported file notes.txt"),
        (lambda tmp: {"text": "look", "files": [_write(tmp / "broken.png", b"not a png" * 50)]},
         "could not read image"),
    ],
    ids=["empty", "unsupported", "corrupt"],
)
def test_bad_input_is_explained_history_kept_next_works(client, tmp_path, make, expected):
    from gradio_client.exceptions import AppError

    first = collect(*send(client, "Hello", max_new_tokens=16, max_speech_s=5))
    job, start = send(client, history=first.chat, max_speech_s=5, **make(tmp_path))
    shown = None
    with pytest.raises(AppError, match=expected):
        for _textbox, chat, _webcam, _audio, _stats in job:
            if not (isinstance(chat, dict) and chat.get("__type__") == "update"):
                shown = chat
        job.result()
    if shown is not None:  # whatever the UI displayed last is the history from before the bad turn
        assert [m["role"] for m in shown] == [m["role"] for m in first.chat]
    after = collect(*send(client, "Still there?", history=first.chat, max_new_tokens=16, max_speech_s=5))
    assert after.texts[-1] and len([m for m in after.chat if m["role"] == "user"]) == 2


def test_oversize_upload_is_refused(server, client, tmp_path):
    import httpx

    big = _write(tmp_path / "big.wav", b"\0" * (2 * 1024 * 1024))  # the server was started with a 1 MB limit
    with big.open("rb") as f:
        response = httpx.post(f"{server.url}/gradio_api/upload", files={"files": f}, timeout=30)
    assert response.status_code == 413 and "maximum allowed size" in response.text
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        client.predict(message={"text": "hear this", "files": [handle_file(str(big))]}, history=[], webcam=None,
                       **SETTINGS, api_name="/chat")
    assert collect(*send(client, "ok?", max_new_tokens=16, max_speech_s=5)).texts[-1]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_same_seed_same_reply(client):
    first = collect(*send(client, "Say something", max_new_tokens=16, max_speech_s=5, seed=77))
    again = collect(*send(client, "Say something", max_new_tokens=16, max_speech_s=5, seed=77))
    other = collect(*send(client, "Say something", max_new_tokens=16, max_speech_s=5, seed=78))
    assert first.texts[-1] == again.texts[-1] and first.texts[-1] != other.texts[-1]
