"""Recreate the example media in assets/ (committed; this script documents how they were made).

    python assets/make_assets.py

Needs Debian's espeak-ng and ffmpeg, and Pillow:
- question.wav: espeak-ng speaks QUESTION (voice en-us, 150 words a minute), resampled by ffmpeg to 16 kHz mono.
- shapes.png: Pillow draws a red circle, a blue square and a yellow triangle on white, 320x240.
- talking_shapes.mp4: ffmpeg animates shapes.png sliding left to right for 3 s at 10 fps
  (H.264, 320x240) with question.wav as its AAC sound track.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
QUESTION = "What shapes can you see, and what colours are they?"


def make_question(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), QUESTION], check=True)
        _ffmpeg("-i", str(raw), "-ar", "16000", "-ac", "1", str(out))


def make_shapes(out: Path) -> None:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 70, 120, 160), fill=(220, 40, 40))
    draw.rectangle((140, 70, 210, 140), fill=(40, 80, 220))
    draw.polygon([(260, 60), (300, 160), (220, 160)], fill=(240, 200, 30))
    image.save(out, optimize=True)


def make_video(out: Path, image: Path, sound: Path) -> None:
    _ffmpeg(
        "-loop", "1", "-framerate", "10", "-i", str(image), "-i", str(sound),
        "-filter_complex", "[0:v]pad=480:240:80:0:white,crop=320:240:'80+80*sin(t*2)':0,format=yuv420p[v]",
        "-map", "[v]", "-map", "1:a", "-t", "3", "-c:v", "libx264", "-preset", "veryslow", "-crf", "32",
        "-c:a", "aac", "-b:a", "32k", "-ar", "16000", "-ac", "1", "-movflags", "+faststart", str(out),
    )


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", *args], check=True)


def main() -> None:
    make_question(HERE / "question.wav")
    make_shapes(HERE / "shapes.png")
    make_video(HERE / "talking_shapes.mp4", HERE / "shapes.png", HERE / "question.wav")
    for name in ("question.wav", "shapes.png", "talking_shapes.mp4"):
        print(f"{name}: {(HERE / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
