"""The Gradio web UI. It never imports torch: `build_demo(backend)` takes anything with the
engine's `stream(messages, options, cancel)`, `voices`, `model_name` and `is_random`.

A turn from the page is two steps: `ChatHandler.accept` (outside the queue) refuses an empty
message with a toast and shows the user's turn at once; `ChatHandler.respond_ui` (in the queue)
streams the reply. `/chat` (`ChatHandler.respond`) is the same reply as one API call. Speech goes
to a Web Audio player (web/player.js) as 16-bit PCM, one message per chunk; Stop sets the turn's
cancel event, so the reply ends through the engine and is finalized ("stopped", partial audio
kept). Errors are toasts or chat messages, never Gradio's red error state. The wiring is at the
bottom of `build_demo`.
"""

from __future__ import annotations

import atexit
import base64
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import soundfile as sf

from .config import DEFAULT_SYSTEM_PROMPT, MAX_SEED, SAMPLE_RATE, SAMPLES_PER_CODE, GenerationOptions, Limits
from .conversation import (ASSETS, STOPPED_MARK, UploadRegistry, chat_to_conversation, media_summary, new_upload_paths,
                           user_turn)
from .errors import InputError, first_line
from .events import AudioChunk, ContextTrimmed, Finished, TextDelta
from .inputs import check_request

log = logging.getLogger(__name__)

CODES_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_CODE  # 50 talker codes per second of speech
MAX_ERROR_CHARS = 300  # an error shown to a user (and logged) is at most this long
REPLY_DIR = Path(tempfile.mkdtemp(prefix="omni-demo-replies-"))
atexit.register(shutil.rmtree, REPLY_DIR, ignore_errors=True)
WEB = Path(__file__).resolve().parent / "web"
STOP_GRACE_S = 1.0  # after Stop, how long to wait for the engine's Finished (it comes within one step)

RANDOM_BANNER = (
    "⚠️ **Tiny random-weight model**: replies are deliberately nonsense (text and speech). "
    "Start the app with `--model Qwen/Qwen2.5-Omni-7B` on a GPU for real answers."
)
SYSTEM_PROMPT_WARNING = (
    "⚠️ Qwen2.5-Omni only speaks reliably with its default system prompt. With another prompt the "
    "spoken reply may be missing or garbled; switch speech off or restore the default."
)
# The player's own markup; player.js fills it. The live region is what screen readers announce.
PLAYER_HTML = ('<div class="player-state" aria-hidden="true"></div>'
               '<div class="player-live sr-only" role="status" aria-live="polite"></div>')
STOP_JS = "() => { if (window.omniPlayer) window.omniPlayer.stop(); return []; }"
TEXTBOX_PLACEHOLDER = "Type a message, record one with the microphone, or attach media…"
# Returns its inputs as a list: a bare array (the chat's messages) would be read as one input each.
CALL_START_JS = "(chat) => { if (window.omniCall) window.omniCall.prepare(); return [chat]; }"
CALL_END_JS = "(call) => { if (window.omniPlayer) window.omniPlayer.stop(); return [call]; }"
CALL_HINT = "Hands-free: pause and it answers, talk over it to interrupt."


class Reply(NamedTuple):
    """One update of the reply handler's outputs, by name; what is not named stays as it is."""

    textbox: Any = gr.skip()
    chat: Any = gr.skip()
    webcam: Any = gr.skip()
    audio: Any = gr.skip()  # the live player's message: PlayerMessages(...)
    stats: Any = gr.skip()  # the latency readout


class PlayerMessages:
    """The live player's messages for one reply: its state line, and the speech as base64 int16 PCM
    (mono, little-endian, 24 kHz), one message per engine chunk. `seq` makes every message a new
    value, so each one reaches the page."""

    def __init__(self, reply_id: str | None = None, seq: int = 0, **extra):
        self.id = reply_id or uuid.uuid4().hex[:12]
        self.seq = seq
        self.extra = extra  # in every message (a call's replies say `in_call`)

    def __call__(self, state: str, text: str = "", pcm: np.ndarray | None = None) -> dict:
        self.seq += 1
        message = {"reply": self.id, "seq": self.seq, "state": state, "text": text, **self.extra}
        if pcm is not None:  # made_at: the server's clock (Unix s), for first-sound figures in tests
            message |= {"pcm": base64.b64encode(pcm.astype("<i2").tobytes()).decode(), "rate": SAMPLE_RATE,
                        "made_at": time.time()}
        return message


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"]+)+[/\\]([^\s/\\'\"]+)")


