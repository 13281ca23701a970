"""The video call in headless Chromium: a fake camera (Chromium's moving test pattern) and a
microphone file of spoken questions. The app runs in this process on the tiny engine, so the test
reads the prompt the engine builds for each turn. With the camera on, each turn reaches the model
as a video with its sound interleaved (TMRoPE chunks), gets a spoken reply, and the chat shows its
clip, playable; muted, speech makes no turn and the call stays open; with the camera off, a turn is
audio only and the camera's light is out."""


import time

import pytest

from omni_demo.app.page import build_demo
from omni_demo.call.vad import load_vad

from .apphelpers import free_port
from .browser import chromium_page, contrast, fake_microphone, open_app, shot
from .speech import compose, needs_espeak, speak, write_wav

pytestmark = needs_espeak

GAP_S = 7.0  # after each question: its reply is heard before the next


@pytest.fixture(scope="module")
def app(engine):
    demo = build_demo(engine, load_vad, reply_limit=4).queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    """Four questions: two with the camera on, one muted (no turn), one with the camera off."""
    folder = tmp_path_factory.mktemp("video-call")
    spoken = [speak(text, folder) for text in ("What colour is the thing I am holding?", "And what is behind me?",
                                               "This one you should not hear.", "Now can you still hear me?")]
    audio, spans = compose(1.5, spoken[0], GAP_S, spoken[1], GAP_S, spoken[2], 3.0, spoken[3], 12.0)
    return write_wav(folder / "questions.wav", audio), spans


def prompt_recorder(engine, monkeypatch) -> list:
    """The media tokens of each reply's last user turn, as runs: ["video", "audio", "video", ...]."""
    config = engine.model.config.thinker_config
    kinds = {config.video_token_index: "video", config.audio_token_index: "audio"}
    user_start = engine.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
    turns, stream_inputs = [], engine.stream_inputs

    def record(inputs, *args, **kwargs):
        ids = inputs.input_ids[0].tolist()
        last = ids[len(ids) - ids[::-1].index(user_start) - 1:]  # the assistant prefix: its own start
        before = ids[: len(ids) - len(last)]
        turn = before[len(before) - before[::-1].index(user_start) - 1:]
        runs = []
        for token in turn:
            kind = kinds.get(token)
            if kind is not None and (not runs or runs[-1] != kind):
                runs.append(kind)
        turns.append(runs)
        return stream_inputs(inputs, *args, **kwargs)

    monkeypatch.setattr(engine, "stream_inputs", record)
    return turns


CHAT_CLIPS = """[...document.querySelectorAll('#chatbot .message.user video')].map(v => ({
  src: v.currentSrc || v.src, width: v.videoWidth, duration: v.duration, ready: v.readyState}))"""
MIC_S = "window.omniCall.mic ? (performance.now() - window.omniCall.mic.startedAt) / 1000 : 0"
STATUS = "document.querySelector('#call-status').innerText"


def wait_until(page, script: str, timeout: float):
    page.wait_for_function(script, timeout=timeout * 1000, polling=100)


