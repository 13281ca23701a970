"""--quantize int8/int4 (torchao, on load), the memory plan it is chosen by, the 3B, and the
refusal of pre-quantized GPTQ/AWQ checkpoints. The real-width checkpoints (tiny-7b, tiny-3b: every
width of the real model, 2 layers per stack) run on the CPU in bfloat16."""

from __future__ import annotations

import gc
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

from omni_demo.config import BatchConfig, GenerationOptions, ModelConfig
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.errors import ModelLoadError
from omni_demo.events import AudioChunk, TextDelta
from omni_demo.models.loading import load_model
from omni_demo.models.memory import COMPONENTS, GB, GIB, auto_quantization, meta_model, model_config_of, plan
from omni_demo.models.quantize import is_quantized, target_linears, tensor_bytes

from .conftest import text_messages

TEXT_TOKENS, CODES = 6, 30
OPTIONS = GenerationOptions(greedy=True, seed=0, min_new_tokens=TEXT_TOKENS, max_new_tokens=TEXT_TOKENS,
                            min_audio_tokens=CODES, max_audio_tokens=CODES)


def held_by_component(model) -> dict[str, int]:
    """What the loaded model holds, grouped as the plan groups it, each tensor counted once."""
    held, seen = {label: 0 for label, _ in COMPONENTS}, set()
    for key, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            held[next(label for label, prefix in COMPONENTS if key.startswith(prefix))] += tensor_bytes(tensor)
    return held


def reply(engine, options=OPTIONS):
    events = list(engine.stream(text_messages(), options))
    text = "".join(event.text for event in events if isinstance(event, TextDelta))
    samples = sum(len(event.samples) for event in events if isinstance(event, AudioChunk))
    return text, samples


@pytest.mark.parametrize("model, quantization", [("tiny-7b", "int8"), ("tiny-7b", "int4"), ("tiny-3b", "int4")])
def test_quantized_real_width_model_answers_and_holds_what_the_plan_says(model, quantization):
    """The plan is made from the config alone (a meta-device model, nothing loaded); the loaded,
    quantized model must hold exactly those bytes, component by component, and answer with speech."""
    loaded = load_model(ModelConfig(model=model, device="cpu", quantize=quantization))
    try:
        assert loaded.dtype == torch.bfloat16 and loaded.precision == f"bfloat16, {quantization} decoders"
        linears = target_linears(loaded.model)
        assert len(linears) == 2 * 7 * 2  # two stacks, two layers each, seven projections (the tied lm_head stays)
        assert all(is_quantized(linear.weight) for linear in linears.values())
        from transformers import AutoConfig

        expected = plan(meta_model(AutoConfig.from_pretrained(loaded.path), loaded.dtype), model, quantization,
                        loaded.dtype, "cpu")
        held = held_by_component(loaded.model)
        assert held == {label: expected.parts[label] for label in held}
        engine = OmniEngine(loaded, batch=BatchConfig(max_batch=2))
        text, samples = reply(engine)
        engine.close()
        assert len(text) >= TEXT_TOKENS and samples == CODES * 480
    finally:
        del loaded
        gc.collect()


def test_lean_steps_on_quantized_weights_equal_the_plain_transformers_steps():
    """The lean step runs each quantized projection through torchao (no fused q/k/v): greedy
    replies equal the plain transformers decode of the same quantized model."""
    loaded = load_model(ModelConfig(model="tiny", device="cpu", quantize="int8"))
    assert "thinker.lm_head" in target_linears(loaded.model)  # the toy thinker's head is its own: quantized
    options = GenerationOptions(greedy=True, seed=3, min_new_tokens=12, max_new_tokens=12, min_audio_tokens=40,
                                max_audio_tokens=40)
    lean, plain = OmniEngine(loaded, batch=BatchConfig(max_batch=2)), OmniEngine(loaded, lean=False)
    try:
        assert reply(lean, options) == reply(plain, options)
    finally:
        lean.close()
        plain.close()


def test_toy_widths_that_int4_cannot_group_keep_their_weights():
    from omni_demo.models.quantize import Quantized, bytes_after, unfit_reason

    assert unfit_reason(64, 48, "int4", "cpu") and unfit_reason(24, 64, "int4", "cpu")
    assert unfit_reason(24, 64, "int4", "cuda") is None and unfit_reason(24, 48, "int8", "cpu") is None
    assert bytes_after(24, 48, "int4", "cpu", torch.bfloat16) == 24 * 48 * 2
    assert "1 kept" in Quantized("int4", ["a"], {"b": "input width 48 is not a multiple of 32"}).summary()


def _plan_gb(output: str, quantization: str) -> float:
    block = output.split(f": {quantization}, ")[1]
    return float(re.search(r"in all\s+([\d.]+) GB", block).group(1))


