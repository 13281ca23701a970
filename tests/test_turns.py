"""Turn detection on recorded speech (espeak-ng sentences with pauses between them): exact turn
boundaries within a tolerance, no turn from silence, clicks or noise, the same turns whatever the
chunk size; a short pause says the turn may be over (SpeechPaused) with the audio the turn will
have, and speech after it takes that back (SpeechResumed)."""

import numpy as np
import pytest

from omni_demo.call.turns import SpeechPaused, SpeechResumed, SpeechStarted, TurnConfig, TurnDetector, TurnEnded
from omni_demo.call.vad import load_vad
from omni_demo.config import INPUT_SAMPLE_RATE as SAMPLE_RATE

from .speech import compose, needs_espeak, silence, speak

pytestmark = needs_espeak

SENTENCES = ["Hello, can you hear me?", "Tell me a story about the sea, please."]
START_TOLERANCE_S = 0.15  # the VAD decides on 32 ms frames and needs a few of them
END_TOLERANCE_S = 0.25  # a trailing fricative may fall under the threshold early


@pytest.fixture(scope="module")
def vad():
    return load_vad()


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> list[tuple[np.ndarray, float, float]]:
    folder = tmp_path_factory.mktemp("speech")
    return [speak(text, folder) for text in SENTENCES]


def detect(vad, audio, chunk=1600, config=None, playing=False) -> list:
    detector = TurnDetector(config or TurnConfig(), vad)
    events = []
    for start in range(0, len(audio), chunk):
        events += detector.feed(audio[start : start + chunk], playing=playing)
    return events


def turns_of(events) -> list[TurnEnded]:
    return [e for e in events if isinstance(e, TurnEnded)]


def summary(events) -> list[tuple]:
    return [(type(e).__name__, getattr(e, "start_s", getattr(e, "at_s", None)), getattr(e, "end_s", None))
            for e in events]


def assert_pauses_foretell_turns(events, config=TurnConfig()) -> None:
    """Each turn's end was foretold: the SpeechPaused just before it has its start, end and
    audio, early_reply_s after its end; every other SpeechPaused was taken back by a
    SpeechResumed before anything else happened."""
    for before, event in zip(events, events[1:]):
        if isinstance(event, TurnEnded):
            assert isinstance(before, SpeechPaused), summary(events)
            assert (before.start_s, before.end_s) == (event.start_s, event.end_s)
            np.testing.assert_array_equal(before.audio, event.audio)
            assert before.decided_s == pytest.approx(event.end_s + config.early_reply_s, abs=0.033)
        elif isinstance(before, SpeechPaused):
            assert isinstance(event, SpeechResumed) and event.at_s >= before.end_s, summary(events)


def test_two_sentences_with_a_long_pause_are_two_turns_with_their_boundaries(vad, sentences):
    audio, spans = compose(0.8, sentences[0], 1.5, sentences[1], 1.5)
    events = detect(vad, audio)
    turns = turns_of(events)
    assert len(turns) == 2, events
    for turn, (begin, end) in zip(turns, spans):
        assert abs(turn.start_s - begin) <= START_TOLERANCE_S, (turn.start_s, begin)
        assert abs(turn.end_s - end) <= END_TOLERANCE_S, (turn.end_s, end)
        assert turn.decided_s == pytest.approx(turn.end_s + 0.6, abs=0.033)  # the pause, to a frame
        assert len(turn.audio) / SAMPLE_RATE == pytest.approx(turn.end_s - turn.start_s + 0.3, abs=0.033)
    # each turn began with a SpeechStarted, min_speech_s after its start: a barge-in signal
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    assert [round(s.start_s, 3) for s in starts] == [round(t.start_s, 3) for t in turns]
    assert all(0.25 <= s.decided_s - s.start_s <= 0.5 for s in starts)
    foretold = [type(e) for e in events if not isinstance(e, (SpeechPaused, SpeechResumed))]
    assert foretold == [SpeechStarted, TurnEnded] * 2
    assert_pauses_foretell_turns(events)


