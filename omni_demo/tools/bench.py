"""Benchmark: the streaming engine against transformers' reference `generate`, same prompt,
same process, several repeats.

    python -m omni_demo.bench --model tiny --text-tokens 64 --audio-tokens 500
    python -m omni_demo.bench --random-full-size --device cuda     # 7B architecture, random weights
    python -m omni_demo.bench --model tiny --conversation --text-tokens 32 --audio-tokens 100

Random weights never stop on their own, so both lengths are forced (min = max). Prints a table
and, last, one JSON line with `stream`, `reference` and `ratio` (stream / reference) objects.
Every run computes its prompt from scratch, as the reference does (the conversation cache is off).

`--conversation` instead plays a six-turn conversation (text, image, audio clip, video with its
sound, text, text), each reply going into the history, once with the conversation cache off and
once with it on (`--repeats` times each, medians), and prints each turn's time to first text and
first audio (media reading and processing included) and how many prompt tokens the cache served;
then a `--utterance-s` spoken turn fed in real time, from the end of speech to the first text and
audio, with the clip processed whole at the end or heard while it is spoken (omni_demo.engine.listening).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import threading
import time
from dataclasses import replace

import psutil
import torch

from omni_demo.config import (ASSETS, DEFAULT_SYSTEM_PROMPT, INPUT_SAMPLE_RATE, SAMPLE_RATE, TINY_MODEL, CacheConfig,
                              GenerationOptions)
from omni_demo.errors import ModelLoadError
from omni_demo.events import AudioChunk, Finished, TextDelta
from omni_demo.flags import add_model_arguments, batch_config, model_config
from omni_demo.inputs.messages import system_message
from omni_demo.inputs.prepare import PreparedInputs
from omni_demo.models.loading import quiet_libraries

METRICS = ("time_to_first_text_s", "time_to_first_audio_s", "total_s", "rtf", "peak_rss_mb", "peak_rss_growth_mb")
PROMPT = "Tell me a long story about a robot who learns to sing, with many details."
CONVERSATION = (  # (what the turn holds, its user content)
    ("text", [{"type": "text", "text": "Hello! Who are you?"}]),
    ("image", [{"type": "image", "image": str(ASSETS / "shapes.png")},
               {"type": "text", "text": "What is in this picture?"}]),
    ("audio", [{"type": "audio", "audio": str(ASSETS / "question.wav")}]),
    ("video+sound", [{"type": "video", "video": str(ASSETS / "talking_shapes.mp4")},
                     {"type": "text", "text": "And what happens in this video?"}]),
    ("text", [{"type": "text", "text": "Which of them did you like best?"}]),
    ("text", [{"type": "text", "text": "Tell me more about it."}]),
)


class PeakMemory:
    """Peak process RSS (sampled every 20 ms; faster polling steals the GIL from the run being
    measured) and, on CUDA, peak allocated VRAM during a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process = psutil.Process()

    def __enter__(self):
        gc.collect()
        _release_freed_memory()
        self.baseline = self.peak = self.process.memory_info().rss
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.peak_vram = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def as_dict(self) -> dict:
        out = {"peak_rss_mb": self.peak / 2**20, "peak_rss_growth_mb": (self.peak - self.baseline) / 2**20}
        if self.peak_vram is not None:
            out["peak_vram_mb"] = self.peak_vram / 2**20
        return out


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS, so one run's leftovers do not count as the next one's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_stream(engine, inputs: PreparedInputs, options: GenerationOptions) -> dict:
    with PeakMemory(engine.loaded.device) as memory:
        finished = [event for event in engine.stream_inputs(inputs, options) if isinstance(event, Finished)][0]
    stats = finished.stats
    return {
        "time_to_first_text_s": stats.time_to_first_text_s,
        "time_to_first_audio_s": stats.time_to_first_audio_s,
        "total_s": stats.total_s,
        "rtf": stats.rtf,
        "audio_s": stats.audio_s,
        "text_tokens": stats.text_tokens,
        "audio_tokens": stats.audio_tokens,
        **memory.as_dict(),
    }


