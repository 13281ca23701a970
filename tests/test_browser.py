"""A person's view: the real app in headless Chromium (desktop 1400x1000 and phone 390x844).

Timing figures (Enter -> first sound, stalls) are printed; run with -s to see them. The machine
may be a shared 2-core CPU, so bounds are generous where the server's own speed is involved and
exact where only the page is (error states, silence after Stop, layout)."""

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from .apphelpers import AppServer
from .browser import (
    CHROMIUM,
    accessibility_violations,
    chromium_page,
    chromium_pages,
    fake_microphone,
    open_app,
    playback_figures,
    played_gaps,
    send,
    shot,
    state,
    tab_stops,
    wait_state,
)
from .conftest import ASSETS

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
SEED = 11  # fixed: an unseeded random reply can be too short to be seen growing
DESKTOP, PHONE = (1400, 1000), (390, 844)
LEAD_S = 0.3  # the player's start-up buffer (omni_demo/app/web/player.js)
FIRST_SOUND_GOAL_S = 0.5  # engine's first audio chunk -> sound in the browser


@pytest.fixture(scope="module")
def server(tiny_dir):
    """One typed reply at a time (--concurrency 1): the tests of a turn waiting in Gradio's line need
    one to wait there deterministically (with the default, the engine batches the second reply as
    soon as the real-time guard lets it in; tests/test_everyone_browser.py covers that)."""
    app = AppServer("--concurrency", "1").wait()
    yield app
    app.stop()


def error_panels(page) -> int:
    """Components in Gradio's red error state (the status tracker's 'Error' box)."""
    return page.locator(".error:visible").count()


def bot_messages(page) -> list[str]:
    return page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").all_inner_texts()


def test_empty_send_and_broken_image_are_toasts_not_red_panels(server, tmp_path):
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, seed=None)
        page.locator("#textbox textarea").press("Enter")
        page.get_by_text("Nothing to send").first.wait_for(timeout=10_000)
        shot(page, "state-empty-send")
        assert error_panels(page) == 0
        page.locator("#textbox textarea").fill("still typing")  # nothing blocks the box
        assert page.locator("#textbox textarea").input_value() == "still typing"

        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png" * 50)
        page.locator("#textbox input[type=file]").set_input_files(str(broken))
        page.locator("#textbox textarea").fill("look")
        page.locator("#textbox textarea").press("Enter")
        page.get_by_text("could not read image").first.wait_for(timeout=60_000)
        wait_state(page, "error")
        shot(page, "state-error")
        assert error_panels(page) == 0
        assert "/tmp" not in page.locator("body").inner_text() and "gradio/" not in page.locator("body").inner_text()
        assert page.locator("#textbox textarea").input_value() == "look"  # the message comes back to the box
        page.get_by_text("broken.png: cannot be shown").first.wait_for(timeout=10_000)  # not a bare broken icon
        page.locator("#textbox textarea").fill("a line\n" * 40)  # the box stops growing
        assert page.locator("#textbox textarea").bounding_box()["height"] < 300


