"""The typed chat's handlers. A turn from the page is two steps: `ChatHandler.accept` (outside the
queue) refuses an empty message with a toast and shows the user's turn at once; `respond_ui` (in
the queue) streams the reply. `/chat` (`respond`) is the same reply as one API call.

Speech goes to the page's Web Audio player (web/player.js) as 16-bit PCM, one message per chunk;
Stop sets the session's activity, so the reply ends through the backend and is finalized
("stopped", partial audio kept). Errors are toasts or chat messages, never Gradio's red error state.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import gradio as gr

from omni_demo.backends.protocol import Backend
from omni_demo.config import SAMPLE_RATE, STOP_GRACE_S
from omni_demo.errors import InputError
from omni_demo.events import Admitted, AudioChunk, ContextTrimmed, Finished, TextDelta, Waiting
from omni_demo.inputs.messages import check_request

from .chat_history import UploadRegistry, _parts, chat_to_conversation, media_summary, new_upload_paths, user_turn
from .export import export_conversation
from .notices import failure_message, notice, public_message, refused, trimmed_text
from .player import NOT_SENT, PlayerMessages, finalize, player_stopped
from .saved import seal, unseal
from .sessions import Activity, Sessions, queue_text, session_scope, waiting_text
from .settings import reply_options, system_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resend:
    """A user turn already in the chat, sent again: Regenerate (the chat's retry button), or a user
    message edited in place. What follows the turn in the chat is dropped."""

    turn: tuple  # the turn's chat messages (its files, then its text)


def back_in_box(message):
    """What goes back into the message box when a turn is not sent: a typed message; nothing for a resent one."""
    return None if isinstance(message, Resend) else message


def resend_split(chat: list[dict], index: int, text: str | None = None) -> tuple[list[dict], Resend]:
    """(the chat before the user turn holding message `index`, that turn), with message `index`'s
    text replaced by `text` when given. An index on a reply means the user turn before it."""
    while index >= 0 and chat[index]["role"] != "user":
        index -= 1
    if index < 0:
        raise InputError("There is no message of yours to send again.")
    start, end = index, index + 1
    while start > 0 and chat[start - 1]["role"] == "user":
        start -= 1
    while end < len(chat) and chat[end]["role"] == "user":
        end += 1
    turn = [dict(message) for message in chat[start:end]]
    if text is not None:
        if not text.strip():
            raise InputError("An edited message cannot be empty.")
        if not message_text(turn[index - start]):
            raise InputError("Only typed text can be edited; send files again as a new message.")
        turn[index - start] = {"role": "user", "content": [{"type": "text", "text": text.strip()}]}
    return chat[:start], Resend(tuple(turn))


def message_text(message: dict) -> str | None:
    """A chat message's text (its text parts joined), or None when it has none (a file)."""
    texts = [part.get("text", "") for part in _parts(message) if part.get("type") == "text"]
    return " ".join(texts) if texts else None


def edited_text(value) -> str:
    """gr.EditData's new value: a string, or the message's parts."""
    return value if isinstance(value, str) else message_text({"content": value}) or ""


class ChatView(NamedTuple):
    """One update of the chat handlers' outputs, by name; what is not named stays as it is."""

    textbox: Any = gr.skip()
    chat: Any = gr.skip()
    webcam: Any = gr.skip()
    audio: Any = gr.skip()  # the live player's message: PlayerMessages(...)
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
    return "Server: " + " · ".join(cells)


class ChatHandler:
    """The reply handlers, bound to a backend, the upload registry and the sessions' activities."""

    def __init__(self, backend: Backend, uploads: UploadRegistry | None = None, sessions: Sessions | None = None,
                 reply_limit: int | None = None):
        self.backend = backend
        self.reply_limit = reply_limit  # typed replies Gradio's queue runs at once; None: unknown
        self.pace = Pace()  # how far ahead the page buffers speech
        self.uploads = uploads or UploadRegistry()
        self.sessions = sessions or Sessions()

    def stop(self, request: gr.Request, clear: bool = False):
        """Stop this session's activity: a reply ends within one decode step and is finalized (or,
        after Clear, dropped); one still in line is forgotten at once. -> the Send button."""
        if self.sessions.stop(request.session_hash, clear=clear):
            return gr.update(submit_btn="Send", stop_btn=False)
        return gr.skip()

    def stop_ui(self, pending, request: gr.Request):
        """Stop on the page: a turn still in Gradio's queue is forgotten and put back as it was (the
        chat before it, the message in the box); a running one ends through its handler."""
        if pending is not None and self.sessions.stop(request.session_hash, only=pending["turn"]):
            return (gr.update(value=back_in_box(pending["message"]), submit_btn="Send", stop_btn=False),
                    pending["before"], pending["webcam"], player_stopped(pending["reply"]))
        self.sessions.stop(request.session_hash)
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def stream(self, message, history, webcam, settings: tuple, session: str, cancel: Activity,
               player: PlayerMessages):
        """One reply as ChatView updates; raises InputError for a message it cannot send (the request's
        own checks run before the first update; the backend's budgets after it)."""
        history = list(history or [])
        if isinstance(message, Resend):  # its files are already this session's
            self.uploads.accept_turn(session, [], history + list(message.turn))
            chat = history + list(message.turn)
        else:
            self.uploads.accept_turn(session, new_upload_paths(message, webcam), history)
            chat = history + user_turn(message, webcam)
        voice, speech, system_prompt, *numbers = settings
        conversation = chat_to_conversation(chat, system_text(system_prompt))
        check_request(conversation, self.backend.limits)
        options = replace(reply_options(voice, speech, *numbers), cache_scope=session_scope(session))
        yield ChatView(textbox=None, chat=chat, webcam=None, audio=player("thinking", "Thinking…"), stats="")
        reply = _Streamed(self.pace)
        if not cancel.is_set():  # Stop may come while the turn still waits in the queue
            with closing(self.backend.stream(conversation, options, cancel)) as events:
                for update in reply.follow(events, cancel, chat, player):
                    if cancel.cleared:
                        return
                    yield update
        if cancel.cleared:
            return
        stopped = cancel.is_set() or (reply.finished is not None and reply.finished.stop_reason == "cancelled")
        if stopped and not (reply.text or reply.chunks):  # stopped while it waited: as if never sent
            cancel.unsent = True
            yield ChatView(chat=history, stats="", audio=player("stopped", NOT_SENT))
            return
        stats = (format_stats(reply.finished, conversation) if reply.finished else
                 "Stopped." if reply.text or reply.chunks else "Stopped before the reply started.")
        self.sessions.release(session, cancel)  # free before the page shows the end: Send or Retry at once is taken
        yield ChatView(chat=finalize(chat, reply.text, reply.chunks, stopped), stats=stats,
                       audio=player("stopped", "Stopped.") if stopped else player("done", "Done."))

    def respond(self, message, history, webcam, voice, speech, system_prompt, temperature, top_p, max_new_tokens,
                max_speech_s, use_audio_in_video, seed, request: gr.Request):
        """`/chat`: send one user turn; stream the reply. Errors end the call (API clients see them)."""
        settings = (voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                    use_audio_in_video, seed)
        cancel = self.sessions.begin(request.session_hash)
        shown = None  # the chat as last shown; None while nothing was
        try:
            for update in self.stream(message, history, webcam, settings, request.session_hash, cancel,
                                      PlayerMessages()):
                shown = update.chat if isinstance(update.chat, list) else shown
                yield update
        except InputError as exc:
            if shown is not None:  # nothing is lost: the chat as before, the message back in the box
                yield ChatView(textbox=message, chat=list(history or []), webcam=webcam, stats="")
            raise gr.Error(refused(exc), print_exception=False) from exc
        except Exception as exc:
            log.exception("reply failed")
            yield ChatView(chat=(shown or list(history or [])) + [failure_message(exc)], stats="")
            raise gr.Error(f"The reply failed ({type(exc).__name__}: {public_message(exc)}). "
                           "The chat is kept; try again.", print_exception=False) from exc
        finally:
            self.sessions.release(request.session_hash, cancel)

    def accept(self, message, history, webcam, request: gr.Request):
        """Outside the queue (a queued step costs ~0.3-0.6 s before the reply's own): refuse gently
        what cannot be sent, with a notice; else show the user's turn at once and swap Send for
        Stop. Returns (pending turn or None, *ChatView)."""
        history = list(history or [])
        try:
            shown = user_turn(message, webcam)
        except InputError as exc:
            return (None, *ChatView(audio=notice(public_message(exc))))
        return self._claim(message, history, history, shown, webcam, request,
                           textbox=gr.update(value=None, submit_btn=False, stop_btn="Stop"))

    def restore(self, saved, request: gr.Request):
        """Page load: the conversation this browser kept (app/saved.py), its files the new session's."""
        return unseal(saved, request.session_hash, self.uploads)

    @staticmethod
    def keep(chat):
        """After each turn, Clear and a call: what the page stores for a reload."""
        return seal(chat)

    def export(self, chat, request: gr.Request):
        """Export: the conversation as a zip to download (app/export.py), or a notice why not."""
        try:
            path = export_conversation(list(chat or []), request.session_hash, self.uploads)
        except InputError as exc:
            return gr.update(visible=False), notice(public_message(exc))
        return gr.update(value=path, visible=True), gr.skip()

    def retry(self, chat, data: gr.RetryData, request: gr.Request):
        """The chat's retry button on the last reply: its user turn again, the reply after it dropped."""
        return self._resend(chat, data.index, None, request)

    def edit(self, chat, data: gr.EditData, request: gr.Request):
        """A user message edited in place: that turn, edited, sent again; the chat after it dropped."""
        return self._resend(chat, data.index, edited_text(data.value), request)

    def _resend(self, chat, index, text: str | None, request: gr.Request):
        chat = list(chat or [])
        try:
            history, resend = resend_split(chat, index if isinstance(index, int) else index[0], text)
        except InputError as exc:
            return (None, *ChatView(chat=chat, audio=notice(public_message(exc))))
        return self._claim(resend, history, chat, list(resend.turn), None, request,
                           textbox=gr.update(submit_btn=False, stop_btn="Stop"))  # what is being typed stays

    def _claim(self, message, history, before, shown, webcam, request: gr.Request, textbox):
        """Claim the session's one activity for a turn and show it: (pending or None, *ChatView).
        `before`: the chat as it was, put back if the turn is not sent."""
        activity, busy, ahead = self.sessions.claim(request.session_hash)
        if busy is not None:
            return (None, *ChatView(chat=before, audio=notice(busy.busy_text)))
        player = PlayerMessages()
        pending = {"message": message, "history": history, "before": before, "webcam": webcam, "reply": player.id,
                   "turn": activity.id}
        return (pending, *ChatView(textbox=textbox, chat=history + shown, webcam=None if webcam is not None else
                                   gr.skip(), audio=player("queued", self.line_text(ahead)), stats=""))

    def line_text(self, ahead: int) -> str:
        """Where a new turn stands with `ahead` typed replies registered before it: past Gradio's
        concurrency limit it waits in Gradio's queue (the engine's own line speaks for itself later)."""
        limit = self.reply_limit
        if not limit or ahead < limit:
            return "Sending…"
        estimate = getattr(self.backend, "wait_estimate", lambda ahead: None)(ahead - limit)
        return queue_text(ahead - limit + 1, limit, estimate)

    def respond_ui(self, pending, voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                   use_audio_in_video, seed, request: gr.Request):
        """In the queue: stream the accepted turn. Errors become a toast plus the player's error
        state (bad input: the message goes back to the box) or a message in the chat."""
        session = request.session_hash
        cancel = self.sessions.start(session, pending["turn"]) if pending is not None else None
        if cancel is None:  # nothing accepted, or Stop or Clear came while it waited: the page has its
            yield ChatView()  # Send button back already, and may have sent the next turn since
            return
        settings = (voice, speech, system_prompt, temperature, top_p, max_new_tokens, max_speech_s,
                    use_audio_in_video, seed)
        history = pending["history"]
        player, send_again = PlayerMessages(pending["reply"], seq=1), gr.update(submit_btn="Send", stop_btn=False)
        shown = history
        try:
            for update in self.stream(pending["message"], history, pending["webcam"], settings, session, cancel,
                                      player):
                shown = update.chat if isinstance(update.chat, list) else shown
                yield update._replace(textbox=gr.skip(), webcam=gr.skip())  # the user may be typing the next one
            if cancel.unsent:  # Stop came before the reply began: the chat and the message go back as they were
                send_again = gr.update(value=back_in_box(pending["message"]), submit_btn="Send", stop_btn=False)
                yield ChatView(chat=pending["before"])
            yield ChatView(textbox=send_again, webcam=pending["webcam"] if cancel.unsent else gr.skip())
        except InputError as exc:
            message = refused(exc)
            gr.Warning(message)
            textbox = gr.update(value=back_in_box(pending["message"]), submit_btn="Send", stop_btn=False)
            yield ChatView(textbox=textbox, chat=pending["before"], webcam=pending["webcam"],
                           audio=player("error", f"Not sent: {message}"))
        except Exception as exc:
            log.exception("reply failed")
            gr.Warning(f"The reply failed: {public_message(exc)}. The chat is kept; try again.")
            yield ChatView(textbox=send_again, chat=shown + [failure_message(exc)],
                           audio=player("error", "The reply failed."))
        finally:
            self.sessions.release(session, cancel)

    def clear(self, request: gr.Request):
        self.stop(request, clear=True)
        return ChatView(textbox=gr.update(value=None, submit_btn="Send", stop_btn=False), chat=[], webcam=None,
                        audio=None, stats="")

    def page_closed(self, request: gr.Request) -> None:
        """Gradio's unload: the session's page was closed or reloaded (its heartbeat connection
        closed). A turn still in line is forgotten at once (Gradio drops its queued event without
        calling it), so that it no longer counts in other users' "In line"; a running reply or call
        stops as with Stop, its reply kept (for a page whose connection only dropped)."""
        self.stop(request)


class Pace:
    """How far ahead the player must buffer, from this server's recent replies: the most any of them
    needed (each chunk's lateness against playing everything before it from the first chunk, as the
    handler received them), plus a margin for the network. The page starts a reply's speech that far
    ahead; it also learns from what it receives itself (web/player.js)."""

    MARGIN_S, RECENT = 0.25, 5

    def __init__(self):
        self.needed: deque[float] = deque(maxlen=self.RECENT)

    def lead_s(self) -> float | None:
        return max(self.needed) + self.MARGIN_S if self.needed else None


class _Streamed:
    """What one reply streamed so far: its text, its audio chunks, its Finished, and how late its
    chunks came against playing them from the first one (`needed`, seconds)."""

    def __init__(self, pace: Pace | None = None):
        self.text, self.chunks, self.finished = "", [], None
        self.pace, self.first_at, self.audio_s, self.needed = pace, None, 0.0, 0.0

    def follow(self, events, cancel: Activity, chat: list[dict], player: PlayerMessages):
        """The backend's events as ChatView updates. After Stop only the Finished is waited for, and
        for at most STOP_GRACE_S (a backend that ignores `cancel`, ZeroGPU's worker, ends here)."""
        stop_seen = None
        for event in events:
            if cancel.is_set() and not isinstance(event, Finished):
                stop_seen = stop_seen or time.monotonic()
                if time.monotonic() - stop_seen > STOP_GRACE_S:
                    return
                continue
            if isinstance(event, TextDelta):
                self.text += event.text
                yield ChatView(chat=chat + [{"role": "assistant", "content": self.text}])
            elif isinstance(event, AudioChunk):
                yield ChatView(audio=self._audio(event, player))
            elif isinstance(event, ContextTrimmed):
                gr.Warning(trimmed_text(event))
            elif isinstance(event, Waiting):
                yield ChatView(audio=player("queued", waiting_text(event)))
            elif isinstance(event, Admitted):
                yield ChatView(audio=player("thinking", "Thinking…"))
            elif isinstance(event, Finished):
                self.finished = event
        if self.pace is not None and self.audio_s >= 1.0 and not cancel.is_set():
            self.pace.needed.append(self.needed)

    def _audio(self, event: AudioChunk, player: PlayerMessages) -> dict:
        now = time.monotonic()
        message = player("speaking", "Speaking…", event.pcm16())
        if self.first_at is None:
            self.first_at = now
            if self.pace is not None and (lead := self.pace.lead_s()) is not None:
                message["lead_s"] = round(lead, 2)
        self.needed = max(self.needed, now - self.first_at - self.audio_s)
        self.audio_s += len(event.samples) / SAMPLE_RATE
        self.chunks.append(event.samples)
        return message