def run_reference(loaded, inputs: PreparedInputs, options: GenerationOptions) -> dict:
    from .reference import reference_generate_batch

    with PeakMemory(loaded.device) as memory:
        result = reference_generate_batch(loaded, inputs.tensors, options, use_audio_in_video=inputs.use_audio_in_video)
    audio_s = len(result.waveform) / SAMPLE_RATE if result.waveform is not None else 0.0
    return {
        "time_to_first_text_s": result.time_to_first_text_s,
        "time_to_first_audio_s": result.total_s,  # the audio exists only once generate returns
        "total_s": result.total_s,
        "rtf": result.total_s / audio_s if audio_s else None,
        "audio_s": audio_s,
        "text_tokens": len(result.text_token_ids),
        "audio_tokens": len(result.codec_token_ids),
        **memory.as_dict(),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode_steps(engine, inputs: PreparedInputs, steps: int, *, lean: bool) -> dict:
    """ms per decode step of the engine's thinker and talker decoders after a prefill."""
    from omni_demo.engine.decoders import TalkerDecoder, ThinkerDecoder

    device, model = engine.loaded.device, engine.model

    def per_step_ms(step) -> float:
        for _ in range(8):  # warm-up
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        return 1e3 * (time.perf_counter() - start) / steps

    thinker = ThinkerDecoder(model.thinker, engine.decode_step("thinker", 0 if lean else None))
    token = thinker.prefill(inputs).argmax(-1)  # [1] on the device
    result = {"thinker_step_ms": per_step_ms(lambda: thinker.step(token))}
    if engine.loaded.has_talker:
        thinker = ThinkerDecoder(model.thinker, engine.decode_step("thinker", 0 if lean else None))
        thinker.prefill(inputs)
        _, reply_part = thinker.step(token)
        talker = TalkerDecoder(model, engine.decode_step("talker", 0 if lean else None))
        talker.prefill(inputs, thinker, next(iter(model.speaker_map.values()))["bos_token"], int(token), reply_part)
        pad = talker.text_embedding(model.talker.text_pad_token)
        code = torch.tensor([100], device=device)
        result["talker_step_ms"] = per_step_ms(lambda: talker.step(code, pad))
    return result


def time_generate_steps(loaded, inputs: PreparedInputs, text_steps: int, audio_steps: int) -> dict:
    """Seconds per step inside transformers' thinker.generate and talker.generate: the difference
    between a long and a 2-token run, so prefill and set-up cancel out."""
    from .reference import reference_generate_batch

    def run(text, audio):
        options = GenerationOptions(greedy=True, max_new_tokens=text, min_new_tokens=text,
                                    max_audio_tokens=audio, min_audio_tokens=audio)
        return reference_generate_batch(loaded, inputs.tensors, options)

    short, long = run(2, 2), run(text_steps, audio_steps)
    return {
        "thinker_step_ms": 1e3 * (long.thinker_generate_s - short.thinker_generate_s) / (text_steps - 2),
        "talker_step_ms": 1e3 * (long.talker_generate_s - short.talker_generate_s) / (audio_steps - 2),
    }


def _median_of(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def step_table(loaded, engine, inputs, steps: int, repeats: int = 3) -> dict:
    """ms per decode step: inside transformers' generate, the engine's plain step, its lean step
    (median of `repeats`, `steps` steps each)."""
    table = {
        "steps": steps,
        "generate": _median_of([time_generate_steps(loaded, inputs, steps, steps) for _ in range(repeats)]),
        "plain": _median_of([time_decode_steps(engine, inputs, steps, lean=False) for _ in range(repeats)]),
    }
    if engine.lean:
        table["lean"] = _median_of([time_decode_steps(engine, inputs, steps, lean=True) for _ in range(repeats)])
        for part in ("thinker_step_ms", "talker_step_ms"):
            table.setdefault("speedup_vs_generate", {})[part] = table["generate"][part] / table["lean"][part]
            table.setdefault("speedup_vs_plain", {})[part] = table["plain"][part] / table["lean"][part]
    return table


def synthetic_inputs(loaded, prompt_tokens: int, seed: int = 0) -> PreparedInputs:
    """Random text-token prompt for models without a matching processor (random full size)."""
    vocab = loaded.model.config.thinker_config.audio_token_index  # ids below the special tokens
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=generator).to(loaded.device)
    return PreparedInputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [], False)


def median(runs: list[dict], key: str):
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(stream_runs: list[dict], reference_runs: list[dict]) -> dict:
    keys = [*METRICS, "audio_s", "text_tokens", "audio_tokens"] + (["peak_vram_mb"] if "peak_vram_mb" in stream_runs[0] else [])
    stream = {key: median(stream_runs, key) for key in keys}
    reference = {key: median(reference_runs, key) for key in keys}
    ratio = {
        key: stream[key] / reference[key]
        for key in (*METRICS, "peak_vram_mb")
        if stream.get(key) is not None and reference.get(key)
    }
    return {"stream": stream, "reference": reference, "ratio": ratio}


