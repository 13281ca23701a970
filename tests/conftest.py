"""Shared fixtures: the tiny checkpoint (built once per cache), the loaded model, the engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it)")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from omni_demo.models.loading import quiet_libraries

    quiet_libraries()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from omni_demo.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from omni_demo.config import ModelConfig
    from omni_demo.models.loading import load_model

    return load_model(ModelConfig(model="tiny", device="cpu"))


@pytest.fixture(scope="session")
def engine(loaded):
    from omni_demo.engine.omni_engine import OmniEngine

    return OmniEngine(loaded)


def text_messages(text: str = "Hello there, tell me a story", system: str = "You are Qwen, a virtual human"):
    from omni_demo.inputs.messages import system_message

    return [system_message(system), {"role": "user", "content": [{"type": "text", "text": text}]}]


def run(engine, messages, options, cancel=None):
    """All events of one reply, in order."""
    return list(engine.stream(messages, options, cancel))


@pytest.fixture(scope="session")
def api_server(tiny_dir):
    """`python -m omni_demo.serve --model tiny` on loopback: API key, one reply at a time and one waiting
    at most, small size and time limits."""
    from .serverhelpers import API_KEY, METRICS_KEY, ApiServer

    server = ApiServer("--api-key", API_KEY, "--metrics-key", METRICS_KEY, "--max-batch", "1", "--max-queue", "1",
                       "--max-request-mb", "2",
                       "--max-media-mb", "0.5", "--upload-timeout-s", "2").wait()
    yield server
    server.stop()
