"""The Gradio page: `build_demo(backend, vad)` lays out the Blocks and wires the handlers
(chat.py for typed turns, call_page.py for the voice call). It never imports torch: the backend
(omni_demo.backends.protocol) and the call's voice activity model are given by app.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from omni_demo.backends.protocol import Backend
from omni_demo.config import ASSETS, DEFAULT_SYSTEM_PROMPT

from .call_page import MAX_CALLS, MIC_CHUNK_S, TEXTBOX_PLACEHOLDER, CallHandler
from .chat import ChatHandler
from .player import VoicePreviews

WEB = Path(__file__).resolve().parent / "web"
RANDOM_BANNER = (
    "⚠️ **Tiny random-weight model**: replies are deliberately nonsense (text and speech). "
    "Start the app with `--model Qwen/Qwen2.5-Omni-7B` on a GPU for real answers."
)
SYSTEM_PROMPT_WARNING = (
    "⚠️ Qwen2.5-Omni only speaks reliably with its default system prompt. With another prompt the "
    "spoken reply may be missing or garbled; switch speech off or restore the default."
)
# The player's own markup; player.js fills it. The live region is what screen readers announce.
PLAYER_HTML = ('<div class="player-row"><div class="player-state" aria-hidden="true"></div>'
               '<button type="button" class="player-stop">■ Stop speech</button></div>'
               '<div class="player-live sr-only" role="status" aria-live="polite"></div>')
STOP_JS = "() => { if (window.omniPlayer) window.omniPlayer.stop(); return []; }"
THEME_JS = "() => window.omniTheme && window.omniTheme.toggle()"  # light <-> dark, kept in this browser
CLEAR_JS = "() => { if (window.omniPlayer) window.omniPlayer.reset(); return []; }"
STOP_TURN_JS = "(turn) => { if (window.omniPlayer) window.omniPlayer.stop(); return [turn]; }"
# Returns its inputs as a list: a bare array (the chat's messages) would be read as one input each.
CALL_START_JS = "(chat) => { if (window.omniCall) window.omniCall.prepare(); return [chat]; }"
CALL_END_JS = "(call) => { if (window.omniPlayer) window.omniPlayer.stop(); return [call]; }"
CALL_HINT = "Hands-free: pause and it answers, talk over it to interrupt; in a call, the camera shows it what you see."
# The call screen's own markup (web/voice.js fills and drives it while a call runs): the microphone's
# level, Mute, the camera toggle and its preview.
CALL_SCREEN_HTML = (
    '<div class="call-screen" hidden>'
    '<div class="call-level" role="meter" aria-label="Microphone level" aria-valuemin="0" aria-valuemax="100" '
    'aria-valuenow="0"><span></span></div>'
    '<button type="button" class="call-mute">🎙️ Mute</button>'
    '<button type="button" class="call-camera">📷 Turn camera on</button>'
    '<span class="call-muted-note" role="status">Muted: the call hears nothing</span>'
    '<video class="call-preview" muted playsinline autoplay hidden aria-label="Your camera, as the model sees it">'
    '</video></div>')
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


def microphone_stream(**kwargs) -> gr.Audio:
    """The call's streaming microphone: a gr.Audio whose chunks are the call's to read and delete
    (app/files.py). Gradio records each file an input receives, to delete it at shutdown; this one
    records none: the call deletes each chunk as it reads it, and a path that is no regular file
    (a folder named by a crafted post) is refused by the call before anything touches it (Gradio's
    shutdown clean-up failed on one). An override on the instance: a subclass of a Gradio
    component makes Gradio write a .pyi stub beside its source at import."""
    audio = gr.Audio(**kwargs)

    async def unrecorded(url_or_file_path):  # Gradio checked the path is in its upload folder
        return None if url_or_file_path is None else str(url_or_file_path)

    audio.async_move_resource_to_block_cache = unrecorded
    return audio


def system_prompt_notice(system_prompt: str, speech: bool):
    return gr.update(visible=bool(speech) and system_prompt.strip() != DEFAULT_SYSTEM_PROMPT)


@dataclass
class _Chat:
    """The conversation column's components."""

    chatbot: gr.Chatbot
    player: gr.HTML
    textbox: gr.MultimodalTextbox
    call_start: gr.Button
    call_end: gr.Button
    call_status: gr.Markdown
    call_mic: gr.Audio
    call_frames: gr.Textbox
    chips: list
    clear: gr.Button
    stats: gr.Markdown
    export: gr.Button
    exported: gr.File
    theme: gr.Button


