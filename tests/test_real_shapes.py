"""The whole engine at the real model's tensor shapes: a random checkpoint with every width, head
count, head_dim, mRoPE section, vocabulary, DiT and BigVGAN geometry of Qwen2.5-Omni-7B and two
layers per stack (built once into the cache, ~35 s; 2.9 GB on disk), run on the CPU in float32
and bfloat16: prefill with an image and an audio clip, lean decode steps, the talker, two DiT
windows and the vocoder. Tiny widths hide shape bugs (heads x head_dim = hidden, one head_dim
everywhere, a DiT codebook as large as the talker's vocabulary); these must not."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, SAMPLES_PER_CODE, BatchConfig, GenerationOptions, ModelConfig
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.events import AudioChunk, Finished, TextDelta
from omni_demo.models.checkpoints import resolve_model_path
from omni_demo.models.loading import load_model
from omni_demo.models.tiny import (
    DEFAULT_LAYERS,
    REAL_3B,
    REAL_7B,
    SPECIAL_TOKENS,
    TIED_THINKER,
    cache_dir,
    ensure_checkpoint,
    shape_config,
    special_token_ids,
)

from .conftest import ASSETS

LAYERS = DEFAULT_LAYERS  # 2: what `--model tiny-7b` loads
TEXT_TOKENS, CODES = 4, 30  # 30 codes: the first 24-code DiT chunk, then a flush of the rest
MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
    {"role": "user", "content": [
        {"type": "image", "image": str(ASSETS / "shapes.png")},
        {"type": "audio", "audio": str(ASSETS / "question.wav")},
        {"type": "text", "text": "What do you see and hear?"},
    ]},
]
# Exact lengths: random weights would stop at any point (or never).
OPTIONS = GenerationOptions(greedy=True, seed=0, min_new_tokens=TEXT_TOKENS, max_new_tokens=TEXT_TOKENS,
                            min_audio_tokens=CODES, max_audio_tokens=CODES)

# Fields that may differ from the real model: layer counts and the layer-index lists that follow them.
LAYER_FIELDS = {"num_hidden_layers", "encoder_layers", "depth", "layer_types", "fullatt_block_indexes",
                "look_ahead_layers", "look_backward_layers"}


def _leaves(tree: dict, prefix=()) -> dict:
    """{(key, subkey, ...): value} for every non-dict value of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _config_leaves(config) -> dict:
    skip = {"transformers_version", "_name_or_path", "dtype"}
    return {path: value for path, value in _leaves(config.to_dict()).items() if path[-1] not in skip}


@pytest.mark.parametrize("shape", ["7b", "3b"])
def test_only_layer_counts_differ_from_the_real_config(shape):
    """Compared with `Qwen2_5OmniConfig()` field by field, so it cannot drift: the checkpoint
    differs only in layer counts, in the documented corrections of those defaults to the published
    config (REAL_7B, and REAL_3B for the 3B) and in its tied thinker lm_head."""
    from transformers import Qwen2_5OmniConfig

    default, ours = _config_leaves(Qwen2_5OmniConfig()), _config_leaves(shape_config(shape, LAYERS))
    documented = _leaves(REAL_7B) | (_leaves(REAL_3B) if shape == "3b" else {}) | _leaves(TIED_THINKER)
    assert set(default) <= set(ours) and set(ours) - set(default) <= set(documented)
    differing = {path for path in ours if path not in default or ours[path] != default[path]}
    unexplained = {path for path in differing if path[-1] not in LAYER_FIELDS and path not in documented}
    assert not unexplained, f"{shape} differs from the real config beyond layer counts: {sorted(unexplained)}"
    for path, value in documented.items():
        if path[-1] not in LAYER_FIELDS:
            assert ours[path] == value, path
    for path, value in ours.items():
        if path[-1] in {"num_hidden_layers", "encoder_layers", "depth"}:
            assert value == LAYERS, path


