"""Make assets/screenshot.png: the app on the tiny model in headless Chromium, after one reply
to the image example.   python scripts/screenshot.py   (needs the --dev set-up)"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.apphelpers import AppServer  # noqa: E402
from tests.browser import chromium_page  # noqa: E402


def main() -> None:
    app = AppServer().wait()
    try:
        with chromium_page(width=1400, height=1050) as page:
            page.goto(app.url, wait_until="networkidle")
            page.locator("#settings").get_by_text("Settings").click()  # settings start collapsed
            page.get_by_label("Max speech (seconds)").first.fill("6")
            page.locator("#settings").get_by_text("Settings").click()
            page.get_by_text("What is in this picture?").first.click()
            time.sleep(1)
            page.locator("#textbox textarea").press("Enter")
            page.wait_for_function("document.querySelector('#stats').innerText.includes('first audio')",
                                   timeout=120_000)
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(1)
            page.screenshot(path=str(ROOT / "assets" / "screenshot.png"))
    finally:
        app.stop()
    print("wrote assets/screenshot.png")


if __name__ == "__main__":
    main()
