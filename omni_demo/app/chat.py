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
from contextlib import closing
from dataclasses import replace
from typing import Any, NamedTuple

import gradio as gr

from omni_demo.backends.protocol import Backend
from omni_demo.config import STOP_GRACE_S
from omni_demo.errors import InputError
from omni_demo.events import Admitted, AudioChunk, ContextTrimmed, Finished, TextDelta, Waiting
from omni_demo.inputs.messages import check_request

from .chat_history import UploadRegistry, chat_to_conversation, media_summary, new_upload_paths, user_turn
from .notices import failure_message, notice, public_message, refused, trimmed_text
from .player import NOT_SENT, PlayerMessages, finalize, player_stopped
from .sessions import Activity, Sessions, queue_text, session_scope, waiting_text
from .settings import reply_options, system_text

log = logging.getLogger(__name__)


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
            return (gr.update(value=pending["message"], submit_btn="Send", stop_btn=False), pending["history"],
                    pending["webcam"], player_stopped(pending["reply"]))
        self.sessions.stop(request.session_hash)
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def stream(self, message, history, webcam, settings: tuple, session: str, cancel: Activity,
               player: PlayerMessages):
        """One reply as ChatView updates; raises InputError for a message it cannot send (the request's
        own checks run before the first update; the backend's budgets after it)."""
        history = list(history or [])
        self.uploads.accept_turn(session, new_upload_paths(message, webcam), history)
        chat = history + user_turn(message, webcam)
        voice, speech, system_prompt, *numbers = settings
        conversation = chat_to_conversation(chat, system_text(system_prompt))
        check_request(conversation, self.backend.limits)
        options = replace(reply_options(voice, speech, *numbers), cache_scope=session_scope(session))
        yield ChatView(textbox=None, chat=chat, webcam=None, audio=player("thinking", "Thinking…"), stats="")
        reply = _Streamed()
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
        activity, busy, ahead = self.sessions.claim(request.session_hash)
        if busy is not None:
            return (None, *ChatView(audio=notice(busy.busy_text)))
        player = PlayerMessages()
        pending = {"message": message, "history": history, "webcam": webcam, "reply": player.id, "turn": activity.id}
        return (pending, *ChatView(textbox=gr.update(value=None, submit_btn=False, stop_btn="Stop"),
                                   chat=history + shown, webcam=None, audio=player("queued", self.line_text(ahead)),
                                   stats=""))

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
            if cancel.unsent:  # Stop came before the reply began: the message goes back where it was
                send_again = gr.update(value=pending["message"], submit_btn="Send", stop_btn=False)
            yield ChatView(textbox=send_again, webcam=pending["webcam"] if cancel.unsent else gr.skip())
        except InputError as exc:
            message = refused(exc)
            gr.Warning(message)
            yield ChatView(textbox=gr.update(value=pending["message"], submit_btn="Send", stop_btn=False),
                           chat=history, webcam=pending["webcam"], audio=player("error", f"Not sent: {message}"))
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


class _Streamed:
    """What one reply streamed so far: its text, its audio chunks, its Finished."""

    def __init__(self):
        self.text, self.chunks, self.finished = "", [], None

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
                self.chunks.append(event.samples)
                yield ChatView(audio=player("speaking", "Speaking…", event.pcm16()))
            elif isinstance(event, ContextTrimmed):
                gr.Warning(trimmed_text(event))
            elif isinstance(event, Waiting):
                yield ChatView(audio=player("queued", waiting_text(event)))
            elif isinstance(event, Admitted):
                yield ChatView(audio=player("thinking", "Thinking…"))
            elif isinstance(event, Finished):
                self.finished = event
