"""What a model needs in memory, read from its config before any weight is downloaded.

    python -m omni_demo.memory --model Qwen/Qwen2.5-Omni-7B --quantize int4 --gpu-gb 12

The model is built on the meta device (no memory, no weights) and every parameter and buffer is
counted at the precision it will have: the decoders' linears as the chosen quantization holds
them (omni_demo.models.quantize.bytes_after, exact), the rest at the model's dtype, Token2Wav in
float32. The static KV caches are exact too (one slot per reply of a batch, plus the scratch slot
the batched step writes its padding to). Working memory (activations of the largest image through
the vision tower, a prefill piece, a Token2Wav batch) is an estimate, named as one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from omni_demo.models.quantize import QUANTIZATIONS, bytes_after, target_linears

GB, GIB = 1e9, 2**30  # figures in GB; a card's size (--gpu-gb) in GiB, as cards are sold ("12 GB": 12 GiB)
MARGIN = 0.9  # `--quantize auto` plans for this share of the free memory
# Published configs, so a plan needs no download for the two official sizes.
KNOWN_SHAPES = {"Qwen/Qwen2.5-Omni-7B": "7b", "Qwen/Qwen2.5-Omni-3B": "3b"}
COMPONENTS = (  # (label, parameter-name prefix), first match wins
    ("thinker embeddings", "thinker.model.language_model.embed_tokens"),
    ("thinker decoder", "thinker.model.language_model"),
    ("thinker lm_head", "thinker.lm_head"),
    ("audio encoder", "thinker.model.audio_tower"),
    ("vision encoder", "thinker.model.visual"),
    ("talker", "talker"),
    ("Token2Wav (float32)", "token2wav"),
)


@dataclass
class MemoryPlan:
    model: str
    quantization: str
    dtype: torch.dtype
    device_type: str
    parts: dict[str, int]  # label -> bytes (weights, caches, working memory)
    slots: int
    window: int
    host: dict[str, int]  # label -> bytes kept in host memory instead (not in `total`)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def weights(self) -> int:
        return sum(size for label, size in self.parts.items() if label in dict(COMPONENTS))

    def table(self, gpu_gb: float | None = None) -> str:
        lines = [f"{self.model}: {self.quantization}, {str(self.dtype).removeprefix('torch.')} on {self.device_type}, "
                 f"{self.slots} reply slot(s) of {self.window:,} tokens"]
        lines += [f"  {label:<34} {size / GB:7.2f} GB" for label, size in self.parts.items()]
        lines.append(f"  {'in all':<34} {self.total / GB:7.2f} GB")
        lines += [f"  {label + ' (in host memory)':<34} {size / GB:7.2f} GB" for label, size in self.host.items()]
        if gpu_gb is not None:
            verdict = "fits" if self.total <= gpu_gb * GIB * MARGIN else "does not fit"
            lines.append(f"  {verdict} a {gpu_gb:g} GB device (planning for {MARGIN:.0%} of it)")
        return "\n".join(lines)


def model_config_of(name: str):
    """The Qwen2.5-Omni config of a hub id, directory or tiny name, without fetching weights."""
    from transformers import AutoConfig

    if name in KNOWN_SHAPES:
        from omni_demo.models.tiny import real_config

        return real_config(KNOWN_SHAPES[name])
    from omni_demo.models.checkpoints import resolve_config_path

    return AutoConfig.from_pretrained(resolve_config_path(name))


def meta_model(config, dtype: torch.dtype):
    from transformers import Qwen2_5OmniForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=dtype)
    model.token2wav.float()
    return model


def plan(model, name: str, quantization: str, dtype: torch.dtype, device_type: str, slots: int = 1,
         window: int | None = None) -> MemoryPlan:
    """The bytes `model` (any device, meta included) holds after `quantization`, with the static
    caches for `slots` replies over `window` tokens (default: the model's own windows)."""
    targets = {f"{name}.weight": linear for name, linear in target_linears(model).items()}
    parts = {label: 0 for label, _ in COMPONENTS}
    seen = set()
    for key, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        label = next(label for label, prefix in COMPONENTS if key.startswith(prefix))
        linear = targets.get(key)
        parts[label] += (bytes_after(linear.out_features, linear.in_features, quantization, device_type, dtype)
                         if linear is not None else tensor.numel() * tensor.element_size())
    host = {}
    tied = model.thinker.lm_head.weight is model.thinker.get_input_embeddings().weight
    if quantization != "none" and device_type == "cuda" and not tied:  # omni_demo.models.quantize.embeddings_to_host
        host["thinker embeddings"] = parts.pop("thinker embeddings")
    windows = decoder_windows(model.config, window)
    parts["static KV caches"] = (slots + 1) * sum(kv_bytes(model, stack, windows[stack], dtype) for stack in windows)
    parts["working memory (estimate)"] = working_bytes(model.config, dtype)
    return MemoryPlan(name, quantization, dtype, device_type, parts, slots, min(windows.values()), host)


def decoder_windows(config, window: int | None) -> dict[str, int]:
    windows = {"thinker": config.thinker_config.text_config.max_position_embeddings}
    if config.enable_audio_output:
        windows["talker"] = config.talker_config.max_position_embeddings
    return {name: min(size, window or size) for name, size in windows.items()}


def kv_bytes(model, stack: str, window: int, dtype: torch.dtype) -> int:
    """One slot's keys and values over `window` positions (omni_demo.engine.decode_step.LeanStep)."""
    config = model.config.thinker_config.text_config if stack == "thinker" else model.config.talker_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * window * element


def working_bytes(config, dtype: torch.dtype, prefill_tokens: int = 512, image_tokens: int = 4096) -> int:
    """Estimate: the largest image's patches through one vision block (q, k, v, MLP), a prefill
    piece through one decoder layer with its logits, and a Token2Wav batch's DiT activations."""
    element = torch.empty((), dtype=dtype).element_size()
    vision, text = config.thinker_config.vision_config, config.thinker_config.text_config
    patches = image_tokens * vision.spatial_merge_size ** 2
    encoder = patches * (4 * vision.hidden_size + 2 * vision.intermediate_size) * element
    prefill = prefill_tokens * (6 * text.hidden_size + 3 * text.intermediate_size) * element + text.vocab_size * 4
    dit = config.token2wav_config.dit_config
    token2wav = 4 * 2 * 168 * (6 * dit.hidden_size + 2 * dit.hidden_size * dit.ff_mult) * 4  # 4 windows, CFG pairs
    return encoder + prefill + token2wav


def auto_quantization(config, name: str, dtype: torch.dtype, device: torch.device, free_bytes: int,
                      slots: int = 1, window: int | None = None) -> tuple[str, str]:
    """The least quantization whose plan fits `MARGIN` of `free_bytes`, and a line saying why."""
    model = meta_model(config, dtype)
    plans = {q: plan(model, name, q, dtype, device.type, slots, window) for q in QUANTIZATIONS}
    budget = free_bytes * MARGIN
    chosen = next((q for q, p in plans.items() if p.total <= budget), "int4")
    needs = ", ".join(f"{q} {p.total / GB:.1f} GB" for q, p in plans.items())
    verdict = "" if plans[chosen].total <= budget else " (even int4 may not fit: try a shorter --context-window)"
    return chosen, f"--quantize auto chose {chosen}: {free_bytes / GB:.1f} GB free; needs {needs}{verdict}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_demo.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-Omni-7B", help="hub id, local directory or tiny name")
    parser.add_argument("--quantize", choices=("all",) + QUANTIZATIONS, default="all")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="whose int4 layout to count")
    parser.add_argument("--max-batch", type=int, default=1, help="reply slots (default 1)")
    parser.add_argument("--context-window", type=int, default=4096, help="tokens per reply slot (default 4096)")
    parser.add_argument("--gpu-gb", type=float, help="say whether it fits a card of this size (GiB, as sold)")
    args = parser.parse_args(argv)
    from omni_demo.errors import ModelLoadError

    try:
        model = meta_model(model_config_of(args.model), getattr(torch, args.dtype))
    except (ModelLoadError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for quantization in QUANTIZATIONS if args.quantize == "all" else (args.quantize,):
        print(plan(model, args.model, quantization, getattr(torch, args.dtype), args.device, args.max_batch,
                   args.context_window).table(args.gpu_gb))
    return 0
