"""The conversation kept across a page reload, in the browser's own storage (never on the server).

The page keeps the chat in a gr.BrowserState. Gradio encrypts it with a key it also gives the
page, so what comes back is the page's word, nothing more: the text is shown as it comes, and the
files in it are trusted only when they carry this server's seal, an HMAC of their paths with a key
this process alone holds. A sealed file of the old session becomes the new session's (a reload
gets a new session); an unsealed or forged one is dropped, as is one no longer on disk. A server
restart makes every seal stale: the text stays, the files go.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from .chat_history import UploadRegistry, _parts

KEY = secrets.token_bytes(32)  # this process's; never leaves it
MAX_MESSAGES = 2000
MAX_CHARS = 2_000_000


def _paths(chat: list[dict]) -> list[str]:
    return sorted({part["file"]["path"] for message in chat for part in _parts(message) if part.get("type") == "file"})


def _seal(paths: list[str]) -> str:
    return hmac.new(KEY, json.dumps(paths).encode(), hashlib.sha256).hexdigest()


def seal(chat: list[dict] | None) -> dict:
    """What the page stores: the chat and the seal of its files."""
    chat = list(chat or [])
    return {"chat": chat, "seal": _seal(_paths(chat))}


def unseal(saved, session: str, uploads: UploadRegistry) -> list[dict]:
    """The stored chat as the new session may show it (see the module's docstring)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("chat"), list):
        return []
    chat = [m for m in saved["chat"][:MAX_MESSAGES]
            if isinstance(m, dict) and m.get("role") in ("user", "assistant") and _well_formed(m)]
    if len(json.dumps(chat)) > MAX_CHARS:
        return []
    trusted = hmac.compare_digest(str(saved.get("seal", "")), _seal(_paths(chat)))
    kept = [m for m in chat if trusted and all(Path(p).is_file() for p in _file_paths(m)) or not _file_paths(m)]
    uploads.add(session, [p for m in kept if m["role"] == "user" for p in _file_paths(m)])
    return kept


def _file_paths(message: dict) -> list[str]:
    return [part["file"]["path"] for part in _parts(message) if part.get("type") == "file"]


def _well_formed(message: dict) -> bool:
    if not message.get("content"):
        return False
    try:
        parts = _parts(message)
    except (AttributeError, TypeError):
        return False
    return all(isinstance(part, dict) and (part.get("type") != "file"
                                           or isinstance((part.get("file") or {}).get("path"), str)) for part in parts)
