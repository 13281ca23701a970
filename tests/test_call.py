"""The voice call's loop (omni_demo.call) on the tiny engine and Silero VAD: a microphone played in
real time (48 kHz int16 chunks of 0.25 s, as the page sends them) from espeak-ng speech, turns
found, replies streamed, barge-in during generation and during playback, the call's limits; and
the page handlers' rules (one call per session, a typed message waits for the call)."""

import inspect
import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni_demo.app.chat_history import INTERRUPTED_MARK, STOPPED_MARK, chat_to_conversation, gradio_upload_dir
from omni_demo.call.events import CallEnded, PlaybackInterrupted, ReplyAudio, ReplyEnded, Status, Tick, UserTurn
from omni_demo.call.turns import TurnConfig
from omni_demo.call.vad import load_vad
from omni_demo.call.voice_call import CallConfig, VoiceCall
from omni_demo.config import INPUT_SAMPLE_RATE as SAMPLE_RATE
from omni_demo.config import GenerationOptions
from omni_demo.events import TextDelta

from .conftest import ASSETS
from .speech import click, needs_espeak, silence, speak
from .test_ui import MESSAGE, SETTINGS, OneWordModel, Request

pytestmark = needs_espeak

CHUNK_S = 0.25  # the page's stream_every
MIC_RATE = 48_000
START_TOLERANCE_S = 0.2
END_TOLERANCE_S = 0.3
LONG = GenerationOptions(max_new_tokens=512, max_audio_tokens=3000, seed=11)  # far longer than any test waits


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speech")
    return [speak(text, folder) for text in ("Hello, can you hear me?", "Wait, tell me about the sea instead.")]


class Microphone(threading.Thread):
    """Plays a script into a call in real time: arrays are spoken, an Event is waited for (with
    silence going on meanwhile, as a real microphone's), a number is seconds of silence."""

    def __init__(self, call: VoiceCall, *script):
        super().__init__(daemon=True)
        self.call, self.script, self.stopped = call, script, threading.Event()
        self.fed_s = 0.0  # seconds of audio fed so far

    def run(self):
        quiet = silence(CHUNK_S)
        start = time.monotonic()
        for piece in self.script:
            if isinstance(piece, threading.Event):
                while not piece.is_set() and not self.stopped.is_set():
                    self._chunk(quiet, start)
                continue
            audio = silence(piece) if isinstance(piece, (int, float)) else piece
            for at in range(0, len(audio), int(CHUNK_S * SAMPLE_RATE)):
                if self.stopped.is_set():
                    return
                self._chunk(audio[at : at + int(CHUNK_S * SAMPLE_RATE)], start)

    def _chunk(self, samples: np.ndarray, start: float) -> None:
        self.fed_s += len(samples) / SAMPLE_RATE
        time.sleep(max(0.0, start + self.fed_s - time.monotonic()))  # a chunk is sent once it was recorded
        up = np.interp(np.arange(len(samples) * 3) / 3, np.arange(len(samples)), samples)  # 16 -> 48 kHz
        self.call.feed(MIC_RATE, (up * 32767).astype(np.int16))


def run_call(call: VoiceCall, mic: Microphone, timeout_s: float = 60, on_event=None) -> list:
    """The call's events until it ends (or the timeout ends it)."""
    mic.start()
    events, deadline = [], time.monotonic() + timeout_s
    try:
        for event in call.run():
            events.append(event)
            if on_event is not None:
                on_event(event)
            if time.monotonic() > deadline:
                call.end()
    finally:
        mic.stopped.set()
    return events


def of(events, kind) -> list:
    return [event for event in events if isinstance(event, kind)]


