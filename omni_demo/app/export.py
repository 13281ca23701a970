"""Export: the conversation as one zip a person keeps. `conversation.md` says who said what, in
order, with each file linked; `media/` holds every file of it (the replies' speech, the pictures,
clips and recordings sent). Only files the session may read go in: its own uploads (the upload
registry's check), the assets, and the app's own reply and call folders (whose file names are
unguessable capabilities the page already holds). The chat comes from the page, so any other path
in it is refused, never read.
"""

from __future__ import annotations

import secrets
import time
import zipfile
from pathlib import Path

from omni_demo.errors import InputError

from .chat_history import UploadRegistry, _parts, media_kind
from .files import owned_dir

APP_FOLDERS = ("replies", "calls")  # the app's own files, in Gradio's upload folder


def readable(path: str, session: str, uploads: UploadRegistry) -> Path:
    """`path` resolved, if this session may read it; else InputError."""
    resolved = Path(path).resolve()
    if resolved.is_file() and any(resolved.is_relative_to(owned_dir(kind)) for kind in APP_FOLDERS):
        return resolved
    uploads.check(session, [str(resolved)])  # its own uploads and the assets
    if not resolved.is_file():
        raise InputError(f"{resolved.name} is no longer on the server: export what is left by removing it")
    return resolved


def export_conversation(chat: list[dict], session: str, uploads: UploadRegistry) -> str:
    """The zip's path (in this process's export folder, removed at exit)."""
    if not chat:
        raise InputError("Nothing to export yet: the conversation is empty.")
    stamp = time.strftime("%Y-%m-%d-%H%M%S")
    path = owned_dir("exports") / f"conversation-{stamp}-{secrets.token_hex(8)}.zip"
    lines = [f"# A conversation with Qwen2.5-Omni ({stamp})"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, message in enumerate(chat, 1):
            who = "You" if message.get("role") == "user" else "Qwen"
            for part in _parts(message):
                if part.get("type") == "text" and part.get("text", "").strip():
                    lines.append(f"**{who}:** {part['text'].strip()}")
                elif part.get("type") == "file":
                    source = readable(part["file"]["path"], session, uploads)
                    name = f"media/{number:03d}-{who.lower()}-{source.name}"
                    archive.write(source, name)
                    lines.append(f"**{who}:** [{media_kind(source.name) or 'file'}: {source.name}]({name})")
        archive.writestr("conversation.md", "\n\n".join(lines) + "\n")
    return str(path)

