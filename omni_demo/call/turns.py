"""Turn-taking by voice activity, for a voice call: Silero VAD over the microphone's stream says
when the user starts to speak (a barge-in, while a reply plays) and when a turn ends (a pause).

    detector = TurnDetector(TurnConfig(pause_s=0.6), load_vad())   # omni_demo.call.vad
    for pcm in microphone:                       # float32 mono at 16 kHz, any chunk size
        for event in detector.feed(pcm, playing=reply_is_playing):
            ...                                  # SpeechStarted, then TurnEnded with the turn's audio

The model decides on 32 ms frames (512 samples). Speech starts once the frames over `threshold`
add up to `min_speech_s` with no pause between them, so a click or a cough is no turn; it ends
after `pause_s` under the lower threshold (hysteresis, as Silero's own iterator has). Sooner,
after `early_reply_s`, SpeechPaused says the turn may be over and carries its audio, so that a
reply can start before the pause is certain; SpeechResumed takes that back if the user goes on.
While the assistant's voice plays, `playing_threshold` applies instead: the browser's echo cancellation
removes most of the assistant's voice from the microphone, and what leaks through must be clear
speech to interrupt. Times are seconds of audio fed, so a test knows exactly what to expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from omni_demo.config import INPUT_SAMPLE_RATE

FRAME = 512  # samples per VAD decision (32 ms): the frame Silero's 16 kHz model takes
HYSTERESIS = 0.15  # speech ends under `threshold - HYSTERESIS`, not under `threshold`


@dataclass(frozen=True)
class TurnConfig:
    pause_s: float = 0.6  # silence that ends a turn
    threshold: float = 0.5  # speech probability that counts as speech (lower: softer voices count)
    min_speech_s: float = 0.25  # speech shorter than this is no turn (clicks, coughs, a door)
    playing_threshold: float = 0.8  # while the assistant's voice plays
    pre_roll_s: float = 0.3  # audio kept from before the detected start: onsets are soft
    early_reply_s: float | None = 0.2  # silence after which SpeechPaused comes (None, or >= pause_s: never)
    max_turn_s: float = 60.0  # a turn this long ends here, pause or not

    def __post_init__(self):
        for name in ("threshold", "playing_threshold"):
            if not HYSTERESIS < getattr(self, name) < 1:
                raise ValueError(f"{name} must be between {HYSTERESIS} and 1, not {getattr(self, name)}")
        if (self.pause_s < FRAME / INPUT_SAMPLE_RATE or self.min_speech_s < 0 or self.pre_roll_s < 0
                or self.max_turn_s <= self.min_speech_s
                or (self.early_reply_s is not None and self.early_reply_s < FRAME / INPUT_SAMPLE_RATE)):
            raise ValueError(f"invalid turn settings: {self}")


@dataclass(frozen=True)
class SpeechStarted:
    start_s: float  # where the speech began (its first frame over the threshold)
    decided_s: float  # when that was certain: min_speech_s of speech later


@dataclass(frozen=True)
class SpeechPaused:
    """`early_reply_s` of silence: the turn may be over. If no SpeechResumed follows, the
    TurnEnded to come has this start, end and audio."""

    start_s: float
    end_s: float  # the end of the last frame of speech
    decided_s: float  # end_s + early_reply_s
    audio: np.ndarray  # float32 16 kHz: pre_roll_s before start_s to end_s


@dataclass(frozen=True)
class SpeechResumed:
    """Speech again after a SpeechPaused, before the pause ended the turn: the turn goes on."""

    at_s: float


@dataclass(frozen=True)
class TurnEnded:
    start_s: float
    end_s: float  # the end of the last frame of speech
    decided_s: float  # when the pause made it certain (end_s + pause_s, or max_turn_s)
    audio: np.ndarray  # float32 16 kHz: pre_roll_s before start_s to end_s


class TurnDetector:
    """One microphone stream's turns. Not thread-safe: one caller feeds it."""

    def __init__(self, config: TurnConfig, vad):
        """`vad`: this detector's own voice activity model (it keeps the stream's state inside):
        `vad(frame)` -> speech probability of FRAME samples, `vad.reset()` (omni_demo.call.vad)."""
        self.config = config
        self.vad = vad
        self.vad.reset()
        self.pending = np.zeros(0, np.float32)  # samples not yet a whole frame
        self.frames = 0  # frames decided so far
        self.audio: list[np.ndarray] = []  # frames kept: the pre-roll while idle, the turn while speaking
        self.audio_start = 0  # frame index of audio[0]
        self.start: int | None = None  # first frame of the speech being heard
        self.voiced = 0  # frames over the threshold since `start`
        self.last_voiced = 0  # last frame over the lower threshold
        self.speaking = False  # SpeechStarted was emitted and TurnEnded not yet
        self.paused = False  # SpeechPaused was emitted and neither SpeechResumed nor TurnEnded yet
        self.sent = -1  # last frame of the last turn: a turn cut at max_turn_s does not repeat it

    @staticmethod
    def seconds(frames: int) -> float:
        return frames * FRAME / INPUT_SAMPLE_RATE

    def feed(self, pcm: np.ndarray, playing: bool = False) -> list[SpeechStarted | SpeechPaused | SpeechResumed
                                                                      | TurnEnded]:
        """Samples in; the events they decide out."""
        self.pending = np.concatenate([self.pending, np.asarray(pcm, np.float32).reshape(-1)])
        whole = len(self.pending) // FRAME * FRAME
        chunk, self.pending = self.pending[:whole], self.pending[whole:]
        events = []
        for frame in chunk.reshape(-1, FRAME):
            events += self._decide(frame, self.vad(frame), playing)
        return events

    def _decide(self, frame: np.ndarray, probability: float, playing: bool) -> list:
        config, index = self.config, self.frames
        self.frames += 1
        self.audio.append(frame)
        threshold = config.playing_threshold if playing else config.threshold
        pause = round(config.pause_s * INPUT_SAMPLE_RATE / FRAME)
        if probability >= threshold:
            if self.start is None:
                self.start, self.voiced = index, 0
            self.voiced += 1
            self.last_voiced = index
        elif probability >= threshold - HYSTERESIS and self.start is not None:
            self.last_voiced = index  # still speech, not enough to begin it
        events: list = []
        if self.start is not None and not self.speaking:
            if self.voiced * FRAME / INPUT_SAMPLE_RATE >= config.min_speech_s:
                self.speaking = True
                events.append(SpeechStarted(self.seconds(self.start), self.seconds(index + 1)))
            elif index - self.last_voiced >= pause:  # too short to be a turn: forget it
                self.start = None
        if self.speaking:
            silent = index - self.last_voiced
            if self.paused and silent == 0:
                self.paused = False
                events.append(SpeechResumed(self.seconds(index)))
            if silent >= pause or self.seconds(index + 1 - self.start) >= config.max_turn_s:
                events.append(self._end_turn(index))
            elif config.early_reply_s is not None and not self.paused and silent == round(
                    config.early_reply_s * INPUT_SAMPLE_RATE / FRAME):
                self.paused = True
                events.append(SpeechPaused(self.seconds(self.start), self.seconds(self.last_voiced + 1),
                                           self.seconds(index + 1), self._turn_audio_to(self.last_voiced)))
        self._trim()
        return events

    def turn_audio(self, since: int = 0) -> np.ndarray:
        """While a turn is heard (after SpeechStarted): its audio so far, from its pre-roll to the
        last frame decided, from sample `since` of it on (a multiple of FRAME): what a listener
        is fed while the user speaks."""
        if not self.speaking:
            return np.zeros(0, np.float32)
        frames = self.audio[self._turn_first() + since // FRAME - self.audio_start:]
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def _turn_first(self) -> int:
        """The first frame of the turn being heard: its pre-roll, never before the last turn's end."""
        pre_roll = round(self.config.pre_roll_s * INPUT_SAMPLE_RATE / FRAME)
        return max(self.audio_start, self.sent + 1, self.start - pre_roll)

    def _turn_audio_to(self, last: int) -> np.ndarray:
        """The turn being heard, from its pre-roll through frame `last`."""
        return np.concatenate(self.audio[self._turn_first() - self.audio_start : last + 1 - self.audio_start])

    def _end_turn(self, index: int) -> TurnEnded:
        config = self.config
        last = self.last_voiced if index - self.last_voiced >= round(config.pause_s * INPUT_SAMPLE_RATE / FRAME) else index
        turn = TurnEnded(self.seconds(self.start), self.seconds(last + 1), self.seconds(index + 1),
                         self._turn_audio_to(last))
        self.start, self.speaking, self.paused, self.voiced, self.sent = None, False, False, 0, last
        return turn

    def _trim(self) -> None:
        """Keep the pre-roll while no speech is being heard; everything from it while it is."""
        keep_from = self.frames - round(self.config.pre_roll_s * INPUT_SAMPLE_RATE / FRAME) - 1
        if self.start is not None:
            keep_from = min(keep_from, self.start - round(self.config.pre_roll_s * INPUT_SAMPLE_RATE / FRAME))
        if keep_from > self.audio_start:
            del self.audio[: keep_from - self.audio_start]
            self.audio_start = keep_from