def test_a_call_hears_turns_and_a_voice_over_the_reply_cancels_it(engine, sentences, monkeypatch):
    """A click is no turn; a sentence is; the second sentence, spoken while the first reply is
    being generated, cancels it at once (the engine stops: "cancelled"), the cut reply stays in
    the history, and the second sentence is the next turn, answered from the conversation cache."""
    first_audio, second_done = threading.Event(), threading.Event()
    listeners, listen = [], engine.listen
    monkeypatch.setattr(engine, "listen", lambda *a, **k: listeners.append(listen(*a, **k)) or listeners[-1])
    call = VoiceCall(engine, [], LONG, CallConfig(max_idle_s=30), vad=load_vad())
    mic = Microphone(call, 0.8, click()[0], 1.0, sentences[0][0], first_audio, 0.3, sentences[1][0], 1.0, second_done)
    replies = []

    def follow(event):
        if isinstance(event, ReplyAudio):
            first_audio.set()
        if isinstance(event, ReplyEnded):
            replies.append(event)
        if isinstance(event, ReplyAudio) and len(replies) == 1:
            call.end()  # the second reply speaks: enough

    events = run_call(call, mic, on_event=follow)
    turns = of(events, UserTurn)
    assert len(turns) == 2, [type(e).__name__ for e in events if not isinstance(e, Status)]
    spoken_at = 0.8 + len(click()[0]) / SAMPLE_RATE + 1.0
    assert abs(turns[0].start_s - (spoken_at + sentences[0][1])) <= START_TOLERANCE_S
    assert abs(turns[0].end_s - (spoken_at + sentences[0][2])) <= END_TOLERANCE_S
    assert len(turns[0].audio) / SAMPLE_RATE >= sentences[0][2] - sentences[0][1]  # the whole sentence is heard

    first, second = replies
    assert first.interrupted and first.finished.stop_reason == "cancelled"  # generation stopped, not only sound
    assert 0 < len(first.finished.codec_token_ids) < LONG.max_audio_tokens
    assert first.text and first.text == first.finished.text  # the text as far as it was generated
    cut = next(i for i, e in enumerate(events) if e is first)
    after = [e for e in events[cut + 1:] if not isinstance(e, Tick)][:2]  # cut as the voice was heard:
    assert after[0] == Status("hearing", "Hearing you…") and isinstance(after[1], UserTurn)  # nothing of it after
    assert second.call_ended and not second.interrupted  # End call during the reply: ended, not interrupted
    assert second.finished.stop_reason == "cancelled"
    # the history: each spoken turn, then what the model said to it (cut where it was cut)
    roles = [(m["role"], m["content"][0]["type"]) for m in call.conversation]
    assert roles == [("user", "audio"), ("assistant", "text"), ("user", "audio"), ("assistant", "text")]
    assert call.conversation[1]["content"][0]["text"] == first.text
    # each turn was listened to while spoken (the second: a window encoded before its end), and is
    # the speech as detected, not the pause after it
    assert len(listeners) == 2 and listeners[1].windows_kept >= 1
    assert [len(m["content"][0]["audio"]) for m in call.conversation[::2]] == [len(t.audio) for t in turns]
    assert second.finished.stats.reused_prompt_tokens > 0  # the first turn came from the cache
    # the latency parts, in the order they happen; each reply began at a short pause, before the
    # turn's end was certain (its first text and audio were held for that moment)
    for reply in replies:
        latency = reply.latency.as_dict()
        assert 0.2 <= latency["vad_s"] <= 0.6 + 2 * CHUNK_S + 0.5, latency  # the pause, and a chunk's wait
        assert latency["early_s"] is not None and 0 <= latency["first_text_s"] <= latency["first_audio_s"]
        assert latency["speech_end_to_audio_s"] == pytest.approx(latency["vad_s"] + latency["first_audio_s"], abs=2e-3)
    assert of(events, CallEnded)[-1].reason == "You ended the call."


