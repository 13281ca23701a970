"""The UI as a client (`app.py --backend URL`): no model and no torch in its process; in headless
Chromium the text grows and the speech streams from the HTTP server, as in local mode."""

import time
from pathlib import Path

import pytest

from .apphelpers import AppServer
from .browser import ARTIFACTS, CHROMIUM, chromium_page, open_app, playback_figures, send, state
from .serverhelpers import API_KEY
from .test_browser import SEED, bot_messages

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


@pytest.fixture(scope="module")
def remote_ui(api_server):
    app = AppServer("--backend", api_server.base_url, "--api-key", API_KEY).wait()
    yield app
    app.stop()


def loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_remote_page_streams_text_and_speech_without_torch(remote_ui, api_server):
    with chromium_page() as page:
        open_app(page, remote_ui.url, max_speech_s=10, seed=SEED)  # the local test's reply, long enough
        assert "random" in page.locator("#random-banner").inner_text().lower()  # the server's model card says so
        send(page, "Tell me a story about a singing robot")
        observations, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline and state(page) != "done":
            observations.append("\n".join(bot_messages(page)))
            time.sleep(0.02)  # the tiny server writes the whole text in a few tenths of a second
        assert state(page) == "done", f"the reply did not finish: {remote_ui.output()}"
        generated = page.evaluate("omniPlayer.reply.generated")
        page.wait_for_function("omniPlayer.position() >= omniPlayer.reply.generated - 0.01", timeout=60_000)
        probe = page.evaluate("window.__probe")
        arrivals = page.evaluate("omniPlayer.arrivals.filter(a => a[3] > 0)")  # [ms, seq, state, s, transit ms]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "browser-remote-reply.png"), full_page=True)

    assert len(observations[-1]) >= 40, f"seed {SEED} gives too short a reply to watch it grow: {observations[-1]!r}"
    distinct = [t for i, t in enumerate(observations) if t and (i == 0 or t != observations[i - 1])]
    assert len(distinct) >= 3, f"chat text should grow over several observations: {distinct[:5]}"
    figures = playback_figures(probe)
    print(f"\n--backend: {figures}, {len(arrivals)} chunks")
    assert figures["played_s"] >= generated - 0.05 >= 5
    assert figures["first_sound_s"] < (arrivals[-1][0] - probe["enter"]) / 1000, "speech should play while streaming"

    ui_libraries = loaded_libraries(remote_ui.process.pid)
    assert "libtorch" not in ui_libraries and "/torch/" not in ui_libraries, "the UI process loaded torch"
    assert "libtorch" in loaded_libraries(api_server.process.pid), "the check would see torch if it were there"