def public_message(exc: BaseException) -> str:
    """An exception's message for the user: first line, with server paths cut to their file names."""
    return _PATH.sub(r"\1", first_line(exc, MAX_ERROR_CHARS))


def refused(exc: InputError) -> str:
    """A refusal's message, logged in one line (no traceback: nothing went wrong here)."""
    message = public_message(exc)
    log.warning("refused: %s", message)
    return message


def format_stats(finished: Finished, conversation: list[dict]) -> str:
    s = finished.stats
    cells = [f"first text **{s.time_to_first_text_s:.2f} s**" if s.time_to_first_text_s is not None else "no text"]
    if s.time_to_first_audio_s is not None:
        cells += [f"first audio **{s.time_to_first_audio_s:.2f} s**", f"real-time factor **{s.rtf:.2f}**",
                  f"{s.audio_s:.1f} s of speech"]
    cells += [f"total {s.total_s:.2f} s", f"context {s.prompt_tokens} tokens ({media_summary(conversation)})"]
    if finished.stop_reason == "cancelled":
        cells.append("stopped")
    return "Server: " + " · ".join(cells)


def save_reply_audio(chunks: list[np.ndarray], keep: int = 256) -> str:
    """Write the reply's wav (Gradio copies it into its cache); keep only the newest `keep` here."""
    path = REPLY_DIR / f"reply-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**9:09d}.wav"
    sf.write(path, np.concatenate(chunks), SAMPLE_RATE, subtype="PCM_16")
    for old in sorted(REPLY_DIR.glob("reply-*.wav"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return str(path)


# The settings a request may send, as (low, high, whole number); the sliders show the same ranges.
SETTING_RANGES = {"temperature": (0.05, 1.5, False), "top_p": (0.05, 1.0, False), "max_new_tokens": (16, 2048, True),
                  "max_speech_s": (5, 80, False), "seed": (0, MAX_SEED, True), "call_pause": (0.2, 3.0, False),
                  "call_sensitivity": (0.1, 0.8, False)}


def setting(name: str, value) -> int | float:
    """A numeric setting, checked: a finite number in its range (whole where it must be)."""
    low, high, whole = SETTING_RANGES[name]
    label = name.replace("_", " ")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{label} must be a number, not {value!r:.40}")
    if not (math.isfinite(value) and low <= value <= high):
        raise InputError(f"{label} must be between {low:g} and {high:g}, not {value!r:.40}")
    if whole and value != int(value):
        raise InputError(f"{label} must be a whole number, not {value!r:.40}")
    return int(value) if whole else float(value)


def reply_options(voice, speech, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video,
                  seed) -> GenerationOptions:
    """The settings panel's values as a request's options; InputError names a value out of range."""
    if not isinstance(voice, str):
        raise InputError(f"voice must be a name, not {voice!r:.40}")
    try:
        return GenerationOptions(
            voice=voice, speech=bool(speech), temperature=setting("temperature", temperature),
            top_p=setting("top_p", top_p), max_new_tokens=setting("max_new_tokens", max_new_tokens),
            max_audio_tokens=max(1, round(setting("max_speech_s", max_speech_s) * CODES_PER_SECOND)),
            use_audio_in_video=bool(use_audio_in_video), seed=setting("seed", 0 if seed is None else seed) or None,
        )
    except ValueError as exc:
        raise InputError(f"invalid setting: {exc}") from exc


def system_text(system_prompt) -> str:
    """The system prompt as sent (None, from the API: none)."""
    if system_prompt is None:
        return ""
    if not isinstance(system_prompt, str):
        raise InputError(f"the system prompt must be text, not {type(system_prompt).__name__}")
    return system_prompt.strip()


def finalize(chat: list[dict], text: str, chunks: list[np.ndarray], stopped: bool) -> list[dict]:
    """The finished turn in the chat: the reply text (marked when stopped), then its audio."""
    if stopped:
        text = f"{text} {STOPPED_MARK}".strip()
    final = chat + ([{"role": "assistant", "content": text}] if text else [])
    if chunks:
        final.append({"role": "assistant", "content": {"path": save_reply_audio(chunks)}})
    return final


class Turn(threading.Event):
    """A session's queued or running turn, as its cancel flag (set by Stop and by Clear)."""

    busy_text = "A reply is still running: Stop it (Esc) or wait. Your message is kept."

    def __init__(self):
        super().__init__()
        self.id = uuid.uuid4().hex[:12]
        self.started = False  # its reply handler runs (until then it waits in the queue)
        self.cleared = False  # Clear, not Stop, ended it: the emptied chat gets nothing more


class ChatHandler:
    """The reply handlers, bound to a backend, the upload registry and each session's running turn."""

    def __init__(self, backend, uploads: UploadRegistry | None = None):
        self.backend = backend
        self.uploads = uploads or UploadRegistry()
        self.turns: dict[str, Turn] = {}  # session -> its queued or running turn
        self.lock = threading.Lock()

    def _begin(self, session: str) -> Turn:
        """The session's turn, now running (an API call's own, or one the page accepted)."""
        with self.lock:
            turn = self.turns.setdefault(session, Turn())
            turn.started = True
            return turn

    def release(self, session: str, cancel: Turn) -> None:
        """The session's turn `cancel` is over: the session may begin another."""
        with self.lock:
            if self.turns.get(session) is cancel:
                del self.turns[session]

    def stop(self, request: gr.Request, clear: bool = False):
        """Stop this session's turn: the reply ends within one decode step and is finalized (or,
        after Clear, dropped). A turn still waiting in the queue is forgotten at once, so that a
        turn the queue never runs (it was full) cannot hold the session. -> the Send button."""
        with self.lock:
            turn = self.turns.get(request.session_hash)
            if turn is None:
                return gr.skip()
            turn.cleared = turn.cleared or clear
            turn.set()
            if turn.started:
                return gr.skip()
            del self.turns[request.session_hash]
        return gr.update(submit_btn="Send", stop_btn=False)

    def stream(self, message, history, webcam, settings: tuple, session: str, cancel: Turn,
               player: PlayerMessages):
        """One reply as Reply updates; raises InputError for a message it cannot send (the request's
        own checks run before the first update; the engine's budgets after it)."""
        history = list(history or [])
        self.uploads.accept_turn(session, new_upload_paths(message, webcam), history)
        chat = history + user_turn(message, webcam)
        voice, speech, system_prompt, *numbers = settings
        conversation = chat_to_conversation(chat, system_text(system_prompt))
        check_request(conversation, getattr(self.backend, "limits", None) or Limits())
        options = reply_options(voice, speech, *numbers)
        yield Reply(textbox=None, chat=chat, webcam=None, audio=player("thinking", "Thinking…"), stats="")
        text, chunks, finished, stop_seen = "", [], None, None
        if not cancel.is_set():  # Stop may come while the turn still waits in the queue
            with closing(self.backend.stream(conversation, options, cancel)) as events:
                for event in events:
                    if cancel.cleared:
                        return
                    if cancel.is_set() and not isinstance(event, Finished):
                        if stop_seen is None:
                            stop_seen = time.monotonic()
                        if time.monotonic() - stop_seen > STOP_GRACE_S:  # a backend that ignores `cancel`
                            break  # (ZeroGPU's worker) ends here, without its Finished
                        continue
                    if isinstance(event, TextDelta):
                        text += event.text
                        yield Reply(chat=chat + [{"role": "assistant", "content": text}])
                    elif isinstance(event, AudioChunk):
                        chunks.append(event.samples)
                        yield Reply(audio=player("speaking", "Speaking…", event.pcm16()))
                    elif isinstance(event, ContextTrimmed):
                        gr.Warning(f"The conversation is over this server's budgets ({event.limit_tokens} tokens, "
                                   f"media per conversation): its oldest {event.dropped_turns} turn(s) were left out.")
                    elif isinstance(event, Finished):
                        finished = event
        if cancel.cleared:
            return
        stopped = cancel.is_set() or (finished is not None and finished.stop_reason == "cancelled")
        stats = (format_stats(finished, conversation) if finished else
                 "Stopped." if text or chunks else "Stopped before the reply started.")
        yield Reply(chat=finalize(chat, text, chunks, stopped), stats=stats,
                    audio=player("stopped", "Stopped.") if stopped else player("done", "Done."))

    def respond(self, message, history, webcam, voice, speech, system_prompt, temperature, top_p, max_new_tokens,
                max_speech_s, use_audio_in_video, seed, request: gr.Request):
        """`/chat`: send one user turn; stream the reply. Errors end the call (API clients see them)."""
        settings = (voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                    use_audio_in_video, seed)
        cancel = self._begin(request.session_hash)
        shown = None  # the chat as last shown; None while nothing was
        try:
            for update in self.stream(message, history, webcam, settings, request.session_hash, cancel,
                                      PlayerMessages()):
                shown = update.chat if isinstance(update.chat, list) else shown
                yield update
        except InputError as exc:
            if shown is not None:  # nothing is lost: the chat as before, the message back in the box
                yield Reply(textbox=message, chat=list(history or []), webcam=webcam, stats="")
            raise gr.Error(refused(exc), print_exception=False) from exc
        except Exception as exc:
            log.exception("reply failed")
            yield Reply(chat=(shown or list(history or [])) + [failure_message(exc)], stats="")
            raise gr.Error(f"The reply failed ({type(exc).__name__}: {public_message(exc)}). "
                           "The chat is kept; try again.", print_exception=False) from exc
        finally:
            self.release(request.session_hash, cancel)

    def accept(self, message, history, webcam, request: gr.Request):
        """Outside the queue (a queued step costs ~0.3-0.6 s before the reply's own): refuse gently
        what cannot be sent, with a notice; else show the user's turn at once and swap Send for
        Stop. Returns (pending turn or None, *Reply)."""
        session, history = request.session_hash, list(history or [])
        try:
            shown = user_turn(message, webcam)
        except InputError as exc:
            return (None, *Reply(audio=notice(public_message(exc))))
        with self.lock:  # one check-and-set: a double Enter queues one turn
            busy, ahead = self.turns.get(session), len(self.turns)  # replies running or waiting before this one
            if busy is None:
                turn = self.turns[session] = Turn()
        if busy is not None:
            return (None, *Reply(audio=notice(busy.busy_text)))
        player = PlayerMessages()
        pending = {"message": message, "history": history, "webcam": webcam, "reply": player.id, "turn": turn.id}
        return (pending, *Reply(textbox=gr.update(value=None, submit_btn=False, stop_btn="Stop"), chat=history + shown,
                                webcam=None, audio=player("queued", waiting_text(ahead)), stats=""))

    def respond_ui(self, pending, voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                   use_audio_in_video, seed, request: gr.Request):
        """In the queue: stream the accepted turn. Errors become a toast plus the player's error
        state (bad input: the message goes back to the box) or a message in the chat."""
        if pending is None:
            yield Reply()
            return
        settings = (voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                    use_audio_in_video, seed)
        session, history = request.session_hash, pending["history"]
        player, send_again = PlayerMessages(pending["reply"], seq=1), gr.update(submit_btn="Send", stop_btn=False)
        with self.lock:
            cancel = self.turns.get(session)
            if cancel is not None and cancel.id == pending["turn"]:
                cancel.started = True
        if cancel is None or cancel.id != pending["turn"]:  # Stop or Clear came while it waited: the page
            yield Reply()  # has its Send button back already, and may have sent the next turn since
            return
        shown = history
        try:
            for update in self.stream(pending["message"], history, pending["webcam"], settings, session, cancel,
                                      player):
                shown = update.chat if isinstance(update.chat, list) else shown
                yield update._replace(textbox=gr.skip(), webcam=gr.skip())  # the user may be typing the next one
            yield Reply(textbox=send_again)
        except InputError as exc:
            message = refused(exc)
            gr.Warning(message)
            yield Reply(textbox=gr.update(value=pending["message"], submit_btn="Send", stop_btn=False), chat=history,
                        webcam=pending["webcam"], audio=player("error", f"Not sent: {message}"))
        except Exception as exc:
            log.exception("reply failed")
            gr.Warning(f"The reply failed: {public_message(exc)}. The chat is kept; try again.")
            yield Reply(textbox=send_again, chat=shown + [failure_message(exc)],
                        audio=player("error", "The reply failed."))
        finally:
            self.release(session, cancel)

    def clear(self, request: gr.Request):
        self.stop(request, clear=True)
        return Reply(textbox=gr.update(value=None, submit_btn="Send", stop_btn=False), chat=[], webcam=None,
                     audio=None, stats="")

    def page_closed(self, request: gr.Request) -> None:
        """Gradio's unload: the session's page was closed or reloaded (its heartbeat connection
        closed). A turn still in line is forgotten at once (Gradio drops its queued event without
        calling it), so that it no longer counts in other users' "In line"; a running reply or call
        stops as with Stop, its reply kept (for a page whose connection only dropped)."""
        self.stop(request)


def notice(text: str) -> dict:
    """A toast from the player (Gradio's own toasts need the queue, which would delay every Send)."""
    return {"notice": text, "id": uuid.uuid4().hex[:12]}


def waiting_text(ahead: int) -> str:
    if not ahead:
        return "Waiting for the model…"
    return f"In line: {ahead} {'reply' if ahead == 1 else 'replies'} before yours. Your message is kept."


def failure_message(exc: BaseException) -> dict:
    return {"role": "assistant", "content": f"⚠️ This reply failed: {public_message(exc)}"}


def system_prompt_notice(system_prompt: str, speech: bool):
    return gr.update(visible=bool(speech) and system_prompt.strip() != DEFAULT_SYSTEM_PROMPT)


# Example chips: (label, what they put in the box). Chosen, not sent: the user can edit first.
EXAMPLES = [
    ("What is in this picture?", {"text": "What is in this picture?", "files": [str(ASSETS / "shapes.png")]}),
    ("Ask by voice (sample)", {"text": "", "files": [str(ASSETS / "question.wav")]}),
    ("What happens in this video?", {"text": "What happens in this video?",
                                        "files": [str(ASSETS / "talking_shapes.mp4")]}),
    ("A story about a robot", {"text": "Tell me a short story about a robot who learns to sing.", "files": []}),
]
PAGE_HEAD = f"<style>{(WEB / 'style.css').read_text()}</style>"
PAGE_JS = (WEB / "player.js").read_text() + "\n" + (WEB / "voice.js").read_text()


def build_demo(backend, *, title: str = "Qwen2.5-Omni, streaming") -> gr.Blocks:
    handler = ChatHandler(backend)
    # Uploads and replies older than a day leave Gradio's cache (checked hourly).
    with gr.Blocks(title=title, fill_height=True, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {title}\nTalk with text, images, audio, video, your microphone or webcam; "
                    "the reply is written and spoken at the same time.", elem_id="title")
        if backend.is_random:
            gr.Markdown(RANDOM_BANNER, elem_id="random-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", buttons=["copy"],
                                     group_consecutive_messages=False, autoscroll=True)
                player = gr.HTML(None, html_template=PLAYER_HTML, js_on_load=PAGE_JS, head=PAGE_HEAD,
                                 elem_id="player", label="Reply status")
                textbox = gr.MultimodalTextbox(
                    placeholder=TEXTBOX_PLACEHOLDER,
                    sources=["upload", "microphone"], file_types=["image", "audio", "video"],
                    file_count="multiple", elem_id="textbox", label="Message", show_label=False,
                    submit_btn="Send", stop_btn=False, autofocus=True,
                )
                with gr.Group(elem_id="call"):
                    with gr.Row(equal_height=False, elem_id="call-bar"):
                        call_start = gr.Button("📞 Start voice call", variant="primary", size="sm", scale=0,
                                               min_width=160, elem_id="call-start")
                        call_end = gr.Button("End call", variant="stop", size="sm", scale=0, min_width=120,
                                             visible=False, elem_id="call-end")
                        call_status = gr.Markdown(CALL_HINT, elem_id="call-status", min_width=160)
                    gr.HTML(None, html_template='<div class="call-latency"></div>', elem_id="call-latency")
                    # The call's microphone: started and stopped by the call (web/voice.js), hidden by style.css.
                    # type="filepath", format=None: Gradio hands over the upload as it is, unread (call_ui.read_chunk).
                    call_mic = gr.Audio(sources=["microphone"], streaming=True, type="filepath", format=None,
                                        elem_id="call-mic", label="Call microphone", show_label=False)
                with gr.Row(elem_id="chips"):
                    chips = [(gr.Button(label, size="sm", variant="secondary"), value) for label, value in EXAMPLES]
                    clear = gr.Button("Clear chat", size="sm", variant="secondary", elem_id="clear")
                stats = gr.Markdown(elem_id="stats")
            with gr.Column(scale=2):
                with gr.Accordion("Camera: record a clip to send", open=False, elem_id="camera"):
                    # mirror=False: Gradio otherwise re-encodes every clip with ffmpeg hflip before
                    # any handler runs (~9.5 s for a short clip), outside the queue's cancellation.
                    webcam = gr.Video(label="Webcam clip (sent with your next message)", sources=["webcam"],
                                      include_audio=True, elem_id="webcam",
                                      webcam_options=gr.WebcamOptions(mirror=False))
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    voice = gr.Radio(backend.voices, value=backend.voices[0], label="Voice")
                    speech = gr.Checkbox(True, label="Speak the reply (off: text only, faster)")
                    gr.Checkbox(True, label="Send voice messages when recording stops", elem_id="autosend")
                    use_audio_in_video = gr.Checkbox(True, label="Use the sound of videos")
                    temperature = gr.Slider(0.05, 1.5, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
                    max_speech_s = gr.Slider(5, 80, value=60, step=5, label="Max speech (seconds)")
                    seed = gr.Number(0, minimum=0,  # no precision: a float or NaN reaches setting() and is refused there
                                     label="Seed (0: random; same seed, same reply)")
                    call_pause = gr.Slider(0.2, 3.0, value=0.6, step=0.1, elem_id="call-pause",
                                           label="Voice call: the pause that ends your turn (seconds)")
                    call_sensitivity = gr.Slider(0.1, 0.8, value=0.5, step=0.05, elem_id="call-sensitivity",
                                                 label="Voice call: sensitivity (higher: softer voices count, so does noise)")
                    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
                    notice = gr.Markdown(SYSTEM_PROMPT_WARNING, visible=False, elem_id="system-prompt-warning")
        pending = gr.State(None)

        settings = [voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video,
                    seed]
        outputs = [textbox, chatbot, webcam, player, stats]
        accepted = textbox.submit(handler.accept, [textbox, chatbot, webcam], [pending, *outputs], queue=False,
                                  show_progress="hidden", trigger_mode="multiple", api_visibility="private")
        accepted.then(handler.respond_ui, [pending, *settings], outputs, concurrency_id="gpu",
                      show_progress="minimal", show_progress_on=[player], api_visibility="private")
        api_only = gr.Button(visible=False)  # /chat: the same reply as one call, for API clients and tests
        api_reply = api_only.click(handler.respond, [textbox, chatbot, webcam, *settings], outputs, api_name="chat",
                                   concurrency_id="gpu")
        textbox.stop(handler.stop, None, textbox, js=STOP_JS, queue=False, api_visibility="private")
        clear.click(handler.clear, None, outputs, js=STOP_JS, queue=False, api_name="clear", cancels=[api_reply])
        chatbot.clear(handler.clear, None, outputs, js=STOP_JS, queue=False, api_visibility="private")
        for button, value in chips:
            button.click(lambda v=value: v, None, textbox, queue=False, api_visibility="private")
        # The voice call (omni_demo.call_ui): Start call registers it outside the queue and starts
        # the microphone; its loop holds the model like a reply; the microphone streams beside it.
        from .call_ui import MIC_CHUNK_S, CallHandler  # it builds on this module's handlers

        calls = CallHandler(handler)
        pending_call = gr.State(None)
        call_outputs = [chatbot, player, call_status, stats, call_start, call_end, textbox]
        call_accepted = call_start.click(calls.accept, [chatbot], [pending_call, *call_outputs], js=CALL_START_JS,
                                         queue=False, show_progress="hidden", api_visibility="private")
        call_accepted.then(calls.run, [pending_call, *settings, call_pause, call_sensitivity], call_outputs,
                           concurrency_id="gpu", show_progress="minimal", show_progress_on=[call_status],
                           api_visibility="private")
        call_mic.stream(calls.hear, [call_mic], None, stream_every=MIC_CHUNK_S,
                        time_limit=calls.config.max_call_s + 60, concurrency_limit=None, concurrency_id="call-mic",
                        show_progress="hidden", api_visibility="private")
        call_end.click(calls.end, [pending_call], call_outputs, js=CALL_END_JS, queue=False, api_visibility="private")
        call_mic.stop_recording(calls.end, [pending_call], call_outputs, queue=False, api_visibility="private")
        for control in (system_prompt, speech):
            control.change(system_prompt_notice, [system_prompt, speech], notice, api_name=False)
        demo.unload(handler.page_closed)
    return demo
