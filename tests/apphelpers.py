"""Start the real app in a subprocess and talk to it through gradio_client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from omni_demo.config import DEFAULT_SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ChildServer:
    """A server in a subprocess on a free loopback port, its output in a log file under the repo."""

    name = "server"
    stop_signal = signal.SIGTERM
    stop_grace_s = 20.0  # after stop_signal, how long before it is killed

    def __init__(self, command: list[str], port: int, env: dict | None = None):
        """`env` is added to this process's environment; a None value removes that variable."""
        self.port = port
        self.log = open(ROOT / f".{self.name}-{port}.log", "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None},
        )

    def ready(self) -> None:
        """Raises OSError until the server answers."""
        raise NotImplementedError

    def wait(self, timeout: float = 180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            try:
                self.ready()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"{self.name} did not start: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self):
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


class AppServer(ChildServer):
    """`app.py --model tiny` (plus `args`)."""

    name = "app"

    def __init__(self, *args: str, env: dict | None = None):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        super().__init__([sys.executable, "app.py", "--model", "tiny", "--port", str(port), *args], port, env)

    def ready(self) -> None:
        urllib.request.urlopen(self.url, timeout=2).read()


SETTINGS = dict(voice="Chelsie", speech=True, system_prompt=DEFAULT_SYSTEM_PROMPT, temperature=0.7, top_p=0.8,
                max_new_tokens=24, max_speech_s=5, use_audio_in_video=True, seed=1234)


def is_skip(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def is_speech(value) -> bool:
    """A player message that carries audio (others carry only the reply's state)."""
    return isinstance(value, dict) and bool(value.get("pcm"))


@dataclass
class Reply:
    texts: list[str] = field(default_factory=list)  # assistant text at each chat update
    audio_updates: list[float] = field(default_factory=list)  # seconds after submit
    chat: list = field(default_factory=list)
    stats: str = ""
    done_at: float = 0.0


def assistant_text(chat) -> str:
    for message in reversed(chat):
        if message["role"] == "assistant":
            for part in message["content"]:
                if part.get("type") == "text":
                    return part["text"]
    return ""


def collect(job, start: float) -> Reply:
    reply = Reply()
    for _textbox, chat, _webcam, audio, stats in job:
        now = time.monotonic() - start
        if not is_skip(chat):
            reply.chat = chat
            reply.texts.append(assistant_text(chat))
        if is_speech(audio):
            reply.audio_updates.append(now)
        if not is_skip(stats):
            reply.stats = stats
    reply.done_at = time.monotonic() - start
    job.result()  # raises the app's error, if the reply failed
    return reply


def file_path(part: dict) -> str:
    """A file part as gradio_client returns it ({"file": path}) or as the API takes it."""
    file = part["file"]
    return file if isinstance(file, str) else file["path"]


def resendable(chat: list) -> list:
    """A chat returned by the client, with its files re-uploaded so it can be sent back."""
    from gradio_client import handle_file

    return [{**message, "content": [{**part, "file": handle_file(file_path(part))} if part.get("type") == "file"
                                    else part for part in message["content"]]} for message in chat]


def send(client, text="", files=(), history=(), **settings):
    from gradio_client import handle_file

    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    start = time.monotonic()
    job = client.submit(message=message, history=resendable(list(history)), webcam=None, **{**SETTINGS, **settings},
                        api_name="/chat")
    return job, start