def test_memory_plan_of_the_7b_fits_12_and_16_gb_cards():
    """`python -m omni_demo.memory` from the published config alone (no download): one reply slot of
    4,096 tokens; int4 fits a 12 GB card, int8 a 16 GB one."""
    out = subprocess.run([sys.executable, "-m", "omni_demo.memory", "--model", "Qwen/Qwen2.5-Omni-7B",
                          "--context-window", "4096", "--gpu-gb", "12"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    none, int8, int4 = (_plan_gb(out, q) for q in ("none", "int8", "int4"))
    assert int4 <= 11 < int8 <= 16 < none
    assert "thinker embeddings (in host memory)" in out and out.count("fits a 12 GB") == 1  # int4 only


def test_auto_picks_the_least_quantization_that_fits_the_free_memory():
    config, cuda = model_config_of("Qwen/Qwen2.5-Omni-7B"), torch.device("cuda")

    def pick(free_gib):
        return auto_quantization(config, "7b", torch.bfloat16, cuda, int(free_gib * GIB), window=4096)[0]

    assert [pick(gib) for gib in (40, 17, 12, 6)] == ["none", "int8", "int4", "int4"]
    assert "needs none 23.8 GB" in auto_quantization(config, "7b", torch.bfloat16, cuda, 6 * GIB, window=4096)[1]
    assert load_model(ModelConfig(model="tiny", device="cpu")).quantization == "none"  # auto on a CPU


def test_3b_plan_counts_its_own_widths():
    model = meta_model(model_config_of("Qwen/Qwen2.5-Omni-3B"), torch.bfloat16)
    bf16 = plan(model, "3b", "none", torch.bfloat16, "cuda", window=4096)
    assert model.thinker.lm_head.weight.shape == (151936, 2048)
    assert bf16.parts["thinker lm_head"] == 151936 * 2048 * 2 and 12 * GB < bf16.total < 14 * GB


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-Omni-7B-GPTQ-Int4", "Qwen/Qwen2.5-Omni-7B-AWQ"])
def test_official_prequantized_ids_are_refused_at_once_with_what_to_use(name):
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        load_model(ModelConfig(model=name, device="cpu"))
    assert time.monotonic() - started < 5  # before any download
    assert "--model Qwen/Qwen2.5-Omni-7B --quantize int4" in str(caught.value)


def test_a_local_gptq_checkpoint_is_refused_with_what_to_use(tiny_dir, tmp_path):
    """A checkpoint whose config says GPTQ (as Qwen's does), made here from the tiny one."""
    local = shutil.copytree(tiny_dir, tmp_path / "omni-gptq")
    config = json.loads((local / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (local / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"GPTQ checkpoint.*Pillow 13.*--quantize int4"):
        load_model(ModelConfig(model=str(local), device="cpu"))


def test_context_window_sizes_the_static_caches_and_the_prompt_limit(loaded):
    from dataclasses import replace

    small = replace(loaded, context_window=512)
    engine = OmniEngine(small, batch=BatchConfig(max_batch=1))
    try:
        assert {step.max_len for step in engine.lean_steps.values()} == {512}
        assert engine.prompt_limit(GenerationOptions(max_new_tokens=100, max_audio_tokens=200)) == 512 - 2 - 200
    finally:
        engine.close()
    with pytest.raises(ValueError, match="context_window"):
        ModelConfig(context_window=16)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_on_cuda_holds_what_the_plan_says_and_its_graphs_answer(quantization):
    """CUDA's int4 layout (tile-packed, padded) and the host-memory embedding table, with the
    lean step captured as CUDA graphs over the quantized weights. tiny-7b ties its lm_head to the
    embeddings, so its table stays on the GPU."""
    loaded = load_model(ModelConfig(model="tiny-7b", device="cuda", quantize=quantization))
    from transformers import AutoConfig

    expected = plan(meta_model(AutoConfig.from_pretrained(loaded.path), loaded.dtype), "tiny-7b", quantization,
                    loaded.dtype, "cuda")
    held = held_by_component(loaded.model)
    assert held == {label: expected.parts[label] for label in held}
    engine = OmniEngine(loaded, batch=BatchConfig(max_batch=2))
    try:
        assert engine.lean_steps["thinker"].graphs  # captured over the quantized weights
        text, samples = reply(engine)
        assert len(text) >= TEXT_TOKENS and samples == CODES * 480
    finally:
        engine.close()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_the_server_answers_the_openai_client_with_speech_on_a_quantized_7b_shape(quantization):
    """`python -m omni_demo.serve --model tiny-7b --quantize ...` on the CPU, asked by the official
    client: text and exactly the asked length of speech, and /v1/models says what is running."""
    import base64

    openai = pytest.importorskip("openai")
    from .serverhelpers import API_KEY, ApiServer

    server = ApiServer("--model", "tiny-7b", "--quantize", quantization, "--api-key", API_KEY, "--max-batch", "1")
    try:
        api = openai.OpenAI(base_url=server.wait().base_url, api_key=API_KEY, max_retries=0, timeout=300)
        card = api.models.list().data[0].model_dump()
        assert card["id"] == "tiny-7b" and card["quantization"] == quantization
        assert card["precision"] == f"bfloat16, {quantization} decoders"
        stream = api.chat.completions.create(
            model="tiny-7b", messages=[{"role": "user", "content": "Tell me about the sea"}], stream=True,
            modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"}, temperature=0, seed=7,
            max_completion_tokens=TEXT_TOKENS, extra_body={"min_tokens": TEXT_TOKENS, "max_audio_tokens": CODES,
                                                           "min_audio_tokens": CODES})
        text, pcm = "", b""
        for chunk in stream:
            delta = chunk.model_dump()["choices"][0]["delta"] if chunk.choices else {}
            text += delta.get("content") or ""
            pcm += base64.b64decode((delta.get("audio") or {}).get("data") or "")
        assert len(text) >= TEXT_TOKENS and len(pcm) == CODES * 480 * 2
    finally:
        server.stop()
