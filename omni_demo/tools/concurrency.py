"""`python -m omni_demo.bench --concurrency 1,2,4,8`: N streams with staggered arrivals on one engine.

Each level starts N replies `stagger_s` apart, each in its own thread as a server would, and
measures what each listener gets: first audio from its own arrival, its real-time factor (its
time in the system over the speech it got) and, for the level, the speech seconds made per wall
second. The engine serves one reply at a time today (its ModelLock), so the level's aggregate is
one reply's and the later streams wait: these are the figures batching is measured against.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

from omni_demo.config import GenerationOptions
from omni_demo.events import AudioChunk, Finished
from omni_demo.inputs.prepare import PreparedInputs


def play_streams(engine, inputs: PreparedInputs, options: GenerationOptions, count: int, stagger_s: float) -> dict:
    """`count` replies to `inputs`, arriving `stagger_s` apart. -> the level's figures."""
    streams = [{} for _ in range(count)]
    start = time.perf_counter()

    def listen(index: int) -> None:
        record = streams[index]
        time.sleep(max(0.0, start + index * stagger_s - time.perf_counter()))
        record["arrived"] = time.perf_counter()
        for event in engine.stream_inputs(inputs, options):
            if isinstance(event, AudioChunk) and "first_audio" not in record:
                record["first_audio"] = time.perf_counter()
            elif isinstance(event, Finished):
                record["audio_s"] = event.stats.audio_s
        record["ended"] = time.perf_counter()

    threads = [threading.Thread(target=listen, args=(index,), name=f"stream-{index}") for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize_level(streams)


def summarize_level(streams: list[dict]) -> dict:
    first_audio = sorted(s["first_audio"] - s["arrived"] for s in streams)
    rtfs = [(s["ended"] - s["arrived"]) / s["audio_s"] for s in streams]
    wall = max(s["ended"] for s in streams) - min(s["arrived"] for s in streams)
    return {
        "streams": len(streams),
        "speech_s_per_wall_s": sum(s["audio_s"] for s in streams) / wall,
        "first_audio_p50_s": statistics.median(first_audio),
        "first_audio_p95_s": first_audio[min(len(first_audio) - 1, round(0.95 * (len(first_audio) - 1)))],
        "rtf_each": [round(rtf, 3) for rtf in rtfs],
        "rtf_worst": max(rtfs),
        "batch_size": 1,  # one reply at a time: the engine has no batched step yet
    }


def concurrency_bench(engine, inputs: PreparedInputs, options: GenerationOptions, levels: list[int],
                      stagger_s: float) -> dict:
    engine.model_lock.wait_s = 3600.0  # a stream waits its turn, however long (the server's wait is shorter)
    result = {}
    for count in levels:
        result[str(count)] = play_streams(engine, inputs, options, count, stagger_s)
        print(f"{count} streams done", file=sys.stderr)
    return result


def print_levels(levels: dict, file=sys.stdout) -> None:
    print("\nstreams  speech s/s   first audio p50 / p95   worst stream RTF   each stream's RTF", file=file)
    one = levels.get("1", {}).get("speech_s_per_wall_s")
    for count, level in levels.items():
        gain = f" ({level['speech_s_per_wall_s'] / one:.2f}x one)" if one else ""
        print(f"{count:>7}  {level['speech_s_per_wall_s']:6.2f}{gain:<13} {level['first_audio_p50_s']:6.3f} / "
              f"{level['first_audio_p95_s']:6.3f} s     {level['rtf_worst']:8.3f}        {level['rtf_each']}",
              file=file)
