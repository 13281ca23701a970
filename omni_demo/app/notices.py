"""What the page tells a person when something is refused or fails: one short line, no server
paths, never Gradio's red error state (it blocks every output until closed)."""

from __future__ import annotations

import logging
import re
import uuid

from omni_demo.errors import InputError, first_line
from omni_demo.events import ContextTrimmed

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300  # an error shown to a user (and logged) is at most this long
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"]+)+[/\\]([^\s/\\'\"]+)")


def public_message(exc: BaseException) -> str:
    """An exception's message for the user: first line, with server paths cut to their file names."""
    return _PATH.sub(r"\1", first_line(exc, MAX_ERROR_CHARS))


def refused(exc: InputError) -> str:
    """A refusal's message, logged in one line (no traceback: nothing went wrong here)."""
    message = public_message(exc)
    log.warning("refused: %s", message)
    return message


def failure_message(exc: BaseException) -> dict:
    """The chat message that stands where a failed reply would have been."""
    return {"role": "assistant", "content": f"⚠️ This reply failed: {public_message(exc)}"}


def trimmed_text(event: ContextTrimmed) -> str:
    """The notice for a conversation whose oldest turns were left out (typed chat and call alike)."""
    return (f"The conversation is over this server's budgets ({event.limit_tokens} tokens, media per "
            f"conversation): its oldest {event.dropped_turns} turn(s) were left out.")


def notice(text: str) -> dict:
    """A toast from the page's player (Gradio's own toasts need the queue, which would delay every Send)."""
    return {"notice": text, "id": uuid.uuid4().hex[:12]}
