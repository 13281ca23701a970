"""The files the page makes and reads, each owned by the session it was made for.

- Reply wavs and call-turn recordings are written into folders of this process's own inside
  Gradio's upload folder (so Gradio serves them without copying), and removed at exit.
- The call's microphone chunks: the page names each upload `omni-call-<call token>-<n>.wav`
  (web/voice.js), with a token only that call's page was given. A chunk is read, then deleted
  (its folder stays, see `remove_chunk`), only when its name carries the session's running call's token: no handler
  reads or deletes a path another session named, and equal chunks (digital silence) never share
  a path. The numbers put overlapping posts back in order: a chunk Gradio dropped (it keeps only
  the newest of a stream event's pending chunks) is read from its file when the next one comes.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from omni_demo.call.microphone import MAX_CHUNK_S, MAX_RATE, MIN_RATE
from omni_demo.config import INPUT_SAMPLE_RATE, SAMPLE_RATE
from omni_demo.inputs.clips import write_clip

from .chat_history import gradio_upload_dir

log = logging.getLogger(__name__)

CHUNK_NAME = re.compile(r"omni-call-(?P<token>[0-9a-f]{32})-(?P<seq>\d{1,9})\.wav")
MAX_GAP = 40  # chunks one post may skip (10 s at the page's 0.25 s); a larger jump is refused, not searched
ARRIVAL_WAIT_S = 2.0  # Gradio moves an upload into place after it answers: how long a chunk is waited for
_OWNED: dict[str, Path] = {}  # kind -> this process's folder of it
_OWNED_LOCK = threading.Lock()


def owned_dir(kind: str) -> Path:
    """This process's folder of `kind` ("replies", "calls") in Gradio's upload folder, removed at exit."""
    with _OWNED_LOCK:
        if kind not in _OWNED or not _OWNED[kind].is_dir():
            folder = gradio_upload_dir() / f"omni-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            folder.mkdir(parents=True, exist_ok=True)
            _OWNED[kind] = folder
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return _OWNED[kind]


def save_reply_audio(chunks: list[np.ndarray], keep: int = 256) -> str:
    """The reply's wav (24 kHz, 16-bit) in this process's reply folder; only the newest `keep` stay."""
    folder = owned_dir("replies")
    path = folder / f"reply-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(16)}.wav"  # Gradio serves what
    # is named: the name is the capability
    sf.write(path, np.concatenate(chunks), SAMPLE_RATE, subtype="PCM_16")
    for old in sorted(folder.glob("reply-*.wav"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return str(path)


def save_user_audio(samples: np.ndarray, session: str, uploads) -> str:
    """A spoken turn as a 16 kHz 16-bit wav, owned by the session (`uploads`, an UploadRegistry): a
    typed turn after the call may send it again as history."""
    folder = owned_dir("calls") / uuid.uuid4().hex
    folder.mkdir()
    path = folder / f"you-{time.strftime('%Y%m%d-%H%M%S')}.wav"
    sf.write(path, samples, INPUT_SAMPLE_RATE, subtype="PCM_16")
    uploads.add(session, [str(path)])
    return str(path)


def save_user_video(frames: list[np.ndarray], samples: np.ndarray, session: str, uploads) -> str:
    """A turn spoken with the camera on as an MP4 of its frames and sound (omni_demo.inputs.clips),
    owned by the session like its spoken turns."""
    folder = owned_dir("calls") / uuid.uuid4().hex
    folder.mkdir()
    path = write_clip(folder / f"you-{time.strftime('%Y%m%d-%H%M%S')}.mp4", frames, samples)
    uploads.add(session, [path])
    return path


def new_chunk_token() -> str:
    return secrets.token_hex(16)


class ChunkSequence:
    """One call's microphone chunks, as the page numbered them: heard once each, in order."""

    def __init__(self, token: str):
        self.token = token
        self.next = 0  # the number of the next chunk to hear
        self.lock = threading.Lock()  # chunk posts may overlap: taken, read and fed one post at a time

    @property
    def prefix(self) -> str:
        """What the page names this call's chunks: `{prefix}-{n}.wav`."""
        return f"omni-call-{self.token}"

    def take(self, path: str, hear: Callable[[int, np.ndarray], None]) -> None:
        """Hear (`hear(rate, samples)`) the chunks `path` brings, in order: those skipped before it
        (from their files, when Gradio dropped their posts), then its own. A path refused is logged
        with the reason, and nothing is heard."""
        number = self._number(path)
        if number is None:
            return
        with self.lock:
            if number < self.next:
                log.warning("microphone chunk %d refused: it came after chunk %d (a repeat or out of order)",
                            number, self.next - 1)
                return
            if number - self.next > MAX_GAP:
                log.warning("microphone chunk %d refused: %d chunks after the last one heard", number,
                            number - self.next)
                return
            skipped = self._find(range(self.next, number))
            if lost := number - self.next - len(skipped):
                log.warning("%d microphone chunk(s) before chunk %d never arrived", lost, number)
            self.next = number + 1
            for file in [*skipped, Path(path)]:
                if (chunk := read_chunk(file)) is not None:
                    hear(*chunk)

    def _number(self, path: str) -> int | None:
        """The chunk's number, when `path` is one of this call's chunks in Gradio's upload folder."""
        file = Path(path)
        match = CHUNK_NAME.fullmatch(file.name)
        if match is None or match["token"] != self.token:
            log.warning("microphone chunk refused: %s is not this call's", file.name[:80])
            return None
        if file.parent.parent.resolve() != gradio_upload_dir() or not _arrived(file):
            log.warning("microphone chunk refused: %s is not a file Gradio received", file.name)
            return None
        return int(match["seq"])

    def _find(self, numbers: range) -> list[Path]:
        """The files of the chunks `numbers` whose posts Gradio dropped, in order, waiting a little for
        those still being moved into place (one listing of the upload folder per look)."""
        found: dict[int, Path] = {}
        deadline = time.monotonic() + (ARRIVAL_WAIT_S if numbers else 0)
        while True:
            for file in gradio_upload_dir().glob(f"*/{self.prefix}-*.wav"):
                match = CHUNK_NAME.fullmatch(file.name)
                if match and int(match["seq"]) in numbers and file.is_file() and not file.is_symlink():
                    found[int(match["seq"])] = file
            if len(found) == len(numbers) or time.monotonic() > deadline:
                return [found[number] for number in sorted(found)]
            time.sleep(0.05)

    def remove_left(self) -> None:
        """The call is over: its chunk files still on disk (a last post, one never handed over) go."""
        for file in gradio_upload_dir().glob(f"*/{self.prefix}-*.wav"):
            remove_chunk(file)


