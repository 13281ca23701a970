"""The lean decode step (static KV cache, fused matmuls; CUDA graphs on CUDA) against the plain
one (transformers' forward over a DynamicCache): the same greedy tokens and codes."""

import pytest
import torch

from omni_demo.config import GenerationOptions, ModelConfig
from omni_demo.engine.decode_step import graph_buckets
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.events import Finished
from omni_demo.models.loading import load_model

from .conftest import run
from .test_fidelity import CASES


@pytest.fixture(scope="module")
def plain(loaded):
    return OmniEngine(loaded, lean=False)


@pytest.mark.parametrize("case", list(CASES))
def test_lean_equals_plain(engine, plain, case):
    assert engine.lean and not plain.lean
    messages, use_audio_in_video = CASES[case]
    options = GenerationOptions(greedy=True, max_new_tokens=40, max_audio_tokens=120,
                                use_audio_in_video=use_audio_in_video)
    lean_done, plain_done = run(engine, messages, options)[-1], run(plain, messages, options)[-1]
    assert isinstance(lean_done, Finished) and isinstance(plain_done, Finished)
    assert lean_done.text_token_ids == plain_done.text_token_ids
    assert lean_done.codec_token_ids == plain_done.codec_token_ids


def test_fused_weights_keep_the_plain_path_intact(engine, plain):
    """Fusing re-seats q/k/v and gate/up weights as views of one tensor: same values, shared memory."""
    layer = engine.model.thinker.model.language_model.layers[0]
    fused = layer._omni_fused
    assert layer.self_attn.q_proj.weight.data_ptr() == fused.qkv_weight.data_ptr()
    assert torch.equal(fused.gate_up_weight[: layer.mlp.gate_proj.out_features], layer.mlp.gate_proj.weight)


def test_graph_buckets_cover_the_window():
    assert graph_buckets(4096) == [512, 1024, 2048, 4096]
    assert graph_buckets(3000) == [512, 1024, 2048, 3000]
    assert graph_buckets(100) == [100]


@pytest.mark.gpu
def test_cuda_graph_steps_equal_plain_on_gpu(tiny_dir):
    loaded = load_model(ModelConfig(model="tiny", device="cuda", dtype="float32"))
    lean, plain = OmniEngine(loaded, lean=True), OmniEngine(loaded, lean=False)
    assert lean.lean_steps["thinker"].graphs, "CUDA graphs should be captured at load"
    for case in CASES:
        messages, use_audio_in_video = CASES[case]
        options = GenerationOptions(greedy=True, max_new_tokens=40, max_audio_tokens=120,
                                    use_audio_in_video=use_audio_in_video)
        a, b = run(lean, messages, options)[-1], run(plain, messages, options)[-1]
        assert a.text_token_ids == b.text_token_ids and a.codec_token_ids == b.codec_token_ids, case
