"""The Gradio web UI. It never imports torch: `build_demo(backend)` takes anything with the
engine's `stream(messages, options, cancel)`, `voices`, `model_name` and `is_random`.

The reply handler is `ChatHandler.respond` (a method, so that it is bound to the backend and
still gets Gradio's `gr.Request`); the other handlers are functions. Conversation format and
upload policy live in omni_demo.conversation. The wiring is at the bottom of `build_demo`.
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import soundfile as sf

from .config import DEFAULT_SYSTEM_PROMPT, MAX_SEED, SAMPLE_RATE, SAMPLES_PER_CODE, GenerationOptions, Limits
from .conversation import ASSETS, UploadRegistry, chat_to_conversation, media_summary, new_upload_paths, user_turn
from .errors import InputError, first_line
from .inputs import check_request
from .events import AudioChunk, ContextTrimmed, Finished, TextDelta

log = logging.getLogger(__name__)

# Gradio publishes only the audio frames ready within ~5 ms of a yield; an empty chunk ~50 ms
# later flushes the rest, so speech does not lag one chunk behind (measured on Gradio 6.31).
FLUSH_DELAY_S = 0.05
EMPTY_PCM = np.zeros(0, dtype=np.int16)
CODES_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_CODE  # 50 talker codes per second of speech
MAX_ERROR_CHARS = 500  # an error shown to a user (and logged) is at most this long
REPLY_DIR = Path(tempfile.mkdtemp(prefix="omni-demo-replies-"))
atexit.register(shutil.rmtree, REPLY_DIR, ignore_errors=True)

RANDOM_BANNER = (
    "⚠️ **Tiny random-weight model.** This server runs a checkpoint built offline with random "
    "weights, so replies (text and speech) are deliberately nonsense. It exercises the whole "
    "streaming pipeline; start the app with `--model Qwen/Qwen2.5-Omni-7B` on a GPU for real answers."
)
SYSTEM_PROMPT_WARNING = (
    "⚠️ Qwen2.5-Omni only speaks reliably with its default system prompt. With another prompt the "
    "spoken reply may be missing or garbled; switch speech off or restore the default."
)


class Reply(NamedTuple):
    """One update of the reply handler's outputs, by name; what is not named stays as it is."""

    textbox: Any = gr.skip()
    chat: Any = gr.skip()
    webcam: Any = gr.skip()
    audio: Any = gr.skip()  # the streaming player: (24000, int16 [n])
    stats: Any = gr.skip()  # the latency readout


def format_stats(finished: Finished, conversation: list[dict]) -> str:
    s = finished.stats
    cells = [f"first text **{s.time_to_first_text_s:.2f} s**" if s.time_to_first_text_s is not None else "no text"]
    if s.time_to_first_audio_s is not None:
        cells += [f"first audio **{s.time_to_first_audio_s:.2f} s**", f"real-time factor **{s.rtf:.2f}**",
                  f"{s.audio_s:.1f} s of speech"]
    cells += [f"total {s.total_s:.2f} s", f"context {s.prompt_tokens} tokens ({media_summary(conversation)})"]
    if finished.stop_reason == "cancelled":
        cells.append("stopped")
    return " · ".join(cells)