def test_speech_starts_fast_and_plays_without_stalls(server):
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, max_speech_s=10)
        send(page, "Tell me a story about a singing robot")
        wait_state(page, "thinking", "speaking")
        wait_state(page, "speaking")
        shot(page, "state-speaking")
        wait_state(page, "done")
        generated = page.evaluate("omniPlayer.reply.generated")
        page.wait_for_function("omniPlayer.position() >= omniPlayer.reply.generated - 0.01", timeout=60_000)
        time.sleep(0.3)
        shot(page, "state-done")
        probe, readout = page.evaluate("window.__probe"), page.locator("#stats").inner_text()
        gaps = played_gaps(page.evaluate("window.__sources"))  # what the page played, not its bookkeeping
        arrivals = page.evaluate("omniPlayer.arrivals.filter(a => a[3] > 0)")  # [ms, seq, state, s, transit ms]

    figures = playback_figures(probe)
    server_first_audio = float(readout.split("first audio")[1].split("s")[0])
    first_chunk_s = (arrivals[0][0] - probe["enter"]) / 1000
    made_s = first_chunk_s - arrivals[0][4] / 1000  # when the engine's first chunk was made (same machine clock)
    # The server was ahead of real time when every chunk arrived before the audio before it ran out.
    late = [round((t - arrivals[0][0]) / 1000 - LEAD_S - sum(a[3] for a in arrivals[:i]), 2)
            for i, (t, *_rest) in enumerate(arrivals) if i]
    behind = [x for x in late if x > 0]
    print(json.dumps({**figures, "server_first_audio_s": server_first_audio, "first_chunk_in_browser_s": first_chunk_s,
                      "engine_first_chunk_s": round(made_s, 2),
                      "sound_after_engine_first_chunk_s": round(figures["first_sound_s"] - made_s, 2),
                      "chunks_behind_real_time": behind, "readout": readout}))
    assert figures["played_s"] >= generated - 0.05 >= 5
    assert "first sound heard" in readout and "first audio" in readout
    # Streamed: sound starts while the reply is still being generated (its last chunk comes later).
    assert figures["first_sound_s"] < (arrivals[-1][0] - probe["enter"]) / 1000, figures
    # The goal is 0.5 s; on an overloaded machine (tests in parallel on 2 cores) the page's own timers
    # and audio thread lag too, so the bound widens there, and says so.
    bound = FIRST_SOUND_GOAL_S if os.getloadavg()[0] / os.cpu_count() < 1.5 else 2.0
    print(f"first sound {figures['first_sound_s'] - made_s:.2f} s after the engine's first chunk (bound {bound} s, "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    assert figures["first_sound_s"] - made_s <= bound, "sound should start within 0.5 s of the engine's first chunk"
    # Counted from the sources the page started: the sampled position also pauses when a loaded
    # machine holds the page's timers back.
    assert len(gaps) <= len(behind), f"a gap while the server was ahead of real time: {gaps}, {figures}, {late}"


def test_stop_silences_at_once_and_keeps_the_partial_reply_and_queue_shows_the_message(server):
    with chromium_pages(2, *DESKTOP) as (first, second):
        open_app(first, server.url, max_speech_s=60)
        open_app(second, server.url, max_speech_s=5)
        send(first, "Talk for a long time")
        wait_state(first, "speaking")
        send(second, "Are you there?")  # waits for the first reply: its message shows meanwhile
        wait_state(second, "queued")
        assert "Are you there?" in second.locator("#chatbot").inner_text()
        assert "1 reply before yours" in second.locator("#player").inner_text()
        shot(second, "state-queued")
        first.wait_for_function("omniPlayer.position() > 0.5", timeout=60_000)
        assert first.get_by_role("button", name="Stop").count() >= 1  # Send became Stop
        stop_at = first.evaluate("omniPlayer.position()")
        first.keyboard.press("Escape")
        t0 = time.monotonic()
        first.wait_for_function("omniPlayer.reply.stoppedAt !== undefined", timeout=5_000)
        time.sleep(0.3)
        after = first.evaluate("omniPlayer.ctx.currentTime")
        played_then, silent_at = first.evaluate("[omniPlayer.position(), omniPlayer.reply.stoppedAt]")
        active = first.evaluate("omniPlayer.reply.sources.length")
        wait_state(first, "stopped", timeout=30)
        first.get_by_text("stopped").first.wait_for(timeout=30_000)
        first.locator("#chatbot audio").first.wait_for(state="attached", timeout=30_000)  # the partial audio is kept
        first.locator("#stats").get_by_text("first audio").wait_for(timeout=30_000)
        shot(first, "state-stopped")
        assert first.get_by_role("button", name="Send").count() >= 1
        print(json.dumps({"stopped_after_s": round(time.monotonic() - t0, 2), "played_at_stop": stop_at,
                          "played_after": played_then}))
        assert played_then - stop_at <= 0.3 and silent_at <= after and active == 0
        wait_state(second, "thinking", "speaking", "done", timeout=120)  # the queued turn runs next
        wait_state(second, "done", timeout=120)


def test_a_page_closed_while_in_line_no_longer_counts_for_the_next_user(server):
    """A turn waits in line; its page is closed (Gradio drops the queued event without calling it):
    the next user's "In line" counts only the reply actually running."""
    with chromium_pages(3, *DESKTOP) as (first, second, third):
        for page in (first, second, third):
            open_app(page, server.url, max_speech_s=60)
        send(first, "Talk for a long time")
        wait_state(first, "speaking")
        send(second, "Are you there?")
        wait_state(second, "queued")
        assert "1 reply before yours" in second.locator("#player").inner_text()
        second.close()
        time.sleep(3)  # the page's heartbeat connection closes; Gradio calls unload
        assert state(first) == "speaking"  # the first reply is still running
        send(third, "And me?")
        wait_state(third, "queued")
        assert "1 reply before yours" in third.locator("#player").inner_text()
        first.keyboard.press("Escape")
        wait_state(third, "done", timeout=120)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_chat_and_input_above_the_fold_with_big_named_targets(server, viewport):
    width, height = viewport
    with chromium_page(width, height) as page:
        open_app(page, server.url, seed=None)
        shot(page, f"layout-{'phone' if width < 600 else 'desktop'}")
        box = page.locator("#textbox textarea").bounding_box()
        chat = page.locator("#chatbot").bounding_box()
        assert box["y"] + box["height"] <= height and chat["y"] < height / 2, (box, chat)
        assert page.get_by_role("textbox", name="Message").count() == 1
        assert not page.get_by_label("Voice").first.is_visible()  # settings start collapsed
        assert not page.locator("#webcam").is_visible()  # the webcam waits behind the camera control
        chips = page.locator("#chips button")
        assert chips.count() >= 4 and chips.first.bounding_box()["y"] < height
        for target in [*page.locator("#textbox button:visible").all(), *chips.all()]:
            size = target.bounding_box()
            assert size["height"] >= 44 and size["width"] >= 44, (target.inner_html()[:80], size)
        page.get_by_role("button", name="What is in this picture?").click()  # fills the box, sends nothing
        page.wait_for_function("document.querySelector('#textbox textarea').value === 'What is in this picture?'",
                               timeout=10_000)
        assert page.locator("#textbox [aria-label='Remove file']").count() == 1  # the picture came with it


def test_voice_message_is_one_tap_to_record_one_to_send(server):
    with chromium_page(*PHONE, args=fake_microphone(ASSETS / "question.wav")) as page:
        open_app(page, server.url, max_speech_s=5)
        page.get_by_role("button", name="Record audio").click()  # tap 1: recording starts at once
        stop = page.get_by_role("button", name="Stop recording")
        stop.wait_for(timeout=10_000)
        time.sleep(1.5)
        shot(page, "state-recording")
        assert "Recording" in page.evaluate(
            "getComputedStyle(document.querySelector('#textbox'), '::after').content")
        stop.click()  # tap 2: attached and sent
        page.locator("#chatbot audio").first.wait_for(state="attached", timeout=30_000)
        wait_state(page, "queued", "thinking", "speaking", "done")
        wait_state(page, "done")
        assert page.locator("#textbox textarea").input_value() == ""


def test_stop_speech_stays_while_speech_plays_after_the_reply_is_made_and_clear_resets_the_readouts(server):
    """The server finishes well before the speech has played: Send comes back, and a Stop speech
    button stays while sound remains (Esc was the only way before). Clear leaves no readout."""
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, max_speech_s=20)
        send(page, "Talk for a long time")
        wait_state(page, "done", timeout=120)  # the server has finished the reply...
        remaining = page.evaluate("omniPlayer.reply.end - omniPlayer.ctx.currentTime")
        print({"speech_left_when_done_s": round(remaining, 2)})
        assert remaining > 1  # ...well before its speech has played (the tiny model outruns real time)
        stop = page.locator("#player .player-stop")
        assert stop.is_visible() and page.get_by_role("button", name="Send").count() >= 1
        assert page.locator("#player .player-state").inner_text().startswith(("Speaking", "Buffering"))
        shot(page, "stop-speech-after-done")
        stop.click()
        page.wait_for_function("omniPlayer.reply.stoppedAt !== undefined", timeout=5_000)
        assert page.evaluate("omniPlayer.reply.sources.length") == 0  # nothing scheduled plays
        stop.wait_for(state="hidden", timeout=5_000)
        page.click("#clear")
        page.wait_for_function("document.querySelector('#player .player-state').innerText === ''", timeout=10_000)
        page.wait_for_function("document.querySelector('#stats').innerText.trim() === ''", timeout=10_000)
        assert page.locator("#chatbot .message").count() == 0


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_no_serious_accessibility_violation_and_every_tab_stop_does_something(server, viewport):
    """axe-core (WCAG 2.1 A/AA and best practice) finds nothing serious, idle and after a reply; Tab
    reaches only controls, each with a visible focus ring; Clear is not one of the examples."""
    with chromium_page(*viewport) as page:
        open_app(page, server.url, max_speech_s=5)
        assert accessibility_violations(page) == []
        stops = tab_stops(page)
        print(stops[:16])
        assert not [stop for stop in stops if stop.startswith(("div", "span", "p#"))], stops  # no dead stops
        assert "button#textbox: Send" in stops and page.locator("#chips #clear").count() == 0
        page.locator("#textbox textarea").focus()
        ring = page.evaluate("getComputedStyle(document.querySelector('#textbox')).outlineWidth")
        assert float(ring.removesuffix("px")) >= 2, ring
        send(page, "Hello!")
        wait_state(page, "done", timeout=120)
        assert accessibility_violations(page) == []



