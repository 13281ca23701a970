"""The voice call's page handlers: Start call (outside the queue) registers the session's call; the
call's loop (omni_demo.call.voice_call, in the queue's "calls" group: it holds no model, its replies are
the engine's requests like any other) starts the page's
microphone and turns the call's events into chat, player and status updates; the microphone's
stream handler hands each chunk to the session's call. A call is the session's one activity, like a
typed turn: End call, Esc and Clear end it, and typing waits for it to end.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from omni_demo.call.events import (
    CallEnded,
    PlaybackInterrupted,
    ReplyAudio,
    ReplyEnded,
    ReplyText,
    Status,
    Tick,
    Trimmed,
    TurnFailed,
    UserTurn,
)
from omni_demo.call.voice_call import CallConfig, VoiceCall
from omni_demo.errors import InputError

from .chat import ChatHandler
from .chat_history import INTERRUPTED_MARK, chat_to_conversation, user_file_paths
from .files import ChunkSequence, new_chunk_token, save_user_audio, save_user_video
from .notices import notice, public_message, refused, trimmed_text
from .player import PlayerMessages, finalize
from .sessions import Activity, session_scope
from .settings import call_config, reply_options, system_text

log = logging.getLogger(__name__)

STATE_ICONS = {"listening": "🟢", "hearing": "🎙️", "thinking": "💭", "speaking": "🔊"}
MIC_CHUNK_S = 0.25  # the page sends the microphone this often (stream_every)
MAX_SESSIONS = 10_000  # sessions whose last call's late chunks are remembered
CALL_PLACEHOLDER = "A voice call is running: just talk. End the call to type."
TEXTBOX_PLACEHOLDER = "Type, attach media, or record…"
MAX_CALLS = 16  # voice calls open at once per server (each is one waiting thread; the engine batches their replies)
MAX_CAMERA_MESSAGE = 1_500_000  # characters of one camera message from the page (it sends one ~30 KB frame at a time)


class CallView(NamedTuple):
    """One update of the call's outputs, by name; what is not named stays as it is."""

    chat: Any = gr.skip()
    player: Any = gr.skip()
    status: Any = gr.skip()
    stats: Any = gr.skip()
    start: Any = gr.skip()
    end: Any = gr.skip()
    textbox: Any = gr.skip()  # closed to typing while the call runs


def control(command: str, chunk_prefix: str | None = None) -> dict:
    """A message for the page's call controls (web/voice.js): "start" or "stop" the microphone.
    `server_time` (Unix s) sets the page's estimate of the server's clock, against which it times
    each reply's delivery (the two clocks need not agree); `chunk_prefix` is what the page names
    the call's microphone uploads (app/files.py)."""
    return {"call": command, "id": uuid.uuid4().hex[:12], "server_time": time.time(), "chunk_prefix": chunk_prefix}


def status_line(state: str, text: str) -> str:
    """The call's state as the page shows it: a badge that style.css colours by state."""
    return f'<span class="call-state call-state-{state}">{STATE_ICONS.get(state, "📞")} {text}</span>'


def camera_message(payload, call: str) -> tuple[bool, list[tuple[float, bytes]], int | None] | None:
    """The page's camera message (web/voice.js), a JSON string: {"call": the call's chunk prefix,
    "seq": its number, "on": bool, "frames": [[seconds of call audio, base64 JPEG], ...]}, as
    (on, frames, seq); None when it names another call than `call` (its frames are not decoded).
    ValueError when it is no such message."""
    if not isinstance(payload, str) or len(payload) > MAX_CAMERA_MESSAGE:
        raise ValueError("a camera message must be a JSON string of at most 1.5 MB")
    try:
        message = json.loads(payload)
    except RecursionError as exc:  # nested deeper than Python's parser goes
        raise ValueError("a camera message nests too deep") from exc
    if not isinstance(message, dict) or not isinstance(message.get("frames", []), list):
        raise ValueError("a camera message must be an object with a list of frames")
    if message.get("call") != call:
        return None
    seq = message.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise ValueError("a camera message's number must be an integer")
    frames = []
    for frame in message.get("frames", []):
        if not (isinstance(frame, list) and len(frame) == 2 and isinstance(frame[1], str)):
            raise ValueError("a camera frame must be [seconds, base64 JPEG]")
        frames.append((frame[0], base64.b64decode(frame[1], validate=True)))
    return message.get("on") is True, frames, seq


def ended_view(reason: str) -> CallView:
    return CallView(player=control("stop"), status=f"📴 **Call ended.** {reason}", start=gr.update(visible=True),
                    end=gr.update(visible=False), textbox=gr.update(interactive=True, placeholder=TEXTBOX_PLACEHOLDER))


class CallActivity(Activity):
    """A session's voice call as its end flag (End call, Stop, Clear and a closed page set it)."""

    busy_text = "A voice call is running: end it to send a typed message. Your message is kept."

    def __init__(self):
        super().__init__()
        self.call: VoiceCall | None = None
        self.chunks = ChunkSequence(new_chunk_token())  # its microphone's uploads, named by its page


