"""Headless Debian Chromium through Playwright (its own browser download is not used), and how
a test drives the app's page."""

import os
import time
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Screenshots of each state land here (docs/screens/ holds a copy of them).
ARTIFACTS = Path(os.environ.get("OMNI_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "out"))


def shot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def fake_microphone(wav) -> list[str]:
    """Chromium flags: a microphone that plays `wav`, allowed without a prompt."""
    return ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}"]


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--autoplay-policy=no-user-gesture-required",
]


@contextmanager
def chromium_pages(count, width=1400, height=1000, args=()):
    """`count` pages, each in its own browser context: separate users (Gradio sessions)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[*CHROMIUM_ARGS, *args])
        try:
            yield [browser.new_page(viewport={"width": width, "height": height}) for _ in range(count)]
        finally:
            browser.close()


@contextmanager
def chromium_page(width=1400, height=1000, args=()):
    with chromium_pages(1, width, height, args) as (page,):
        yield page


# Sampled every 25 ms from page start: the live player's played seconds. The Web Audio player
# (window.omniPlayer) reports its audio clock; the older HLS <audio> its currentTime, so the same
# figures can be taken of either. `enter` is when Enter was pressed in the message box.
PLAYBACK_PROBE = r"""
window.__probe = {enter: null, samples: []};
document.addEventListener('keydown', e => {
  if (e.key === 'Enter' && e.target.closest && e.target.closest('#textbox')) window.__probe.enter = performance.now();
}, true);
// What the page really plays, whatever the player's own bookkeeping says: every buffer source
// started on any AudioContext, with its start time on the audio clock and its length.
window.__sources = [];
{
  const start = AudioBufferSourceNode.prototype.start;
  AudioBufferSourceNode.prototype.start = function (when = 0, offset = 0, duration) {
    const record = {when: Math.max(when, this.context.currentTime), length: this.buffer ? this.buffer.duration : 0,
                    calledAt: this.context.currentTime, stoppedAt: null};
    window.__sources.push(record);
    const stop = this.stop.bind(this);
    this.stop = (at = 0) => { record.stoppedAt = Math.max(at, this.context.currentTime); return stop(at); };
    return start.call(this, when, offset, duration);
  };
}
setInterval(() => {
  const el = document.querySelector('#reply-audio audio');
  const pos = window.omniPlayer ? window.omniPlayer.position() : (el ? el.currentTime : null);
  window.__probe.samples.push([performance.now(), pos]);
}, 25);
"""
STALL_S = 0.2  # a pause in the played position this long (after sound started) counts as a stall


def playback_figures(probe: dict) -> dict:
    """Enter -> first sound, and the stalls after it: pauses of the played position that resume
    (the wait after the last chunk does not count)."""
    enter = probe["enter"]
    samples = [(t / 1000, p) for t, p in probe["samples"] if p is not None and enter is not None and t >= enter]
    first = next((t for t, p in samples if p > 0), None)
    stalls, moved_at, position = [], None, 0.0
    for t, p in samples:
        if p > position + 1e-4:
            if moved_at is not None and t - moved_at > STALL_S + 0.025:
                stalls.append(round(t - moved_at, 2))
            moved_at, position = t, p
    return {"first_sound_s": None if first is None else round(first - enter / 1000, 2), "stalls": len(stalls),
            "stalled_s": round(sum(stalls), 2), "stall_lengths": stalls, "played_s": round(position, 2)}


def open_app(page, url, max_speech_s=None, seed=11):
    """Load the app with the playback probe; set max speech and seed (settings start collapsed)."""
    page.add_init_script(PLAYBACK_PROBE)
    page.goto(url, wait_until="load")
    page.locator("#textbox textarea").wait_for()
    page.wait_for_function("window.omniPlayer !== undefined")
    if max_speech_s is not None or seed is not None:
        page.locator("#settings").get_by_text("Settings").click()
        if max_speech_s is not None:
            page.get_by_label("Max speech (seconds)").first.fill(str(max_speech_s))
        if seed is not None:
            page.get_by_label("Seed", exact=False).first.fill(str(seed))
        page.locator("#settings").get_by_text("Settings").click()


def send(page, text):
    page.locator("#textbox textarea").fill(text)
    page.locator("#textbox textarea").press("Enter")


def state(page) -> str:
    return page.evaluate("document.querySelector('#player [data-state]')?.dataset.state || ''")


def wait_state(page, *states, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(page) in states:
            return
        time.sleep(0.05)
    raise AssertionError(f"state {state(page)!r}, expected one of {states}")


# WCAG contrast of an element's text against the first opaque background behind it, with the
# opacity of every ancestor applied (Gradio dims a pending component to 0.2).
CONTRAST_JS = """(el) => {
  const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
    .reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  let opacity = 1, bg = null;
  for (let n = el; n && n.nodeType === 1; n = n.parentElement) {
    const style = getComputedStyle(n);
    opacity *= parseFloat(style.opacity);
    const c = rgb(style.backgroundColor);
    if (!bg && c.length && (c.length < 4 || c[3] > 0.5)) bg = c.slice(0, 3);
  }
  bg = bg || [255, 255, 255];
  const fg = rgb(getComputedStyle(el).color).slice(0, 3).map((v, i) => v * opacity + bg[i] * (1 - opacity));
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  return (hi + 0.05) / (lo + 0.05);
}"""


def contrast(page, selector) -> float:
    return page.locator(selector).first.evaluate(CONTRAST_JS)


AXE = Path(__file__).resolve().parent.parent / ".npm" / "node_modules" / "axe-core" / "axe.min.js"
AXE_RULES = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def accessibility_violations(page, impacts=("serious", "critical")) -> list[dict]:
    """axe-core's violations of WCAG 2.1 A/AA and its best practices at `impacts`, on the page as it is."""
    assert AXE.exists(), f"{AXE} is missing: run bash scripts/setup.sh --dev (it installs axe-core from npm)"
    page.evaluate(AXE.read_text())
    result = page.evaluate(f"axe.run(document, {{runOnly: {AXE_RULES!r}}})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"], "targets": [n["target"] for n in v["nodes"]]}
            for v in result["violations"] if v["impact"] in impacts]


def tab_stops(page, count=40) -> list[str]:
    """What Tab reaches from the top of the page, as 'tag#closest-id: name'."""
    page.locator("body").click(position={"x": 2, "y": 2})
    stops = []
    for _ in range(count):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("""() => { const e = document.activeElement, id = e.closest('[id]');
            return `${e.tagName.toLowerCase()}#${id ? id.id : ''}: ${e.getAttribute('aria-label') || e.innerText || ''}`
              .slice(0, 80); }"""))
    return stops


def played_gaps(sources: list[dict], min_gap_s: float = 0.02) -> list[float]:
    """Silences between consecutive buffers the page played (from the AudioBufferSourceNode starts
    the probe recorded), in seconds: where one ended before the next began."""
    spans = sorted((s["when"], s["when"] + s["length"]) for s in sources if s["length"] > 0)
    return [round(nxt - end, 3) for (_, end), (nxt, _) in zip(spans, spans[1:]) if nxt - end > min_gap_s]

