"""The voice call's page handlers: Start call (outside the queue) registers the session's call; the
call's loop (omni_demo.call, in the queue: it holds the model while it runs) starts the page's
microphone and turns the call's events into chat, player and status updates; the microphone's
stream handler hands each chunk to the session's call. A call is the session's one activity, like a
typed turn: End call, Esc and Clear end it, and typing waits for it to end.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
import soundfile as sf

from .call import (MAX_CHUNK_S, MAX_RATE, MIN_RATE, CallConfig, CallEnded, PlaybackInterrupted, ReplyAudio, ReplyEnded,
                   ReplyText, Status, Tick, Trimmed, TurnFailed, UserTurn, VoiceCall)
from .config import INPUT_SAMPLE_RATE
from .conversation import INTERRUPTED_MARK, chat_to_conversation, gradio_upload_dir, user_file_paths
from .errors import InputError
from .turns import HYSTERESIS
from .ui import (TEXTBOX_PLACEHOLDER, ChatHandler, PlayerMessages, Turn, finalize, public_message, refused,
                 reply_options, setting, system_text)

log = logging.getLogger(__name__)

STATE_ICONS = {"listening": "🟢", "hearing": "🎙️", "thinking": "💭", "speaking": "🔊"}
MIC_CHUNK_S = 0.25  # the page sends the microphone this often (stream_every)
CALL_PLACEHOLDER = "A voice call is running: just talk. End the call to type."


class CallView(NamedTuple):
    """One update of the call's outputs, by name; what is not named stays as it is."""

    chat: Any = gr.skip()
    player: Any = gr.skip()
    status: Any = gr.skip()
    stats: Any = gr.skip()
    start: Any = gr.skip()
    end: Any = gr.skip()
    textbox: Any = gr.skip()  # closed to typing while the call runs


def control(command: str) -> dict:
    """A message for the page's call controls (web/voice.js): "start" or "stop" the microphone.
    `server_time` (Unix s) sets the page's estimate of the server's clock, against which it times
    each reply's delivery (the two clocks need not agree)."""
    return {"call": command, "id": uuid.uuid4().hex[:12], "server_time": time.time()}


def status_line(state: str, text: str) -> str:
    return f"{STATE_ICONS.get(state, '📞')} **{text}**"


def ended_view(reason: str) -> CallView:
    return CallView(player=control("stop"), status=f"📴 **Call ended.** {reason}", start=gr.update(visible=True),
                    end=gr.update(visible=False), textbox=gr.update(interactive=True, placeholder=TEXTBOX_PLACEHOLDER))


def save_user_audio(samples: np.ndarray, session: str, uploads) -> str:
    """A spoken turn as a 16-bit wav among Gradio's uploads (its cache keeps it a day, as it keeps
    uploads), owned by the session: a typed turn after the call may send it again as history."""
    folder = gradio_upload_dir() / "omni-calls" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    path = folder / f"you-{time.strftime('%Y%m%d-%H%M%S')}.wav"
    sf.write(path, samples, INPUT_SAMPLE_RATE, subtype="PCM_16")
    uploads.add(session, [str(path)])
    return str(path)


def call_config(pause_s, sensitivity, base: CallConfig) -> CallConfig:
    """The call settings as a CallConfig. Sensitivity is 1 - the VAD's speech threshold."""
    pause_s, sensitivity = setting("call_pause", pause_s), setting("call_sensitivity", sensitivity)
    threshold = max(1.0 - sensitivity, HYSTERESIS + 0.05)
    turns = replace(base.turns, pause_s=pause_s, threshold=threshold,
                    playing_threshold=max(base.turns.playing_threshold, threshold))
    return replace(base, turns=turns)


def read_chunk(path) -> tuple[int, np.ndarray] | None:
    """A microphone chunk the page uploaded (a short WAV), checked from its header before it is
    read, then deleted (a call uploads four a second). None for anything else."""
    path = Path(path)
    if not path.resolve().is_relative_to(gradio_upload_dir()):
        return None
    try:
        info = sf.info(path)
        if (info.format != "WAV" or not 1 <= info.channels <= 2 or not MIN_RATE <= info.samplerate <= MAX_RATE
                or info.frames > MAX_CHUNK_S * info.samplerate):
            log.warning("microphone chunk refused: %s, %d Hz, %d channels, %d frames", info.format,
                        info.samplerate, info.channels, info.frames)
            return None
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        return rate, samples
    except (OSError, RuntimeError, ValueError) as exc:  # not a WAV soundfile can read
        log.warning("microphone chunk refused: %s", type(exc).__name__)
        return None
    finally:
        path.unlink(missing_ok=True)