class CallScreen:
    """What one call shows: the chat (the call's turns appended to the history it began with), the
    player's messages of the reply being spoken, the status and latency lines."""

    def __init__(self, chat: list[dict]):
        self.chat = chat  # through the last finished turn
        self.player = PlayerMessages(in_call=True)
        self.replied = False  # the last reply has a message in the chat that an interruption marks

    def update(self, event) -> CallView:
        if isinstance(event, Tick):
            return CallView()
        if isinstance(event, Status):
            return CallView(status=status_line(event.state, event.text))
        if isinstance(event, UserTurn):
            sound = [{"role": "user", "content": {"path": event.sound}}] if event.sound else []  # beside its video
            self.chat = self.chat + [{"role": "user", "content": {"path": event.path}}, *sound]
            self.player, self.replied = PlayerMessages(in_call=True), False
            return CallView(chat=self.chat, player=self.player("thinking", "Thinking…"))
        if isinstance(event, ReplyText):
            return CallView(chat=self.chat + [{"role": "assistant", "content": event.text}])
        if isinstance(event, ReplyAudio):
            message = self.player("speaking", "Speaking…", event.chunk.pcm16())
            if event.latency is not None:  # the page adds its player's part and shows the whole wait
                message["latency"] = event.latency.as_dict()
            return CallView(player=message)
        if isinstance(event, ReplyEnded):
            return self._reply_ended(event)
        if isinstance(event, PlaybackInterrupted):
            self._mark_interrupted()
            return CallView(chat=self.chat, player=self.player("interrupted", "Interrupted."))
        if isinstance(event, TurnFailed):
            gr.Warning(f"That turn failed: {event.message}")
            self.chat = self.chat + [{"role": "assistant", "content": f"⚠️ This reply failed: {event.message}"}]
            return CallView(chat=self.chat, player=self.player("error", "The reply failed."))
        if isinstance(event, Trimmed):
            gr.Warning(trimmed_text(event.event))
            return CallView()
        if isinstance(event, CallEnded):
            return ended_view(event.reason)
        raise TypeError(f"unknown call event {event!r}")

    def _reply_ended(self, event: ReplyEnded) -> CallView:
        self.chat = finalize(self.chat, event.text, event.chunks, stopped=event.call_ended)
        self.replied = bool(event.text)
        if event.interrupted:
            self._mark_interrupted()
        state = (("interrupted", "Interrupted.") if event.interrupted else ("stopped", "Call ended.")
                 if event.call_ended else ("done", "Done."))
        return CallView(chat=self.chat, player=self.player(*state))  # the wait: the page's call readout

    def _mark_interrupted(self) -> None:
        """The last reply's text, marked: the chat shows where the user cut in."""
        if not self.replied:
            if self.chat and self.chat[-1]["role"] == "user":  # cut before any text: say so
                self.chat = self.chat + [{"role": "assistant", "content": INTERRUPTED_MARK}]
            return
        for index in range(len(self.chat) - 1, -1, -1):
            message = self.chat[index]
            if message["role"] == "assistant" and isinstance(message["content"], str):
                if not message["content"].endswith(INTERRUPTED_MARK):
                    self.chat = [*self.chat[:index], {**message, "content": f"{message['content']} {INTERRUPTED_MARK}"},
                                 *self.chat[index + 1:]]
                return


