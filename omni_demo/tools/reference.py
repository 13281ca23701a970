"""The transformers reference, `Qwen2_5OmniForConditionalGeneration.generate`, instrumented.

Used by the fidelity tests and the benchmark. Two ways to call it:
- as users do (`padded=False`): one prompt, so `generate` drops the all-ones mask and the talker
  loses its codec pad/bos conditioning and 3-D positions (the transformers 5.x defect);
- on its intended path (`padded=True`): the prompt as the longest row of a left-padded batch of
  two, which keeps the mask, so its tokens are what the model is meant to produce.
Images and videos get `talker_pixel_values=None` / `talker_pixel_values_videos=None`; otherwise
`generate` forwards them to the talker and fails ("model_kwargs are not used: pixel_values").
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from omni_demo.config import GenerationOptions
from omni_demo.engine.sampling import token_id_list
from omni_demo.inputs.prepare import prepare_inputs
from omni_demo.models.loading import LoadedModel

# Row 2 of the padded batch; it must tokenize shorter than the prompt under test.
FILLER = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


@dataclass
class ReferenceResult:
    text_token_ids: list[int]  # generated thinker tokens (stops after an end-of-turn token)
    codec_token_ids: list[int]  # talker codes before its end token
    waveform: torch.Tensor | None  # [n] float32
    time_to_first_text_s: float | None
    total_s: float
    thinker_generate_s: float  # thinker.generate alone
    talker_generate_s: float | None  # talker.generate alone


class _FirstTokenClock:
    """A generate() streamer that only notes when the first generated token arrives."""

    def __init__(self):
        self.calls = 0
        self.first_token_at = None

    def put(self, value):
        self.calls += 1  # the first call carries the prompt
        if self.calls == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self):
        pass


@contextmanager
def _record_generate(module):
    """Capture what `module.generate` returns and how long it took (synchronised on CUDA)."""
    captured = {}
    original = module.generate

    def generate(*args, **kwargs):
        start = time.perf_counter()
        captured["sequences"] = result = original(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        captured["seconds"] = time.perf_counter() - start
        captured["prompt_len"] = kwargs["input_ids"].shape[1]
        return result

    module.generate = generate
    try:
        yield captured
    finally:
        del module.generate  # back to the class method


def reference_generate(
    loaded: LoadedModel, messages, options: GenerationOptions, *, padded: bool = True
) -> ReferenceResult:
    inputs = prepare_inputs(loaded.processor, messages, use_audio_in_video=options.use_audio_in_video,
                            device=loaded.device, padding_rows=(FILLER,) if padded else ())
    if padded and inputs.tensors["attention_mask"][0].min() == 0:
        raise ValueError("the compared prompt must be the longest row of the padded batch")
    return reference_generate_batch(loaded, inputs.tensors, options, use_audio_in_video=inputs.use_audio_in_video)


def reference_generate_batch(
    loaded: LoadedModel, batch: dict, options: GenerationOptions, *, use_audio_in_video: bool = False
) -> ReferenceResult:
    """Run `generate` on processor output; results are row 0's."""
    model = loaded.model
    prompt_len = batch["input_ids"].shape[1]
    clock = _FirstTokenClock()
    kwargs = dict(
        speaker=options.voice,
        use_audio_in_video=use_audio_in_video,
        thinker_max_new_tokens=options.max_new_tokens,
        thinker_min_new_tokens=options.min_new_tokens,
        thinker_streamer=clock,
        talker_max_new_tokens=options.max_audio_tokens,
        talker_min_new_tokens=options.min_audio_tokens,
        talker_pixel_values=None,
        talker_pixel_values_videos=None,
    )
    if options.greedy:
        kwargs.update(thinker_do_sample=False, talker_do_sample=False)
    if not options.speech:
        kwargs["generation_mode"] = "text"
    if options.seed is not None:
        torch.manual_seed(options.seed)
    start = time.perf_counter()
    with torch.inference_mode(), _record_generate(model.thinker) as thinker_out, \
            _record_generate(model.talker) as talker_out:
        output = model.generate(**batch, **kwargs)
    total = time.perf_counter() - start
    sequences = output[0] if isinstance(output, tuple) else getattr(output, "sequences", output)
    thinker_eos = set(token_id_list(model.thinker.generation_config.eos_token_id))
    text_ids = _until(sequences[0, prompt_len:].tolist(), thinker_eos, keep=True)
    codes, waveform = [], None
    if options.speech:
        talker = model.talker
        generated = talker_out["sequences"][0, talker_out["prompt_len"] :].tolist()
        codes = _until(generated, {talker.codec_pad_token, talker.codec_eos_token}, keep=False)
        wavs = output[1]
        waveform = (wavs[0] if isinstance(wavs, list) else wavs).reshape(-1).float().cpu()
    first = None if clock.first_token_at is None else clock.first_token_at - start
    return ReferenceResult(text_ids, codes, waveform, first, total, thinker_out["seconds"],
                           talker_out.get("seconds"))


def _until(ids: list[int], stops: set[int], *, keep: bool) -> list[int]:
    """`ids` up to the first stop token (`keep`: including it)."""
    for index, token in enumerate(ids):
        if token in stops:
            return ids[: index + 1] if keep else ids[:index]
    return ids
