"""The UI's handlers and components without a browser or a model (a stand-in backend)."""

import shutil
import threading
import time

import gradio as gr
import pytest
from gradio.data_classes import FileData

from omni_demo.app.notices import public_message
from omni_demo.app.page import build_demo
from omni_demo.call.vad import load_vad
from omni_demo.config import Limits
from omni_demo.errors import InputError

from .conftest import ASSETS


class NoModel:
    """A Backend (omni_demo.backends.protocol) with no model behind it."""

    voices = ["Chelsie", "Ethan"]
    model_name = "none"
    is_random = True
    precision = "float32"
    limits = Limits()

    def listen(self, history, options=None):
        return None


def component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_a_webcam_clip_is_passed_on_as_recorded(tmp_path, monkeypatch):
    """Gradio mirrors webcam clips with an ffmpeg re-encode before any handler runs (~9.5 s for a
    short clip); the demo turns that off, so the clip goes on as the browser recorded it."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    clip = tmp_path / "webcam.mp4"
    shutil.copy(ASSETS / "talking_shapes.mp4", clip)
    webcam = component(build_demo(NoModel(), load_vad), "webcam")
    start = time.monotonic()
    assert webcam.preprocess(FileData(path=str(clip))) == str(clip)
    assert time.monotonic() - start < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webcam.mp4"]  # no "_flip" copy


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("could not read image /tmp/gradio/4f1c/broken.png: cannot identify image file '/tmp/gradio/4f1c/broken.png'",
         "could not read image broken.png: cannot identify image file 'broken.png'"),
        ("video C:\\Users\\me\\AppData\\clip.mp4 is 12.0 s long", "video clip.mp4 is 12.0 s long"),
        ("line one\nTraceback ...", "line one"),
    ],
)
def test_messages_never_show_server_paths(message, shown):
    assert public_message(InputError(message)) == shown


def test_stop_and_send_share_one_control_and_settings_start_closed():
    demo = build_demo(NoModel(), load_vad)
    textbox = component(demo, "textbox")
    assert textbox.submit_btn == "Send" and textbox.label == "Message"
    assert component(demo, "settings").open is False and component(demo, "camera").open is False
    assert isinstance(component(demo, "player"), gr.HTML)


class Request:
    """What the handlers read of a gr.Request."""

    def __init__(self, session: str):
        self.session_hash = session


def finished(stop_reason: str, text: str, messages):
    from omni_demo.events import Finished, Stats

    stats = Stats(0.01 if text else None, None, 0.02, 0.0, None, 10, 0, len(text.split()), 0)
    return Finished(text, [1] * len(text.split()), [], 0, stop_reason, stats, messages)


class OneWordModel(NoModel):
    """A backend that answers "hi" (and stops when asked to)."""

    def stream(self, messages, options, cancel=None):
        from omni_demo.events import TextDelta

        yield TextDelta("hi")
        yield finished("cancelled" if cancel is not None and cancel.is_set() else "eos", "hi", messages)


SETTINGS = ("Chelsie", False, "", 0.7, 0.8, 32, 5, False, 1)
MESSAGE = {"text": "hello", "files": []}


def accept(handler, session="a", history=()):
    pending, *outputs = handler.accept(MESSAGE, list(history), None, Request(session))
    return pending, outputs


def test_a_double_send_queues_one_turn():
    from omni_demo.app.chat import ChatHandler

    handler = ChatHandler(OneWordModel())
    first, _ = accept(handler)
    second, outputs = accept(handler)
    assert first is not None and second is None
    assert "still running" in outputs[3]["notice"]  # the player's notice


@pytest.mark.parametrize("clear", [False, True])
def test_a_turn_stopped_or_cleared_in_the_queue_never_runs_nor_holds_the_session(clear):
    """Stop or Clear while the turn waits: the session is free at once (the queue may never run the
    turn, e.g. when it was full), and when the queue does run it, nothing reaches the chat."""
    from omni_demo.app.chat import ChatHandler

    handler = ChatHandler(OneWordModel())
    pending, _ = accept(handler, history=[{"role": "user", "content": "earlier"}])
    if clear:
        handler.clear(Request("a"))
    else:
        assert handler.stop(Request("a"))["submit_btn"] == "Send"  # the page gets Send back
    assert handler.sessions.get("a") is None
    updates = list(handler.respond_ui(pending, *SETTINGS, Request("a")))
    assert not any(isinstance(update.chat, list) for update in updates)  # nothing reaches the chat
    assert accept(handler)[0] is not None  # the next message is taken


def test_a_running_turn_stops_through_the_engine_and_is_kept():
    from omni_demo.app.chat import ChatHandler

    handler = ChatHandler(OneWordModel())
    pending, _ = accept(handler)
    replies = handler.respond_ui(pending, *SETTINGS, Request("a"))
    next(replies), next(replies)  # the turn started, and its first word is in the chat
    assert handler.stop(Request("a")) == gr.skip()  # it finishes through the engine, marked
    chats = [update.chat for update in replies if isinstance(update.chat, list)]
    assert "stopped" in chats[-1][-1]["content"]
    assert handler.sessions.get("a") is None


def test_a_session_that_never_reaches_the_queue_stops_counting_in_line(monkeypatch):
    """A client that sends only the first, un-queued step of Send (no page, so nothing unloads it)
    used to count in every later "In line" for good."""
    from omni_demo.app import sessions
    from omni_demo.app.chat import ChatHandler

    queued = {"a"}  # only session a's page queued its reply's step
    handler = ChatHandler(OneWordModel(), sessions=sessions.Sessions(queued=lambda session: session in queued),
                          reply_limit=1)
    for session in ("a", "ghost-1", "ghost-2"):
        assert accept(handler, session)[0] is not None
    assert "In line: 3 replies" in accept(handler, "b")[1][3]["text"]
    handler.sessions.release("b", handler.sessions.get("b"))
    monkeypatch.setattr(sessions, "QUEUE_GRACE_S", 0.0)
    _, outputs = accept(handler, "b")
    assert "In line: 1 reply" in outputs[3]["text"]  # a is still in line; the ghosts are gone
    assert handler.sessions.get("ghost-1") is None and handler.sessions.get("a") is not None


def test_the_page_asks_gradios_own_queue_what_it_holds():
    from omni_demo.app.page import queued_in

    demo = build_demo(NoModel(), load_vad).queue()
    assert getattr(demo._queue, "pending_event_ids_session", None) is not None  # the table queued_in reads
    assert queued_in(demo)("nobody") is False


def test_the_call_microphone_records_no_chunk_for_gradios_shutdown_clean_up(tmp_path):
    """Gradio recorded every file an input received and deleted each at shutdown: a folder named
    as a chunk made that fail ("Application shutdown failed"). The call's chunks are the call's."""
    import asyncio

    mic = component(build_demo(NoModel(), load_vad), "call-mic")
    folder = tmp_path / "omni-call-0-1.wav"
    folder.mkdir()
    assert asyncio.run(mic.async_move_resource_to_block_cache(folder)) == str(folder)
    assert not mic.temp_files


def test_the_title_names_the_model_and_what_its_weights_run_in():
    backend = NoModel()
    backend.model_name, backend.precision = "Qwen/Qwen2.5-Omni-7B", "bfloat16, int4 decoders"
    title = component(build_demo(backend, load_vad), "title")
    assert "Model: Qwen/Qwen2.5-Omni-7B · bfloat16, int4 decoders" in title.value


class WaitingModel(NoModel):
    """A backend whose reply waits in the engine's line until it is cancelled (or admitted)."""

    def __init__(self):
        self.admit = threading.Event()

    def stream(self, messages, options, cancel=None):
        from omni_demo.events import Admitted, TextDelta, Waiting

        yield Waiting(ahead=1, running=2, reason="full", estimate_s=7.4)
        while not self.admit.wait(0.01):
            if cancel is not None and cancel.is_set():
                yield finished("cancelled", "", messages)
                return
        yield Admitted(waited_s=1.0)
        yield TextDelta("hi")
        yield finished("eos", "hi", messages)