def test_a_pause_shorter_than_the_setting_keeps_one_turn(vad, sentences):
    audio, spans = compose(0.5, sentences[0], 0.3, sentences[1], 1.0)  # 0.4 s from sound to sound
    events = detect(vad, audio)
    turns = turns_of(events)
    assert len(turns) == 1
    # the gap was long enough for the turn to maybe be over, and the second sentence went on with it
    paused_at_gap = [e for e in events if isinstance(e, SpeechPaused) and abs(e.end_s - spans[0][1]) <= END_TOLERANCE_S]
    assert len(paused_at_gap) == 1 and len(paused_at_gap[0].audio) < len(turns[0].audio)
    assert_pauses_foretell_turns(events)
    assert not any(isinstance(e, (SpeechPaused, SpeechResumed))  # an early reply can be turned off
                   for e in detect(vad, audio, config=TurnConfig(early_reply_s=None)))
    assert abs(turns[0].start_s - spans[0][0]) <= START_TOLERANCE_S
    assert abs(turns[0].end_s - spans[1][1]) <= END_TOLERANCE_S
    # the same recording with a 0.2 s pause setting: a turn ends with the first sentence (its
    # comma may end one too)
    short = turns_of(detect(vad, audio, config=TurnConfig(pause_s=0.2)))
    assert len(short) >= 2 and any(abs(turn.end_s - spans[0][1]) <= END_TOLERANCE_S for turn in short)


def test_silence_clicks_and_noise_make_no_turn(vad):
    rng = np.random.default_rng(0)
    clicks = silence(6.0)
    for at in np.arange(0.5, 5.5, 0.7):  # 5 ms clicks
        start = int(at * SAMPLE_RATE)
        clicks[start : start + 80] = rng.uniform(-0.8, 0.8, 80)
    noise = rng.normal(0, 0.02, 6 * SAMPLE_RATE).astype(np.float32)
    hum = (0.1 * np.sin(2 * np.pi * 50 * np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
    for name, audio in (("silence", silence(6.0)), ("clicks", clicks), ("noise", noise), ("mains hum", hum)):
        assert detect(vad, audio) == [], name


def test_speech_over_noise_is_still_found(vad, sentences):
    audio, spans = compose(0.8, sentences[0], 1.5)
    noisy = audio + np.random.default_rng(1).normal(0, 0.01, len(audio)).astype(np.float32)
    turns = turns_of(detect(vad, noisy))
    assert len(turns) == 1 and abs(turns[0].start_s - spans[0][0]) <= START_TOLERANCE_S


def test_the_turns_do_not_depend_on_the_chunk_size(vad, sentences):
    audio, _ = compose(0.8, sentences[0], 1.5, sentences[1], 1.5)
    reference = summary(detect(vad, audio, chunk=1600))
    for chunk in (333, 512, 4800):
        assert summary(detect(vad, audio, chunk=chunk)) == reference


def test_a_turn_over_the_time_limit_ends_there(vad, sentences):
    audio, _ = compose(0.5, sentences[1], 1.0)
    turns = turns_of(detect(vad, audio, config=TurnConfig(max_turn_s=1.0)))
    assert len(turns) >= 2 and turns[0].end_s - turns[0].start_s == pytest.approx(1.0, abs=0.033)
    # the speech goes on: the next turn takes up where the cut was, no audio sent twice
    assert turns[1].start_s >= turns[0].end_s
    assert sum(len(turn.audio) for turn in turns) <= len(audio)


def test_while_a_reply_plays_only_clear_speech_interrupts(vad, sentences):
    audio, _ = compose(0.8, sentences[0], 1.5)
    assert turns_of(detect(vad, audio, playing=True))  # a clear voice still barges in
    assert detect(vad, 0.02 * audio, playing=True) == []  # a faint one (an echo's leak) does not
    with pytest.raises(ValueError, match="threshold"):
        TurnConfig(threshold=1.5)
    with pytest.raises(ValueError, match="invalid turn settings"):
        TurnConfig(pause_s=0.01)  # under one 32 ms frame


def test_loading_the_vad_leaves_torchs_threads_alone():
    """silero_vad sets torch's thread count to 1 when imported: the engine in the same process
    would run on one core (and round differently, so its audio would differ from a server's)."""
    import subprocess
    import sys

    script = ("import torch; torch.set_num_threads(2); from omni_demo.call.vad import load_vad; load_vad(); "
              "print(torch.get_num_threads())")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip() == "2"