class CallHandler:
    """The call handlers, sharing the chat handler's sessions (one activity per session). `vad()`
    makes each call its own voice activity model (omni_demo.call.vad.load_vad, given by app.py)."""

    def __init__(self, chats: ChatHandler, vad, config: CallConfig | None = None):
        self.chats = chats
        self.vad = vad
        self.config = config or CallConfig()
        self.ended_calls: OrderedDict[str, ChunkSequence] = OrderedDict()  # session -> its last call's chunks
        atexit.register(self.remove_late_chunks)

    def accept(self, history, request: gr.Request):
        """Outside the queue: register the session's call and say where it stands in line (the
        microphone starts when the call does). Returns (pending call or None, *CallView)."""
        activity, busy, ahead = self.chats.sessions.claim(request.session_hash, CallActivity)
        if busy is not None:
            what = "A call is already running" if isinstance(busy, CallActivity) else "A reply is still running"
            return (None, *CallView(player=notice(f"{what}: stop it first.")))
        waiting = ahead - MAX_CALLS + 1  # calls have a queue of their own; their replies share the model
        line = (f"In line: {waiting} {'call' if waiting == 1 else 'calls'} before yours ({MAX_CALLS} calls run at "
                "once). The call starts when one ends." if waiting > 0 else "Connecting…")
        pending = {"history": list(history or []), "turn": activity.id}
        return (pending, *CallView(status=f"⏳ **{line}**", stats="",
                                   start=gr.update(visible=False), end=gr.update(visible=True),
                                   textbox=gr.update(interactive=False, placeholder=CALL_PLACEHOLDER)))

    def run(self, pending, voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
            use_audio_in_video, seed, pause_s, sensitivity, request: gr.Request):
        """In the queue: the call, until it ends. Holds the model: each reply is the backend's."""
        session = request.session_hash
        activity = self.chats.sessions.start(session, pending["turn"], CallActivity) if pending else None
        if activity is None:  # nothing accepted, ended (End, Clear) while it waited in line, or already running
            current = self.chats.sessions.get(session)
            if pending is None:
                yield CallView()
            elif not (isinstance(current, CallActivity) and current.id == pending["turn"]):
                yield ended_view("The call ended before it began.")._replace(chat=gr.skip())
            return
        try:
            self.chats.uploads.check(session, user_file_paths(pending["history"]))  # as a typed turn's history
            options = replace(reply_options(voice, speech, temperature, top_p, max_new_tokens, max_speech_s,
                                            use_audio_in_video, seed), cache_scope=session_scope(session))
            config = call_config(pause_s, sensitivity, self.config)
            conversation = chat_to_conversation(pending["history"], system_text(system_prompt))
            activity.call = VoiceCall(self.chats.backend, conversation, options, config, ended=activity,
                                      vad=self.vad(), save_audio=lambda samples: save_user_audio(samples, session,
                                                                                                  self.chats.uploads),
                                      save_video=lambda frames, samples: save_user_video(frames, samples, session,
                                                                                         self.chats.uploads))
            self._remember_chunks(session, activity.chunks)
            screen = CallScreen(pending["history"])
            # the model is the call's now: so is the microphone, its chunks named for this call
            yield CallView(player=control("start", activity.chunks.prefix))
            for event in activity.call.run():
                if activity.cleared:  # Clear: the emptied chat gets nothing more
                    yield ended_view("The chat was cleared.")._replace(chat=gr.skip())
                    return
                yield screen.update(event)
        except InputError as exc:
            gr.Warning(refused(exc))
            yield ended_view(public_message(exc))
        except Exception as exc:
            log.exception("the call failed")
            yield ended_view(f"The call failed: {public_message(exc)}")
        finally:
            self.chats.sessions.release(session, activity)
            activity.chunks.remove_left()

    def hear(self, path, request: gr.Request) -> None:
        """The microphone's stream: each chunk (a WAV file the call's page named) to the session's
        running call, in order. A chunk of the session's last call, come after its end, is deleted
        unread; any other path is left alone (app/files.py)."""
        if not isinstance(path, str):
            return
        session = request.session_hash
        call = self.chats.sessions.get(session)
        if not isinstance(call, CallActivity) or call.call is None or call.is_set():
            ended = self.ended_calls.get(session)
            if ended is not None and Path(path).name.startswith(ended.prefix + "-"):
                ended.remove_left()
            return
        call.chunks.take(path, call.call.feed)

    def see(self, payload, request: gr.Request):
        """The page's camera (web/voice.js): its state and frames to the session's running call, when
        they name it (frames of an ended call, or of another page, are dropped). A message over the
        call's budgets, or one no page sends, switches the camera off, with a notice; the call goes on.
        -> a player message for the page, or nothing."""
        call = self.chats.sessions.get(request.session_hash)
        if not isinstance(call, CallActivity) or call.call is None or call.is_set():
            return gr.skip()
        try:
            message = camera_message(payload, call.chunks.prefix)
            if message is not None:
                call.call.see(*message)
        except InputError as exc:
            return {**notice(refused(exc)), "camera": "off"}
        except (ValueError, TypeError, binascii.Error) as exc:
            log.warning("refused a camera message: %s", exc)
            call.call.camera.refuse("the page sent frames this server cannot read")
            return {**notice("Camera switched off: the page sent frames this server cannot read."), "camera": "off"}
        return gr.skip()

    def _remember_chunks(self, session: str, chunks: ChunkSequence) -> None:
        """The session's call's chunks: those its page posts after the call ended are still its to delete."""
        self.ended_calls[session] = chunks
        self.ended_calls.move_to_end(session)
        while len(self.ended_calls) > MAX_SESSIONS:
            self.ended_calls.popitem(last=False)

    def remove_late_chunks(self) -> None:
        """At exit: chunks the calls' pages posted after their calls ended, which Gradio never handed
        over (the microphone's last one, posted as it stops)."""
        for chunks in list(self.ended_calls.values()):
            chunks.remove_left()

    def end(self, pending, request: gr.Request) -> CallView:
        """End call (or the microphone stopped): the call `pending` names ends at its next step
        (and says so); one still in line is forgotten here. Another call of the session (a late
        event of an earlier one) is left alone."""
        if pending is None or not self.chats.sessions.stop(request.session_hash, only=pending.get("turn")):
            return CallView()  # a running call's loop says so within a step (an update here could land after its own)
        return ended_view("You left the line.")
