"""The call's microphone: the page's chunks (any rate, int or float, mono or multichannel),
checked, resampled to 16 kHz mono float32 as one stream, and queued for the call's loop."""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import soxr

from omni_demo.config import INPUT_SAMPLE_RATE
from omni_demo.errors import InputError

MIN_RATE, MAX_RATE = 8_000, 192_000  # microphone sample rates taken (Hz)
MAX_CHUNK_S = 10.0  # the page sends 0.25 s chunks (more, joined, when an upload was slow)
MAX_QUEUED_S = 30.0  # audio waiting for the loop beyond this is dropped (oldest first)


class Microphone:
    """The call's microphone audio, from the page's handler to the loop: resampled to 16 kHz
    mono float32, each chunk with the time it arrived (time.monotonic)."""

    def __init__(self):
        self.chunks: collections.deque = collections.deque()  # (arrived, samples), oldest first
        self.queued = 0  # samples waiting in `chunks`
        self.resampler = None
        self.rate = None
        self.arrived = threading.Condition()  # guards all of the above
        self.last_at: float | None = None  # arrival of the newest chunk

    def put(self, rate: int, pcm: np.ndarray) -> None:
        """Raises InputError for a chunk no microphone sends (a rate out of range, over MAX_CHUNK_S)."""
        pcm = np.asarray(pcm)
        if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not MIN_RATE <= rate <= MAX_RATE:
            raise InputError(f"microphone audio at {rate!r:.20} Hz: expected {MIN_RATE}-{MAX_RATE} Hz")
        if pcm.ndim not in (1, 2) or pcm.dtype.kind not in "iuf" or len(pcm) > MAX_CHUNK_S * rate:
            raise InputError(f"a microphone chunk must be at most {MAX_CHUNK_S:g} s of mono or multichannel PCM")
        if not len(pcm):
            return
        if pcm.dtype.kind in "iu":
            pcm = pcm.astype(np.float32) / float(np.iinfo(pcm.dtype).max)
        pcm = np.nan_to_num(pcm.astype(np.float32).reshape(len(pcm), -1).mean(axis=1), nan=0.0, posinf=0.0,
                            neginf=0.0).clip(-1, 1)  # [n] mono
        with self.arrived:
            if rate != self.rate:
                self.rate, self.resampler = rate, soxr.ResampleStream(int(rate), INPUT_SAMPLE_RATE, 1, dtype="float32")
            samples = self.resampler.resample_chunk(pcm)
            self.last_at = time.monotonic()
            while self.chunks and self.queued + len(samples) > MAX_QUEUED_S * INPUT_SAMPLE_RATE:
                self.queued -= len(self.chunks.popleft()[1])  # the loop is stuck: hear the newest
            self.chunks.append((self.last_at, samples))
            self.queued += len(samples)
            self.arrived.notify()

    def take(self, wait_s: float) -> list[tuple[float, np.ndarray]]:
        """The chunks that arrived, waiting up to `wait_s` for the first."""
        with self.arrived:
            if not self.chunks and wait_s > 0:
                self.arrived.wait(wait_s)
            taken = list(self.chunks)
            self.chunks.clear()
            self.queued = 0
        return taken


class AudioClock:
    """The call's audio clock: samples heard so far, and when the chunks carrying them arrived."""

    def __init__(self):
        self.heard = 0  # samples fed to the turn detector
        self.arrivals = collections.deque(maxlen=512)  # (samples heard through a chunk, its arrival)

    @property
    def seconds(self) -> float:
        return self.heard / INPUT_SAMPLE_RATE

    def add(self, arrived_at: float, samples: int) -> None:
        self.heard += samples
        self.arrivals.append((self.heard, arrived_at))

    def heard_at(self, at_s: float) -> float:
        """When the sample `at_s` seconds into the call's audio was heard: the arrival of the chunk
        that carried it, less the audio after it in that chunk (upload time is not counted)."""
        sample = at_s * INPUT_SAMPLE_RATE
        for heard, arrived in self.arrivals:
            if heard >= sample:
                return arrived - (heard - sample) / INPUT_SAMPLE_RATE
        return time.monotonic()