def user_messages(page) -> list[str]:
    return page.locator("#chatbot .message.user").all_inner_texts()


def wait_new_reply_done(page, old_id, timeout=120):
    page.wait_for_function(f"omniPlayer.reply && omniPlayer.reply.id !== {old_id!r} && "
                           "['done', 'stopped'].includes(omniPlayer.reply.state)", timeout=timeout * 1000)


def test_regenerate_and_edit_then_the_reply_equals_the_edited_conversation_sent_fresh(server):
    """Retry (the chat's own button) makes the last reply again; editing the first message drops
    everything after it and answers the edited message, as a new page sending it fresh does
    (the same seed: equal text), though this session's conversation cache held the old turns."""
    with chromium_pages(2, *DESKTOP) as (page, fresh):
        open_app(page, server.url, max_speech_s=5)
        open_app(fresh, server.url, max_speech_s=5)
        send(page, "Hello!")
        wait_state(page, "done", timeout=120)
        old = page.evaluate("omniPlayer.reply.id")
        send(page, "Tell me about the sea.")
        wait_new_reply_done(page, old)
        users, replies = user_messages(page), len(bot_messages(page))
        old = page.evaluate("omniPlayer.reply.id")
        page.locator("#chatbot button[aria-label='Retry']").last.click()
        wait_new_reply_done(page, old)
        assert user_messages(page) == users and len(bot_messages(page)) == replies  # replaced, not added
        old = page.evaluate("omniPlayer.reply.id")
        page.locator("#chatbot .message.user").first.hover()
        page.locator("#chatbot button[aria-label='Edit']").first.click()
        page.locator("#chatbot textarea.edit-textarea").fill("Hi there!")
        page.locator("#chatbot button[aria-label='Submit']").click()
        wait_new_reply_done(page, old)
        shot(page, "edited-and-resent")
        assert [text.strip() for text in user_messages(page)] == ["Hi there!"]
        send(fresh, "Hi there!")
        wait_state(fresh, "done", timeout=120)
        edited, sent = bot_messages(page), bot_messages(fresh)
        print({"edited": edited[0][:60], "fresh": sent[0][:60]})
        assert len(edited[0].strip()) >= 8 and edited[0] == sent[0] and len(edited) == len(sent)  # text, then audio


