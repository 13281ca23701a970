"""Silero VAD, the voice call's voice activity model: the speech probability of each 32 ms frame.

The only module of the call that imports torch. Neither the page nor the call's loop imports it:
app.py hands the page `load_vad`, as it hands it the backend.
"""

from __future__ import annotations

import numpy as np
import torch

from omni_demo.config import INPUT_SAMPLE_RATE


class SileroVad:
    """One microphone stream's model (it keeps the stream's state inside): the package's bundled
    weights, nothing is downloaded; 0.07 s to load."""

    def __init__(self):
        threads = torch.get_num_threads()
        try:  # importing silero_vad sets torch's thread count to 1 for the whole process (silero_vad/model.py),
            from silero_vad import load_silero_vad  # which would halve the engine's speed on a CPU and change
            self.model = load_silero_vad()  # its float rounding: the count is put back
        finally:
            torch.set_num_threads(threads)

    def reset(self) -> None:
        self.model.reset_states()

    def __call__(self, frame: np.ndarray) -> float:
        """[512] float32 at 16 kHz -> the probability that it is speech."""
        with torch.inference_mode():
            return float(self.model(torch.from_numpy(np.array(frame, np.float32)), INPUT_SAMPLE_RATE))


def load_vad() -> SileroVad:
    return SileroVad()
