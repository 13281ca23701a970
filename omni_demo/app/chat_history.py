"""The chat as the UI holds it (Gradio messages) and as the model reads it (Qwen messages), and
which files a turn may name. No Gradio and no torch here: the UI and its tests import it.

Upload policy: a turn may only name files that its own browser session uploaded, or the app's
assets, so a crafted request cannot make the server read /etc/passwd, ../ paths or another
user's upload.
"""

from __future__ import annotations

import mimetypes
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from omni_demo.config import ASSETS
from omni_demo.errors import InputError
from omni_demo.inputs.messages import MEDIA_TYPES, system_message

# How the chat marks a reply cut short; the model's history has the reply's text without them.
STOPPED_MARK = "⏹ *stopped*"
INTERRUPTED_MARK = "✋ *interrupted*"


class UploadRegistry:
    """Which uploaded files belong to which browser session (the newest `max_sessions` sessions).

    Gradio names an upload by a keyed hash of its bytes, so a path names one content; what a
    session may claim as new is a file it uploaded, not one another session already sent. A
    claim records the file's version (inode, change time): a path another session claimed is only
    accepted as new once the file was written again since, which takes uploading the same bytes.
    """

    def __init__(self, max_sessions: int = 10_000):
        self.sessions: OrderedDict[str, set[str]] = OrderedDict()
        self.claims: dict[str, dict[str, tuple[int, int]]] = {}  # path -> {session: file version when claimed}
        self.max_sessions = max_sessions
        self.lock = threading.Lock()

    def add(self, session: str, paths: list[str]) -> None:
        with self.lock:
            owned = self.sessions.setdefault(session, set())
            for path in map(_resolved, paths):
                owned.add(path)
                self.claims.setdefault(path, {})[session] = _version(path)
            self.sessions.move_to_end(session)
            while len(self.sessions) > self.max_sessions:
                gone, paths_gone = self.sessions.popitem(last=False)
                for path in paths_gone:
                    self.claims.get(path, {}).pop(gone, None)
                    if not self.claims.get(path, True):
                        del self.claims[path]

    def check(self, session: str, paths: list[str]) -> None:
        with self.lock:
            owned = self.sessions.get(session, set())
        for path in paths:
            resolved = Path(path).resolve()
            if str(resolved) not in owned and not resolved.is_relative_to(ASSETS):
                raise InputError(f"Refused {Path(path).name}: this conversation did not upload it.")

    def check_new(self, session: str, paths: list[str]) -> None:
        """New files must be uploads (or assets) that no other session sent in this version."""
        for path in paths:
            resolved = Path(path).resolve()
            if resolved.is_relative_to(ASSETS):
                continue
            if not resolved.is_relative_to(gradio_upload_dir()):
                raise InputError(f"Refused {Path(path).name}: not an upload.")
            with self.lock:
                others = {s: v for s, v in self.claims.get(str(resolved), {}).items() if s != session}
                mine = session in self.claims.get(str(resolved), {})
            if others and not mine and _version(str(resolved)) in others.values():
                raise InputError(f"Refused {Path(path).name}: this conversation did not upload it.")

    def accept_turn(self, session: str, new_files: list[str], history: list[dict]) -> None:
        """New files must be this session's uploads (or assets) and become its own; files in the
        history must already be this session's."""
        self.check_new(session, new_files)
        old_files = user_file_paths(history)
        self.check(session, old_files)
        self.add(session, new_files + old_files)  # a client that uploads its history again re-claims it


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def _version(path: str) -> tuple[int, int]:
    """(inode, change time in ns): Gradio writes each upload as a new file, so both change."""
    try:
        stat = os.stat(path)
    except OSError:
        return (0, 0)
    return (stat.st_ino, stat.st_ctime_ns)


def gradio_upload_dir() -> Path:
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def new_upload_paths(message: dict | None, webcam: str | None) -> list[str]:
    """The files a user sends with this turn: the textbox's attachments, then the webcam clip."""
    files = [*((message or {}).get("files") or []), *([webcam] if webcam else [])]
    return [f if isinstance(f, str) else f.get("path") for f in files]


def user_file_paths(history: list[dict]) -> list[str]:
    return [part["file"]["path"] for message in history if message["role"] == "user"
            for part in _parts(message) if part.get("type") == "file"]


def media_kind(path: str) -> str | None:
    """'image', 'audio' or 'video' from the file name, else None."""
    mime, _ = mimetypes.guess_type(path)
    kind = (mime or "").split("/")[0]
    return kind if kind in MEDIA_TYPES else None


def user_turn(message: dict | None, webcam: str | None) -> list[dict]:
    """The chat messages for what the user sends: each file on its own, then the text."""
    paths = new_upload_paths(message, webcam)
    text = ((message or {}).get("text") or "").strip()
    if not paths and not text:
        raise InputError("Nothing to send: type a message, record one, or attach an image, audio clip or video.")
    turn = []
    for path in paths:
        if media_kind(path) is None:
            raise InputError(f"Unsupported file {Path(path).name}: attach images, audio or video.")
        file = {"path": path, "mime_type": mimetypes.guess_type(path)[0]}
        turn.append({"role": "user", "content": [{"type": "file", "file": file}]})
    if text:
        turn.append({"role": "user", "content": [{"type": "text", "text": text}]})
    return turn


def chat_to_conversation(history: list[dict], system_prompt: str) -> list[dict]:
    """Chatbot messages -> Qwen messages: consecutive user messages become one turn with every
    file as an image/audio/video part; assistant turns keep their text (not the reply audio)."""
    conversation = [system_message(system_prompt)] if system_prompt else []
    for message in history:
        parts = []
        for part in _parts(message):
            if part.get("type") == "text" and (text := unmarked(part.get("text", ""))):
                parts.append({"type": "text", "text": text})
            elif part.get("type") == "file" and message["role"] == "user":
                path = part["file"]["path"]
                kind = media_kind(path)
                if kind is None:
                    raise InputError(f"unsupported file in the conversation: {Path(path).name}")
                parts.append({"type": kind, kind: path})
        if not parts:
            continue
        if conversation and conversation[-1]["role"] == message["role"]:
            conversation[-1]["content"].extend(parts)
        else:
            conversation.append({"role": message["role"], "content": parts})
    return conversation


def unmarked(text: str) -> str:
    """A chat text without the marks the UI adds to a reply cut short."""
    text = text.strip()
    for mark in (STOPPED_MARK, INTERRUPTED_MARK):
        text = text.removesuffix(mark).strip()
    return text


def _parts(message: dict) -> list[dict]:
    """A Chatbot message's content as a list of {"type": "text" | "file", ...} parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, dict):
        content = [content]
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append({"type": "text", "text": part})
        elif "path" in part:  # a bare file dict, as the reply audio is appended
            parts.append({"type": "file", "file": part})
        else:
            parts.append(part)
    return parts


def media_summary(conversation: list[dict]) -> str:
    """'1 image, 2 audio clips' (or 'text only') for the latency readout."""
    counts = {kind: 0 for kind in MEDIA_TYPES}
    for message in conversation:
        for part in message["content"]:
            if part["type"] in counts:
                counts[part["type"]] += 1
    names = {"image": "image", "audio": "audio clip", "video": "video"}
    seen = [f"{n} {names[k]}{'s' if n > 1 else ''}" for k, n in counts.items() if n]
    return ", ".join(seen) if seen else "text only"