def test_export_gives_the_conversation_as_text_and_its_files(server, tmp_path):
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, max_speech_s=5)
        page.get_by_role("button", name="What is in this picture?").click()  # a picture and its question
        page.wait_for_function("document.querySelector('#textbox textarea').value !== ''", timeout=10_000)
        page.locator("#textbox textarea").press("Enter")
        wait_state(page, "done", timeout=120)
        page.locator("#export").click()
        link = page.locator("#exported a[download], #exported a").first
        link.wait_for(timeout=20_000)
        with page.expect_download() as download:
            link.click()
        archive = tmp_path / "conversation.zip"
        download.value.save_as(archive)
        shown = bot_messages(page)[0].strip()
    with zipfile.ZipFile(archive) as exported:
        names = exported.namelist()
        text = exported.read("conversation.md").decode()
    print(names)
    words = re.findall(r"[A-Za-z]{4,}", shown)[:4]  # the reply as the page shows it (markdown rendered)
    assert "**You:** What is in this picture?" in text and words and all(word in text for word in words)
    assert any(name.endswith("shapes.png") for name in names)  # what was sent
    assert sum(name.endswith(".wav") for name in names) == 1  # the reply's speech


def test_the_page_follows_a_dark_system_theme_readably_and_keeps_the_theme_chosen(server):
    with chromium_page(*DESKTOP) as page:
        page.emulate_media(color_scheme="dark")
        open_app(page, server.url, seed=None)
        dark = "document.body.classList.contains('dark')"
        assert page.evaluate(dark) and accessibility_violations(page) == []
        shot(page, "theme-dark")
        page.locator("#theme").click()
        page.wait_for_timeout(600)  # Gradio's buttons fade to the new colours
        assert not page.evaluate(dark) and accessibility_violations(page) == []
        page.reload(wait_until="load")
        page.wait_for_function("window.omniPlayer !== undefined")
        assert not page.evaluate(dark)  # the choice is kept in this browser, over the system's
        page.locator("#theme").click()
        assert page.evaluate(dark)


