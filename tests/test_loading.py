"""Model loading picks sensible defaults and fails with messages a person can act on."""

import shutil
import time

import pytest
import torch

from omni_demo.config import ModelConfig
from omni_demo.models.loading import ModelLoadError, load_model, pick_attn, pick_device, pick_dtype


def test_defaults_on_cpu():
    device = pick_device("auto")
    if not torch.cuda.is_available():
        assert device.type == "cpu"
        assert pick_dtype("auto", device) == torch.float32
        assert pick_attn("auto", device) == "sdpa"
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float16", device) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_cuda_requests_without_cuda_are_refused():
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ModelLoadError, match="flash-attn"):
        pick_attn("flash_attention_2", torch.device("cpu"))


def test_incomplete_directory_names_what_is_missing(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(model=str(tmp_path)))
    message = str(err.value)
    assert "spk_dict.pt" in message and "weights" in message and "processor config" in message
    assert "tokenizer" not in message.split("missing")[1]
    assert "--model tiny" in message


def test_file_instead_of_directory(tiny_dir):
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(ModelConfig(model=str(tiny_dir / "config.json")))


def test_neither_directory_nor_hub_id():
    with pytest.raises(ModelLoadError, match="neither a local directory nor a hub id"):
        load_model(ModelConfig(model="./no/such/dir"))


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    # A closed port on loopback stands in for a machine without network access.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelConfig(model="someone/not-cached-model"))
    assert time.monotonic() - start < 30
    assert "could not fetch 'someone/not-cached-model'" in str(err.value)
    assert "--model tiny" in str(err.value)


def test_offline_mode_says_so(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_model(ModelConfig(model="someone/not-cached-model"))
