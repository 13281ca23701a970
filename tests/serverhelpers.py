"""Start `python -m omni_demo.serve` (plain or on Ray) in a subprocess, on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .apphelpers import ROOT, free_port

API_KEY = "test-key"


class ApiServer:
    def __init__(self, *args: str, env: dict | None = None):
        """`env` is added to this process's environment; a None value removes that variable."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(ROOT / f".serve-{self.port}.log", "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "omni_demo.serve", "--model", "tiny", "--device", "cpu",
             "--port", str(self.port), *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None},
        )

    def health(self, timeout: float = 5) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as response:
            return json.load(response)

    def wait(self, timeout: float = 180) -> "ApiServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                self.health(timeout=2)
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"server did not start: {self.output()}")

    def wait_idle(self, timeout: float = 10) -> float:
        """Seconds until no reply runs or waits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            status = self.health()
            if status["running"] == 0 and status["waiting"] == 0:
                return time.monotonic() - start
            time.sleep(0.01)
        raise TimeoutError(f"the server is still busy: {self.health()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self, grace_s: float = 30):
        self.process.send_signal(signal.SIGINT)  # Ray's driver shuts its local cluster down on SIGINT
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
