"""The tiny checkpoint: complete, small, deterministic, and loaded like the real model."""

import hashlib
import json
import subprocess
import sys

import torch

from omni_demo.config import ModelConfig
from omni_demo.models.loading import load_model
from omni_demo.models.tiny import CHAT_TEMPLATE


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_builds_a_small_deterministic_checkpoint(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "omni_demo.models.tiny", str(tmp_path / name)], check=True,
                       capture_output=True)
    a, b = tmp_path / "a", tmp_path / "b"
    size = sum(f.stat().st_size for f in a.iterdir())
    assert size < 10e6, f"tiny checkpoint is {size / 1e6:.1f} MB"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(a / name) == _digest(b / name), f"{name} differs between two builds"
    speakers_a = torch.load(a / "spk_dict.pt", weights_only=True)
    speakers_b = torch.load(b / "spk_dict.pt", weights_only=True)
    assert sorted(speakers_a) == ["Chelsie", "Ethan"]
    for voice in speakers_a:
        assert torch.equal(speakers_a[voice]["ref_mel"], speakers_b[voice]["ref_mel"])


def test_loads_through_the_real_classes(tiny_dir):
    loaded = load_model(ModelConfig(model=str(tiny_dir), device="cpu"))
    assert type(loaded.model).__name__ == "Qwen2_5OmniForConditionalGeneration"
    assert type(loaded.processor).__name__ == "Qwen2_5OmniProcessor"
    assert loaded.voices == ["Chelsie", "Ethan"]
    assert loaded.is_random and loaded.dtype == torch.float32 and loaded.attn == "sdpa"
    assert loaded.model.token2wav.code2wav_dit_model.proj_out.weight.dtype == torch.float32
    assert loaded.processor.chat_template == CHAT_TEMPLATE
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["thinker_config"]["text_config"]["hidden_size"] == 64
    ids = loaded.processor.tokenizer("<|im_start|>user\n<|IMAGE|><|AUDIO|><|VIDEO|>")["input_ids"]
    special = loaded.model.config.thinker_config
    assert {special.image_token_index, special.audio_token_index, special.video_token_index} <= set(ids)


def test_tiny_model_alias_builds_into_the_cache(tiny_dir):
    assert (tiny_dir / "tiny.json").exists()
    assert load_model(ModelConfig(model="tiny", device="cpu")).path == str(tiny_dir)