def test_camera_turns_reach_the_model_as_video_with_sound_and_show_in_the_chat(app, engine, questions, monkeypatch):
    wav, spans = questions
    prompts = prompt_recorder(engine, monkeypatch)
    with chromium_page(args=fake_microphone(f"{wav}%noloop")) as page:
        open_app(page, app, max_speech_s=5, seed=11)
        assert page.locator("#call-screen .call-screen").is_hidden()  # no call: no call screen
        page.click("#call-start")
        wait_until(page, "window.omniCall.mic !== null", 30)
        page.click("#call-screen .call-camera")  # before the first question ends
        wait_until(page, "document.querySelector('#call-screen .call-preview').videoWidth > 0", 10)
        assert page.locator("#call-screen .call-camera").inner_text().endswith("Turn camera off")  # what a tap does
        wait_until(page, f"{STATUS}.includes('Listening')", 30)
        assert page.locator("#call-status .call-state-listening").is_visible()  # a badge, coloured by state
        assert contrast(page, "#call-status .call-state-listening") >= 4.5
        # the microphone's level moves while a question plays (it stays low in the silences)
        wait_until(page, "+document.querySelector('#call-screen .call-level').getAttribute('aria-valuenow') > 20",
                   spans[1][1] + 5)
        # both questions with the camera on: two clips in the chat, each a video the page can play
        wait_until(page, f"({CHAT_CLIPS}).filter(c => c.ready >= 1).length === 2", 90)
        clips = page.evaluate(CHAT_CLIPS)
        assert all(c["src"].endswith(".mp4") and c["width"] == 392 for c in clips), clips  # the frames as sent
        for clip, (start, end) in zip(clips, spans[:2], strict=True):
            assert end - start - 0.1 < clip["duration"] < end - start + 1.2  # the turn: its speech and pre-roll
        assert page.evaluate("window.omniCall.sent") >= 2 * spans[1][1] * 0.8  # ~2 frames a second
        shot(page, "video-call")
        # muted: the third question makes no turn, and the call stays open
        wait_until(page, f"{MIC_S} > {spans[1][1] + 3.0}", 30)
        camera = page.evaluate_handle("window.omniCall.camera.stream")
        page.click("#call-screen .call-camera")  # off: its light goes out at once
        assert page.evaluate("s => s.getVideoTracks().every(t => t.readyState === 'ended')", camera)
        assert page.locator("#call-screen .call-preview").is_hidden()
        page.click("#call-screen .call-mute")
        assert page.locator("#call-screen .call-mute").inner_text().endswith("Unmute")
        assert page.locator("#call-screen .call-muted-note").is_visible()
        assert page.evaluate("window.omniCall.mic.stream.getAudioTracks().every(t => !t.enabled)")
        wait_until(page, f"{MIC_S} > {spans[2][1] + 0.5}", 30)
        assert page.locator("#call-screen .call-level").get_attribute("aria-valuenow") == "0"
        page.click("#call-screen .call-mute")
        # the fourth question, with the camera off: an audio turn, answered
        wait_until(page, "[...document.querySelectorAll('#chatbot .message.user')].length === 3", 60)
        wait_until(page, f"{STATUS}.includes('Listening') || {STATUS}.includes('Speaking')", 60)
        assert "Call ended" not in page.evaluate(STATUS)
        assert page.locator("#chatbot .message.user video").count() == 2
        assert page.locator("#chatbot .message.user audio").count() == 1
        page.click("#call-end")
        wait_until(page, f"{STATUS}.includes('Call ended')", 15)
        assert page.locator("#call-screen .call-screen").is_hidden()
    # the model's view of each answered turn: frames and sound interleaved per 2 s chunk; then sound alone
    videos = [runs for runs in prompts if "video" in runs]
    assert videos and all(runs[:2] == ["video", "audio"] for runs in videos)
    assert prompts[-1] == ["audio"]


def test_the_call_screen_fits_a_phone_held_upright(app, questions):
    """390 x 844: the call's controls side by side within the screen, thumb-sized, the preview beside them."""
    with chromium_page(390, 844, args=fake_microphone(f"{questions[0]}%noloop")) as page:
        open_app(page, app, seed=None)
        page.click("#call-start")
        wait_until(page, "window.omniCall.mic !== null", 30)
        page.click("#call-screen .call-camera")
        wait_until(page, "document.querySelector('#call-screen .call-preview').videoWidth > 0", 10)
        boxes = page.evaluate("""['#call-end', '#call-screen .call-mute', '#call-screen .call-camera',
          '#call-screen .call-preview', '#call-screen .call-level'].map(s => {
            const r = document.querySelector(s).getBoundingClientRect();
            return {s, left: r.left, right: r.right, top: r.top, bottom: r.bottom, height: r.height, width: r.width}; })""")
        assert all(0 <= box["left"] and box["right"] <= 390 and box["width"] > 0 for box in boxes), boxes
        assert all(box["height"] >= 44 for box in boxes[:3]), boxes  # a thumb's target
        assert all(box["bottom"] <= 844 for box in boxes), boxes  # above the fold
        assert min(contrast(page, f"#call-screen {part}") for part in (".call-mute", ".call-camera")) >= 4.5
        assert page.evaluate("document.querySelector('#clear').getBoundingClientRect().right") <= 390
        shot(page, "video-call-phone")
        # two quick taps from off: on, then off again before the camera opened; it stays off
        page.click("#call-screen .call-camera")
        wait_until(page, "window.omniCall.camera === null", 5)
        page.evaluate("(() => { const b = document.querySelector('#call-screen .call-camera'); b.click(); b.click(); })()")
        time.sleep(1.5)
        assert page.evaluate("window.omniCall.camera === null && window.omniCall.opening === null")
        assert page.locator("#call-screen .call-preview").is_hidden()
        page.click("#call-end")
        wait_until(page, f"{STATUS}.includes('Call ended')", 15)
        assert page.evaluate("window.omniCall.camera") is None