def print_table(summary: dict, file=sys.stdout) -> None:
    print(f"{'metric':<24}{'stream':>12}{'reference':>12}{'stream/ref':>12}", file=file)
    for key in summary["stream"]:
        row = [summary[side].get(key) for side in ("stream", "reference")] + [summary["ratio"].get(key)]
        cells = "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in row)
        print(f"{key:<24}{cells}", file=file)
    steps = summary.get("steps")
    if steps:
        columns = [c for c in ("generate", "plain", "lean") if c in steps]
        print(f"\n{'ms per decode step':<24}" + "".join(f"{c:>12}" for c in columns)
              + ("  lean speed-up vs generate" if "lean" in steps else ""), file=file)
        for part in ("thinker_step_ms", "talker_step_ms"):
            cells = "".join(f"{steps[c][part]:>12.3f}" for c in columns)
            extra = f"  {steps['speedup_vs_generate'][part]:.1f}x" if "lean" in steps else ""
            print(f"{part.removesuffix('_step_ms'):<24}{cells}{extra}", file=file)


def utterance(seconds: float, noise: float = 3e-3, seed: int = 0):
    """assets/question.wav repeated to `seconds` at 16 kHz, over a microphone-like noise floor
    (seeded): what a spoken turn sounds like to the engine."""
    import librosa
    import numpy as np

    speech, _ = librosa.load(ASSETS / "question.wav", sr=INPUT_SAMPLE_RATE)
    clip = np.resize(speech, int(seconds * INPUT_SAMPLE_RATE))
    return (clip + np.random.default_rng(seed).normal(0.0, noise, len(clip))).astype(np.float32)


def play_conversation(engine, options: GenerationOptions) -> list[dict]:
    """The CONVERSATION turn by turn, each reply's text going into the history. -> per-turn stats."""
    conversation, turns = [system_message(DEFAULT_SYSTEM_PROMPT)], []
    for kind, content in CONVERSATION:
        conversation = conversation + [{"role": "user", "content": content}]
        finished = [e for e in engine.stream(conversation, options) if isinstance(e, Finished)][0]
        stats = finished.stats
        turns.append({"kind": kind, "prompt_tokens": stats.prompt_tokens, "reused_tokens": stats.reused_prompt_tokens,
                      "time_to_first_text_s": stats.time_to_first_text_s,
                      "time_to_first_audio_s": stats.time_to_first_audio_s, "text_tokens": stats.text_tokens})
        conversation = conversation + [{"role": "assistant", "content": [{"type": "text", "text": finished.text}]}]
    return turns


def conversation_bench(loaded, args, options: GenerationOptions) -> dict:
    """The conversation with the cache off, then on, `args.repeats` times each, a fresh engine
    each time; per-turn medians. A short cache-off pass first warms up every media reader and encoder."""
    from omni_demo.engine.omni_engine import OmniEngine

    short = GenerationOptions(voice=args.voice, greedy=True, max_new_tokens=4, max_audio_tokens=30,
                              use_audio_in_video=True)
    play_conversation(OmniEngine(loaded, lean=args.lean, cache=CacheConfig(enabled=False)), short)
    passes = {"off": [], "on": []}
    for repeat in range(args.repeats):
        for name, cache in (("off", CacheConfig(enabled=False)), ("on", CacheConfig())):
            engine = OmniEngine(loaded, lean=args.lean, cache=cache)
            passes[name].append(play_conversation(engine, options))
            del engine
            gc.collect()
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    turns = []
    for index, (kind, _) in enumerate(CONVERSATION):
        plays = {name: [turns_[index] for turns_ in runs] for name, runs in passes.items()}
        turn = {"kind": kind, "prompt_tokens": plays["off"][0]["prompt_tokens"],
                "reused_tokens": plays["on"][0]["reused_tokens"]}
        for name in ("off", "on"):
            for key in ("time_to_first_text_s", "time_to_first_audio_s"):
                turn[f"{key}_{name}"] = median(plays[name], key)
        turns.append(turn)
    return {
        "turns": turns,
        "last_vs_first_turn_first_audio": {name: turns[-1][f"time_to_first_audio_s_{name}"]
                                           / turns[0][f"time_to_first_audio_s_{name}"] for name in ("off", "on")},
        "repeats": args.repeats,
    }


