"""The terminal client and the benchmark, run as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf

from .conftest import ASSETS

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def omni(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def test_cli_streams_text_writes_wav_and_json(tiny_dir, tmp_path):
    out = tmp_path / "reply.wav"
    result = omni("omni_demo", "--model", "tiny", "--prompt", "What is this?", "--image", str(ASSETS / "shapes.png"),
                  "--audio", str(ASSETS / "question.wav"), "--voice", "Ethan", "--greedy", "--seed", "3",
                  "--max-new-tokens", "16", "--max-audio-tokens", "60", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.splitlines()[-1])
    assert result.stdout.startswith(data["text"] + "\n"), "the streamed text comes first, then the JSON line"
    for key in ("messages", "text", "text_token_ids", "codec_token_ids", "audio_samples", "sample_rate",
                "time_to_first_text_s", "time_to_first_audio_s", "total_s", "audio_s", "rtf"):
        assert key in data
    image = data["messages"][-1]["content"][0]  # with the reading options its budget set (omni_demo.inputs.media)
    assert image["type"] == "image" and image["image"] == str(ASSETS / "shapes.png") and image["max_pixels"] > 0
    assert len(data["text_token_ids"]) == 16 and data["audio_samples"] == 480 * len(data["codec_token_ids"]) > 0
    wave, rate = sf.read(out)
    assert rate == 24000 and len(wave) == data["audio_samples"]
    assert "random-weight" in result.stderr


def test_cli_text_only(tiny_dir):
    result = omni("omni_demo", "--model", "tiny", "--prompt", "hi", "--no-audio", "--max-new-tokens", "5", "--json")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["codec_token_ids"] == [] and data["audio_samples"] == 0 and data["time_to_first_audio_s"] is None


def test_cli_errors_are_one_line_not_tracebacks(tiny_dir, tmp_path):
    cases = [
        (["--prompt", "hi", "--voice", "Bob"], "unknown voice 'Bob'"),
        (["--prompt", "hi", "--video", str(tmp_path / "gone.mp4")], "video file not found"),
    ]
    for args, expected in cases:
        result = omni("omni_demo", "--model", "tiny", *args)
        assert result.returncode == 2
        assert expected in result.stderr and "Traceback" not in result.stderr
    result = omni("omni_demo", "--model", "tiny")
    assert result.returncode == 2 and "give --prompt" in result.stderr


def test_bench_prints_table_and_json(tiny_dir):
    result = omni("omni_demo.bench", "--model", "tiny", "--text-tokens", "8", "--audio-tokens", "60",
                  "--repeats", "1", "--step-tokens", "20", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for side in ("stream", "reference"):
        for key in ("time_to_first_text_s", "time_to_first_audio_s", "total_s", "rtf", "peak_rss_mb"):
            assert summary[side][key] > 0
        assert summary[side]["audio_tokens"] == 60 and summary[side]["text_tokens"] == 8
    assert summary["ratio"]["time_to_first_audio_s"] < 1
    assert "stream/ref" in result.stdout and "time_to_first_audio_s" in result.stdout
    steps = summary["steps"]
    for path in ("generate", "plain", "lean"):
        assert steps[path]["thinker_step_ms"] > 0 and steps[path]["talker_step_ms"] > 0
    assert "ms per decode step" in result.stdout and summary["setup"]["lean"] is True


def test_bench_on_a_machine_without_cuda_says_so_in_one_line(tiny_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = omni("omni_demo.bench", "--random-full-size", "--device", "cuda", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: device 'cuda' was requested but CUDA is not available here; use --device cpu"]


def test_bench_conversation_mode_reuses_earlier_turns(tiny_dir):
    result = omni("omni_demo.bench", "--model", "tiny", "--conversation", "--repeats", "1",
                  "--text-tokens", "6", "--audio-tokens", "30", "--utterance-s", "4.5", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    turns = summary["turns"]
    assert [t["kind"] for t in turns] == ["text", "image", "audio", "video+sound", "text", "text"]
    assert turns[0]["reused_tokens"] == 0
    for previous, turn in zip(turns, turns[1:]):
        assert turn["prompt_tokens"] > previous["prompt_tokens"]
        assert turn["reused_tokens"] >= previous["prompt_tokens"]  # the whole previous prompt, at least
        for key in ("time_to_first_text_s_off", "time_to_first_audio_s_off", "time_to_first_text_s_on",
                    "time_to_first_audio_s_on"):
            assert turn[key] > 0
    assert set(summary["last_vs_first_turn_first_audio"]) == {"off", "on"}
    assert "first audio, last turn / first turn" in result.stdout
    spoken = summary["spoken"]
    assert spoken["utterance_s"] == 4.5 and spoken["on"]["windows_heard"] == spoken["on"]["windows_kept"] == 2
    assert all(spoken[name][key] > 0 for name in ("off", "on", "exact") for key in ("first_text_s", "first_audio_s"))
    assert "heard while spoken" in result.stdout
    result = omni("omni_demo.bench", "--conversation", "--random-full-size", timeout=120)
    assert result.returncode == 2 and "--conversation needs a model with its processor" in result.stderr


@pytest.mark.parametrize("flags, says", [
    (["--seed", str(2**80)], "seed must be between 0 and 4294967295"),
    (["--max-new-tokens", "0"], "max_new_tokens and max_audio_tokens must be between 1 and"),
    (["--max-audio-tokens", str(2**40)], "max_new_tokens and max_audio_tokens must be between 1 and"),
])
def test_cli_refuses_out_of_range_numbers_before_loading(flags, says):
    result = omni("omni_demo", "--model", "tiny", "--prompt", "hi", *flags, timeout=120)
    assert result.returncode == 2 and f"error: {says}" in result.stderr and "Traceback" not in result.stderr


def test_bench_plays_streams_at_once_and_prints_their_figures(tiny_dir):
    result = omni("omni_demo.bench", "--model", "tiny", "--concurrency", "1,3", "--text-tokens", "6",
                  "--audio-tokens", "60", "--stagger-s", "0.05", timeout=600)
    assert result.returncode == 0, result.stderr
    levels = json.loads(result.stdout.strip().splitlines()[-1])["concurrency"]
    assert set(levels) == {"1", "3"} and levels["3"]["streams"] == 3 and len(levels["3"]["rtf_each"]) == 3
    for level in levels.values():
        assert level["speech_s_per_wall_s"] > 0 and 0 < level["first_audio_p50_s"] <= level["first_audio_p95_s"]
    assert "speech s/s" in result.stdout and "first audio p50 / p95" in result.stdout
    bad = omni("omni_demo.bench", "--model", "tiny", "--concurrency", "0,2", timeout=120)
    assert bad.returncode == 2 and "at least 1" in bad.stderr