def test_a_waiting_turn_says_why_and_when_then_thinking_once_admitted():
    from omni_demo.app.chat import ChatHandler

    backend = WaitingModel()
    handler = ChatHandler(backend)
    pending, outputs = accept(handler)
    assert outputs[3]["text"] == "Sending…"  # no queue limit known: nothing to wait for in Gradio's queue
    replies = handler.respond_ui(pending, *SETTINGS, Request("a"))
    lines = [update.audio for update in (next(replies), next(replies))]
    assert lines[-1]["state"] == "queued" and lines[-1]["text"] == (
        "Waiting: the model is answering 2 replies, as many as this server runs at once. "
        "1 more message before yours. About 7 s. Your message is kept.")
    backend.admit.set()
    assert next(replies).audio == {**lines[-1], "seq": lines[-1]["seq"] + 1, "state": "thinking", "text": "Thinking…"}
    assert "hi" in [update for update in replies if isinstance(update.chat, list)][-1].chat[-1]["content"]


def test_stop_while_waiting_puts_the_chat_and_the_message_back():
    """In the engine's line (the handler runs) and in Gradio's queue (it has not started)."""
    from omni_demo.app.chat import ChatHandler

    handler, earlier = ChatHandler(WaitingModel()), [{"role": "user", "content": "earlier"}]
    pending, _ = accept(handler, history=earlier)
    replies = handler.respond_ui(pending, *SETTINGS, Request("a"))
    next(replies), next(replies)  # thinking, then waiting in the engine's line
    handler.stop_ui(pending, Request("a"))
    updates = list(replies)
    assert [update.chat for update in updates if isinstance(update.chat, list)][-1] == earlier
    assert any("Not sent" in update.audio.get("text", "") for update in updates if isinstance(update.audio, dict))
    assert updates[-1].textbox["value"] == MESSAGE and handler.sessions.get("a") is None
    pending, _ = accept(handler, history=earlier)  # now still in Gradio's queue
    textbox, chat, webcam, player = handler.stop_ui(pending, Request("a"))
    assert textbox["value"] == MESSAGE and chat == earlier and player["state"] == "stopped"
    assert not any(isinstance(update.chat, list) for update in handler.respond_ui(pending, *SETTINGS, Request("a")))


