"""`python -m omni_demo.bench --concurrency 1,2,4,8`: N streams with staggered arrivals on one engine.

Each level starts N replies `stagger_s` apart, each in its own thread as a server would, and
measures what each listener gets: first text and first audio from its own arrival, its real-time
factor (its time in the system over the speech it got) and, for the level, the speech seconds
and text tokens made per wall second. The engine's scheduler batches the replies
(omni_demo.engine.scheduler); its observers give the time of each stage of each step (prefill,
thinker, talker, DiT, BigVGAN) by batch size, so a GPU run can be read against a CPU one.
`--no-realtime-guard` admits every stream at once; with the guard, later streams wait while the
running ones' speech is not far enough ahead of real time.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections import defaultdict

import torch

from omni_demo.config import GenerationOptions
from omni_demo.events import AudioChunk, Finished, TextDelta
from omni_demo.inputs.prepare import PreparedInputs

STAGES = ("prefill", "thinker", "talker", "dit", "bigvgan")


class StageTimes:
    """Seconds per stage and batch size, as the scheduler reports them (an observer)."""

    def __init__(self):
        self.calls: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        self._lock = threading.Lock()

    def __call__(self, stage: str, batch: int, seconds: float) -> None:
        with self._lock:
            self.calls[stage][batch].append(seconds)

    def summary(self) -> dict:
        """{stage: {batch size: {"calls", "median_ms"}}}"""
        return {stage: {str(batch): {"calls": len(times), "median_ms": round(1000 * statistics.median(times), 3)}
                        for batch, times in sorted(by_batch.items())}
                for stage, by_batch in self.calls.items()}


def play_streams(engine, inputs: PreparedInputs, options: GenerationOptions, count: int, stagger_s: float) -> dict:
    """`count` replies to `inputs`, arriving `stagger_s` apart. -> the level's figures."""
    streams = [{} for _ in range(count)]
    start = time.perf_counter()

    def listen(index: int) -> None:
        record = streams[index]
        time.sleep(max(0.0, start + index * stagger_s - time.perf_counter()))
        record["arrived"] = time.perf_counter()
        for event in engine.stream_inputs(inputs, options):
            if isinstance(event, TextDelta) and "first_text" not in record:
                record["first_text"] = time.perf_counter()
            if isinstance(event, AudioChunk) and "first_audio" not in record:
                record["first_audio"] = time.perf_counter()
            elif isinstance(event, Finished):
                record["audio_s"], record["text_tokens"] = event.stats.audio_s, event.stats.text_tokens
        record["ended"] = time.perf_counter()

    stages = StageTimes()
    engine.scheduler.observers.append(stages)
    threads = [threading.Thread(target=listen, args=(index,), name=f"stream-{index}") for index in range(count)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.scheduler.observers.remove(stages)
    return {**summarize_level(streams), "stages": stages.summary()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize_level(streams: list[dict]) -> dict:
    wall = max(s["ended"] for s in streams) - min(s["arrived"] for s in streams)
    first_text = [s["first_text"] - s["arrived"] for s in streams if "first_text" in s]
    level = {
        "streams": len(streams),
        "text_tokens_per_wall_s": sum(s["text_tokens"] for s in streams) / wall,
        "first_text_p50_s": statistics.median(first_text),
        "first_text_p95_s": percentile(first_text, 0.95),
    }
    if all(s["audio_s"] for s in streams):
        first_audio = [s["first_audio"] - s["arrived"] for s in streams]
        rtfs = [(s["ended"] - s["arrived"]) / s["audio_s"] for s in streams]
        level.update({
            "speech_s_per_wall_s": sum(s["audio_s"] for s in streams) / wall,
            "first_audio_p50_s": statistics.median(first_audio),
            "first_audio_p95_s": percentile(first_audio, 0.95),
            "rtf_each": [round(rtf, 3) for rtf in rtfs],
            "rtf_worst": max(rtfs),
        })
    return level


def concurrency_bench(engine, inputs: PreparedInputs, options: GenerationOptions, levels: list[int],
                      stagger_s: float) -> dict:
    result = {}
    for count in levels:
        result[str(count)] = play_streams(engine, inputs, options, count, stagger_s)
        print(f"{count} streams done", file=sys.stderr)
    return result


def concurrency_main(engine, inputs: PreparedInputs, options: GenerationOptions, args) -> int:
    """`--concurrency`: every level, its table, then one JSON line with the levels and the setup."""
    result = concurrency_bench(engine, inputs, options, args.concurrency, args.stagger_s)
    print_levels(result)
    setup = {"model": "random-full-size" if args.random_full_size else args.model, "device": str(engine.loaded.device),
             "max_batch": engine.max_batch, "realtime_guard": engine.batch.realtime_guard, "speech": options.speech,
             "prompt_tokens": inputs.prompt_len, "text_tokens": args.text_tokens, "audio_tokens": args.audio_tokens,
             "stagger_s": args.stagger_s, "threads": torch.get_num_threads()}
    print(json.dumps({"concurrency": result, "setup": setup}))
    return 0


def print_levels(levels: dict, file=sys.stdout) -> None:
    one = levels.get("1", {})
    speech = "speech_s_per_wall_s" in one
    print("\nstreams  text tok/s          first text p50 / p95" +
          ("   speech s/s          first audio p50 / p95   worst RTF   each stream's RTF" if speech else ""),
          file=file)
    for count, level in levels.items():
        line = (f"{count:>7}  {level['text_tokens_per_wall_s']:7.1f}{_gain(level, one, 'text_tokens_per_wall_s'):<12} "
                f"{level['first_text_p50_s']:6.3f} / {level['first_text_p95_s']:6.3f} s")
        if speech and "speech_s_per_wall_s" in level:
            line += (f"   {level['speech_s_per_wall_s']:6.2f}{_gain(level, one, 'speech_s_per_wall_s'):<13} "
                     f"{level['first_audio_p50_s']:6.3f} / {level['first_audio_p95_s']:6.3f} s   "
                     f"{level['rtf_worst']:8.3f}   {level['rtf_each']}")
        print(line, file=file)
    print("\nmedian ms per call of each stage, by batch size (calls)", file=file)
    for count, level in levels.items():
        cells = []
        for stage in STAGES:
            by_batch = level["stages"].get(stage, {})
            calls = ", ".join(f"b{b}: {v['median_ms']:.2f} ({v['calls']})" for b, v in by_batch.items())
            cells.append(f"{stage} {calls}")
        print(f"{count:>3} streams | " + " | ".join(cells), file=file)


def _gain(level: dict, one: dict, key: str) -> str:
    return f" ({level[key] / one[key]:.2f}x)" if one.get(key) else ""
