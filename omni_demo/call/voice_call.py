"""A voice call: the microphone streams in, turns are taken by voice activity, replies stream out,
and speaking over a reply interrupts it (barge-in).

One `VoiceCall` per call. The page's microphone handler calls `feed(rate, pcm)` for every chunk
it receives; the call's own generator, `run()`, is one loop that Gradio iterates in the queue:

    hear: the chunks that arrived → TurnDetector → SpeechStarted / SpeechPaused / SpeechResumed / TurnEnded
        SpeechStarted while a reply runs or plays → cancel it (barge-in); start listening
        SpeechPaused → an early reply starts, its events held back (the turn may be over)
        SpeechResumed → the early reply is closed, unseen: the user goes on
        TurnEnded → the user's turn; its reply is the early one, held events first, or starts now
    reply: one backend event (a text delta or an audio chunk) → yield it (early: hold it, up to its
        first audio chunk)

so a barge-in stops generation within one decode step or audio chunk of being heard (a prompt
being prefilled finishes first; ZeroGPU's worker is given up after STOP_GRACE_S). While the
user speaks, the backend listens (`Backend.listen`, omni_demo.engine.listening) where it can, or,
with the camera on, watches (`Backend.watch`: frames and sound, chunk by chunk; call.turn_listening),
and only then does a reply start early: such a backend is this process's engine, whose reply
generator closes at once when the user goes on after all. A turn spoken with the camera on is a
video with its sound (call.camera): in memory for this process's engine, a file for the chat and
for a remote backend.
No torch here: the voice activity model is given (omni_demo.call.vad), like the backend.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from omni_demo.backends.protocol import Backend
from omni_demo.config import INPUT_SAMPLE_RATE, SAMPLE_RATE, GenerationOptions
from omni_demo.errors import InputError
from omni_demo.events import AudioChunk, ContextTrimmed, Finished, TextDelta

from .camera import Camera, CameraConfig, camera_turn, save_clip
from .events import (
    CallEnded,
    PlaybackInterrupted,
    ReplyAudio,
    ReplyEnded,
    ReplyText,
    Status,
    Tick,
    Trimmed,
    TurnFailed,
    TurnLatency,
    UserTurn,
)
from .microphone import AudioClock, Microphone
from .replies import ActiveReply, EarlyReply, same_audio
from .turn_listening import TurnListening
from .turns import SpeechPaused, SpeechResumed, SpeechStarted, TurnConfig, TurnDetector, TurnEnded

log = logging.getLogger(__name__)

TICK_S = 0.2  # the loop yields at least this often, so Gradio can end it (End call, a closed page)
STATES = {  # what the call is doing, as the page says it
    "listening": "Listening… speak, then pause: the reply starts when you stop.",
    "hearing": "Hearing you…",
    "thinking": "Thinking…",
    "speaking": "Speaking… (talk to interrupt)",
}


@dataclass(frozen=True)
class CallConfig:
    turns: TurnConfig = field(default_factory=TurnConfig)
    max_call_s: float = 600.0  # a call ends after this long
    max_idle_s: float = 120.0  # ... or after this long with nobody speaking
    mic_timeout_s: float = 8.0  # no microphone audio for this long: the page is gone or the mic is off
    player_lead_s: float = 0.3  # the page's player buffers this much before it plays (web/player.js)
    camera: CameraConfig = field(default_factory=CameraConfig)  # what the page's camera may send

    def __post_init__(self):
        if min(self.max_call_s, self.max_idle_s, self.mic_timeout_s) <= 0 or self.player_lead_s < 0:
            raise ValueError(f"invalid call settings: {self}")


class VoiceCall:
    """One voice call over a `Backend`."""

    def __init__(self, backend: Backend, history: list[dict], options: GenerationOptions,
                 config: CallConfig | None = None, *, vad, ended: threading.Event | None = None, save_audio=None,
                 save_video=None):
        """`history`: the conversation before the call (Qwen messages); `vad`: a voice activity model
        of this call's own (omni_demo.call.vad.load_vad()); `ended`: set to end the call (End call,
        Stop, Clear); `save_audio(samples) -> path`: keep each user turn as a file (a backend that
        cannot listen is sent that file); `save_video(frames, samples) -> path`: a camera turn as a
        video with its sound (omni_demo.inputs.clips.write_clip); without it no camera is used."""
        self.backend = backend
        self.save_audio = save_audio
        self.save_video = save_video
        self.conversation = list(history)  # the model's view: the call's user turns are audio arrays
        self.options = options
        self.config = config or CallConfig()
        self.detector = TurnDetector(self.config.turns, vad)
        self.mic = Microphone()
        self.camera = Camera(self.config.camera)
        self.can_listen = False  # the backend listens (this process's engine): known at the first turn
        self.ended = ended or threading.Event()
        self.clock = AudioClock()  # samples fed to the detector, and when they arrived
        self.listening: TurnListening | None = None  # the backend listening to (or watching) the turn being spoken
        self.reply: ActiveReply | None = None
        self.early: EarlyReply | None = None  # at most one of reply and early is set
        self.playing_until = 0.0  # when the page's player runs out of the last reply's audio (estimate)
        self.started_at = self.last_activity = time.monotonic()
        self.state = None  # the last Status yielded

    def feed(self, rate: int, pcm: np.ndarray) -> None:
        """A microphone chunk (any rate, int or float PCM, mono or [n, channels]); thread-safe."""
        self.mic.put(rate, pcm)

    def see(self, on: bool, frames: list[tuple[float, bytes]], seq: int | None = None) -> None:
        """The page's camera, on or off, its frames since its last message ((seconds of call audio,
        JPEG) each) and that message's number: Camera.put (omni_demo.call.camera). Thread-safe."""
        self.camera.put(on, frames, seq, heard_s=self.clock.seconds)

    def end(self) -> None:
        self.ended.set()

    # -- the loop ------------------------------------------------------------------------------

    def run(self):
        """The call, as CallEvents, until it ends (End call, a limit, the microphone gone)."""
        reason = None
        try:
            while (reason := self._over()) is None:
                if (state := self._state()) != self.state:
                    self.state = state
                    yield Status(state, STATES[state])
                working = self.reply is not None or (self.early is not None and not self.early.ready)
                for chunk_at, samples in self.mic.take(wait_s=0 if working else TICK_S):
                    yield from self._hear(chunk_at, samples)
                if self.reply is not None:
                    yield from self._reply_step()
                else:
                    if self.early is not None and not self.early.ready:
                        self.early.step()
                    yield Tick()
            if self.reply is not None:  # ended with the call, not interrupted by the user
                self.reply.stop()
                self.playing_until = 0.0
                yield from self._reply_done(interrupted=False, call_ended=True)
        finally:
            self._close_reply()
        yield CallEnded(reason)

    def _state(self) -> str:
        if self.detector.speaking:
            return "hearing"
        if self.reply is not None:
            return "speaking" if self.reply.chunks else "thinking"
        return "speaking" if time.monotonic() < self.playing_until else "listening"

    def _over(self) -> str | None:
        now, config = time.monotonic(), self.config
        if self.ended.is_set():
            return "You ended the call."
        if now - self.started_at > config.max_call_s:
            return f"The call reached its time limit ({config.max_call_s / 60:g} min)."
        quiet_since = max(self.last_activity, self.playing_until)
        if self.reply is None and not self.detector.speaking and now - quiet_since > config.max_idle_s:
            return f"Nobody spoke for {config.max_idle_s:g} s: the call ended."
        if now - (self.mic.last_at or self.started_at) > config.mic_timeout_s:
            return ("No sound from the microphone: the call ended. Allow microphone access (the page must be "
                    "https or localhost)." if self.mic.last_at is None else
                    "The microphone stopped sending audio (page closed or connection lost): the call ended.")
        return None

    def _hear(self, chunk_at: float, samples: np.ndarray):
        self.clock.add(chunk_at, len(samples))
        for event in self.detector.feed(samples, playing=chunk_at < self.playing_until):  # as it was then
            if isinstance(event, SpeechStarted):
                yield from self._speech_started()
            elif isinstance(event, SpeechPaused):
                self._start_early(event)
            elif isinstance(event, SpeechResumed):
                self._drop_early()
            elif isinstance(event, TurnEnded):
                yield from self._turn_ended(event)
        if self.listening is not None and self.detector.speaking:
            self.listening.feed(self.detector.turn_audio(self.listening.fed))
        if self.detector.start is None:  # frames older than any turn to come, but for the newest
            self.camera.forget_before(self.clock.seconds - self.config.turns.pre_roll_s - 1.0)

    def _speech_started(self):
        self.last_activity = time.monotonic()
        if self.reply is not None:
            yield from self._interrupt()
        elif time.monotonic() < self.playing_until:
            self.playing_until = 0.0
            yield PlaybackInterrupted()
        audio = self.detector.turn_audio()
        start_s = self.detector.seconds(self.detector.frames) - len(audio) / INPUT_SAMPLE_RATE
        camera = self.camera if self.camera.on and self.save_video is not None else None
        listening = TurnListening.begin(self.backend, self.conversation, self.options, camera, start_s)
        self.can_listen = listening.listener is not None
        self.listening = listening if listening.listener is not None else None  # none: the turn is read whole
        if self.listening is not None:
            self.listening.feed(audio)

    def _start_early(self, turn: SpeechPaused) -> None:
        """The user paused: start the reply to the turn so far, in case the pause goes on. Only
        while listening: that backend is this process's engine, whose generator closes at once."""
        self._drop_early()  # (the detector takes a pause back before it tells another)
        messages, files = self._turn_messages(turn) if self.can_listen else (None, [])
        if messages is not None:
            cancel = threading.Event()
            self.early = EarlyReply(turn, messages, self.backend.stream(messages, self.options, cancel), cancel,
                                    files=files)

    def _drop_early(self) -> None:
        """The user went on speaking (or the call ends): the early reply is closed."""
        early, self.early = self.early, None
        if early is not None:
            early.drop()

    def _turn_ended(self, event: TurnEnded):
        now = time.monotonic()
        latency = TurnLatency(speech_end_at=self.clock.heard_at(event.end_s), decided_at=now)
        self.last_activity = now
        early, self.early = self.early, None
        if early is not None and not early.answers(event):  # the turn changed since (a max_turn_s cut)
            early.drop()
            early = None
        messages, files = (early.messages, early.files) if early is not None else self._turn_messages(event)
        if messages is not None and not files and not same_audio(messages, event):  # fed another turn's audio
            log.warning("the audio listened to is not the turn's; reading it whole")  # (one upload held both)
            messages = None
        self.listening = None
        audio = event.audio if messages is None or files else messages[-1]["content"][0]["audio"]
        path = files[0] if files else self.save_audio(audio) if self.save_audio else None
        if messages is None:  # not listened to: the turn is read whole, from its file where there is one
            messages = self.conversation + [{"role": "user", "content": [{"type": "audio", "audio": path or audio}]}]
        yield UserTurn(audio, path, event.start_s, event.end_s, video=bool(files), sound=(files[1:] or [None])[0])
        self.conversation = messages
        if early is None:
            cancel = threading.Event()
            self.reply = ActiveReply(self.backend.stream(messages, self.options, cancel), cancel, latency)
            return
        self.reply = early.promote(latency, now)
        for held in early.held_events():  # the text as one message, then its first audio chunk
            yield from self._on_event(held)
        if early.failure is not None:
            yield from self._reply_failed(early.failure)
        elif early.ended:
            yield from self._reply_done(interrupted=False)

    def _turn_messages(self, turn: SpeechPaused | TurnEnded) -> tuple[list[dict] | None, list[str]]:
        """The conversation ending in `turn` and its files: a video with its sound while the camera is
        on (watched, or its file: camera_turn), as the backend listened to it, or (None, []): read whole."""
        watched = self.listening.end_turn(turn.audio, turn.end_s) if self.listening is not None else None
        if watched is not None and self.listening.watching:  # the model reads the clip; the chat shows its file
            clip = watched[-1]["content"][0]["video"]
            path = save_clip(self.camera, self.save_video, list(clip.frames), clip.audio)
            return (watched, [path]) if path is not None else (None, [])
        made = None if self.save_video is None else camera_turn(
            self.camera, turn.end_s - len(turn.audio) / INPUT_SAMPLE_RATE, turn.end_s, turn.audio,
            self.options.use_audio_in_video, self.save_video, self.save_audio)
        return (self.conversation + [made[0]], made[1]) if made is not None else (watched, [])

    # -- the reply -----------------------------------------------------------------------------

    def _reply_step(self):
        reply = self.reply
        reply.started = True
        try:
            event = next(reply.events)
        except StopIteration:
            yield from self._reply_done(interrupted=reply.cancel.is_set())
            return
        except Exception as exc:
            yield from self._reply_failed(exc)
            return
        yield from self._on_event(event)

    def _on_event(self, event):
        reply, now = self.reply, time.monotonic()
        if isinstance(event, TextDelta):
            reply.text += event.text
            if reply.latency.first_text_at is None:
                reply.latency.first_text_at = now
            yield ReplyText(reply.text)
        elif isinstance(event, AudioChunk):
            first = not reply.chunks
            reply.chunks.append(event.samples)
            if first:
                reply.latency.first_audio_at = now
            starts = max(self.playing_until, now + (self.config.player_lead_s if first else 0.0))
            self.playing_until = starts + len(event.samples) / SAMPLE_RATE
            yield ReplyAudio(event, reply.latency if first else None)
        elif isinstance(event, ContextTrimmed):
            yield Trimmed(event)
        elif isinstance(event, Finished):
            reply.finished = event

    def _interrupt(self):
        """Barge-in: cancel the reply (within one decode step: `ActiveReply.stop`) and end it."""
        self.reply.stop()
        self.playing_until = 0.0
        yield from self._reply_done(interrupted=True)

    def _reply_done(self, interrupted: bool, call_ended: bool = False):
        reply, self.reply = self.reply, None
        reply.events.close()
        if reply.text:
            self.conversation = self.conversation + [{"role": "assistant", "content": [{"type": "text",
                                                                                        "text": reply.text}]}]
        self.last_activity = time.monotonic()
        yield ReplyEnded(reply.text, reply.chunks, reply.finished, interrupted, reply.latency, call_ended)

    def _reply_failed(self, exc: Exception):
        reply, self.reply = self.reply, None
        reply.events.close()
        self.conversation = self.conversation[:-1]  # the turn the model could not answer is not kept
        if isinstance(exc, InputError):
            yield TurnFailed(str(exc))
        else:
            log.error("a call's reply failed", exc_info=exc)
            yield TurnFailed(f"the reply failed ({type(exc).__name__}); the call goes on")

    def _close_reply(self) -> None:
        if self.reply is not None:
            self.reply.cancel.set()
            self.reply.events.close()
        self._drop_early()
        self.reply = None
