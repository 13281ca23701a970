"""The Gradio web UI. It never imports torch: `build_demo(backend)` takes anything with the
engine's `stream(messages, options, cancel)`, `voices`, `model_name` and `is_random`.

Handlers are top-level functions; the wiring is at the bottom of `build_demo`.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import closing
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf

from .config import DEFAULT_SYSTEM_PROMPT, SAMPLE_RATE, SAMPLES_PER_CODE, GenerationOptions
from .events import AudioChunk, ContextTrimmed, Finished, TextDelta
from .inputs import MEDIA_TYPES, InputError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Gradio publishes only the audio frames ready within ~5 ms of a yield; an empty chunk ~50 ms
# later flushes the rest, so speech does not lag one chunk behind (measured, shared NOTES.md).
FLUSH_DELAY_S = 0.05
EMPTY_PCM = np.zeros(0, dtype=np.int16)
CODES_PER_SECOND = SAMPLE_RATE // SAMPLES_PER_CODE  # 50 talker codes per second of speech
REPLY_DIR = Path(tempfile.mkdtemp(prefix="omni-demo-replies-"))

RANDOM_BANNER = (
    "⚠️ **Tiny random-weight model.** This server runs a checkpoint built offline with random "
    "weights, so replies (text and speech) are deliberately nonsense. It exercises the whole "
    "streaming pipeline; start the app with `--model Qwen/Qwen2.5-Omni-7B` on a GPU for real answers."
)
SYSTEM_PROMPT_WARNING = (
    "⚠️ Qwen2.5-Omni only speaks reliably with its default system prompt. With another prompt the "
    "spoken reply may be missing or garbled; switch speech off or restore the default."
)


class UploadRegistry:
    """Which uploaded files belong to which browser session. A turn may only refer to files its own
    session uploaded (or the app's assets), so a crafted history cannot make the server read
    /etc/passwd, ../ paths or another user's upload."""

    def __init__(self, max_sessions: int = 10_000):
        self.sessions: OrderedDict[str, set[str]] = OrderedDict()
        self.max_sessions = max_sessions
        self.lock = threading.Lock()

    def add(self, session: str, paths: list[str]) -> None:
        with self.lock:
            owned = self.sessions.setdefault(session, set())
            owned.update(str(Path(p).resolve()) for p in paths)
            self.sessions.move_to_end(session)
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)

    def check(self, session: str, paths: list[str]) -> None:
        with self.lock:
            owned = self.sessions.get(session, set())
        for path in paths:
            resolved = Path(path).resolve()
            if str(resolved) not in owned and not resolved.is_relative_to(ASSETS):
                raise gr.Error(f"Refused {Path(path).name}: this conversation did not upload it.")


def new_upload_paths(message: dict | None, webcam: str | None) -> list[str]:
    files = [*((message or {}).get("files") or []), *([webcam] if webcam else [])]
    return [f if isinstance(f, str) else f.get("path") for f in files]


def user_file_paths(history: list[dict]) -> list[str]:
    return [part["file"]["path"] for message in history if message["role"] == "user"
            for part in _parts(message) if part.get("type") == "file"]


def gradio_upload_dir() -> Path:
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def media_kind(path: str) -> str | None:
    """'image', 'audio' or 'video' from the file name, else None."""
    mime, _ = mimetypes.guess_type(path)
    kind = (mime or "").split("/")[0]
    return kind if kind in MEDIA_TYPES else None


def _file_part(path: str) -> dict:
    return {"type": "file", "file": {"path": path, "mime_type": mimetypes.guess_type(path)[0]}}


def user_turn(message: dict | None, webcam: str | None) -> list[dict]:
    """The chat messages for what the user sends: each file on its own, then the text."""
    message = message or {}
    files = [*(message.get("files") or []), *([webcam] if webcam else [])]
    text = (message.get("text") or "").strip()
    if not files and not text:
        raise gr.Error("Nothing to send: type a message, record one, or attach an image, audio clip or video.")
    turn = []
    for file in files:
        path = file if isinstance(file, str) else file.get("path")
        if media_kind(path) is None:
            raise gr.Error(f"Unsupported file {Path(path).name}: attach images, audio or video.")
        turn.append({"role": "user", "content": [_file_part(path)]})
    if text:
        turn.append({"role": "user", "content": [{"type": "text", "text": text}]})
    return turn


def chat_to_conversation(history: list[dict], system_prompt: str) -> list[dict]:
    """Chatbot messages -> Qwen messages: consecutive user messages become one turn with every
    file as an image/audio/video part; assistant turns keep their text (not the reply audio)."""
    conversation = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    for message in history:
        parts = []
        for part in _parts(message):
            if part.get("type") == "text" and part.get("text", "").strip():
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "file" and message["role"] == "user":
                path = part["file"]["path"]
                kind = media_kind(path)
                if kind is None:
                    raise InputError(f"unsupported file in the conversation: {Path(path).name}")
                parts.append({"type": kind, kind: path})
        if not parts:
            continue
        if conversation and conversation[-1]["role"] == message["role"]:
            conversation[-1]["content"].extend(parts)
        else:
            conversation.append({"role": message["role"], "content": parts})
    return conversation