def test_a_reply_begun_at_a_short_pause_is_dropped_when_the_user_goes_on(engine, sentences, monkeypatch):
    """A reply starts at a short pause (SpeechPaused), held back. The user goes on: it is closed (never
    cancelled, so the engine keeps nothing of it), nothing of it is shown, and the turn is both sentences. At the turn's end, the reply begun at
    its last pause is the one given, and it is the engine's reply to the whole turn."""
    streams, stream = [], engine.stream

    def recorded(messages, options=None, cancel=None):
        events = stream(messages, options, cancel)
        streams.append((messages, cancel, events))
        return events

    monkeypatch.setattr(engine, "stream", recorded)
    cache, first_new = engine.conversation_cache, engine.conversation_cache._next_id
    call = VoiceCall(engine, [], LONG, CallConfig(max_idle_s=30), vad=load_vad())
    # 0.35 s between the sentences: over early_reply_s (0.2 s), under the pause that ends a turn (0.6 s)
    mic = Microphone(call, 0.5, sentences[0][0], 0.35, sentences[1][0], 3.0)

    def follow(event):
        if isinstance(event, ReplyAudio):
            call.end()

    events = run_call(call, mic, on_event=follow)
    turns = of(events, UserTurn)
    assert len(turns) == 1, [type(e).__name__ for e in events if not isinstance(e, (Status, Tick))]
    spoken = (len(sentences[0][0]) + 0.35 * SAMPLE_RATE + sentences[1][2] * SAMPLE_RATE) / SAMPLE_RATE
    assert len(turns[0].audio) / SAMPLE_RATE >= spoken - 0.5 - END_TOLERANCE_S  # both sentences
    # replies begun at the pauses inside the turn were closed, not cancelled; the last one was given
    assert len(streams) >= 2
    assert all(inspect.getgeneratorstate(events) == "GEN_CLOSED" and not cancel.is_set()
               for _, cancel, events in streams[:-1])
    assert all(len(messages[-1]["content"][0]["audio"]) < len(turns[0].audio) for messages, _, _ in streams[:-1])
    messages, _, _ = streams[-1]
    np.testing.assert_array_equal(messages[-1]["content"][0]["audio"], turns[0].audio)
    kinds = [type(e) for e in events if not isinstance(e, (Status, Tick))]
    assert kinds[: kinds.index(UserTurn)] == []  # nothing of a reply before its turn was certain
    reply = of(events, ReplyEnded)[0]
    assert reply.latency.early_s is not None and len(reply.text) >= 8
    # the engine kept the reply given (cut by End) and nothing of those dropped, which were closed,
    # not cancelled: a reply to words the user went on from is no use to anyone's later turn
    kept = [p for key, p in cache.prefixes.items() if key >= first_new and not p.partial]
    assert len(kept) == 1 and len(kept[0].token_ids) > reply.finished.stats.prompt_tokens
    again, events = "", stream(messages, LONG)  # the same turn, its reply begun at the turn's end
    for event in events:
        again += event.text if isinstance(event, TextDelta) else ""
        if len(again) > len(reply.text):
            break
    events.close()
    assert again.startswith(reply.text)


def test_speaking_while_the_last_reply_still_plays_stops_the_player(engine, sentences):
    """The reply is fully generated but its audio still plays in the page: a voice then is a
    barge-in too (PlaybackInterrupted: the page stops the player), and the next turn."""
    done, second_turn = threading.Event(), threading.Event()
    options = GenerationOptions(max_new_tokens=16, max_audio_tokens=400, seed=11)  # 8 s of speech
    # The player is taken to buffer 30 s before it plays: it still plays when the reply is made,
    # however slow the machine (the page's player buffers 0.3 s; replies are made faster than played).
    call = VoiceCall(engine, [], options, CallConfig(max_idle_s=60, player_lead_s=30.0), vad=load_vad())
    mic = Microphone(call, 0.5, sentences[0][0], done, sentences[1][0], second_turn)

    def follow(event):
        if isinstance(event, ReplyEnded) and not done.is_set():
            assert not event.interrupted  # the first reply was made whole
            done.set()
        if isinstance(event, UserTurn) and done.is_set():
            second_turn.set()
            call.end()

    events = run_call(call, mic, on_event=follow)
    kinds = [type(e) for e in events if not isinstance(e, (Status, Tick))]
    assert PlaybackInterrupted in kinds
    assert kinds.index(PlaybackInterrupted) > kinds.index(ReplyEnded)
    assert kinds.count(UserTurn) == 2 and UserTurn in kinds[kinds.index(PlaybackInterrupted):]
    # while the finished reply still played, the call said it was speaking, not listening
    ended = next(i for i, e in enumerate(events) if isinstance(e, ReplyEnded))
    cut = next(i for i, e in enumerate(events) if isinstance(e, PlaybackInterrupted))
    assert not [e for e in events[ended:cut] if isinstance(e, Status)]
    assert [e.state for e in events[:ended] if isinstance(e, Status)][-1] == "speaking"


def test_the_call_ends_itself_idle_without_a_microphone_or_at_its_time_limit(engine):
    quick = {"turns": TurnConfig(), "max_call_s": 30, "max_idle_s": 30, "mic_timeout_s": 30}
    cases = [
        (CallConfig(**{**quick, "max_idle_s": 1.0}), [3.0], "Nobody spoke"),
        (CallConfig(**{**quick, "mic_timeout_s": 1.0}), [], "No sound from the microphone"),
        (CallConfig(**{**quick, "mic_timeout_s": 1.0}), [0.5], "stopped sending audio"),
        (CallConfig(**{**quick, "max_call_s": 1.0}), [3.0], "time limit"),
    ]
    for config, script, reason in cases:
        call = VoiceCall(engine, [], LONG, config, vad=load_vad())
        started = time.monotonic()
        events = run_call(call, Microphone(call, *script), timeout_s=10)
        assert reason in events[-1].reason, (reason, events[-1])
        assert time.monotonic() - started < 6
        assert not of(events, UserTurn)


