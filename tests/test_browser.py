"""A person's view: the real app in headless Chromium, a message sent, text and speech streaming."""

import os
import time
from pathlib import Path

import pytest

from .apphelpers import AppServer
from .browser import CHROMIUM, chromium_page

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
SEED = 11  # fixed: an unseeded random reply can be too short to be seen growing
ARTIFACTS = Path(os.environ.get("OMNI_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "out"))


@pytest.fixture(scope="module")
def server(tiny_dir):
    app = AppServer().wait()
    yield app
    app.stop()


def bot_text(page) -> str:
    bots = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']")
    return bots.first.inner_text() if bots.count() else ""


def test_page_streams_text_and_speech(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_page() as page:
        stream_requests = []
        page.on("request", lambda r: stream_requests.append((time.monotonic(), r.url))
                if "/stream/" in r.url else None)
        page.goto(server.url, wait_until="networkidle")
        assert "random" in page.locator("#random-banner").inner_text().lower()
        page.get_by_label("Max speech (seconds)").first.fill("10")
        page.get_by_label("Seed", exact=False).first.fill(str(SEED))  # a reply long enough to watch it grow
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
        assert finished_at, "the reply did not finish"
        page.screenshot(path=str(ARTIFACTS / "browser-reply.png"), full_page=True)

    assert len(observations[-1]) >= 40, f"seed {SEED} gives too short a reply to watch it grow: {observations[-1]!r}"
    distinct = [t for i, t in enumerate(observations) if t and (i == 0 or t != observations[i - 1])]
    assert len(distinct) >= 3, f"chat text should grow over several observations: {distinct[:5]}"
    playlists = [t for t, url in stream_requests if "playlist" in url and t < finished_at]
    segments = [t for t, url in stream_requests if "playlist" not in url and t < finished_at]
    assert playlists and segments, f"no HLS traffic before the reply ended: {stream_requests[:5]}"
    assert min(segments) < finished_at - 0.5, "speech should be fetched while the reply is still running"