@dataclass
class _Settings:
    """The side column's components: the webcam and the settings panel."""

    webcam: gr.Video
    reply: list  # the settings every reply reads, in ChatHandler.respond's order
    call: list  # the call's own: pause, sensitivity
    system_prompt: gr.Textbox
    speech: gr.Checkbox
    notice: gr.Markdown
    preview: gr.Button


def build_demo(backend: Backend, vad, *, title: str = "Qwen2.5-Omni, streaming",
               reply_limit: int | None = None) -> gr.Blocks:
    """The page for `backend`; `vad()` makes each voice call its own voice activity model;
    `reply_limit`: the typed replies the queue runs at once (its concurrency limit)."""
    chats = ChatHandler(backend, reply_limit=reply_limit)
    calls = CallHandler(chats, vad)
    # Uploads and replies older than a day leave Gradio's cache (checked hourly).
    with gr.Blocks(title=title, fill_height=True, delete_cache=(3600, 86400)) as demo:
        running = " · ".join(part for part in (backend.model_name, getattr(backend, "precision", "")) if part)
        gr.Markdown(f"# {title}\nTalk with text, images, audio, video, your microphone or webcam; "
                    f"the reply is written and spoken at the same time. <small>Model: {running}</small>",
                    elem_id="title")
        if backend.is_random:
            gr.Markdown(RANDOM_BANNER, elem_id="random-banner")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                chat = _chat_column()
            with gr.Column(scale=1, min_width=300):
                settings = _settings_column(backend.voices)
        saved = gr.BrowserState(None, storage_key="omni-demo-conversation")  # the browser's, for a reload
        _wire_chat(chats, chat, settings, saved)
        previews = VoicePreviews(backend)
        settings.preview.click(previews.play, [settings.reply[0]], chat.player, concurrency_id="gpu",
                               show_progress="hidden", api_visibility="private")
        _wire_call(calls, chat, settings, saved)
        demo.load(chats.restore, [saved], [chat.chatbot], api_visibility="private")
        for control in (settings.system_prompt, settings.speech):
            control.change(system_prompt_notice, [settings.system_prompt, settings.speech], settings.notice,
                           api_name=False)
        demo.unload(chats.page_closed)
    chats.sessions.queued = queued_in(demo)
    return demo


def queued_in(demo: gr.Blocks) -> Callable[[str], bool]:
    """Whether Gradio's queue holds an event of a session (its pending events by session hash; a
    Gradio without that table: always, so nothing is forgotten that may still run)."""

    def queued(session: str) -> bool:
        pending = getattr(getattr(demo, "_queue", None), "pending_event_ids_session", None)
        return True if pending is None else bool(pending.get(session))

    return queued