def save_reply_audio(chunks: list[np.ndarray], keep: int = 256) -> str:
    """Write the reply's wav (Gradio copies it into its cache); keep only the newest `keep` here."""
    path = REPLY_DIR / f"reply-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**9:09d}.wav"
    sf.write(path, np.concatenate(chunks), SAMPLE_RATE, subtype="PCM_16")
    for old in sorted(REPLY_DIR.glob("reply-*.wav"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return str(path)


# The settings a request may send, as (low, high, whole number); the sliders show the same ranges.
SETTING_RANGES = {"temperature": (0.05, 1.5, False), "top_p": (0.05, 1.0, False), "max_new_tokens": (16, 2048, True),
                  "max_speech_s": (5, 80, False), "seed": (0, MAX_SEED, True)}


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


def refuse(exc: Exception) -> gr.Error:
    """A refusal: one log line, a short message, no traceback anywhere."""
    message = first_line(exc, MAX_ERROR_CHARS)
    log.warning("refused: %s", message)
    return gr.Error(message, print_exception=False)


class ChatHandler:
    """The reply handler, bound to a backend and the upload registry; `clear` cancels a session's reply."""

    def __init__(self, backend, uploads: UploadRegistry | None = None):
        self.backend = backend
        self.uploads = uploads or UploadRegistry()
        self.running: dict[str, threading.Event] = {}  # session -> its reply's cancel flag

    def respond(self, message, history, webcam, voice, speech, system_prompt, temperature, top_p, max_new_tokens,
                max_speech_s, use_audio_in_video, seed, request: gr.Request):
        """Send one user turn; stream the reply into the chat and the audio player."""
        history = list(history or [])
        chat, reply, shown = history, {"role": "assistant", "content": ""}, False
        cancel = self.running[request.session_hash] = threading.Event()
        try:
            self.uploads.accept_turn(request.session_hash, new_upload_paths(message, webcam), history)
            chat = history + user_turn(message, webcam)
            conversation = chat_to_conversation(chat, system_text(system_prompt))
            check_request(conversation, getattr(self.backend, "limits", None) or Limits())
            options = reply_options(voice, speech, temperature, top_p, max_new_tokens, max_speech_s,
                                    use_audio_in_video, seed)
            yield Reply(textbox=None, chat=chat + [reply], webcam=None, stats="Thinking…")
            shown = True
            chunks: list[np.ndarray] = []
            with closing(self.backend.stream(conversation, options, cancel)) as events:
                for event in events:
                    if cancel.is_set():  # Clear emptied the chat: nothing more goes to it
                        return
                    if isinstance(event, TextDelta):
                        reply = {"role": "assistant", "content": reply["content"] + event.text}
                        yield Reply(chat=chat + [reply])
                    elif isinstance(event, AudioChunk):
                        chunks.append(event.samples)
                        spoken = (event.start_sample + len(event.samples)) / SAMPLE_RATE
                        yield Reply(audio=(SAMPLE_RATE, event.pcm16()), stats=f"Speaking… {spoken:.1f} s")
                        time.sleep(FLUSH_DELAY_S)
                        yield Reply(audio=(SAMPLE_RATE, EMPTY_PCM))
                    elif isinstance(event, ContextTrimmed):
                        gr.Warning(f"The conversation is over this server's budgets ({event.limit_tokens} tokens, "
                                   f"media per conversation): its oldest {event.dropped_turns} turn(s) were left out.")
                    elif isinstance(event, Finished):
                        final = chat + [reply]
                        if chunks:
                            final.append({"role": "assistant", "content": {"path": save_reply_audio(chunks)}})
                        yield Reply(chat=final, stats=format_stats(event, conversation))
        except InputError as exc:
            # Nothing is lost: the chat goes back to before this turn and the message to the textbox
            # (only once it was changed: a request refused at once is not echoed back).
            if shown:
                yield Reply(textbox=message, chat=history, webcam=webcam, stats="")
            raise refuse(exc) from exc
        except Exception as exc:
            log.exception("reply failed")
            failed = chat + [reply, {"role": "assistant", "content": f"⚠️ This reply failed: {first_line(exc)}"}]
            yield Reply(chat=failed, stats="")
            raise gr.Error(f"The reply failed ({type(exc).__name__}: {first_line(exc)}). The chat is kept; try again.",
                           print_exception=False) from exc
        finally:
            if self.running.get(request.session_hash) is cancel:
                del self.running[request.session_hash]

    def clear(self, request: gr.Request):
        """Clear the chat; a reply of this session still running stops within one decode step (the
        button also cancels the event, which an API call to /clear cannot)."""
        if (cancel := self.running.get(request.session_hash)) is not None:
            cancel.set()
        return clear_chat()


def system_prompt_notice(system_prompt: str, speech: bool):
    return gr.update(visible=bool(speech) and system_prompt.strip() != DEFAULT_SYSTEM_PROMPT)


def clear_chat():
    return Reply(textbox=None, chat=[], webcam=None, audio=None, stats="")


EXAMPLES = [
    {"text": "What is in this picture?", "files": [str(ASSETS / "shapes.png")]},
    {"text": "", "files": [str(ASSETS / "question.wav")]},
    {"text": "What happens in this video?", "files": [str(ASSETS / "talking_shapes.mp4")]},
    {"text": "Tell me a short story about a robot who learns to sing.", "files": []},
]


def build_demo(backend, *, title: str = "Qwen2.5-Omni, streaming") -> gr.Blocks:
    # Uploads and replies older than a day leave Gradio's cache (checked hourly).
    with gr.Blocks(title=title, fill_height=True, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {title}\nTalk with text, images, audio, video, your microphone or webcam. "
                    "The reply is written and spoken at the same time.")
        if backend.is_random:
            gr.Markdown(RANDOM_BANNER, elem_id="random-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=520, buttons=["copy"],
                                     group_consecutive_messages=False)
                textbox = gr.MultimodalTextbox(
                    placeholder="Type, record with the microphone, or attach images, audio or video…",
                    sources=["upload", "microphone"], file_types=["image", "audio", "video"],
                    file_count="multiple", elem_id="textbox", show_label=False,
                )
                with gr.Row():
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear", elem_id="clear")
                stats = gr.Markdown(elem_id="stats")
            with gr.Column(scale=2):
                audio_out = gr.Audio(label="Spoken reply", streaming=True, autoplay=True, interactive=False,
                                     elem_id="reply-audio")
                webcam = gr.Video(label="Webcam clip (sent with your next message)", sources=["webcam"],
                                  include_audio=True, elem_id="webcam",
                                  # Mirroring would run ffmpeg on every clip before any check, outside the queue.
                                  webcam_options=gr.WebcamOptions(mirror=False))
                with gr.Accordion("Settings", open=True):
                    voice = gr.Radio(backend.voices, value=backend.voices[0], label="Voice")
                    speech = gr.Checkbox(True, label="Speak the reply (off: text only, faster)")
                    use_audio_in_video = gr.Checkbox(True, label="Use the sound of videos")
                    temperature = gr.Slider(0.05, 1.5, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
                    max_speech_s = gr.Slider(5, 80, value=60, step=5, label="Max speech (seconds)")
                    seed = gr.Number(0, minimum=0,  # no precision: a float or NaN reaches setting() and is refused there
                                     label="Seed (0: random; same seed, same reply)")
                    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
                    notice = gr.Markdown(SYSTEM_PROMPT_WARNING, visible=False, elem_id="system-prompt-warning")
        gr.Examples(EXAMPLES, inputs=[textbox], label="Examples")

        settings = [voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video,
                    seed]
        handler = ChatHandler(backend)
        reply_event = textbox.submit(
            handler.respond, [textbox, chatbot, webcam, *settings],
            [textbox, chatbot, webcam, audio_out, stats], api_name="chat", concurrency_id="gpu",
        )
        stop.click(None, cancels=[reply_event])
        clear.click(handler.clear, None, [textbox, chatbot, webcam, audio_out, stats], cancels=[reply_event],
                    api_name="clear")
        for control in (system_prompt, speech):
            control.change(system_prompt_notice, [system_prompt, speech], notice, api_name=False)
    return demo
