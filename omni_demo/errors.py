"""The errors a request can end with, and how they are shown. No torch here: the UI imports it."""

from __future__ import annotations


class InputError(ValueError):
    """The request cannot be served as given; the message names the problem."""


class Cancelled(Exception):
    """The request was cancelled while its media were read, before its reply started."""


class EngineError(RuntimeError):
    """A request failed inside the engine; the engine itself stays usable."""


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do instead."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), at most `limit` characters."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
