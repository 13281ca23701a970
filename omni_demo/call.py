"""A voice call: the microphone streams in, turns are taken by voice activity, replies stream out,
and speaking over a reply interrupts it (barge-in).

One `VoiceCall` per call. The page's microphone handler calls `feed(rate, pcm)` for every chunk
it receives; the call's own generator, `run()`, is one loop that Gradio iterates in the queue:

    hear: the chunks that arrived → TurnDetector → SpeechStarted / SpeechPaused / SpeechResumed / TurnEnded
        SpeechStarted while a reply runs or plays → cancel it (barge-in); start listening
        SpeechPaused → an early reply starts, its events held back (the turn may be over)
        SpeechResumed → the early reply is closed, unseen: the user goes on
        TurnEnded → the user's turn; its reply is the early one, held events first, or starts now
    reply: one engine event (a text delta or an audio chunk) → yield it (early: hold it, up to its
        first audio chunk)

so a barge-in stops generation within one decode step or audio chunk of being heard (a prompt
being prefilled finishes first; ZeroGPU's worker is given up after STOP_GRACE_S). While the
user speaks, the engine listens (`backend.listen`, omni_demo.listening) when the backend has it,
and only then does a reply start early: such a backend is this process's engine, which stops
within a decode step when the user goes on after all.
Imports no torch itself (the detector loads Silero lazily), like the UI that drives it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import soxr

from .config import INPUT_SAMPLE_RATE, SAMPLE_RATE, GenerationOptions
from .errors import InputError
from .events import AudioChunk, ContextTrimmed, Finished, TextDelta
from .turns import SpeechPaused, SpeechResumed, SpeechStarted, TurnConfig, TurnDetector, TurnEnded

log = logging.getLogger(__name__)

TICK_S = 0.2  # the loop yields at least this often, so Gradio can end it (End call, a closed page)
STATES = {  # what the call is doing, as the page says it
    "listening": "Listening… speak, then pause: the reply starts when you stop.",
    "hearing": "Hearing you…",
    "thinking": "Thinking…",
    "speaking": "Speaking… (talk to interrupt)",
}
MAX_QUEUED_S = 30.0  # microphone audio waiting for the loop beyond this is dropped (oldest first)
MIN_RATE, MAX_RATE = 8_000, 192_000  # microphone sample rates taken (Hz)
STOP_GRACE_S = 1.0  # a cancelled reply that has not ended by then is closed
MAX_CHUNK_S = 10.0  # the page sends 0.25 s chunks (more, joined, when an upload was slow)


@dataclass(frozen=True)
class CallConfig:
    turns: TurnConfig = field(default_factory=TurnConfig)
    max_call_s: float = 600.0  # a call ends after this long
    max_idle_s: float = 120.0  # ... or after this long with nobody speaking
    mic_timeout_s: float = 8.0  # no microphone audio for this long: the page is gone or the mic is off
    player_lead_s: float = 0.3  # the page's player buffers this much before it plays (web/player.js)

    def __post_init__(self):
        if min(self.max_call_s, self.max_idle_s, self.mic_timeout_s) <= 0 or self.player_lead_s < 0:
            raise ValueError(f"invalid call settings: {self}")


# -- what a call yields ------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    state: str  # a key of STATES: what the call is doing now
    text: str


@dataclass(frozen=True)
class Tick:
    """Nothing new: the loop hands control back, so that Gradio can end it."""


@dataclass(frozen=True)
class UserTurn:
    audio: np.ndarray  # float32 16 kHz: what the model hears as the user's turn
    path: str | None  # the same as a wav file, when the call was given `save_audio`
    start_s: float  # where the speech began, seconds into the call's audio
    end_s: float  # where it ended


@dataclass
class TurnLatency:
    """One turn's wait, on the server's clock (time.monotonic). The player's part is the page's."""

    speech_end_at: float  # when the user's last words reached the server (the audio's clock, mapped)
    decided_at: float  # when the pause made the end certain
    first_text_at: float | None = None  # when the call gave them out (never before decided_at)
    first_audio_at: float | None = None
    early_s: float | None = None  # begun at a SpeechPaused: how long before decided_at it began working

    def as_dict(self) -> dict:
        def since(t):
            return None if t is None else round(t - self.decided_at, 3)

        return {"vad_s": round(self.decided_at - self.speech_end_at, 3), "first_text_s": since(self.first_text_at),
                "first_audio_s": since(self.first_audio_at),
                "early_s": None if self.early_s is None else round(self.early_s, 3),
                "speech_end_to_audio_s": None if self.first_audio_at is None
                else round(self.first_audio_at - self.speech_end_at, 3)}


@dataclass(frozen=True)
class ReplyText:
    text: str  # the reply so far


@dataclass(frozen=True)
class ReplyAudio:
    chunk: AudioChunk
    latency: TurnLatency | None  # on the reply's first chunk


@dataclass(frozen=True)
class ReplyEnded:
    text: str  # what was generated (cut where it was interrupted)
    chunks: list  # float32 24 kHz chunks generated
    finished: Finished | None
    interrupted: bool
    latency: TurnLatency


@dataclass(frozen=True)
class PlaybackInterrupted:
    """The user spoke while the last reply, fully generated, was still playing."""


@dataclass(frozen=True)
class TurnFailed:
    message: str  # for the user; the call goes on


@dataclass(frozen=True)
class Trimmed:
    event: ContextTrimmed


@dataclass(frozen=True)
class CallEnded:
    reason: str



# -- the call ----------------------------------------------------------------------------------

@dataclass
class _Reply:
    events: object  # the backend's event iterator
    cancel: threading.Event
    latency: TurnLatency
    text: str = ""
    chunks: list = field(default_factory=list)
    finished: Finished | None = None
    started: bool = False  # its events were asked for (the backend began: prompt, prefill)


@dataclass
class _EarlyReply:
    """A reply begun at a SpeechPaused, before the turn's end is certain: its engine events are
    held back until TurnEnded (then they go out first) or SpeechResumed (then it is closed)."""

    turn: SpeechPaused
    messages: list[dict]  # the conversation it answers
    events: object
    cancel: threading.Event
    held: list = field(default_factory=list)  # engine events, through the first audio chunk
    began_at: float | None = None  # its first step (prompt, prefill)
    ended: bool = False  # its events ran out
    failure: Exception | None = None

    @property
    def ready(self) -> bool:
        """Nothing more to do before the turn is certain: its first audio is here, or it ended."""
        return self.ended or self.failure is not None or (bool(self.held) and isinstance(self.held[-1], AudioChunk))

    def answers(self, turn: TurnEnded) -> bool:
        return (self.turn.start_s, self.turn.end_s) == (turn.start_s, turn.end_s) and _same_audio(self.messages, turn)

    def drop(self) -> None:
        """Closed where it stands, not cancelled: nothing of a reply to words that went on is kept
        (the engine keeps a cancelled reply in its conversation cache), and one not begun never
        prefills."""
        if self.failure is not None:
            log.warning("an early reply failed before it was dropped", exc_info=self.failure)
        self.cancel.set()
        self.events.close()


class _Microphone:
    """The call's microphone audio, from the page's handler to the loop: resampled to 16 kHz
    mono float32, each chunk with the time it arrived (time.monotonic)."""

    def __init__(self):
        self.chunks: collections.deque = collections.deque()  # (arrived, samples), oldest first
        self.queued = 0  # samples waiting in `chunks`
        self.resampler = None
        self.rate = None
        self.arrived = threading.Condition()  # guards all of the above
        self.last_at: float | None = None  # arrival of the newest chunk

    def put(self, rate: int, pcm: np.ndarray) -> None:
        """Raises InputError for a chunk no microphone sends (a rate out of range, over MAX_CHUNK_S)."""
        pcm = np.asarray(pcm)
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
            raise InputError(f"microphone audio at {rate!r:.20} Hz: expected {MIN_RATE}-{MAX_RATE} Hz")
        if pcm.ndim not in (1, 2) or pcm.dtype.kind not in "iuf" or len(pcm) > MAX_CHUNK_S * rate:
            raise InputError(f"a microphone chunk must be at most {MAX_CHUNK_S:g} s of mono or multichannel PCM")
        if not len(pcm):
            return
        if pcm.dtype.kind in "iu":
            pcm = pcm.astype(np.float32) / float(np.iinfo(pcm.dtype).max)
        pcm = np.nan_to_num(pcm.astype(np.float32).reshape(len(pcm), -1).mean(axis=1), nan=0.0, posinf=0.0,
                            neginf=0.0).clip(-1, 1)  # [n] mono
        with self.arrived:
            if rate != self.rate:
                self.rate, self.resampler = rate, soxr.ResampleStream(int(rate), INPUT_SAMPLE_RATE, 1, dtype="float32")
            samples = self.resampler.resample_chunk(pcm)
            self.last_at = time.monotonic()
            while self.chunks and self.queued + len(samples) > MAX_QUEUED_S * INPUT_SAMPLE_RATE:
                self.queued -= len(self.chunks.popleft()[1])  # the loop is stuck: hear the newest
            self.chunks.append((self.last_at, samples))
            self.queued += len(samples)
            self.arrived.notify()

    def take(self, wait_s: float) -> list[tuple[float, np.ndarray]]:
        """The chunks that arrived, waiting up to `wait_s` for the first."""
        with self.arrived:
            if not self.chunks and wait_s > 0:
                self.arrived.wait(wait_s)
            taken = list(self.chunks)
            self.chunks.clear()
            self.queued = 0
        return taken


class VoiceCall:
    """One voice call over `backend` (anything with the engine's `stream`; `listen` if it can)."""

    def __init__(self, backend, history: list[dict], options: GenerationOptions, config: CallConfig | None = None, *,
                 ended: threading.Event | None = None, save_audio=None, vad=None):
        """`history`: the conversation before the call (Qwen messages); `ended`: set to end the call
        (End call, Stop, Clear); `save_audio(samples) -> path`: keep each user turn as a file (a
        backend that cannot listen is sent that file); `vad`: a Silero model of this call's own."""
        self.backend = backend
        self.save_audio = save_audio
        self.conversation = list(history)  # the model's view: the call's user turns are audio arrays
        self.options = options
        self.config = config or CallConfig()
        self.detector = TurnDetector(self.config.turns, vad)
        self.mic = _Microphone()
        self.ended = ended or threading.Event()
        self.heard = 0  # samples fed to the detector (the call's audio clock)
        self.arrivals = collections.deque(maxlen=512)  # (samples heard through a chunk, its arrival)
        self.listener = None  # the engine listening to the turn being spoken
        self.listener_fed = 0  # samples of the turn given to it
        self.reply: _Reply | None = None
        self.early: _EarlyReply | None = None  # at most one of reply and early is set
        self.playing_until = 0.0  # when the page's player runs out of the last reply's audio (estimate)
        self.started_at = self.last_activity = time.monotonic()
        self.state = None  # the last Status yielded

    def feed(self, rate: int, pcm: np.ndarray) -> None:
        """A microphone chunk (any rate, int or float PCM, mono or [n, channels]); thread-safe."""
        self.mic.put(rate, pcm)

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
                        self._early_step()
                    yield Tick()
            if self.reply is not None:
                yield from self._interrupt()
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
        self.heard += len(samples)
        self.arrivals.append((self.heard, chunk_at))
        for event in self.detector.feed(samples, playing=chunk_at < self.playing_until):  # as it was then
            if isinstance(event, SpeechStarted):
                yield from self._speech_started()
            elif isinstance(event, SpeechPaused):
                self._start_early(event)
            elif isinstance(event, SpeechResumed):
                self._drop_early()
            elif isinstance(event, TurnEnded):
                yield from self._turn_ended(event)
        if self.listener is not None and self.detector.speaking:
            self._listen(self.detector.turn_audio(self.listener_fed))

    def _speech_started(self):
        self.last_activity = time.monotonic()
        if self.reply is not None:
            yield from self._interrupt()
        elif time.monotonic() < self.playing_until:
            self.playing_until = 0.0
            yield PlaybackInterrupted()
        self.listener, self.listener_fed = None, 0
        if hasattr(self.backend, "listen"):
            try:
                self.listener = self.backend.listen(self.conversation, self.options)
            except Exception:  # listening only saves time: the turn is then read whole
                log.exception("could not listen to this turn")
        self._listen(self.detector.turn_audio())

    def _listen(self, samples: np.ndarray) -> None:
        if self.listener is None or not len(samples):
            return
        try:
            self.listener.feed_audio(samples)
            self.listener_fed += len(samples)
        except InputError as exc:  # over its audio limit: the turn is then read whole
            log.warning("stopped listening to this turn: %s", exc)
            self.listener = None
        except Exception:  # listening only saves time
            log.exception("listening failed; this turn will be read whole")
            self.listener = None

    def _start_early(self, turn: SpeechPaused) -> None:
        """The user paused: start the reply to the turn so far, in case the pause goes on. Only
        while listening: that backend is this process's engine, whose generator closes at once."""
        self._drop_early()  # (the detector takes a pause back before it tells another)
        if self.listener is None:
            return
        self._listen(turn.audio[self.listener_fed:])  # what the last chunk added before the pause
        try:
            messages = self.listener.end_turn(len(turn.audio))
        except Exception:
            log.exception("listening failed at a pause; the turn will be read whole at its end")
            return
        cancel = threading.Event()
        self.early = _EarlyReply(turn, messages, self.backend.stream(messages, self.options, cancel), cancel)

    def _early_step(self) -> None:
        early = self.early
        early.began_at = early.began_at or time.monotonic()
        try:
            early.held.append(next(early.events))
        except StopIteration:
            early.ended = True
        except Exception as exc:  # told when the turn is certain, as a reply begun then would be
            early.failure = exc

    def _drop_early(self) -> None:
        """The user went on speaking (or the call ends): the early reply is closed."""
        early, self.early = self.early, None
        if early is not None:
            early.drop()

    def _turn_ended(self, event: TurnEnded):
        now = time.monotonic()
        latency = TurnLatency(speech_end_at=self._heard_at(event.end_s), decided_at=now)
        self.last_activity = now
        early, self.early = self.early, None
        if early is not None and not early.answers(event):  # the turn changed since (a max_turn_s cut)
            early.drop()
            early = None
        messages = early.messages if early is not None else None
        if messages is None and self.listener is not None:
            self._listen(event.audio[self.listener_fed:])  # what the last chunk added before the pause
            try:  # the turn as detected: its pre-roll to the end of the speech (not the pause after it)
                messages = self.listener.end_turn(len(event.audio))
            except Exception:
                log.exception("listening failed at the end of the turn; reading it whole")
            if messages is not None and not _same_audio(messages, event):  # fed another turn's audio (one
                log.warning("the audio listened to is not the turn's; reading it whole")  # upload held both)
                messages = None
        self.listener = None
        audio = event.audio if messages is None else messages[-1]["content"][0]["audio"]
        path = self.save_audio(audio) if self.save_audio else None
        if messages is None:  # not listened to: the turn is read whole, from its file where there is one
            messages = self.conversation + [{"role": "user", "content": [{"type": "audio", "audio": path or audio}]}]
        yield UserTurn(audio, path, event.start_s, event.end_s)
        self.conversation = messages
        if early is None:
            cancel = threading.Event()
            self.reply = _Reply(self.backend.stream(messages, self.options, cancel), cancel, latency)
            return
        latency.early_s = 0.0 if early.began_at is None else now - early.began_at
        self.reply = _Reply(early.events, early.cancel, latency, started=early.began_at is not None)
        for index, held in enumerate(early.held):  # the text as one message, then its first audio chunk
            if not (isinstance(held, TextDelta) and index + 1 < len(early.held)
                    and isinstance(early.held[index + 1], TextDelta)):
                yield from self._on_event(held)
            else:
                self.reply.text += held.text
        if early.failure is not None:
            yield from self._reply_failed(early.failure)
        elif early.ended:
            yield from self._reply_done(interrupted=False)

    def _heard_at(self, at_s: float) -> float:
        """When the sample `at_s` seconds into the call's audio was heard: the arrival of the chunk
        that carried it, less the audio after it in that chunk (upload time is not counted)."""
        sample = at_s * INPUT_SAMPLE_RATE
        for heard, arrived in self.arrivals:
            if heard >= sample:
                return arrived - (heard - sample) / INPUT_SAMPLE_RATE
        return time.monotonic()

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
        """Barge-in: cancel the reply (within one decode step: `_stop`) and end it."""
        reply = self.reply
        reply.finished = _stop(reply.events, reply.cancel, reply.started) or reply.finished
        self.playing_until = 0.0
        yield from self._reply_done(interrupted=True)

    def _reply_done(self, interrupted: bool):
        reply, self.reply = self.reply, None
        reply.events.close()
        if reply.text:
            self.conversation = self.conversation + [{"role": "assistant", "content": [{"type": "text",
                                                                                        "text": reply.text}]}]
        self.last_activity = time.monotonic()
        yield ReplyEnded(reply.text, reply.chunks, reply.finished, interrupted, reply.latency)

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


def _same_audio(messages: list[dict], turn) -> bool:
    """Whether the last user turn of `messages` is `turn`'s audio, sample for sample."""
    return np.array_equal(messages[-1]["content"][0]["audio"], turn.audio)


def _stop(events, cancel: threading.Event, started: bool) -> Finished | None:
    """Cancel a reply and close it. The engine stops within one decode step and yields its
    Finished; a backend that goes on (ZeroGPU's worker) is closed after STOP_GRACE_S, and a reply
    not begun yet is closed at once."""
    cancel.set()
    finished = None
    if started:
        deadline = time.monotonic() + STOP_GRACE_S
        try:
            for event in events:
                if isinstance(event, Finished):
                    finished = event
                if time.monotonic() > deadline:
                    break
        except Exception:
            log.exception("a cancelled reply failed")
    events.close()
    return finished
