"""End of speech -> first reply sound in a voice call, measured in headless Chromium: the app on
the tiny model, its microphone a file of N spoken sentences with pauses long enough for each
reply to be heard, the page's own latency readout (window.omniCall.turns) printed per turn with
its parts, then the median and the worst. With --no-browser, the call's loop alone on the tiny
engine, its microphone played in real time (tests/test_call.py's): the server's part of the wait. With --camera the call's camera is on (Chromium's
fake camera; without the browser, a frame every half second): each turn is a video with its sound.

    python scripts/call_latency.py [--turns 6] [--gap-s 7] [--max-speech-s 5] [--camera] [--no-browser]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.apphelpers import AppServer
from tests.browser import chromium_page, fake_microphone, open_app
from tests.speech import compose, speak, write_wav

SENTENCES = ["Hello, can you hear me?", "Tell me about the sea.", "What is your favourite colour?",
             "Sing me a short song.", "How far away is the moon?", "Thank you, that is all."]
PARTS = ["vad", "first_text", "first_audio", "network", "player"]  # total = vad + first_audio + network + player
COLUMNS = [*PARTS, "early"]  # early: how long before the pause was detected the reply began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--gap-s", type=float, default=7.0, help="silence after each sentence")
    parser.add_argument("--max-speech-s", type=float, default=5.0, help="the replies' speech limit")
    parser.add_argument("--no-browser", action="store_true", help="the call's loop alone, without the page")
    parser.add_argument("--camera", action="store_true", help="the camera on: each turn a video with its sound")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="call-latency-"))
    pieces = [1.0]
    for index in range(args.turns):
        pieces += [speak(SENTENCES[index % len(SENTENCES)], folder), args.gap_s]
    audio, _ = compose(*pieces)
    if args.no_browser:
        report(loop_turns(pieces, len(audio) / 16000 + 60, args), [p for p in COLUMNS if p not in ("network", "player")])
        return
    wav = write_wav(folder / "call.wav", audio)
    app = AppServer().wait()
    try:
        with chromium_page(args=fake_microphone(f"{wav}%noloop")) as page:
            open_app(page, app.url, max_speech_s=args.max_speech_s, seed=11)
            page.click("#call-start")
            if args.camera:
                page.wait_for_function("window.omniCall.mic !== null", timeout=30_000)
                page.click("#call-screen .call-camera")
            deadline = time.monotonic() + len(audio) / 16000 + 60
            while time.monotonic() < deadline and len(page.evaluate("window.omniCall.turns")) < args.turns:
                time.sleep(0.5)
            turns = page.evaluate("window.omniCall.turns")
            page.click("#call-end")
    finally:
        app.stop()
    report(turns, COLUMNS)


def loop_turns(pieces: list, timeout_s: float, args) -> list[dict]:
    """The call's loop on the tiny engine, the pieces played into it in real time: per turn, the
    server's latency parts (total: end of speech -> the first audio chunk given out)."""
    from omni_demo.call.events import ReplyAudio, UserTurn
    from omni_demo.call.vad import load_vad
    from omni_demo.call.voice_call import CallConfig, VoiceCall
    from omni_demo.config import GenerationOptions, ModelConfig
    from omni_demo.engine.omni_engine import OmniEngine
    from omni_demo.inputs.clips import write_clip
    from omni_demo.models.loading import load_model
    from tests.test_call import Microphone
    from tests.test_video_call import Webcam

    engine = OmniEngine(load_model(ModelConfig(model="tiny")))
    options = GenerationOptions(max_new_tokens=512, max_audio_tokens=round(args.max_speech_s * 50), seed=11)
    folder = Path(tempfile.mkdtemp(prefix="call-latency-clips-"))
    clips = iter(range(10**6))
    save_video = (lambda frames, samples: write_clip(folder / f"{next(clips)}.mp4", frames, samples)) if args.camera \
        else None
    call = VoiceCall(engine, [], options, CallConfig(max_idle_s=args.gap_s + 30), vad=load_vad(), save_video=save_video)
    mic = Microphone(call, *[piece[0] if isinstance(piece, tuple) else piece for piece in pieces])
    webcam = Webcam(call, mic)
    mic.start()
    if args.camera:
        webcam.start()
    turns, deadline = [], time.monotonic() + timeout_s
    try:
        for event in call.run():
            if isinstance(event, UserTurn):
                print(f"turn at {event.start_s:.1f} s: {'a video with its sound' if event.video else 'audio'}")
            if isinstance(event, ReplyAudio) and event.latency is not None:
                parts = event.latency.as_dict()
                turns.append({"total": parts["speech_end_to_audio_s"], "vad": parts["vad_s"],
                              "first_text": parts["first_text_s"], "first_audio": parts["first_audio_s"],
                              "early": parts["early_s"]})
            if len(turns) == args.turns or time.monotonic() > deadline:
                call.end()
    finally:
        mic.stopped.set()
        webcam.stopped.set()
    return turns


def report(turns: list[dict], columns: list[str]) -> None:
    print(f"{'turn':>4} {'total':>7} " + " ".join(f"{p:>11}" for p in columns))
    for index, turn in enumerate(turns, 1):
        print(f"{index:>4} {turn['total']:7.3f} " + " ".join(f"{turn[p] or 0:11.3f}" for p in columns))
    totals = [turn["total"] for turn in turns]
    if totals:
        print(json.dumps({"turns": len(totals), "median_s": round(statistics.median(totals), 3),
                          "worst_s": round(max(totals), 3),
                          "median_parts_s": {p: round(statistics.median(t[p] or 0 for t in turns), 3) for p in columns}}))


if __name__ == "__main__":
    main()