def _arrived(file: Path, wait_s: float = ARRIVAL_WAIT_S) -> bool:
    """Whether `file` is a regular file (no link, no folder). Gradio answers an upload before it has
    moved the file into place (a background task), so a chunk's event can come first: wait a little."""
    deadline = time.monotonic() + wait_s
    while not file.exists() and not file.is_symlink() and time.monotonic() < deadline:
        time.sleep(0.01)
    return file.is_file() and not file.is_symlink()


def read_chunk(path: Path) -> tuple[int, np.ndarray] | None:
    """(rate, [n, channels] float32) of a chunk, checked from its header before it is read, then
    removed. None (logged) for a file that is no short WAV."""
    try:
        info = sf.info(path)
        if (info.format != "WAV" or not 1 <= info.channels <= 2 or not MIN_RATE <= info.samplerate <= MAX_RATE
                or info.frames > MAX_CHUNK_S * info.samplerate):
            log.warning("microphone chunk refused: %s, %d Hz, %d channels, %d frames", info.format,
                        info.samplerate, info.channels, info.frames)
            return None
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        return rate, samples
    except (OSError, RuntimeError, ValueError) as exc:  # not a WAV soundfile can read
        log.warning("microphone chunk refused: %s", type(exc).__name__)
        return None
    finally:
        remove_chunk(path)


def remove_chunk(path: Path) -> None:
    """Remove a chunk file. Its folder stays: Gradio names the folder by the upload's bytes, so equal
    chunks (digital silence, in any call) share it, and removing it raced the next upload's own
    `mkdir(exist_ok=True)`, which then failed and lost that chunk. Gradio's cache clean-up
    (app/page.py, delete_cache) removes the empty folders later. A path that is no regular file
    (a folder or a link a crafted post named) is left alone."""
    if path.is_symlink() or not path.is_file():
        return
    path.unlink(missing_ok=True)
