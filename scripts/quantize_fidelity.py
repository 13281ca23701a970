"""How far int8 and int4 (--quantize) move the thinker and the talker from the unquantized model,
on the real widths (tiny-7b: the 7B's every width, 2 layers per stack, random weights), on this CPU.

For each precision: teacher-forced logits over one fixed sequence (a prompt and the unquantized
model's own greedy continuation), compared with the unquantized model's: top-1 agreement, the
largest and the mean absolute logit difference, and the difference relative to the logits' spread;
then the greedy reply's tokens (how many leading tokens equal the unquantized reply's), and the
lean decode step's time (text only, batch of one).

    python scripts/quantize_fidelity.py [--model tiny-7b] [--tokens 48]
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omni_demo.config import BatchConfig, GenerationOptions, ModelConfig  # noqa: E402
from omni_demo.engine.omni_engine import OmniEngine  # noqa: E402
from omni_demo.events import TextDelta  # noqa: E402
from omni_demo.models.loading import load_model, quiet_libraries  # noqa: E402
from omni_demo.models.quantize import held_bytes  # noqa: E402

MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "Tell me a short story about a robot who sings."}]}]


def decode_step_s(engine, tokens: int) -> float:
    """The median time between two text tokens of a greedy text-only reply (the lean step, batch of one)."""
    options = GenerationOptions(greedy=True, seed=0, speech=False, min_new_tokens=tokens, max_new_tokens=tokens)
    stamps = [time.perf_counter() for event in engine.stream(MESSAGES, options) if isinstance(event, TextDelta)]
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def sequence(loaded, tokens: int) -> torch.Tensor:
    """The prompt and the model's greedy continuation, as ids [1, T] (plain transformers generate)."""
    processor = loaded.processor
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = processor(text=text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = loaded.model.thinker.generate(input_ids=ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                            do_sample=False)
    return out


def logits_over(loaded, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return loaded.model.thinker(input_ids=ids).logits[0].float()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-7b")
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    reference_ids = reference_logits = None
    print(f"{args.model}, CPU, bfloat16; {args.tokens} continuation tokens")
    print("| precision | decoder bytes held | top-1 agreement | max abs logit diff | mean abs diff | "
          "diff / logit std | greedy tokens equal | decode step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for quantization in ("none", "int8", "int4"):
        loaded = load_model(ModelConfig(model=args.model, device="cpu", dtype="bfloat16", quantize=quantization))
        if reference_ids is None:
            reference_ids = sequence(loaded, args.tokens)
        logits = logits_over(loaded, reference_ids)
        if reference_logits is None:
            reference_logits = logits
        prompt = reference_ids.shape[1] - args.tokens
        span = slice(prompt - 1, None)  # the positions that predict the continuation
        agree = (logits[span].argmax(-1) == reference_logits[span].argmax(-1)).float().mean().item()
        diff = (logits[span] - reference_logits[span]).abs()
        greedy = sequence(loaded, args.tokens)[0, prompt:]
        same = int((greedy == reference_ids[0, prompt:]).cumprod(0).sum())
        engine = OmniEngine(loaded, batch=BatchConfig(max_batch=1))
        step = decode_step_s(engine, args.tokens)
        engine.close()
        decoders = held_bytes(loaded.model.thinker.model.language_model) + held_bytes(loaded.model.talker.model)
        print(f"| {quantization} | {decoders / 1e9:.2f} GB | {agree:.1%} | {diff.max():.3f} | {diff.mean():.4f} | "
              f"{diff.mean() / reference_logits[span].std():.3f} | {same} of {args.tokens} | {step * 1e3:.1f} ms |")
        del loaded, engine
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
