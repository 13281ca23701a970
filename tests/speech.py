"""Spoken test audio: espeak-ng sentences with pauses, silences and clicks between them, at 16 kHz,
with where each sentence's sound begins and ends (a test knows exactly which turns to expect)."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni_demo.config import INPUT_SAMPLE_RATE as SAMPLE_RATE

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


def speak(text: str, folder: Path) -> tuple[np.ndarray, float, float]:
    """`text` spoken at 16 kHz, and where its sound begins and ends (espeak's own silence trimmed
    to 50 ms: the pauses are the test's)."""
    import librosa

    path = folder / f"{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(path), text], check=True)
    audio, _ = librosa.load(path, sr=SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    margin = int(0.05 * SAMPLE_RATE)
    first, last = max(loud[0] - margin, 0), min(loud[-1] + 1 + margin, len(audio))
    return (audio[first:last].astype(np.float32), (loud[0] - first) / SAMPLE_RATE,
            (loud[-1] + 1 - first) / SAMPLE_RATE)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def click(seconds: float = 0.005, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """A short loud click: no turn (it counts as a piece without a span)."""
    return np.random.default_rng(seed).uniform(-0.8, 0.8, int(seconds * SAMPLE_RATE)).astype(np.float32), None, None


def compose(*pieces) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Silences (numbers, in seconds), sentences and clicks -> the recording and each sentence's sound."""
    audio, spans, at = [], [], 0.0
    for piece in pieces:
        if isinstance(piece, (int, float)):
            chunk = silence(piece)
        else:
            chunk, begin, end = piece
            if begin is not None:
                spans.append((at + begin, at + end))
        audio.append(chunk)
        at += len(chunk) / SAMPLE_RATE
    return np.concatenate(audio), spans


def write_wav(path: Path, audio: np.ndarray) -> Path:
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return path