@pytest.mark.parametrize("shape", ["7b", "3b"])
@pytest.mark.parametrize("layers", [2, 3, 8])
def test_fewer_layers_keep_every_kind_of_layer(shape, layers):
    config = shape_config(shape, layers)
    vision, dit = config.thinker_config.vision_config, config.token2wav_config.dit_config
    assert vision.fullatt_block_indexes and set(vision.fullatt_block_indexes) < set(range(layers))
    assert dit.look_ahead_layers and dit.look_backward_layers
    assert set(dit.look_ahead_layers) | set(dit.look_backward_layers) <= set(range(layers))
    assert not set(dit.look_ahead_layers) & set(dit.look_backward_layers)
    text, talker = config.thinker_config.text_config, config.talker_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) * 2 == head_dim == 128
    assert sum(talker.rope_parameters["mrope_section"]) * 2 == talker.head_dim == (128 if shape == "7b" else 64)


@pytest.fixture(scope="session")
def real_dir():
    return ensure_checkpoint("7b", LAYERS)


def test_tokenizer_puts_qwen_special_tokens_at_the_config_ids(real_dir):
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    config = AutoConfig.from_pretrained(real_dir)
    thinker = config.thinker_config
    processor = AutoProcessor.from_pretrained(real_dir)
    tokenizer = processor.tokenizer
    special = special_token_ids(config)
    assert special["<|endoftext|>"] == 151643 and len(tokenizer) == special["<|file_sep|>"] + 1
    assert {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS} == special
    ids = tokenizer("<|im_start|>user\n<|IMAGE|><|AUDIO|><|VIDEO|>")["input_ids"]
    assert ids == [special["<|im_start|>"], *tokenizer("user\n")["input_ids"],
                   thinker.image_token_index, thinker.audio_token_index, thinker.video_token_index]
    generation = GenerationConfig.from_pretrained(real_dir)
    assert generation.eos_token_id == [special["<|im_end|>"], special["<|endoftext|>"]]

    speakers = torch.load(real_dir / "spk_dict.pt", weights_only=True)
    talker = config.talker_config
    tts = [talker.tts_text_pad_token_id, talker.tts_text_start_token_id, talker.tts_text_end_token_id]
    bos = [speaker["bos_token"] for speaker in speakers.values()]
    assert sorted(speakers) == ["Chelsie", "Ethan"] and len(set(bos + tts)) == 5
    assert all(len(tokenizer) <= i < thinker.text_config.vocab_size for i in bos + tts)
    assert speakers["Chelsie"]["cond"].shape == (1, config.token2wav_config.dit_config.enc_emb_dim)