def spoken_turn(engine, options: GenerationOptions, seconds: float, listen: str) -> dict:
    """A text turn, then a `seconds` long spoken turn fed in 0.1 s chunks in real time, processed
    whole at its end (listen "off") or heard as it arrives ("on", or "exact": omni_demo.engine.listening).
    -> times from the end of speech."""
    history = [system_message(DEFAULT_SYSTEM_PROMPT), {"role": "user", "content": "Hi"}]
    reply = [e for e in engine.stream(history, options) if isinstance(e, Finished)][0]
    history.append({"role": "assistant", "content": reply.text})
    clip, chunk = utterance(seconds), 1600
    listener = engine.listen(history, options, exact=listen == "exact") if listen != "off" else None
    start = time.perf_counter()
    for index in range(0, len(clip), chunk):
        time.sleep(max(0.0, start + index / INPUT_SAMPLE_RATE - time.perf_counter()))  # the microphone's pace
        if listener is not None:
            listener.feed_audio(clip[index : index + chunk])
    time.sleep(max(0.0, start + len(clip) / INPUT_SAMPLE_RATE - time.perf_counter()))
    end_of_speech = time.perf_counter()
    if listener is not None:
        messages = listener.end_turn()
    else:
        messages = history + [{"role": "user", "content": [{"type": "audio", "audio": clip}]}]
    first_text = first_audio = None
    for event in engine.stream(messages, options):
        if first_text is None and isinstance(event, TextDelta):
            first_text = time.perf_counter() - end_of_speech
        if isinstance(event, AudioChunk):
            first_audio = time.perf_counter() - end_of_speech
            break
    return {"first_text_s": first_text, "first_audio_s": first_audio,
            "windows_heard": len(listener.windows) if listener is not None else 0,
            "windows_kept": listener.windows_kept if listener is not None else 0,
            "changed_values": listener.changed_values if listener is not None else 0}


def listening_bench(loaded, args, options: GenerationOptions) -> dict:
    """End of speech -> first text and audio of a spoken turn, listening off, on and exact; medians."""
    from omni_demo.engine.omni_engine import OmniEngine

    runs = {"off": [], "on": [], "exact": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(spoken_turn(OmniEngine(loaded, lean=args.lean), options, args.utterance_s, name))
            gc.collect()
    result = {name: {key: median(turns, key) for key in ("first_text_s", "first_audio_s")} for name, turns in runs.items()}
    for name in ("on", "exact"):
        for key in ("windows_heard", "windows_kept", "changed_values"):
            result[name][key] = min(turn[key] for turn in runs[name])
    result["utterance_s"] = args.utterance_s
    result["speed_up_first_audio"] = result["off"]["first_audio_s"] / result["on"]["first_audio_s"]
    return result


def print_conversation(result: dict, file=sys.stdout) -> None:
    print(f"{'turn':<5}{'holds':<13}{'prompt':>7}{'cached':>8}{'first text off':>16}{'on':>8}"
          f"{'first audio off':>17}{'on':>8}", file=file)
    for index, turn in enumerate(result["turns"], 1):
        times = [turn[f"time_to_first_{what}_s_{name}"] for what in ("text", "audio") for name in ("off", "on")]
        cells = [f"{t:.3f}" if t is not None else "-" for t in times]
        print(f"{index:<5}{turn['kind']:<13}{turn['prompt_tokens']:>7}{turn['reused_tokens']:>8}"
              f"{cells[0]:>16}{cells[1]:>8}{cells[2]:>17}{cells[3]:>8}", file=file)
    ratios = result["last_vs_first_turn_first_audio"]
    print(f"first audio, last turn / first turn: cache off {ratios['off']:.2f}x, on {ratios['on']:.2f}x", file=file)
    spoken = result["spoken"]
    print(f"\na {spoken['utterance_s']:.0f} s spoken turn fed in real time, from the end of speech:", file=file)
    for name, label in (("off", "processed whole at the end"), ("on", "heard while spoken"),
                        ("exact", "heard while spoken, exact")):
        extra = "" if name == "off" else (f"  ({spoken[name]['windows_kept']} of {spoken[name]['windows_heard']} "
                                          f"windows kept, {spoken[name]['changed_values']} feature values under the floor)")
        print(f"  {label:<28} first text {spoken[name]['first_text_s']:.3f} s, "
              f"first audio {spoken[name]['first_audio_s']:.3f} s{extra}", file=file)
    print(f"  listening: first audio {spoken['speed_up_first_audio']:.1f}x sooner", file=file)


def levels(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("stream counts are whole numbers of at least 1, e.g. 1,2,4,8")
    return counts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m omni_demo.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.set_defaults(model=TINY_MODEL)
    parser.add_argument("--random-full-size", action="store_true",
                        help="the 7B architecture (Qwen2_5OmniConfig defaults) with random weights")
    parser.add_argument("--text-tokens", type=int, default=64, help="thinker tokens, forced")
    parser.add_argument("--audio-tokens", type=int, default=500, help="talker codec tokens, forced (50 = 1 s)")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="prompt length for --random-full-size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--voice", default="Chelsie")
    parser.add_argument("--step-tokens", type=int, default=200, help="decode steps timed per step measurement")
    parser.add_argument("--conversation", action="store_true",
                        help="play a six-turn media conversation with the conversation cache off and on, "
                             "then a spoken turn fed in real time, listening off, on and exact")
    parser.add_argument("--utterance-s", type=float, default=10.0, help="the spoken turn's length (--conversation)")
    parser.add_argument("--concurrency", type=levels,
                        help="stream counts to play at once, e.g. 1,2,4,8: speech s per wall s, first audio p50/p95, "
                             "each stream's real-time factor (omni_demo/tools/concurrency.py)")
    parser.add_argument("--stagger-s", type=float, default=0.2, help="between two streams' arrivals (--concurrency)")
    parser.add_argument("--hostile", action="store_true",
                        help="how long a heavy request joining (a 1,000-turn history, a 4K video) holds a running "
                             "reply's speech back (omni_demo/tools/hostile.py)")
    parser.add_argument("--speech", action=argparse.BooleanOptionalAction, default=True,
                        help="--no-speech: text only (the talker and Token2Wav never run)")
    return parser.parse_args(argv)


def load_for_bench(args):
    from omni_demo.models.loading import build_random_model, load_model

    if not args.random_full_size:
        loaded = load_model(model_config(args))
        return loaded, None
    from transformers import AutoProcessor, Qwen2_5OmniConfig

    from omni_demo.models.tiny import ensure_tiny_checkpoint

    # Only the tokenizer is used (to detokenize); ids it does not know decode to nothing.
    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint())
    loaded = build_random_model(Qwen2_5OmniConfig(), model_config(args), processor)
    return loaded, synthetic_inputs(loaded, args.prompt_tokens)