def _chat_column() -> _Chat:
    chatbot = gr.Chatbot(label="Conversation", show_label=False, elem_id="chatbot", buttons=["copy"], editable="user",
                         group_consecutive_messages=False, autoscroll=True)
    player = gr.HTML(None, html_template=PLAYER_HTML, js_on_load=PAGE_JS, head=PAGE_HEAD, elem_id="player",
                     label="Reply status")
    textbox = gr.MultimodalTextbox(
        placeholder=TEXTBOX_PLACEHOLDER, sources=["upload", "microphone"], file_types=["image", "audio", "video"],
        file_count="multiple", elem_id="textbox", label="Message", show_label=False, submit_btn="Send", max_lines=8,
        stop_btn=False, autofocus=True,
    )
    with gr.Group(elem_id="call"):
        with gr.Row(equal_height=False, elem_id="call-bar"):
            call_start = gr.Button("📞 Start voice call", variant="primary", size="sm", scale=0, min_width=160,
                                   elem_id="call-start")
            call_end = gr.Button("End call", variant="stop", size="sm", scale=0, min_width=120, visible=False,
                                 elem_id="call-end")
            call_status = gr.Markdown(CALL_HINT, elem_id="call-status", min_width=160)
        gr.HTML(None, html_template=CALL_SCREEN_HTML, elem_id="call-screen")
        gr.HTML(None, html_template='<div class="call-latency"></div>', elem_id="call-latency")
        # The call's microphone: started and stopped by the call (web/voice.js), hidden by style.css.
        # type="filepath", format=None: Gradio hands over the upload as it is, unread (app/files.py).
        call_mic = microphone_stream(sources=["microphone"], streaming=True, type="filepath", format=None,
                                     elem_id="call-mic", label="Call microphone", show_label=False)
        # The call's camera frames, as web/voice.js writes them (hidden by style.css like the microphone).
        call_frames = gr.Textbox(elem_id="call-frames", label="Call camera", show_label=False, container=False,
                                 max_lines=1)
    with gr.Row(elem_id="chips"):
        chips = [(gr.Button(label, size="sm", variant="secondary"), value) for label, value in EXAMPLES]
    with gr.Row(elem_id="footer", equal_height=True):
        stats = gr.Markdown(elem_id="stats")
        export = gr.Button("⬇ Export", size="sm", variant="secondary", scale=0, min_width=110, elem_id="export")
        theme = gr.Button("◐ Theme", size="sm", variant="secondary", scale=0, min_width=100, elem_id="theme")
        clear = gr.Button("🗑 Clear chat", size="sm", variant="secondary", scale=0, min_width=130, elem_id="clear")
    exported = gr.File(label="The conversation (text and audio)", visible=False, elem_id="exported")
    return _Chat(chatbot, player, textbox, call_start, call_end, call_status, call_mic, call_frames, chips, clear, stats,
                 export, exported, theme)


def _settings_column(voices: list[str]) -> _Settings:
    with gr.Accordion("Camera: record a clip to send", open=False, elem_id="camera"):
        # mirror=False: Gradio otherwise re-encodes every clip with ffmpeg hflip before
        # any handler runs (~9.5 s for a short clip), outside the queue's cancellation.
        webcam = gr.Video(label="Webcam clip (sent with your next message)", sources=["webcam"], include_audio=True,
                          elem_id="webcam", webcam_options=gr.WebcamOptions(mirror=False))
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        with gr.Row(equal_height=True):
            voice = gr.Radio(voices, value=voices[0], label="Voice")
            preview = gr.Button("▶ Hear this voice", size="sm", scale=0, min_width=150, elem_id="voice-preview")
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
    reply = [voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s, use_audio_in_video, seed]
    return _Settings(webcam, reply, [call_pause, call_sensitivity], system_prompt, speech, notice, preview)