def test_chat_template_expands_every_medium_at_the_config_ids(real_dir):
    from PIL import Image
    from transformers import AutoConfig, AutoProcessor

    thinker = AutoConfig.from_pretrained(real_dir).thinker_config
    processor = AutoProcessor.from_pretrained(real_dir)
    messages = [{"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "audio", "audio": "b"},
                                             {"type": "video", "video": "c"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>" in text
    out = processor(text=text, images=[Image.open(ASSETS / "shapes.png")], audio=[np.zeros(16000, np.float32)],
                    videos=[np.zeros((4, 112, 112, 3), np.uint8)], return_tensors="pt")
    ids = out["input_ids"][0].tolist()
    merge = thinker.vision_config.spatial_merge_size ** 2
    assert ids.count(thinker.image_token_index) == int(out["image_grid_thw"].prod()) // merge
    assert ids.count(thinker.video_token_index) == int(out["video_grid_thw"].prod()) // merge
    assert ids.count(thinker.audio_token_index) == 25  # 1 s of audio: 25 tokens of 40 ms
    assert ids.count(thinker.vision_start_token_id) == 2 and ids.count(thinker.audio_start_token_id) == 1


def test_model_names_resolve_to_the_cached_checkpoint(real_dir):
    assert resolve_model_path("tiny-7b") == resolve_model_path(f"tiny-7b-l{LAYERS}") == (str(real_dir), True)
    assert real_dir == cache_dir("7b", LAYERS)
    assert json.loads((real_dir / "tiny.json").read_text())["shape"] == "7b"


def _reply(engine) -> list:
    return list(engine.stream(MESSAGES, OPTIONS))


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def run(request, real_dir):
    """One dtype at a time (float32 holds 5.8 GB of weights): the model, its lean engine, the lean
    reply and, in float32, the plain reply."""
    dtype = request.param
    loaded = load_model(ModelConfig(model=str(real_dir), device="cpu", dtype=dtype))
    engine = OmniEngine(loaded, lean=True, batch=BatchConfig(max_batch=1))
    events = _reply(engine)
    plain = _reply(OmniEngine(loaded, lean=False)) if dtype == "float32" else None
    yield {"dtype": dtype, "loaded": loaded, "engine": engine, "events": events, "plain": plain}
    del loaded, engine
    gc.collect()


def test_weights_have_the_real_shapes(run):
    model, dtype = run["loaded"].model, getattr(torch, run["dtype"])
    thinker, talker = model.thinker, model.talker
    assert thinker.get_input_embeddings().weight.shape == (152064, 3584)
    assert thinker.lm_head.weight.shape == (152064, 3584) and thinker.lm_head.weight.dtype == dtype
    layer = thinker.model.language_model.layers[0]
    assert layer.self_attn.k_proj.weight.shape == (4 * 128, 3584)  # 4 KV heads of 128
    assert layer.mlp.gate_proj.weight.shape == (18944, 3584)
    assert thinker.model.visual.blocks[0].attn.q.weight.shape == (1280, 1280)  # 16 heads of 80
    assert thinker.model.audio_tower.proj.weight.shape == (3584, 1280)
    assert talker.thinker_to_talker_proj.weight.shape == (896, 3584)
    talker_attn = talker.model.layers[0].self_attn
    assert talker_attn.q_proj.weight.shape == (12 * 128, 896)  # 12 heads x 128 != 896 wide
    assert talker.codec_head.weight.shape == (8448, 896)
    dit, bigvgan = model.token2wav.code2wav_dit_model, model.token2wav.code2wav_bigvgan_model
    assert dit.text_embed.codec_embed.weight.shape == (8194, 512) and dit.proj_out.weight.dtype == torch.float32
    assert dit.transformer_blocks[0].attn.to_q.weight.shape == (16 * 64, 1024)
    assert bigvgan.conv_pre.weight.shape == (1536, 80, 7)


def test_lean_caches_have_the_real_head_dims(run):
    """The lean steps' static KV caches: [layers, slots + the scratch slot (--max-batch 1 here), KV heads,
    positions, head_dim]."""
    engine, dtype = run["engine"], getattr(torch, run["dtype"])
    assert engine.lean_steps["thinker"].keys.shape == (LAYERS, 2, 4, 32768, 128)
    assert engine.lean_steps["talker"].keys.shape == (LAYERS, 2, 4, 32768, 128)
    assert engine.lean_steps["thinker"].keys.dtype == dtype


def test_reply_streams_text_and_exactly_480_samples_per_code(run):
    events = run["events"]
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.stop_reason == "length"
    assert len(finished.text_token_ids) == TEXT_TOKENS and len(finished.codec_token_ids) == CODES
    assert finished.stats.prompt_tokens > 150  # the image and the audio clip are in the prompt
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == finished.text and finished.text.strip()
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert len(chunks) >= 2  # the first DiT chunk, then the flush
    assert [c.start_sample for c in chunks] == list(np.cumsum([0] + [len(c.samples) for c in chunks[:-1]]))
    samples = np.concatenate([c.samples for c in chunks])
    assert len(samples) == finished.audio_samples == SAMPLES_PER_CODE * CODES
    assert samples.dtype == np.float32 and np.isfinite(samples).all() and samples.any()


def test_lean_steps_match_plain_steps_in_float32(run):
    if run["plain"] is None:
        pytest.skip("bfloat16: lean and plain steps may round differently (measured equal here)")
    lean, plain = run["events"][-1], run["plain"][-1]
    assert lean.text_token_ids == plain.text_token_ids
    assert lean.codec_token_ids == plain.codec_token_ids
    assert lean.audio_samples == plain.audio_samples == SAMPLES_PER_CODE * CODES
