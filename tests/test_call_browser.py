"""The voice call in headless Chromium, its microphone a file (espeak-ng sentences with pauses,
a click): turns found, replies streamed (text grows, speech plays), a second sentence spoken
during a reply interrupts it (generation stops, the player stops, the chat marks it), no turn
from the click or the silence; End call; a closed page or a denied microphone ends the call and
frees the model."""

import re
import time

import pytest

from .apphelpers import AppServer
from .browser import chromium_page, chromium_pages, fake_microphone, open_app, send, shot, wait_state
from .speech import click, compose, needs_espeak, speak, write_wav

pytestmark = needs_espeak


@pytest.fixture(scope="module")
def app():
    server = AppServer().wait()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def call_wav(tmp_path_factory):
    """1 s of silence, a click, 1 s, a sentence, 2.5 s (the reply starts), a second sentence (it
    cuts in), 14 s of silence."""
    folder = tmp_path_factory.mktemp("call")
    first, second = speak("Hello, can you hear me?", folder), speak("Wait, tell me about the sea instead.", folder)
    audio, _ = compose(1.0, click(), 1.0, first, 2.5, second, 14.0)
    return write_wav(folder / "call.wav", audio)


def poll(page, script: str, until, timeout: float, every: float = 0.1):
    """Evaluate `script` until `until(value)`; every value seen, in order."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(page.evaluate(script))
        if until(seen[-1]):
            return seen
        time.sleep(every)
    raise AssertionError(f"timed out; last value {seen[-1] if seen else None!r}")


# A message that is an audio clip shows its length ("0:02") as its only text.
CHAT = """[...document.querySelectorAll('#chatbot .message')].map(m => ({
  user: m.classList.contains('user'), audio: /^\\d+:\\d\\d$/.test(m.innerText.trim()), text: m.innerText.trim()}))"""
PLAYER = """(() => { const p = window.omniPlayer; return p.history.map(r => ({id: r.id, state: r.state,
  generated: r.generated, stopped: r.stoppedAt !== undefined, sources: r.sources.length}))
})()"""


def user_turns(chat) -> int:
    return sum(1 for m in chat if m["user"] and m["audio"])


def test_a_call_takes_turns_streams_replies_and_is_interrupted_by_voice(app, call_wav):
    wav = call_wav
    with chromium_page(args=fake_microphone(f"{wav}%noloop")) as page:
        open_app(page, app.url, seed=11)  # replies of up to 512 tokens and 60 s of speech: long
        page.click("#call-start")
        page.wait_for_function("document.querySelector('#call-status').innerText.includes('Listening')",
                               timeout=30_000)
        assert page.locator("#textbox textarea").is_disabled()  # typing waits for the call's end
        assert page.evaluate("document.activeElement.id || document.activeElement.closest('#call-end')?.id") == "call-end"
        # the first sentence is a turn; its reply streams, then the second sentence cuts in
        chats = poll(page, CHAT, lambda chat: user_turns(chat) == 2, timeout=60)
        replies = poll(page, PLAYER, lambda r: len(r) >= 2 and r[-1]["generated"] > 0.5, timeout=60)[-1]
        first = replies[-2]
        # cut as the voice was heard: what was still scheduled to play was stopped then (how much of
        # it had played by then depends on how fast this machine made it)
        assert first["state"] == "interrupted" and first["stopped"] and first["sources"] == 0
        texts = [next((m["text"] for m in chat if not m["user"] and not m["audio"]), "") for chat in chats]
        assert len({text for text in texts if text}) >= 2  # the first reply's text grew while it streamed
        chat = page.evaluate(CHAT)
        cut = next(i for i, m in enumerate(chat) if not m["user"] and "interrupted" in m["text"])
        # generation stopped there: the reply's audio in the chat is what had been made, far short of
        # the 60 s it was allowed
        minutes, seconds = chat[cut + 1]["text"].split(":")
        assert not chat[cut + 1]["user"] and chat[cut + 1]["audio"] and int(minutes) * 60 + int(seconds) < 30
        # the second reply streams and plays; the click and the long silence made no turn
        played = poll(page, "window.omniPlayer.position()", lambda p: p > 1.0, timeout=60)
        assert played[-1] > 1.0
        shot(page, "call-interrupted")
        time.sleep(3)
        assert user_turns(page.evaluate(CHAT)) == 2
        # the latency readout: the end of speech to the first sound, and its parts
        turns = page.evaluate("window.omniCall.turns")
        assert len(turns) == 2 and all(0.5 < t["total"] < 10 and t["player"] > 0 and t["vad"] > 0.3 for t in turns)
        assert all(t["early"] is not None for t in turns)  # each reply began as the voice paused
        readout = page.locator("#call-latency")
        assert re.fullmatch(r"Answered \d+\.\d s after you stopped", readout.inner_text().strip())  # one short line
        readout.locator("summary").click()  # the parts behind it
        assert "after you stopped speaking" in readout.inner_text() and "before the pause" in readout.inner_text()
        # End call: the reply stops, the page gets its Start button and microphone back
        page.click("#call-end")
        page.wait_for_function("document.querySelector('#call-status').innerText.includes('Call ended')",
                               timeout=10_000)
        page.locator("#call-start").wait_for(state="visible", timeout=5_000)
        assert not page.locator("#textbox textarea").is_disabled()
        page.wait_for_function("[...document.querySelectorAll('#call-mic button')].some(b => b.innerText.trim() === 'Record')",
                               timeout=10_000)
        # a typed message goes on from the call's conversation (its spoken turns are this session's)
        send(page, "And now in writing?")
        wait_state(page, "done", timeout=120)
        assert "And now in writing?" in page.locator("#chatbot").inner_text()
        assert "failed" not in page.locator("#chatbot").inner_text().lower()


def test_a_call_after_typed_turns_and_a_closed_page_ends_it_and_frees_the_model(app, call_wav):
    """A call goes on from a typed conversation; closing its page ends it and frees the model."""
    wav = call_wav
    with chromium_pages(2, args=fake_microphone(f"{wav}%noloop")) as (caller, other):
        open_app(caller, app.url, max_speech_s=5)
        send(caller, "Hello, I will call you next.")
        wait_state(caller, "done", timeout=120)
        caller.click("#call-start")
        caller.wait_for_function("document.querySelector('#call-status').innerText.includes('Listening')",
                                 timeout=30_000)
        caller.close()
        open_app(other, app.url, max_speech_s=5)
        started = time.monotonic()
        send(other, "Is anyone else talking to you?")
        wait_state(other, "speaking", "done", timeout=60)
        assert time.monotonic() - started < 30  # the call ended with its page (at most its 8 s mic timeout)


def test_a_denied_microphone_ends_the_call_with_a_clear_message(app):
    # A fake device but no fake permission prompt: headless Chromium denies the microphone.
    with chromium_page(args=["--use-fake-device-for-media-stream"]) as page:
        open_app(page, app.url)
        page.click("#call-start")
        page.wait_for_function("document.querySelector('#call-status').innerText.includes('Call ended')",
                               timeout=15_000)
        assert "microphone is blocked" in page.locator("#omni-toasts").inner_text()
        page.locator("#call-start").wait_for(state="visible", timeout=5_000)


def lan_address() -> str | None:
    """This machine's address on its network (a page there over plain http is not a secure context)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_call_over_plain_http_says_it_needs_https():
    address = lan_address()
    if address is None:
        pytest.skip("this machine has no network address other than loopback")
    server = AppServer("--host", "0.0.0.0").wait()
    try:
        with chromium_page(args=fake_microphone("/dev/null")) as page:
            open_app(page, server.url.replace("127.0.0.1", address), seed=None)
            assert not page.evaluate("window.isSecureContext")
            page.click("#call-start")
            page.wait_for_function("document.querySelector('#call-status').innerText.includes('Call ended')",
                                   timeout=15_000)
            assert "only on https or localhost" in page.locator("#omni-toasts").inner_text()
    finally:
        server.stop()