def test_marks_of_cut_replies_stay_out_of_the_models_history():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"Hello th {INTERRUPTED_MARK}"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": f"Once {STOPPED_MARK}"},
            {"role": "assistant", "content": INTERRUPTED_MARK}]
    texts = [m["content"][0]["text"] for m in chat_to_conversation(chat, "")]
    assert texts == ["hi", "Hello th", "again", "Once"]


def test_one_call_per_session_and_typed_messages_wait_for_it():
    from omni_demo.app.call_page import CallHandler, CallView
    from omni_demo.app.chat import ChatHandler

    chats = ChatHandler(OneWordModel())
    calls = CallHandler(chats, load_vad)
    pending, *view = calls.accept([], Request("a"))
    assert pending is not None and "Connecting" in view[2]
    again, *view = calls.accept([], Request("a"))
    assert again is None and "already running" in view[1]["notice"]
    typed, *outputs = chats.accept(MESSAGE, [], None, Request("a"))
    assert typed is None and "voice call is running" in outputs[3]["notice"]
    other, *view = calls.accept([], Request("b"))  # another session's call starts too: calls hold no model
    assert other is not None and "Connecting" in view[2]
    # End call while it waits: forgotten at once, its loop never runs, the session is free
    ended = calls.end(other, Request("b"))
    assert ended.end["visible"] is False and ended.player["call"] == "stop"
    views = list(calls.run(other, *SETTINGS, 0.6, 0.5, Request("b")))
    assert len(views) == 1 and "ended before it began" in views[0].status and views[0].chat == CallView().chat
    assert chats.sessions.get("b") is None
    # a late End (the microphone of the earlier call stopping) leaves the session's next call alone
    newer, *_ = calls.accept([], Request("b"))
    assert calls.end(other, Request("b")) == CallView() and not chats.sessions.get("b").is_set()
    # Clear while it waits: the page gets Start back when the queue reaches the call
    chats.clear(Request("b"))
    views = list(calls.run(newer, *SETTINGS, 0.6, 0.5, Request("b")))
    assert views[0].start["visible"] is True and views[0].textbox["interactive"] is True


def test_a_call_runs_once_and_only_on_its_own_sessions_files(engine):
    from omni_demo.app.call_page import CallHandler
    from omni_demo.app.chat import ChatHandler

    calls = CallHandler(ChatHandler(engine), load_vad)
    stranger = [{"role": "user", "content": {"path": str(Path(gradio_upload_dir()) / "x" / "theirs.wav")}}]
    pending, *_ = calls.accept(stranger, Request("a"))
    views = list(calls.run(pending, *SETTINGS, 0.6, 0.5, Request("a")))
    assert "did not upload it" in views[-1].status and calls.chats.sessions.get("a") is None
    pending, *_ = calls.accept([], Request("a"))
    first = calls.run(pending, *SETTINGS, 0.6, 0.5, Request("a"))
    assert next(first).player["call"] == "start"
    assert list(calls.run(pending, *SETTINGS, 0.6, 0.5, Request("a"))) == []  # the same call, run again
    calls.end(pending, Request("a"))
    assert "Call ended" in [view for view in first][-1].status
    assert calls.chats.sessions.get("a") is None


def chunk(folder, name: str, samples: np.ndarray, rate: int = 48_000) -> str:
    """A chunk as Gradio stores an upload: its own folder in the upload folder, the page's name."""
    path = folder / uuid.uuid4().hex / name
    path.parent.mkdir()
    sf.write(path, samples, rate, subtype="PCM_16")
    return str(path)


