"""The video call's server side: the camera's frames picked for a turn and checked against their
budgets (omni_demo.call.camera), a turn's clip written as the model reads it (omni_demo.inputs.clips),
and a call on the tiny engine whose turns, spoken with the camera on, reach the model as videos
with their sound, interleaved as the processor lays out use_audio_in_video, and get the same
greedy reply as the same turn rebuilt offline from what the page sent."""

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_demo.call.camera import Camera, CameraConfig
from omni_demo.call.events import ReplyEnded, UserTurn
from omni_demo.call.vad import load_vad
from omni_demo.call.voice_call import CallConfig, VoiceCall
from omni_demo.config import DEFAULT_SYSTEM_PROMPT, CacheConfig, GenerationOptions, Limits
from omni_demo.config import INPUT_SAMPLE_RATE as SAMPLE_RATE
from omni_demo.engine.omni_engine import OmniEngine
from omni_demo.errors import InputError
from omni_demo.events import Finished
from omni_demo.inputs.clips import VideoClip, clip_frame_count, write_clip
from omni_demo.inputs.media import plan_part, read_audio, read_video
from omni_demo.inputs.messages import system_message

from .speech import needs_espeak, speak
from .test_call import Microphone, of, run_call


def jpeg(shade: int, size=(364, 280), quality=90, progressive=False) -> bytes:
    """A frame of one shade with a bright square whose place says `shade` too (JPEG keeps both)."""
    picture = np.full((size[1], size[0], 3), shade, np.uint8)
    x = (shade * 7) % (size[0] - 40)
    picture[20:60, x : x + 40] = 255 - shade
    out = io.BytesIO()
    Image.fromarray(picture).save(out, "JPEG", quality=quality, progressive=progressive)
    return out.getvalue()


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((280, 364, 3), shade, np.uint8)).save(out, "PNG")
    return out.getvalue()


def shade_of(frame: np.ndarray) -> int:
    return round(float(np.median(frame[100:, :, 0])))


def test_a_turns_frames_are_the_newest_taken_by_each_half_second():
    camera = Camera()
    assert camera.turn_frames(0, 3) is None  # off: an audio turn
    camera.put(True, [(0.0, jpeg(10)), (1.0, jpeg(50)), (1.6, jpeg(90)), (4.9, jpeg(200))])
    frames = camera.turn_frames(0.5, 3.6)  # 3.1 s: 6 frames, at 0.5, 1.0, 1.5, 2.0, 2.5, 3.0
    assert len(frames) == clip_frame_count(3.1) == 6
    assert [shade_of(f) for f in frames] == pytest.approx([10, 50, 50, 90, 90, 90], abs=3)
    # a turn shorter than a frame period: a still picture, twice (the model's frames come in pairs)
    assert [shade_of(f) for f in camera.turn_frames(1.7, 1.9)] == pytest.approx([90, 90], abs=3)
    # the camera came on during the turn: its first frame stands for the time before it
    late = Camera()
    late.put(True, [(2.2, jpeg(120))])
    assert [shade_of(f) for f in late.turn_frames(1.0, 3.0)] == pytest.approx([120] * 4, abs=3)
    # every frame of a turn has the newest frame's size (a phone turned sideways mid-turn)
    turned = Camera()
    turned.put(True, [(0.0, jpeg(30, (364, 280))), (0.6, jpeg(60, (280, 364)))])
    assert {f.shape for f in turned.turn_frames(0, 2.0)} == {(364, 280, 3)}
    # frames before a turn go, but for the newest: what the camera shows until it sends another
    camera.forget_before(2.0)
    assert [f.at_s for f in camera.frames] == [1.6, 4.9]
    camera.put(False, [])  # off: the next turn is audio only at once
    assert camera.turn_frames(0, 3) is None