class CallTurn(Turn):
    """A session's voice call as its end flag (End call, Stop and Clear set it)."""

    busy_text = "A voice call is running: end it to send a typed message. Your message is kept."

    def __init__(self):
        super().__init__()
        self.call: VoiceCall | None = None


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
            self.chat = self.chat + [{"role": "user", "content": {"path": event.path}}]
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
            gr.Warning(f"The conversation is over this server's budgets ({event.event.limit_tokens} tokens, media "
                       f"per conversation): its oldest {event.event.dropped_turns} turn(s) were left out.")
            return CallView()
        if isinstance(event, CallEnded):
            return ended_view(event.reason)
        raise TypeError(f"unknown call event {event!r}")

    def _reply_ended(self, event: ReplyEnded) -> CallView:
        self.chat = finalize(self.chat, event.text, event.chunks, stopped=False)
        self.replied = bool(event.text)
        if event.interrupted:
            self._mark_interrupted()
        state = ("interrupted", "Interrupted.") if event.interrupted else ("done", "Done.")
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
    """The call handlers, sharing the chat handler's sessions (one activity per session)."""

    def __init__(self, chats: ChatHandler, config: CallConfig | None = None):
        self.chats = chats
        self.config = config or CallConfig()

    def accept(self, history, request: gr.Request):
        """Outside the queue: register the session's call and say where it stands in line (the
        microphone starts when the call does). Returns (pending call or None, *CallView)."""
        session = request.session_hash
        with self.chats.lock:
            busy, ahead = self.chats.turns.get(session), len(self.chats.turns)
            if busy is None:
                turn = self.chats.turns[session] = CallTurn()
        if busy is not None:
            what = "A call is already running" if isinstance(busy, CallTurn) else "A reply is still running"
            return (None, *CallView(player={"notice": f"{what}: stop it first.", "id": uuid.uuid4().hex[:12]}))
        line = (f"In line: {ahead} {'reply or call' if ahead == 1 else 'replies or calls'} before yours. "
                "The call starts when the model is free." if ahead else "Connecting…")
        pending = {"history": list(history or []), "turn": turn.id}
        return (pending, *CallView(status=f"⏳ **{line}**", stats="",
                                   start=gr.update(visible=False), end=gr.update(visible=True),
                                   textbox=gr.update(interactive=False, placeholder=CALL_PLACEHOLDER)))

    def run(self, pending, voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
            use_audio_in_video, seed, pause_s, sensitivity, request: gr.Request):
        """In the queue: the call, until it ends. Holds the model: each reply is the engine's."""
        if pending is None:
            yield CallView()
            return
        session = request.session_hash
        with self.chats.lock:  # claimed once: a second run of the same call is refused
            turn = self.chats.turns.get(session)
            claimed = isinstance(turn, CallTurn) and turn.id == pending["turn"] and not turn.started
            if claimed:
                turn.started = True
        if not claimed:  # ended (End, Clear) while it waited in line, or already running
            if not (isinstance(turn, CallTurn) and turn.id == pending["turn"]):
                yield ended_view("The call ended before it began.")._replace(chat=gr.skip())
            return
        try:
            self.chats.uploads.check(session, user_file_paths(pending["history"]))  # as a typed turn's history
            options = reply_options(voice, speech, temperature, top_p, max_new_tokens, max_speech_s,
                                    use_audio_in_video, seed)
            config = call_config(pause_s, sensitivity, self.config)
            conversation = chat_to_conversation(pending["history"], system_text(system_prompt))
            turn.call = VoiceCall(self.chats.backend, conversation, options, config, ended=turn,
                                  save_audio=lambda samples: save_user_audio(samples, session, self.chats.uploads))
            screen = CallScreen(pending["history"])
            yield CallView(player=control("start"))  # the model is the call's now: so is the microphone
            for event in turn.call.run():
                if turn.cleared:  # Clear: the emptied chat gets nothing more
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
            self.chats.release(session, turn)

    def hear(self, path, request: gr.Request) -> None:
        """The microphone's stream: each chunk (a WAV file) to the session's running call; dropped,
        unread, when there is none."""
        turn = self.chats.turns.get(request.session_hash)
        if not isinstance(path, str) or not isinstance(turn, CallTurn) or turn.call is None or turn.is_set():
            if isinstance(path, str) and Path(path).resolve().is_relative_to(gradio_upload_dir()):
                Path(path).unlink(missing_ok=True)
            return
        chunk = read_chunk(path)
        if chunk is not None:
            turn.call.feed(*chunk)

    def end(self, pending, request: gr.Request) -> CallView:
        """End call (or the microphone stopped): the call `pending` names ends at its next step
        (and says so); one still in line is forgotten here. Another call of the session (a late
        event of an earlier one) is left alone."""
        with self.chats.lock:
            turn = self.chats.turns.get(request.session_hash)
            if not isinstance(turn, CallTurn) or pending is None or turn.id != pending.get("turn"):
                return CallView()
            turn.set()
            if turn.started:  # its loop says so within a step (an update here could land after its own)
                return CallView()
            del self.chats.turns[request.session_hash]
        return ended_view("You left the line.")
