"""The UI's handlers and components without a browser or a model (a stand-in backend)."""

import shutil
import time

import gradio as gr
import pytest
from gradio.data_classes import FileData

from omni_demo.errors import InputError
from omni_demo.ui import build_demo, public_message

from .conftest import ASSETS


class NoModel:
    voices = ["Chelsie", "Ethan"]
    model_name = "none"
    is_random = True


def component(demo, elem_id):
    return next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_a_webcam_clip_is_passed_on_as_recorded(tmp_path, monkeypatch):
    """Gradio mirrors webcam clips with an ffmpeg re-encode before any handler runs (~9.5 s for a
    short clip); the demo turns that off, so the clip goes on as the browser recorded it."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    clip = tmp_path / "webcam.mp4"
    shutil.copy(ASSETS / "talking_shapes.mp4", clip)
    webcam = component(build_demo(NoModel()), "webcam")
    start = time.monotonic()
    assert webcam.preprocess(FileData(path=str(clip))) == str(clip)
    assert time.monotonic() - start < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webcam.mp4"]  # no "_flip" copy


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("could not read image /tmp/gradio/4f1c/broken.png: cannot identify image file '/tmp/gradio/4f1c/broken.png'",
         "could not read image broken.png: cannot identify image file 'broken.png'"),
        ("video C:\\Users\\me\\AppData\\clip.mp4 is 12.0 s long", "video clip.mp4 is 12.0 s long"),
        ("line one\nTraceback ...", "line one"),
    ],
)
def test_messages_never_show_server_paths(message, shown):
    assert public_message(InputError(message)) == shown


def test_stop_and_send_share_one_control_and_settings_start_closed():
    demo = build_demo(NoModel())
    textbox = component(demo, "textbox")
    assert textbox.submit_btn == "Send" and textbox.label == "Message"
    assert component(demo, "settings").open is False and component(demo, "camera").open is False
    assert isinstance(component(demo, "player"), gr.HTML)
