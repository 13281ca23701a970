"""`python -m omni_demo.bench --hostile`: how much a heavy request joining holds a running reply's
speech back.

A reply streams speech (greedy, so every run makes the same chunks); once its audio has run a
while, a heavy request joins through the engine's whole path (reading and processing its media in
its own thread, then a chunked prefill between the scheduler's steps). Each chunk's arrival is
compared with the same chunk's in a run alone: the newcomer *held the audio back* by the largest
growth of that delay, from the last chunk before it joined to the first after it was done. The
*stall* is what a listener would hear: the longest a chunk came after playback (started at the
first chunk) needed it. Joiners: a 1,000-turn typed history (left out down to the window), and a
4K (3840x2160) video with sound, made with ffmpeg.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from omni_demo.config import SAMPLE_RATE, GenerationOptions
from omni_demo.events import AudioChunk, Finished
from omni_demo.inputs.messages import system_message
from omni_demo.inputs.prepare import PreparedInputs

JOIN_AFTER_AUDIO_S = 2.0  # the newcomer joins once the running reply has streamed this much speech


def long_history(turns: int = 1000) -> list[dict]:
    history = [system_message("You are Qwen, a virtual human.")]
    for n in range(turns):
        history += [{"role": "user", "content": [{"type": "text", "text": f"Question {n}: what comes after {n}?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": f"After {n} comes {n + 1}."}]}]
    return history + [{"role": "user", "content": [{"type": "text", "text": "And after all that?"}]}]


def video_4k(folder: Path, seconds: float = 4.0) -> list[dict]:
    path = folder / "uhd.mp4"
    video, sound = f"testsrc2=size=3840x2160:rate=25:duration={seconds}", f"sine=frequency=440:duration={seconds}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", video, "-f", "lavfi", "-i", sound,
                    "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(path)], check=True)
    return [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                         {"type": "text", "text": "What happens in this video?"}]}]


def running_reply(engine, inputs: PreparedInputs, options: GenerationOptions, join=None) -> dict:
    """Stream one reply; `join()` is started in a thread once JOIN_AFTER_AUDIO_S of speech is out.
    -> its chunks' (arrival, start second) and the joiner's (start, end) times."""
    record = {"chunks": [], "join": None}
    joiner = None
    start = time.perf_counter()
    for event in engine.stream_inputs(inputs, options):
        if isinstance(event, AudioChunk):
            now = time.perf_counter() - start
            record["chunks"].append((now, event.start_sample / SAMPLE_RATE))
            if join is not None and joiner is None and event.start_sample / SAMPLE_RATE >= JOIN_AFTER_AUDIO_S:
                joiner = threading.Thread(target=_timed_join, args=(join, record, start))
                joiner.start()
        elif isinstance(event, Finished):
            break
    if joiner is not None:
        joiner.join()
    return record


def _timed_join(join, record: dict, start: float) -> None:
    joined = time.perf_counter() - start
    join()
    record["join"] = (joined, time.perf_counter() - start)


def held_back(joined: dict, alone: dict) -> float:
    """The largest growth of the chunks' delay against the run alone while the joiner ran (s)."""
    start, end = joined["join"]
    delays = [(arrived, arrived - alone_arrived)
              for (arrived, _), (alone_arrived, _) in zip(joined["chunks"], alone["chunks"])]
    before = [delay for arrived, delay in delays if arrived <= start]
    after = [i for i, (arrived, _) in enumerate(delays) if arrived > start]
    during = after[: 1 + sum(1 for i in after if delays[i][0] <= end)]  # through the first chunk after it
    return max((delays[i][1] for i in during), default=0.0) - (before[-1] if before else 0.0)


def stall(record: dict) -> float:
    """The longest a chunk arrived after playback (from the first chunk on) needed it (s); 0: none."""
    first_at = record["chunks"][0][0]
    return max(0.0, *(arrived - (first_at + at_s) for arrived, at_s in record["chunks"]))


def hostile_bench(engine, inputs: PreparedInputs, options: GenerationOptions) -> dict:
    joiner_options = GenerationOptions(greedy=True, max_new_tokens=8, speech=False, use_audio_in_video=True)
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        joiners = {"1000-turn history": long_history(), "4K video with sound": video_4k(Path(folder))}
        for name, messages in joiners.items():
            def join(messages=messages):
                for _ in engine.stream(messages, joiner_options):
                    pass
            alone = running_reply(engine, inputs, options)
            joined = running_reply(engine, inputs, options, join)
            result[name] = {"joiner_s": joined["join"][1] - joined["join"][0],
                            "held_back_s": max(0.0, held_back(joined, alone)),
                            "stall_alone_s": stall(alone), "stall_with_s": stall(joined)}
            print(f"{name} done", file=sys.stderr)
    return result


def hostile_main(engine, inputs: PreparedInputs, options: GenerationOptions) -> int:
    """`--hostile`: the table, then one JSON line."""
    result = hostile_bench(engine, inputs, options)
    print_hostile(result)
    print(json.dumps({"hostile": result}))
    return 0


def print_hostile(result: dict, file=sys.stdout) -> None:
    print("\njoiner                 its time   running reply held back   its stall: alone / with it", file=file)
    for name, row in result.items():
        print(f"{name:<22} {row['joiner_s']:7.2f} s   {row['held_back_s']:8.3f} s            "
              f"{row['stall_alone_s']:6.3f} / {row['stall_with_s']:6.3f} s", file=file)
