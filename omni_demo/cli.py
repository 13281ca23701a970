"""Terminal client: stream one reply's text to stdout and its speech to a wav file.

    python -m omni_demo --model tiny --prompt "Describe this" --image assets/shapes.png --out reply.wav
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, SAMPLE_RATE, GenerationOptions
from omni_demo.flags import add_model_arguments, batch_config, model_config
from omni_demo.inputs.messages import system_message


def build_messages(prompt: str | None, system: str, images=(), audios=(), videos=()) -> list[dict]:
    content = [{"type": "image", "image": str(p)} for p in images]
    content += [{"type": "audio", "audio": str(p)} for p in audios]
    content += [{"type": "video", "video": str(p)} for p in videos]
    if prompt:
        content.append({"type": "text", "text": prompt})
    return ([system_message(system)] if system else []) + [{"role": "user", "content": content}]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m omni_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt", help="the user's text")
    parser.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    parser.add_argument("--audio", action="append", default=[], type=Path, help="audio file (repeatable)")
    parser.add_argument("--video", action="append", default=[], type=Path, help="video file (repeatable)")
    parser.add_argument("--use-audio-in-video", action="store_true", help="also feed each video's sound track")
    parser.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (Qwen speaks only with the default)")
    parser.add_argument("--voice", default="Chelsie", help="Chelsie or Ethan")
    parser.add_argument("--no-audio", action="store_true", help="text only: never run the talker")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding in thinker and talker")
    parser.add_argument("--seed", type=int, help="seed sampling and the DiT noise")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="thinker tokens (default 1024)")
    parser.add_argument("--max-audio-tokens", type=int, default=4096, help="talker codec tokens, 50 per second")
    parser.add_argument("--out", type=Path, help="write the spoken reply here (24 kHz wav)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of results and timings")
    args = parser.parse_args(argv)
    if not args.prompt and not (args.image or args.audio or args.video):
        parser.error("give --prompt and/or at least one --image, --audio or --video")
    return args


def run(args) -> dict:
    import numpy as np
    import soundfile as sf

    from omni_demo.engine.omni_engine import OmniEngine
    from omni_demo.events import AudioChunk, Finished, TextDelta
    from omni_demo.models.loading import load_model

    options = GenerationOptions(  # checked before the model loads: a bad value fails at once
        voice=args.voice, speech=not args.no_audio, greedy=args.greedy, seed=args.seed,
        max_new_tokens=args.max_new_tokens, max_audio_tokens=args.max_audio_tokens,
        use_audio_in_video=args.use_audio_in_video,
    )
    loaded = load_model(model_config(args))
    if loaded.is_random:
        print("note: tiny random-weight checkpoint; its replies are deliberately nonsense", file=sys.stderr)
    engine = OmniEngine(loaded, lean=args.lean, batch=batch_config(args))
    messages = build_messages(args.prompt, args.system, args.image, args.audio, args.video)
    chunks, finished = [], None
    for event in engine.stream(messages, options):
        if isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, AudioChunk):
            chunks.append(event.samples)
        elif isinstance(event, Finished):
            finished = event
    sys.stdout.write("\n")
    if args.out and chunks:
        sf.write(args.out, np.concatenate(chunks), SAMPLE_RATE, subtype="PCM_16")
        print(f"wrote {args.out} ({finished.stats.audio_s:.2f} s)", file=sys.stderr)
    return {
        "messages": finished.messages,
        "text": finished.text,
        "text_token_ids": finished.text_token_ids,
        "codec_token_ids": finished.codec_token_ids,
        "audio_samples": finished.audio_samples,
        "sample_rate": SAMPLE_RATE,
        "stop_reason": finished.stop_reason,
        **finished.stats.as_dict(),
    }


def main(argv=None) -> int:
    from omni_demo.errors import InputError, ModelLoadError
    from omni_demo.models.loading import quiet_libraries

    args = parse_args(argv)
    quiet_libraries()
    try:
        result = run(args)
    except (InputError, ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    return 0