def test_past_the_queue_limit_a_turn_is_told_its_place_and_the_engines_estimate():
    from omni_demo.app.chat import ChatHandler

    backend = OneWordModel()
    backend.wait_estimate = lambda ahead: 12.0 + ahead
    handler = ChatHandler(backend, reply_limit=2)
    assert [accept(handler, s)[1][3]["text"] for s in "ab"] == ["Sending…", "Sending…"]
    assert accept(handler, "c")[1][3]["text"] == ("In line: 1 reply before yours (this server streams 2 at once). "
                                                  "About 12 s. Your message is kept.")
    assert "In line: 2 replies" in accept(handler, "d")[1][3]["text"]


CHAT = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "an answer"}]},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/x.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/tmp/reply.wav"}}]}]


@pytest.mark.parametrize("index", [2, 3, 4, 5])
def test_regenerate_sends_the_last_user_turn_again_and_drops_what_followed(index):
    from omni_demo.app.chat import resend_split

    history, resend = resend_split(CHAT, index)
    assert history == CHAT[:2] and list(resend.turn) == CHAT[2:4]  # the picture and its question, together


def test_an_edited_message_replaces_its_text_and_keeps_the_turns_files():
    from omni_demo.app.chat import resend_split

    history, resend = resend_split(CHAT, 3, "what colour is this? ")
    assert history == CHAT[:2] and resend.turn[0] == CHAT[2]
    assert resend.turn[1] == {"role": "user", "content": [{"type": "text", "text": "what colour is this?"}]}
    history, resend = resend_split(CHAT, 0, "hello")  # the first turn: everything after it goes
    assert history == [] and len(resend.turn) == 1
    for index, text, why in [(2, "x", "Only typed text"), (3, "  ", "cannot be empty")]:
        with pytest.raises(InputError, match=why):
            resend_split(CHAT, index, text)