@pytest.mark.parametrize("frames, reason", [
    ([(0.0, b"not a picture")], "not a readable JPEG"),
    ([(0.0, jpeg(1)[: len(jpeg(1)) // 2])], "not a readable JPEG"),  # cut after its header: refused here, not in a turn
    ([(0.0, jpeg(1, progressive=True))], "baseline JPEG"),
    ([(0.0, png(1))], "not a readable JPEG"),
    ([(0.0, jpeg(1, (1024, 768)))], "the limit is 307,200 pixels"),
    ([(0.0, jpeg(1, (20, 300)))], "at least 28 pixels"),
    ([(-1.0, jpeg(1))], "no valid time stamp"),
    ([(float("nan"), jpeg(1))], "no valid time stamp"),
    ([(t / 10, jpeg(1)) for t in range(17)], "over 4 camera frames per second"),
])
def test_a_page_sending_more_than_its_budget_loses_its_camera_and_nothing_else(frames, reason):
    camera = Camera()
    camera.put(True, [(0.0, jpeg(40))])
    with pytest.raises(InputError, match=reason):
        camera.put(True, frames)
    assert camera.turn_frames(0, 2) is None  # off for the call: its turns are audio only
    with pytest.raises(InputError, match="Camera switched off for this call"):
        camera.put(True, [(5.0, jpeg(40))])


def test_a_late_message_a_stopped_camera_and_a_frame_from_the_future_change_nothing():
    camera = Camera()
    camera.put(True, [(1.0, jpeg(10))], seq=3)
    camera.put(False, [], seq=4)  # Camera off ...
    camera.put(True, [(1.5, jpeg(20))], seq=2)  # ... overtaken by an earlier frame on the way: it stays off
    assert camera.turn_frames(0, 3) is None
    camera.put(True, [(10.0, jpeg(30))], seq=5, heard_s=9.5)
    # a camera that stopped sending (unplugged, a background tab) is no picture of a turn long after
    assert camera.turn_frames(12.0, 14.0) is not None and camera.turn_frames(15.5, 17.0) is None
    with pytest.raises(InputError, match="no valid time stamp"):  # far ahead of the audio heard
        camera.put(True, [(100.0, jpeg(40))], seq=6, heard_s=20.0)


def test_a_turn_the_camera_cannot_make_a_video_of_stays_an_audio_turn(tmp_path):
    from omni_demo.call.camera import camera_turn

    camera = Camera()
    camera.put(True, [(0.0, jpeg(10))])
    audio = np.zeros(SAMPLE_RATE, np.float32)

    def full_disk(frames, samples):
        raise OSError(28, "No space left on device")

    assert camera_turn(camera, 0.0, 1.0, audio, True, full_disk) is None
    with pytest.raises(InputError, match="could not be made a video"):
        camera.put(True, [(1.0, jpeg(10))])
    camera = Camera()
    camera.put(True, [(0.0, jpeg(10))])
    message, files = camera_turn(camera, 0.0, 1.0, audio, True, lambda f, s: write_clip(tmp_path / "t.mp4", f, s))
    assert files == [str(tmp_path / "t.mp4")] and message["content"] == [{"type": "video", "video": files[0]}]


def test_byte_and_per_call_budgets():
    camera = Camera(CameraConfig(max_bytes_per_s=400, max_frames_per_call=100))
    with pytest.raises(InputError, match="KB of camera frames per second"):
        for second in range(10):
            camera.put(True, [(second, jpeg(second))])
    small = Camera(CameraConfig(max_frames_per_call=3))
    small.put(True, [(0, jpeg(1)), (0.5, jpeg(2)), (1.0, jpeg(3))])
    with pytest.raises(InputError, match="over 3 camera frames"):
        small.put(True, [(1.5, jpeg(4))])


def test_a_turns_clip_is_read_back_frame_for_frame(tmp_path):
    """The planner samples the clip at 2 frames per second: exactly the frames written, at their size."""
    frames = [np.full((280, 364, 3), 30 * k, np.uint8) for k in range(6)]
    audio = (0.2 * np.sin(np.arange(int(3.4 * SAMPLE_RATE)) * 0.05)).astype(np.float32)
    first, second = write_clip(tmp_path / "a.mp4", frames, audio), write_clip(tmp_path / "b.mp4", frames, audio)
    assert Path(first).read_bytes() == Path(second).read_bytes()  # rebuilt offline: the same file
    plan = plan_part({"type": "video", "video": first}, Limits(), with_audio=True, token_budget=8192,
                     image_max_pixels=10**8)
    assert plan.options == {"nframes": 6, "resized_height": 280, "resized_width": 364}
    video = read_video(first, plan)
    assert [round(float(v)) for v in video[:, 0, 140, 180]] == pytest.approx([30 * k for k in range(6)], abs=3)
    sound = read_audio(first, "a.mp4", 60)
    assert 0 <= len(sound) - len(audio) < 0.1 * SAMPLE_RATE  # AAC ends on a whole frame of 1,024 samples
    assert np.corrcoef(sound[: len(audio)], audio[: len(sound)])[0, 1] > 0.99


GREEDY = GenerationOptions(greedy=True, max_new_tokens=24, max_audio_tokens=60, use_audio_in_video=True)


class Webcam(threading.Thread):
    """Sends the call a frame every half second of microphone audio, stamped on that clock, as the page does."""

    def __init__(self, call: VoiceCall, mic: Microphone):
        super().__init__(daemon=True)
        self.call, self.mic, self.sent, self.stopped = call, mic, [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            at = self.mic.fed_s
            frame = (at, jpeg(int(at * 37) % 200 + 20))
            self.sent.append(frame)
            self.call.see(True, [frame])
            time.sleep(0.5)


@needs_espeak
def test_camera_turns_reach_the_model_as_video_with_sound_and_match_the_turn_rebuilt_offline(engine, loaded, tmp_path,
                                                                                            monkeypatch):
    folder = tmp_path / "speech"
    folder.mkdir()
    question = speak("What do you see in front of me right now?", folder)[0]
    prompts, stream_inputs = [], engine.stream_inputs
    monkeypatch.setattr(engine, "stream_inputs", lambda inputs, *a, **k: prompts.append(inputs) or stream_inputs(
        inputs, *a, **k))
    clips = []

    def save_video(frames, samples):
        clips.append((frames, samples))
        return write_clip(tmp_path / f"turn-{len(clips)}.mp4", frames, samples)

    call = VoiceCall(engine, [], GREEDY, CallConfig(max_idle_s=30), vad=load_vad(), save_video=save_video)
    answered, done = threading.Event(), threading.Event()
    mic = Microphone(call, 1.0, question, 2.0, answered, 0.5, question, 2.0, done)
    webcam = Webcam(call, mic)
    webcam.start()
    replies = []

    def follow(event):
        if isinstance(event, ReplyEnded):
            replies.append(event)
            answered.set()
            if len(replies) == 2:
                done.set()
                call.end()

    try:
        events = run_call(call, mic, on_event=follow)
    finally:
        webcam.stopped.set()
    turn, second = of(events, UserTurn)
    reply = replies[0]
    assert turn.video and second.video and turn.path.endswith(".mp4") and reply.finished is not None
    # the next turn reads the first from the conversation cache: its frames and sound are not prefilled again
    assert replies[1].finished.stats.reused_prompt_tokens >= len(prompts[0].input_ids[0])
    assert len(reply.finished.text_token_ids) >= 8  # long enough to compare
    # the prompt: the turn's frames and its sound interleaved per 2 s chunk (TMRoPE), as the processor lays them out
    clip = call.conversation[0]["content"][0]["video"]  # in memory: the frames and sound exactly as sent and heard
    assert isinstance(clip, VideoClip) and Path(turn.path).stat().st_size > 0  # the chat's copy: its file
    ids = next(p for p in prompts if p.messages[-1]["content"][0].get("video") is clip).input_ids[0].tolist()
    config = engine.model.config.thinker_config
    runs = kinds_in_order(ids, {config.video_token_index: "video", config.audio_token_index: "audio"})
    seconds = len(turn.audio) / SAMPLE_RATE
    assert runs[:2] == ["video", "audio"] and runs.count("video") == -(-clip_frame_count(seconds) // 4)
    # watched while spoken: its first 2 s chunk (frames and sound) was prefilled before the turn ended
    assert reply.finished.stats.reused_prompt_tokens >= 2 * 130 + 50
    # offline: the frames the page sent and the audio the call heard, through the same camera, processed
    # whole by an engine that keeps nothing between replies
    offline_camera = Camera(CameraConfig(max_fps=10_000, max_bytes_per_s=10**9))  # all at once, not as a page sends
    offline_camera.put(True, webcam.sent)
    frames = offline_camera.turn_frames(turn.end_s - seconds, turn.end_s)
    assert np.array_equal(np.stack(frames), clip.frames) and np.array_equal(turn.audio, clip.audio)
    whole = OmniEngine(loaded, cache=CacheConfig(enabled=False))
    offline = list(whole.stream([{"role": "user", "content": [{"type": "video", "video": VideoClip(np.stack(frames),
                                                                                                   turn.audio)}]}],
                                GREEDY))
    finished = next(e for e in offline if isinstance(e, Finished))
    assert finished.text_token_ids == reply.finished.text_token_ids
    assert finished.codec_token_ids == reply.finished.codec_token_ids


def kinds_in_order(ids: list[int], kinds: dict[int, str]) -> list[str]:
    """The runs of media tokens in `ids`, by kind: ["video", "audio", "video", ...]."""
    runs = []
    for token in ids:
        kind = kinds.get(token)
        if kind is not None and (not runs or runs[-1] != kind):
            runs.append(kind)
    return runs


@needs_espeak
def test_a_remote_server_is_sent_each_camera_turn_as_a_video_url_with_its_sound(api_server, engine, tmp_path,
                                                                                monkeypatch):
    """`--backend`: the call's camera turn goes to `omni_demo.serve` as a video_url part (the clip's
    bytes, its sound inside) with use_audio_in_video, and the server reads it as the engine here does."""
    from omni_demo.backends import remote
    from omni_demo.backends.remote import RemoteBackend

    from .serverhelpers import API_KEY

    folder = tmp_path / "speech"
    folder.mkdir()
    question = speak("Look at this, what is it?", folder)[0]
    bodies, request_body = [], remote.request_body
    monkeypatch.setattr(remote, "request_body", lambda *a: bodies.append(request_body(*a)) or bodies[-1])
    backend = RemoteBackend(api_server.base_url, API_KEY)
    call = VoiceCall(backend, [], GREEDY, CallConfig(max_idle_s=30), vad=load_vad(),
                     save_video=lambda frames, samples: write_clip(tmp_path / "turn.mp4", frames, samples))
    done = threading.Event()
    mic = Microphone(call, 1.0, question, 1.5, done)
    webcam = Webcam(call, mic)
    webcam.start()

    def follow(event):
        if isinstance(event, ReplyEnded):
            done.set()
            call.end()

    try:
        events = run_call(call, mic, on_event=follow)
    finally:
        webcam.stopped.set()
    turn, = of(events, UserTurn)
    reply = of(events, ReplyEnded)[0]
    assert turn.video and reply.finished is not None and reply.text
    body = bodies[-1]
    part, = body["messages"][-1]["content"]
    assert part["type"] == "video_url" and body["use_audio_in_video"] is True
    assert base64.b64decode(part["video_url"]["url"].removeprefix("data:video/mp4;base64,")) == Path(
        turn.path).read_bytes()
    # the server's prompt is the clip's frames and sound, as this process's engine reads them
    local = engine.prepare([system_message(DEFAULT_SYSTEM_PROMPT),  # the server's default, where none is sent
                            {"role": "user", "content": [{"type": "video", "video": turn.path}]}], GREEDY)
    assert reply.finished.stats.prompt_tokens == local.prompt_len


def test_the_page_handler_takes_only_its_own_calls_frames_and_switches_a_bad_camera_off():
    from omni_demo.app.call_page import CallHandler
    from omni_demo.app.chat import ChatHandler

    from .apphelpers import is_skip
    from .test_ui import SETTINGS, OneWordModel, Request

    def message(name, frames, on=True):
        return json.dumps({"call": name, "on": on, "frames": [[at, base64.b64encode(data).decode()]
                                                              for at, data in frames]})

    calls = CallHandler(ChatHandler(OneWordModel()), load_vad)
    assert is_skip(calls.see(message("omni-call-x", [(0.5, jpeg(40))]), Request("a")))  # no call: nothing to see
    pending, *_ = calls.accept([], Request("a"))
    run = calls.run(pending, *SETTINGS, 0.6, 0.5, Request("a"))
    prefix = next(run).player["chunk_prefix"]  # the page's name for this call
    camera = calls.chats.sessions.get("a").call.camera
    assert is_skip(calls.see(message(prefix, [(0.5, jpeg(40))]), Request("a")))
    assert [frame.at_s for frame in camera.frames] == [0.5]
    # another session's page, an earlier call's late frames: dropped unread
    calls.see(message(prefix, [(1.0, jpeg(50))]), Request("b"))
    calls.see(message("omni-call-" + "0" * 32, [(1.0, jpeg(50))]), Request("a"))
    assert [frame.at_s for frame in camera.frames] == [0.5]
    # what no page sends: the page is told to switch its camera off, and why; the call goes on
    for bad in ("{not json", json.dumps({"call": prefix, "on": True, "frames": [[1.0, "not base64!"]]}),
                json.dumps({"call": prefix, "frames": "many"}), "x" * 2_000_000, "[" * 100_000 + "]" * 100_000,
                json.dumps({"call": prefix, "seq": "1", "on": True, "frames": []})):
        refused = calls.see(bad, Request("a"))
        assert refused["camera"] == "off" and "cannot read" in refused["notice"]
        assert camera.turn_frames(0, 2) is None  # off on the server too, not only in the page
    assert "cannot read" in calls.see(message(prefix, [(1.0, jpeg(50))]), Request("a"))["notice"]  # for the call
    assert not calls.chats.sessions.get("a").is_set()  # the call goes on
    calls.end(pending, Request("a"))
    assert "Call ended" in list(run)[-1].status


def test_without_the_sound_of_videos_a_camera_turn_keeps_its_sound_beside_its_frames():
    from omni_demo.call.camera import video_turn

    audio = np.ones(1600, np.float32)
    assert video_turn("turn.mp4", audio, True) == {"role": "user", "content": [{"type": "video", "video": "turn.mp4"}]}
    saved = []
    message = video_turn("turn.mp4", audio, False, save_audio=lambda samples: saved.append(samples) or "turn.wav")
    assert message["content"] == [{"type": "video", "video": "turn.mp4"}, {"type": "audio", "audio": "turn.wav"}]
    assert saved[0] is audio


def test_a_budget_refusal_names_the_budget():
    from omni_demo.app.call_page import CallHandler
    from omni_demo.app.chat import ChatHandler

    from .test_ui import SETTINGS, OneWordModel, Request

    calls = CallHandler(ChatHandler(OneWordModel()), load_vad)
    pending, *_ = calls.accept([], Request("a"))
    run = calls.run(pending, *SETTINGS, 0.6, 0.5, Request("a"))
    prefix = next(run).player["chunk_prefix"]
    big = json.dumps({"call": prefix, "seq": 0, "on": True,
                      "frames": [[0.0, base64.b64encode(jpeg(1, (1024, 768))).decode()]]})
    refused = calls.see(big, Request("a"))
    assert refused["camera"] == "off" and "1024×768" in refused["notice"]
    calls.end(pending, Request("a"))
    list(run)


def watched(engine, history, frames: np.ndarray, audio: np.ndarray, options=GREEDY, lag_s: float = 0.5):
    """A camera turn fed as a call feeds it: 0.25 s of sound at a time, and the frames of the chunks
    whose time is `lag_s` behind the sound (a frame may still arrive until then)."""
    watcher = engine.watch(history, options)
    step = SAMPLE_RATE // 4
    for at in range(0, len(audio), step):
        heard_s = (at + step) / SAMPLE_RATE
        chunks = max(0, int((heard_s - lag_s) // 2))
        watcher.feed(frames[: 4 * chunks], audio[at : at + step])
    return watcher, watcher.end_turn(frames)


def test_a_camera_turn_watched_chunk_by_chunk_is_the_clip_processed_whole(loaded):
    """Each 2 s chunk of frames and sound is encoded and prefilled while the user speaks; the
    greedy reply is token for token and code for code the reply to the clip processed whole."""
    from omni_demo.config import CacheConfig
    from omni_demo.engine.omni_engine import OmniEngine
    from omni_demo.inputs.clips import VideoClip
    from omni_demo.tools.bench import utterance

    watching, whole = OmniEngine(loaded), OmniEngine(loaded, cache=CacheConfig(enabled=False))
    rng = np.random.default_rng(7)
    audio = utterance(7.0)  # 3 whole chunks, then 1 s
    frames = rng.integers(0, 255, (clip_frame_count(7.0), 280, 392, 3), dtype=np.uint8)
    history = [system_message(DEFAULT_SYSTEM_PROMPT)]
    watcher, messages = watched(watching, history, frames, audio)
    assert len(watcher.seen) == 3 and watcher.chunks_kept == 3
    ours = [e for e in watching.stream(messages, GREEDY) if isinstance(e, Finished)][-1]
    theirs = [e for e in whole.stream(history + [{"role": "user", "content": [
        {"type": "video", "video": VideoClip(frames, audio)}]}], GREEDY) if isinstance(e, Finished)][-1]
    assert ours.text_token_ids == theirs.text_token_ids
    assert ours.codec_token_ids == theirs.codec_token_ids and len(ours.codec_token_ids) >= 24
    # the three chunks (their frames: 140 tokens a second; their sound: 25) came from the cache
    assert ours.stats.reused_prompt_tokens >= 3 * (2 * 140 + 50)


def test_a_clip_in_memory_is_read_as_it_is_within_its_budget_and_like_a_file_over_it():
    from omni_demo.inputs.prepare import read_media

    frames = np.random.default_rng(1).integers(0, 255, (8, 280, 392, 3), dtype=np.uint8)
    audio = np.zeros(4 * SAMPLE_RATE, np.float32)
    part = {"type": "video", "video": VideoClip(frames, audio)}
    plan = plan_part(part, Limits(), with_audio=True, token_budget=8192, image_max_pixels=10**8)
    assert plan.options == {} and plan.tokens == 4 * 140 + 100  # its key is the clip's own (a watched turn's)
    video = read_media(part, plan, with_audio=True)["videos"][0]
    assert video.shape == (8, 3, 280, 392) and np.array_equal(video[3].permute(1, 2, 0).numpy(), frames[3])
    small = plan_part(part, Limits(), with_audio=True, token_budget=400, image_max_pixels=10**8)
    assert small.options["nframes"] < 8 and small.tokens - 100 <= 400  # fewer, smaller frames: as a file's
    read = read_media({**part, **small.options}, small, with_audio=True)
    assert read["videos"][0].shape == (small.options["nframes"], 3, small.options["resized_height"],
                                       small.options["resized_width"])
    assert read["audio"][0] is audio
    with pytest.raises(ValueError, match="whole frame pairs"):
        VideoClip(frames[:3], audio)
