"""The UI as a client (`app.py --backend URL`): no model and no torch in its process; in headless
Chromium the text grows and the speech streams from the HTTP server, as in local mode."""

import time
from pathlib import Path

import pytest

from .apphelpers import AppServer
from .browser import CHROMIUM, chromium_page
from .serverhelpers import API_KEY
from .test_browser import ARTIFACTS, SEED, bot_text

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


@pytest.fixture(scope="module")
def remote_ui(api_server):
    app = AppServer("--backend", api_server.base_url, "--api-key", API_KEY).wait()
    yield app
    app.stop()


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_remote_page_streams_text_and_speech_without_torch(remote_ui, api_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_page() as page:
        stream_requests = []
        page.on("request", lambda r: stream_requests.append((time.monotonic(), r.url))
                if "/stream/" in r.url else None)
        page.goto(remote_ui.url, wait_until="networkidle")
        assert "random" in page.locator("#random-banner").inner_text().lower()  # the server's model card says so
        page.get_by_label("Max speech (seconds)").first.fill("10")
        page.get_by_label("Seed", exact=False).first.fill(str(SEED))  # the local test's reply, long enough
        page.locator("#textbox textarea").fill("Tell me a story about a singing robot")
        page.locator("#textbox textarea").press("Enter")

        observations, finished_at = [], None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            observations.append(bot_text(page))
            if "first audio" in page.locator("#stats").inner_text():
                finished_at = time.monotonic()
                break
            time.sleep(0.1)
        assert finished_at, f"the reply did not finish: {remote_ui.output()}"
        page.screenshot(path=str(ARTIFACTS / "browser-remote-reply.png"), full_page=True)

    assert len(observations[-1]) >= 40, f"seed {SEED} gives too short a reply to watch it grow: {observations[-1]!r}"
    distinct = [t for i, t in enumerate(observations) if t and (i == 0 or t != observations[i - 1])]
    assert len(distinct) >= 3, f"chat text should grow over several observations: {distinct[:5]}"
    playlists = [t for t, url in stream_requests if "playlist" in url and t < finished_at]
    segments = [t for t, url in stream_requests if "playlist" not in url and t < finished_at]
    assert playlists and segments, f"no HLS traffic before the reply ended: {stream_requests[:5]}"
    assert min(segments) < finished_at - 0.5, "speech should be fetched while the reply is still running"

    ui_libraries = loaded_libraries(remote_ui.process.pid)
    assert "libtorch" not in ui_libraries and "/torch/" not in ui_libraries, "the UI process loaded torch"
    assert "libtorch" in loaded_libraries(api_server.process.pid), "the check would see torch if it were there"