def test_export_reads_only_what_the_session_may_read(tmp_path, monkeypatch):
    """The chat comes from the page: a path in it that is not the session's upload, an asset or the
    app's own reply audio is refused, never read into the zip."""
    import zipfile

    import numpy as np

    from omni_demo.app.chat_history import UploadRegistry
    from omni_demo.app.export import export_conversation
    from omni_demo.app.files import save_reply_audio

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    reply_wav = save_reply_audio([np.zeros(2400, np.float32)])
    uploads = UploadRegistry()
    chat = [{"role": "user", "content": [{"type": "file", "file": {"path": str(ASSETS / "shapes.png")}}]},
            {"role": "user", "content": "what is this?"},
            {"role": "assistant", "content": "shapes"},
            {"role": "assistant", "content": {"path": reply_wav}}]
    with zipfile.ZipFile(export_conversation(chat, "a", uploads)) as archive:
        assert {name.rsplit("-", 1)[-1] for name in archive.namelist()} == {
            "conversation.md", "shapes.png", reply_wav.rsplit("-", 1)[-1]}
        assert "**You:** what is this?\n\n**Qwen:** shapes" in archive.read("conversation.md").decode()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    for role in ("user", "assistant"):
        with pytest.raises(InputError, match="did not upload"):
            export_conversation([{"role": role, "content": {"path": str(secret)}}], "a", uploads)
    with pytest.raises(InputError, match="Nothing to export"):
        export_conversation([], "a", uploads)


@pytest.mark.parametrize("script", ["player.js", "voice.js"])
def test_the_pages_scripts_parse(script):
    """A syntax error in one would leave the page without its player or its call, silently."""
    import subprocess

    from omni_demo.app.page import WEB

    body = (WEB / script).read_text()
    result = subprocess.run(["node", "-e", "new Function('element', 'props', require('fs').readFileSync(0, 'utf8'))"],
                            input=body, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_a_kept_conversation_comes_back_with_its_files_only_under_this_servers_seal(tmp_path):
    """The browser's copy is the page's word: text comes back as it is; files only when sealed by
    this process (then the new session owns them), and only while they exist."""
    from omni_demo.app import saved
    from omni_demo.app.chat_history import UploadRegistry

    picture = tmp_path / "mine.png"
    shutil.copy(ASSETS / "shapes.png", picture)
    chat = [{"role": "user", "content": [{"type": "file", "file": {"path": str(picture)}}]},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "shapes"}]}]
    uploads = UploadRegistry()
    assert saved.unseal(saved.seal(chat), "new", uploads) == chat
    uploads.check("new", [str(picture)])  # the reloaded page's session owns its upload now
    forged = {**saved.seal(chat), "chat": chat[1:] + [{"role": "user", "content": {"path": "/etc/passwd"}}]}
    assert saved.unseal(forged, "other", uploads) == chat[1:]  # the text stays, no unsealed file
    with pytest.raises(InputError):
        uploads.check("other", ["/etc/passwd"])
    picture.unlink()
    assert saved.unseal(saved.seal(chat), "new", uploads) == chat[1:]  # a file gone from the server
    for junk in (None, "text", {"chat": "x"}, {"chat": [1, {"role": "system", "content": "x"}, {"role": "user"}]}):
        assert saved.unseal(junk, "new", uploads) == []