def main(argv=None) -> int:
    from omni_demo.engine.omni_engine import OmniEngine

    args = parse_args(argv)
    if args.conversation and args.random_full_size:
        print("error: --conversation needs a model with its processor, not --random-full-size", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        loaded, inputs = load_for_bench(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = GenerationOptions(
        voice=args.voice, greedy=True, seed=0,
        max_new_tokens=args.text_tokens, min_new_tokens=args.text_tokens,
        max_audio_tokens=args.audio_tokens, min_audio_tokens=args.audio_tokens, speech=args.speech,
    )
    if args.conversation:
        result = conversation_bench(loaded, args, replace(options, use_audio_in_video=True))
        result["spoken"] = listening_bench(loaded, args, options)
        print_conversation(result)
        print(json.dumps(result))
        return 0
    engine = OmniEngine(loaded, lean=args.lean, cache=CacheConfig(enabled=False), batch=batch_config(args))
    if inputs is None:
        messages = [system_message(DEFAULT_SYSTEM_PROMPT), {"role": "user", "content": [{"type": "text", "text": PROMPT}]}]
        inputs = engine.prepare(messages, options)
    if args.hostile:
        from .hostile import hostile_main

        return hostile_main(engine, inputs, options)
    warmup = GenerationOptions(voice=args.voice, greedy=True, max_new_tokens=4, max_audio_tokens=30)
    run_stream(engine, inputs, warmup)
    if args.concurrency:
        from .concurrency import concurrency_main

        return concurrency_main(engine, inputs, options, args)
    run_reference(loaded, inputs, warmup)
    stream_runs, reference_runs = [], []
    for repeat in range(args.repeats):  # alternate the order, so neither always runs second
        runs = [lambda: stream_runs.append(run_stream(engine, inputs, options)),
                lambda: reference_runs.append(run_reference(loaded, inputs, options))]
        for run in runs if repeat % 2 == 0 else runs[::-1]:
            run()
        print(f"repeat {repeat + 1}/{args.repeats}: stream {stream_runs[-1]['total_s']:.2f} s, "
              f"reference {reference_runs[-1]['total_s']:.2f} s", file=sys.stderr)
    summary = summarize(stream_runs, reference_runs)
    summary["steps"] = step_table(loaded, engine, inputs, args.step_tokens)
    summary["setup"] = {
        "model": "random-full-size" if args.random_full_size else args.model,
        "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."), "attn": loaded.attn,
        "prompt_tokens": inputs.prompt_len, "text_tokens": args.text_tokens, "audio_tokens": args.audio_tokens,
        "repeats": args.repeats, "lean": engine.lean, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else None,
    }
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