def _wire_chat(chats: ChatHandler, chat: _Chat, settings: _Settings, saved: gr.BrowserState) -> None:
    """Send: accepted outside the queue, answered in it; `/chat` for API clients; Stop and Clear."""
    pending = gr.State(None)
    inputs = [chat.textbox, chat.chatbot, settings.webcam]
    outputs = [chat.textbox, chat.chatbot, settings.webcam, chat.player, chat.stats]
    accepted = chat.textbox.submit(chats.accept, inputs, [pending, *outputs], queue=False, show_progress="hidden",
                                   trigger_mode="multiple", api_visibility="private")
    kept = dict(queue=False, show_progress="hidden", api_visibility="private")  # the chat, into the browser's storage
    answered = accepted.then(chats.respond_ui, [pending, *settings.reply], outputs, concurrency_id="gpu",
                             show_progress="minimal", show_progress_on=[chat.player], api_visibility="private")
    answered.then(chats.keep, [chat.chatbot], saved, **kept)
    for resent in (chat.chatbot.retry(chats.retry, [chat.chatbot], [pending, *outputs], queue=False,
                                      show_progress="hidden", api_visibility="private"),
                   chat.chatbot.edit(chats.edit, [chat.chatbot], [pending, *outputs], queue=False,
                                     show_progress="hidden", api_visibility="private")):
        reanswered = resent.then(chats.respond_ui, [pending, *settings.reply], outputs, concurrency_id="gpu",
                                 show_progress="minimal", show_progress_on=[chat.player], api_visibility="private")
        reanswered.then(chats.keep, [chat.chatbot], saved, **kept)
    api_only = gr.Button(visible=False)  # /chat: the same reply as one call, for API clients and tests
    api_reply = api_only.click(chats.respond, [*inputs, *settings.reply], outputs, api_name="chat",
                               concurrency_id="gpu")
    chat.textbox.stop(chats.stop_ui, [pending], [chat.textbox, chat.chatbot, settings.webcam, chat.player],
                      js=STOP_TURN_JS, queue=False, api_visibility="private")
    cleared = chat.clear.click(chats.clear, None, outputs, js=CLEAR_JS, queue=False, api_name="clear",
                               cancels=[api_reply])
    cleared.then(lambda: gr.update(value=None, visible=False), None, chat.exported, **kept)
    cleared.then(chats.keep, [chat.chatbot], saved, **kept)
    chat.chatbot.clear(chats.clear, None, outputs, js=CLEAR_JS, queue=False,
                       api_visibility="private").then(chats.keep, [chat.chatbot], saved, **kept)
    chat.theme.click(None, js=THEME_JS)
    chat.export.click(chats.export, [chat.chatbot], [chat.exported, chat.player], queue=False, api_visibility="private")
    for button, value in chat.chips:
        button.click(lambda v=value: v, None, chat.textbox, queue=False, api_visibility="private")


def _wire_call(calls: CallHandler, chat: _Chat, settings: _Settings, saved: gr.BrowserState) -> None:
    """Start call registers the call outside the queue and starts the microphone; its loop runs in a
    group of its own (it holds no model: its replies and its listening are the engine's requests like
    any other), and the microphone streams beside it."""
    pending = gr.State(None)
    outputs = [chat.chatbot, chat.player, chat.call_status, chat.stats, chat.call_start, chat.call_end, chat.textbox]
    accepted = chat.call_start.click(calls.accept, [chat.chatbot], [pending, *outputs], js=CALL_START_JS,
                                     queue=False, show_progress="hidden", api_visibility="private")
    called = accepted.then(calls.run, [pending, *settings.reply, *settings.call], outputs, concurrency_id="calls",
                           concurrency_limit=MAX_CALLS, show_progress="minimal", show_progress_on=[chat.call_status],
                           api_visibility="private")
    called.then(calls.chats.keep, [chat.chatbot], saved, queue=False, show_progress="hidden", api_visibility="private")
    chat.call_mic.stream(calls.hear, [chat.call_mic], None, stream_every=MIC_CHUNK_S,
                         time_limit=calls.config.max_call_s + 60, concurrency_limit=None, concurrency_id="call-mic",
                         show_progress="hidden", api_visibility="private")
    chat.call_frames.change(calls.see, [chat.call_frames], chat.player, queue=False, show_progress="hidden",
                           trigger_mode="multiple", api_visibility="private")
    chat.call_end.click(calls.end, [pending], outputs, js=CALL_END_JS, queue=False, api_visibility="private")
    chat.call_mic.stop_recording(calls.end, [pending], outputs, queue=False, api_visibility="private")
