"""Each browser session's one activity: a typed reply or a voice call, queued or running.

An `Activity` is also its cancel flag (a `threading.Event`): Stop, End call, Clear and a closed
page set it, and the engine ends the reply within one decode step. `Sessions` is the registry
that the chat and the call share, so that a session runs one activity at a time and everyone is
told how many are ahead of them.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable

from omni_demo.config import CacheScope

QUEUE_GRACE_S = 30.0  # an accepted activity's page queues its next step within this (it sends it at once)


class Activity(threading.Event):
    """A session's queued or running typed reply (or, as CallActivity, its call), as its cancel flag."""

    busy_text = "A reply is still running: Stop it (Esc) or wait. Your message is kept."

    def __init__(self):
        super().__init__()
        self.id = uuid.uuid4().hex[:12]
        self.accepted_at = time.monotonic()
        self.started = False  # its handler runs (until then it waits in the queue)
        self.cleared = False  # Clear, not Stop, ended it: the emptied chat gets nothing more
        self.unsent = False  # Stop came before its reply began: the page gets the message back


class Sessions:
    """Session hash -> its activity. Every check-and-set holds one lock.

    An activity is accepted outside the queue, then its page queues the step that runs it. A client
    that sends only the first step (no page: nothing ever unloads it) would count in everyone's
    "In line" for good, so an activity not yet running is forgotten once `queued(session)` says the
    queue holds nothing of its session, `QUEUE_GRACE_S` after it was accepted (`queued` reads Gradio's
    queue, app/page.py; without its table, nothing is forgotten)."""

    def __init__(self, queued: Callable[[str], bool] | None = None):
        self.activities: dict[str, Activity] = {}
        self.lock = threading.Lock()
        self.queued = queued or (lambda session: True)  # whether Gradio's queue holds an event of a session

    def _forget_unqueued(self) -> None:
        now = time.monotonic()
        for session, activity in list(self.activities.items()):
            if not activity.started and now - activity.accepted_at > QUEUE_GRACE_S and not self.queued(session):
                activity.set()
                del self.activities[session]

    def get(self, session: str) -> Activity | None:
        return self.activities.get(session)

    def claim(self, session: str, new: type[Activity] = Activity) -> tuple[Activity | None, Activity | None, int]:
        """Register a new activity unless the session has one: (the new one or None, the busy one or
        None, how many activities of its kind were registered before it: typed replies and calls
        have queues of their own). A double Enter claims once."""
        with self.lock:
            self._forget_unqueued()
            busy = self.activities.get(session)
            ahead = sum(type(activity) is new for activity in self.activities.values())
            if busy is not None:
                return None, busy, ahead
            activity = self.activities[session] = new()
            return activity, None, ahead

    def begin(self, session: str) -> Activity:
        """The session's activity, now running (an API call's own, or one the page claimed)."""
        with self.lock:
            activity = self.activities.setdefault(session, Activity())
            activity.started = True
            return activity

    def start(self, session: str, activity_id: str, kind: type[Activity] = Activity) -> Activity | None:
        """The queue reached the activity `activity_id`: it runs, once. None when it ended (Stop,
        End call, Clear) while it waited, or already runs."""
        with self.lock:
            activity = self.activities.get(session)
            if not isinstance(activity, kind) or activity.id != activity_id or activity.started:
                return None
            activity.started = True
            return activity

    def stop(self, session: str, *, clear: bool = False, only: str | None = None) -> bool:
        """Set the session's activity (only the one with id `only`, when given): a running one ends at
        its next step; one still in line is forgotten at once, so that an event the queue never runs
        (a full queue, a closed page) cannot hold the session. -> whether one was forgotten."""
        with self.lock:
            activity = self.activities.get(session)
            if activity is None or (only is not None and activity.id != only):
                return False
            activity.cleared = activity.cleared or clear
            activity.set()
            if activity.started:
                return False
            del self.activities[session]
            return True

    def release(self, session: str, activity: Activity) -> None:
        """`activity` is over: the session may begin another."""
        with self.lock:
            if self.activities.get(session) is activity:
                del self.activities[session]


def session_scope(session: str) -> CacheScope:
    """A browser session's conversation cache, its own (Gradio's session hash is the page's secret)."""
    return CacheScope(party="session:" + hashlib.sha256(session.encode()).hexdigest()[:32], private=True)


def _when(estimate: float | None) -> str:
    return "" if estimate is None else "Starting any moment. " if estimate < 2 else f"About {round(estimate)} s. "


def queue_text(before: int, limit: int, estimate: float | None) -> str:
    """The player's line while a typed reply waits in Gradio's queue, `before` replies ahead of it."""
    return (f"In line: {before} {'reply' if before == 1 else 'replies'} before yours (this server streams {limit} "
            f"at once). {_when(estimate)}Your message is kept.")


def waiting_text(waiting) -> str:
    """The player's line while a typed reply waits for the model (an omni_demo.events.Waiting): what
    is ahead, why, and the engine's estimate."""
    replies = f"{waiting.running} {'reply' if waiting.running == 1 else 'replies'}"
    if waiting.reason == "full":
        why = f"the model is answering {replies}, as many as this server runs at once"
    else:
        why = f"the model is speaking {replies} and starts yours once their speech is safely ahead"
    before = f"{waiting.ahead} more {'message' if waiting.ahead == 1 else 'messages'} before yours. " \
        if waiting.ahead else ""
    return f"Waiting: {why}. {before}{_when(waiting.estimate_s)}Your message is kept."