def _parts(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        content = [content]
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif "path" in part:  # a bare file dict, as handlers may append
            parts.append({"type": "file", "file": part})
        else:
            parts.append(part)
    return parts


def media_summary(conversation: list[dict]) -> str:
    counts = {kind: 0 for kind in MEDIA_TYPES}
    for message in conversation:
        for part in message["content"]:
            if part["type"] in counts:
                counts[part["type"]] += 1
    names = {"image": "image", "audio": "audio clip", "video": "video"}
    seen = [f"{n} {names[k]}{'s' if n > 1 else ''}" for k, n in counts.items() if n]
    return ", ".join(seen) if seen else "text only"


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


class ChatHandler:
    """The reply handler, bound to a backend and the upload registry. A method rather than a
    functools.partial of a function: Gradio only injects gr.Request where it can read type hints."""

    def __init__(self, backend, uploads: UploadRegistry | None = None):
        self.backend = backend
        self.uploads = uploads or UploadRegistry()

    def check_files(self, session: str, message, webcam, history: list[dict]) -> None:
        """New files must be fresh uploads (or our examples); files in the history must be this
        session's own uploads."""
        new_files = new_upload_paths(message, webcam)
        for path in new_files:
            resolved = Path(path).resolve()
            if not (resolved.is_relative_to(gradio_upload_dir()) or resolved.is_relative_to(ASSETS)):
                raise gr.Error(f"Refused {Path(path).name}: not an upload.")
        self.uploads.add(session, new_files)
        self.uploads.check(session, user_file_paths(history))

    def respond(self, message, history, webcam, voice, speech, system_prompt, temperature, top_p, max_new_tokens,
                max_speech_s, use_audio_in_video, seed, request: gr.Request):
        """Send one user turn; stream the reply into the chat and the audio player.

        Outputs: textbox, chatbot, webcam, streaming audio, latency readout.
        """
        history = list(history or [])
        self.check_files(request.session_hash, message, webcam, history)
        turn = user_turn(message, webcam)
        chat = history + turn
        conversation = chat_to_conversation(chat, system_prompt.strip())
        options = GenerationOptions(
            voice=voice, speech=bool(speech), temperature=float(temperature), top_p=float(top_p),
            max_new_tokens=int(max_new_tokens), max_audio_tokens=int(float(max_speech_s) * CODES_PER_SECOND),
            use_audio_in_video=bool(use_audio_in_video), seed=int(seed) or None,
        )
        reply = {"role": "assistant", "content": ""}
        yield None, chat + [reply], None, gr.skip(), "Thinking…"
        chunks: list[np.ndarray] = []
        try:
            with closing(self.backend.stream(conversation, options)) as events:
                for event in events:
                    if isinstance(event, TextDelta):
                        reply = {"role": "assistant", "content": reply["content"] + event.text}
                        yield gr.skip(), chat + [reply], gr.skip(), gr.skip(), gr.skip()
                    elif isinstance(event, AudioChunk):
                        chunks.append(event.samples)
                        spoken = (event.start_sample + len(event.samples)) / SAMPLE_RATE
                        yield gr.skip(), gr.skip(), gr.skip(), (SAMPLE_RATE, event.pcm16()), f"Speaking… {spoken:.1f} s"
                        time.sleep(FLUSH_DELAY_S)
                        yield gr.skip(), gr.skip(), gr.skip(), (SAMPLE_RATE, EMPTY_PCM), gr.skip()
                    elif isinstance(event, ContextTrimmed):
                        gr.Warning(f"The conversation is longer than the model's window ({event.limit_tokens} tokens): "
                                   f"its oldest {event.dropped_turns} turn(s) were left out of this reply.")
                    elif isinstance(event, Finished):
                        final = chat + [reply]
                        if chunks:
                            final.append({"role": "assistant", "content": {"path": save_reply_audio(chunks)}})
                        yield gr.skip(), final, gr.skip(), gr.skip(), format_stats(event, conversation)
        except InputError as exc:
            # Nothing is lost: the chat goes back to before this turn and the message to the textbox.
            yield message, history, webcam, gr.skip(), ""
            raise gr.Error(str(exc)) from exc
        except Exception as exc:
            log.exception("reply failed")
            failed = chat + [reply, {"role": "assistant", "content": f"⚠️ This reply failed: {exc}"}]
            yield gr.skip(), failed, gr.skip(), gr.skip(), ""
            raise gr.Error(f"The reply failed ({type(exc).__name__}: {exc}). The chat is kept; try again.") from exc


def system_prompt_notice(system_prompt: str, speech: bool):
    return gr.update(visible=bool(speech) and system_prompt.strip() != DEFAULT_SYSTEM_PROMPT)


def clear_chat():
    return None, [], None, None, ""


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
                                  include_audio=True, elem_id="webcam")
                with gr.Accordion("Settings", open=True):
                    voice = gr.Radio(backend.voices, value=backend.voices[0], label="Voice")
                    speech = gr.Checkbox(True, label="Speak the reply (off: text only, faster)")
                    use_audio_in_video = gr.Checkbox(True, label="Use the sound of videos")
                    temperature = gr.Slider(0.05, 1.5, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
                    max_speech_s = gr.Slider(5, 80, value=60, step=5, label="Max speech (seconds)")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed (0: random; same seed, same reply)")
                    system_prompt = gr.Textbox(DEFAULT_SYSTEM_PROMPT, label="System prompt", lines=3)
                    notice = gr.Markdown(SYSTEM_PROMPT_WARNING, visible=False, elem_id="system-prompt-warning")
        gr.Examples(EXAMPLES, inputs=[textbox], label="Examples")

        settings = [voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video,
                    seed]
        reply_event = textbox.submit(
            ChatHandler(backend).respond, [textbox, chatbot, webcam, *settings],
            [textbox, chatbot, webcam, audio_out, stats], api_name="chat", concurrency_id="gpu",
        )
        stop.click(None, cancels=[reply_event])
        clear.click(clear_chat, None, [textbox, chatbot, webcam, audio_out, stats], cancels=[reply_event],
                    api_name="clear")
        for control in (system_prompt, speech):
            control.change(system_prompt_notice, [system_prompt, speech], notice, api_name=False)
    return demo