def test_each_voice_can_be_heard_before_choosing_it(server):
    """The preview plays in the page's player (what it plays is measured: its audio clock moves) and
    leaves the chat alone; the second time a voice is asked for, its kept sample plays at once."""
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, seed=None)
        page.locator("#settings").get_by_text("Settings").click()
        for voice in ("Ethan", "Ethan"):
            page.get_by_label(voice).check()
            old = page.evaluate("omniPlayer.reply ? omniPlayer.reply.id : ''")
            started = time.monotonic()
            page.locator("#voice-preview").click()
            page.wait_for_function(f"omniPlayer.reply && omniPlayer.reply.id !== {old!r} && "
                                   "omniPlayer.position() > 0.2", timeout=60_000)
            print({"voice": voice, "first_sound_s": round(time.monotonic() - started, 2)})
            page.wait_for_function("omniPlayer.reply.state === 'done'", timeout=60_000)
        assert "Voice preview: Ethan" in page.locator("#player").inner_text() or "That was Ethan" in \
            page.locator("#player").inner_text()
        assert page.locator("#chatbot .message").count() == 0


def test_a_reload_keeps_the_conversation_and_it_goes_on(server, tmp_path):
    """The chat comes back from the browser's own storage after a reload, with the picture this
    page uploaded and the reply's audio, and the next message is answered with that history (the
    new session owns the sealed upload)."""
    picture = tmp_path / "my-picture.png"
    shutil.copy(ASSETS / "shapes.png", picture)
    with chromium_page(*DESKTOP) as page:
        open_app(page, server.url, max_speech_s=5)
        page.locator("#textbox input[type=file]").set_input_files(str(picture))
        page.locator("#textbox [aria-label='Remove file']").wait_for(timeout=20_000)
        send(page, "What is this?")
        wait_state(page, "done", timeout=120)
        page.wait_for_timeout(1000)  # the chat is stored after the reply's last step
        before = page.locator("#chatbot").inner_text()
        page.reload(wait_until="load")
        page.locator("#chatbot .message.user").first.wait_for(timeout=20_000)
        durations = re.compile(r"\d+:\d\d")  # an audio player's length shows once its file has loaded
        assert durations.sub("", page.locator("#chatbot").inner_text()) == durations.sub("", before)
        assert page.locator("#chatbot img").count() == 1 and page.locator("#chatbot .message.bot").count() == 2
        send(page, "And what colour is it?")
        page.wait_for_function("document.querySelectorAll('#chatbot .message.user').length === 3", timeout=20_000)
        wait_state(page, "done", timeout=120)
        assert "Refused" not in page.locator("body").inner_text()
        assert page.locator("#chatbot .message.bot").count() == 4  # two replies, each its text and its audio


def reply_figures(page, text) -> dict:
    """Send `text`, wait until its speech has played; what the page played (gaps from its sources)."""
    page.evaluate("window.__sources = []")
    old = page.evaluate("omniPlayer.reply ? omniPlayer.reply.id : ''")
    send(page, text)
    page.wait_for_function(f"omniPlayer.reply && omniPlayer.reply.id !== {old!r} && "
                           "omniPlayer.reply.state === 'done'", timeout=120_000)
    page.wait_for_function("omniPlayer.position() >= omniPlayer.reply.generated - 0.01", timeout=60_000)
    sources = page.evaluate("window.__sources")
    return {"gaps": played_gaps(sources), "lead_s": round(page.evaluate("omniPlayer.reply.lead"), 2),
            "needed_s": round(page.evaluate("omniPlayer.reply.needed"), 2),
            "played_s": round(sum(s["length"] for s in sources), 2)}


def test_after_the_first_reply_speech_plays_without_a_gap(server):
    """Measured from what the page plays (every buffer source it starts), not from the player's
    bookkeeping: the start-up buffer learns the server's pace from the replies before (its own,
    and the server's word on the first chunk), so the replies after the first play with no gap,
    also the first reply of a page opened later."""
    with chromium_pages(2, *DESKTOP) as (page, later):
        open_app(page, server.url, max_speech_s=5)
        figures = [reply_figures(page, text) for text in ("Tell me a story about a singing robot", "And another one",
                                                           "One more, please")]
        open_app(later, server.url, max_speech_s=5)
        figures.append(reply_figures(later, "Hello, I am new here"))
        print(json.dumps(figures))
        assert all(f["played_s"] >= 3 for f in figures)  # several chunks each
        for index, figure in enumerate(figures[1:3], 1):  # the page learnt from the replies before
            learnt = max(f["needed_s"] for f in figures[max(0, index - 3):index]) + 0.25
            assert figure["lead_s"] >= min(2.0, learnt) - 0.01, figures
        assert figures[3]["lead_s"] > 0.3, figures  # a new page starts from the server's word on its pace
        # Silence only where the server fell further behind than the buffer (a loaded machine can
        # make it slower than real time); none while it kept within it.
        assert all(f["gaps"] == [] for f in figures[1:] if f["needed_s"] <= f["lead_s"]), figures
