"""Start `python -m omni_demo.serve` (plain or on Ray) in a subprocess, on loopback."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request

from .apphelpers import ChildServer, free_port

API_KEY = "test-key"
METRICS_KEY = "metrics-key"


class ApiServer(ChildServer):
    """`python -m omni_demo.serve --model tiny` (plus `args`)."""

    name = "serve"
    stop_signal = signal.SIGINT  # Ray's driver shuts its local cluster down on SIGINT
    stop_grace_s = 30.0

    def __init__(self, *args: str, env: dict | None = None):
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        super().__init__([sys.executable, "-m", "omni_demo.serve", "--model", "tiny", "--device", "cpu",
                          "--port", str(port), *args], port, env)

    def health(self, timeout: float = 5) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as response:
            return json.load(response)

    def ready(self) -> None:
        self.health(timeout=2)

    def wait_idle(self, timeout: float = 10) -> float:
        """Seconds until no reply runs or waits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            status = self.health()
            if status["running"] == 0 and status["waiting"] == 0:
                return time.monotonic() - start
            time.sleep(0.01)
        raise TimeoutError(f"the server is still busy: {self.health()}")
