"""The model flags every entry point shares (app.py, the terminal client, the server, the bench),
each with an environment variable. No torch here: the app's --backend mode parses them too."""

from __future__ import annotations

import argparse
import os

from omni_demo.config import ATTN_IMPLEMENTATIONS, DEFAULT_MODEL, DTYPES, QUANTIZE_CHOICES, BatchConfig, ModelConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags of the app, the terminal client and the bench; each has an environment variable."""
    env = os.environ.get
    parser.add_argument("--model", default=env("OMNI_MODEL", DEFAULT_MODEL),
                        help="hub id, local directory, or 'tiny' (offline, random weights) (default %(default)s)")
    parser.add_argument("--device", default=env("OMNI_DEVICE", "auto"), help="cuda, cuda:1, cpu (default: auto)")
    parser.add_argument("--dtype", default=env("OMNI_DTYPE", "auto"), choices=DTYPES,
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--attn", default=env("OMNI_ATTN", "auto"), choices=ATTN_IMPLEMENTATIONS,
                        help="auto: flash_attention_2 where installed on CUDA, else sdpa")
    parser.add_argument("--quantize", default=env("OMNI_QUANTIZE", "auto"), choices=QUANTIZE_CHOICES,
                        help="weight-only int8/int4 of the thinker's and talker's decoder linears, on load (torchao); "
                             "auto: on CUDA the least that fits the free memory, none on a CPU "
                             "(see python -m omni_demo.memory)")
    parser.add_argument("--context-window", type=int, default=int(env("OMNI_CONTEXT_WINDOW", 0)) or None,
                        help="tokens each reply's KV caches hold, prompt and reply together (default: the model's "
                             "own, 32,768 for the 7B; 4096 saves 1.6 GB per reply on the 7B)")
    parser.add_argument("--lean", action=argparse.BooleanOptionalAction, default=env("OMNI_LEAN", "1") != "0",
                        help="lean decode steps: static KV cache, fused matmuls, CUDA graphs on CUDA (default on)")
    parser.add_argument("--max-batch", type=int, default=int(env("OMNI_MAX_BATCH", 0)) or None,
                        help="replies decoded together (default: as many KV slots as a share of the free memory "
                             "holds, at most 16 on CUDA, 8 on a CPU)")
    parser.add_argument("--realtime-guard", action=argparse.BooleanOptionalAction,
                        default=env("OMNI_REALTIME_GUARD", "1") != "0",
                        help="admit a new reply only while every running reply's speech stays ahead of real time; "
                             "--no-realtime-guard: everyone at once, speech slower than real time if need be")


def model_config(args) -> ModelConfig:
    try:
        return ModelConfig(model=args.model, device=args.device, dtype=args.dtype, attn=args.attn,
                           quantize=args.quantize, context_window=args.context_window)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def batch_config(args, **overrides) -> BatchConfig:
    """The scheduler's settings from --max-batch and --realtime-guard (and `overrides` by name)."""
    values = {"max_batch": args.max_batch, "realtime_guard": args.realtime_guard, **overrides}
    try:
        return BatchConfig(**values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