def test_microphone_chunks_are_read_only_when_named_by_the_call_then_deleted(tmp_path, monkeypatch):
    from omni_demo.app.files import ChunkSequence, new_chunk_token

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    ours, theirs = ChunkSequence(new_chunk_token()), ChunkSequence(new_chunk_token())

    def take(sequence, path) -> list:
        heard = []
        sequence.take(path, lambda rate, samples: heard.append((rate, samples)))
        return heard

    silence = np.zeros((12_000, 2), np.int16)
    first = chunk(tmp_path, f"{ours.prefix}-0.wav", silence)
    (rate, samples), = take(ours, first)
    assert rate == 48_000 and samples.shape == (12_000, 2)
    assert not Path(first).exists()  # read once, then deleted (its folder stays: equal chunks share it)
    # what is not this call's chunk is refused and left alone: another call's, any other upload, a folder
    other = chunk(tmp_path, f"{theirs.prefix}-1.wav", silence)
    picture = tmp_path / uuid.uuid4().hex / "shapes.png"  # an example chip's picture, as another session sent it
    picture.parent.mkdir()
    shutil.copy(ASSETS / "shapes.png", picture)
    folder = tmp_path / uuid.uuid4().hex / f"{ours.prefix}-1.wav"
    folder.mkdir(parents=True)
    outside = tmp_path.parent / f"{ours.prefix}-1.wav"
    sf.write(outside, silence, 48_000, subtype="PCM_16")
    for path in (other, str(picture), str(folder), str(outside)):
        assert take(ours, path) == []
    assert Path(other).exists() and picture.exists() and folder.is_dir() and outside.exists()
    outside.unlink()
    # equal chunks (digital silence) have paths of their own: both are heard
    second, third = chunk(tmp_path, f"{ours.prefix}-1.wav", silence), chunk(tmp_path, f"{ours.prefix}-2.wav", silence)
    assert len(take(ours, second)) == 1 and len(take(ours, third)) == 1
    # overlapping posts: a chunk Gradio dropped is read from its file, in order; a late repeat is refused
    skipped, last = chunk(tmp_path, f"{ours.prefix}-3.wav", silence[:10]), chunk(tmp_path, f"{ours.prefix}-4.wav",
                                                                                  silence)
    assert [len(samples) for _, samples in take(ours, last)] == [10, 12_000] and not Path(skipped).exists()
    assert take(ours, chunk(tmp_path, f"{ours.prefix}-3.wav", silence)) == []
    # a jump far ahead is refused at once, not searched for (a crafted number would list the folder 10^9 times)
    started, far = time.monotonic(), chunk(tmp_path, f"{ours.prefix}-999999999.wav", silence)
    assert take(ours, far) == [] and time.monotonic() - started < 1 and Path(far).exists()
    # not a short WAV: refused (and, being the call's own, deleted)
    flac = tmp_path / uuid.uuid4().hex / f"{ours.prefix}-5.wav"
    flac.parent.mkdir()
    sf.write(flac, np.zeros(12_000, np.int16), 48_000, format="FLAC")
    long = chunk(tmp_path, f"{ours.prefix}-6.wav", np.zeros(48_000 * 11, np.int16))
    assert take(ours, str(flac)) == [] and take(ours, long) == [] and not flac.exists()
    # the call is over: what is left of its chunks goes, nothing else
    late = chunk(tmp_path, f"{ours.prefix}-9.wav", silence)
    ours.remove_left()
    assert not Path(late).exists() and Path(other).exists()


def test_call_settings_are_checked():
    from omni_demo.app.call_page import CallHandler
    from omni_demo.app.chat import ChatHandler
    from omni_demo.errors import InputError

    calls = CallHandler(ChatHandler(OneWordModel()), load_vad)
    pending, *_ = calls.accept([], Request("a"))
    views = list(calls.run(pending, *SETTINGS, 9.0, 0.5, Request("a")))  # a 9 s pause is out of range
    assert "pause must be between" in views[-1].status and views[-1].start["visible"] is True
    assert calls.chats.sessions.get("a") is None
    with pytest.raises(InputError):
        from omni_demo.app.settings import call_config

        call_config(0.6, float("nan"), CallConfig())


def test_the_microphone_takes_any_real_chunk_and_refuses_what_no_microphone_sends():
    from omni_demo.call.microphone import Microphone
    from omni_demo.errors import InputError

    mic = Microphone()
    mic.put(48_000, (np.random.default_rng(0).normal(0, 0.1, 12_000) * 32767).astype(np.int16))  # 0.25 s
    mic.put(44_100, np.full((11_025, 2), np.nan, np.float32))  # stereo, NaN: read as silence
    mic.put(16_000, np.zeros(0, np.int16))
    taken = mic.take(wait_s=0)
    assert all(np.isfinite(samples).all() and np.abs(samples).max(initial=0) <= 1 for _, samples in taken)
    assert sum(len(samples) for _, samples in taken) == pytest.approx(0.5 * SAMPLE_RATE, abs=800)  # soxr's delay
    for rate, pcm in [(1, np.zeros(10, np.int16)), (10**7, np.zeros(10, np.int16)), (48_000.5, np.zeros(10)),
                      (48_000, np.zeros(48_000 * 11, np.int16)), (48_000, np.zeros((2, 2, 2))),
                      (48_000, np.array(["a"]))]:
        with pytest.raises(InputError):
            mic.put(rate, pcm)