def test_a_call_from_silence_to_speech_hears_every_chunk_and_leaves_no_file(tmp_path):
    """Digital silence makes byte-identical chunks: they once shared one upload path, and deleting
    one removed the next before it was read (33 refused in a one-minute call). Each chunk now has
    the call's own numbered name: none is refused, none is lost, and none is left on disk."""
    uploads = tmp_path / "gradio"
    server = AppServer(env={"GRADIO_TEMP_DIR": str(uploads)}).wait()
    try:
        sentence = speak("Hello, can you hear me?", tmp_path)
        wav = write_wav(tmp_path / "silence-then-speech.wav", compose(20.0, sentence, 6.0)[0])
        with chromium_page(args=fake_microphone(f"{wav}%noloop")) as page:
            open_app(page, server.url, max_speech_s=5)
            page.click("#call-start")
            poll(page, CHAT, lambda chat: user_turns(chat) == 1, timeout=60)
            poll(page, PLAYER, lambda r: len(r) >= 1 and r[-1]["state"] in ("done", "speaking"), timeout=60)
            page.click("#call-end")
            page.wait_for_function("document.querySelector('#call-status').innerText.includes('Call ended')",
                                   timeout=10_000)
            time.sleep(6)  # the microphone's last chunk, posted as it stops
        log = server.output()
        assert "microphone chunk" not in log, log  # none refused, none lost
    finally:
        server.stop()
    left = [p.relative_to(uploads) for p in uploads.glob("*/omni-call-*")]  # each read chunk went as it was read;
    assert not left, left  # one posted after the call's end (Gradio never hands it over), at exit
    assert not list(uploads.glob("omni-replies-*")) and not list(uploads.glob("omni-calls-*"))  # removed at exit
