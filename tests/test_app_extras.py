"""The app's edges: ZeroGPU wrapping, webcam clips, start-up without a hub, the prompt warning."""

import os
import pickle
import subprocess
import sys
import time

import pytest
from gradio_client import Client, handle_file

from omni_demo.config import DEFAULT_SYSTEM_PROMPT, GenerationOptions
from omni_demo.events import AudioChunk, Finished

from .apphelpers import ROOT, SETTINGS, AppServer, collect
from .conftest import ASSETS, text_messages


def test_zerogpu_backend_runs_replies_under_spaces_gpu(engine, monkeypatch):
    import spaces

    from omni_demo.backends import zerogpu

    durations = []
    real_gpu = spaces.GPU

    def spy(*args, **kwargs):
        durations.append(kwargs.get("duration"))
        return real_gpu(*args, **kwargs)

    monkeypatch.setattr(spaces, "GPU", spy)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert zerogpu.on_zerogpu()
    backend = zerogpu.ZeroGPUBackend(engine, duration_s=90)
    assert durations == [90] and backend.voices == engine.voices and backend.is_random
    events = list(backend.stream(text_messages(), GenerationOptions(greedy=True, max_new_tokens=6,
                                                                    max_audio_tokens=30)))
    assert isinstance(events[-1], Finished) and any(isinstance(e, AudioChunk) for e in events)
    for event in events:  # ZeroGPU pickles what the worker yields; CUDA tensors would not survive
        assert pickle.loads(pickle.dumps(event)).__class__ is event.__class__
        assert all("torch" not in type(value).__module__ for value in vars(event).values())


def test_app_without_hub_says_so_and_suggests_tiny(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "app.py", "--model", "Qwen/Qwen2.5-Omni-7B"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "could not fetch 'Qwen/Qwen2.5-Omni-7B'" in result.stderr and "--model tiny" in result.stderr
    assert "Traceback" not in result.stderr


def test_system_prompt_warning_shows_only_when_it_matters():
    from omni_demo.app.page import system_prompt_notice

    assert system_prompt_notice(DEFAULT_SYSTEM_PROMPT, True)["visible"] is False
    assert system_prompt_notice("You are a pirate.", True)["visible"] is True
    assert system_prompt_notice("You are a pirate.", False)["visible"] is False


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = AppServer().wait()
    yield app
    app.stop()


def test_webcam_clip_is_sent_with_its_sound(server):
    client = Client(server.url, verbose=False)
    start = time.monotonic()
    job = client.submit(message={"text": "What am I showing?", "files": []}, history=[],
                        webcam=handle_file(str(ASSETS / "talking_shapes.mp4")), **SETTINGS, api_name="/chat")
    reply = collect(job, start)
    assert "1 video" in reply.stats and reply.texts[-1]
    users = [m for m in reply.chat if m["role"] == "user"]
    assert any(part.get("type") == "file" and str(part["file"]).endswith(".mp4") for m in users
               for part in m["content"])
