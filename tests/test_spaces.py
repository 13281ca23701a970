"""spaces.yaml is the one source of the Space metadata; README.md's front matter must match it."""

import subprocess
import sys

import yaml

from omni_demo.tools.spaces import ROOT, front_matter, split_readme


def test_readme_front_matter_matches_spaces_yaml():
    result = subprocess.run([sys.executable, "-m", "omni_demo.tools.spaces", "--check"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_check_fails_when_they_disagree(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("sdk_version: 6.31.0", "sdk_version: 5.0.0"))
    result = subprocess.run([sys.executable, "-m", "omni_demo.tools.spaces", "--check", "--readme", str(readme)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "disagrees" in result.stderr


def test_space_metadata_is_complete_and_consistent():
    import gradio

    metadata = yaml.safe_load((ROOT / "spaces.yaml").read_text())
    for key in ("sdk", "sdk_version", "app_file", "python_version", "suggested_hardware", "models",
                "preload_from_hub", "startup_duration_timeout"):
        assert key in metadata, key
    assert metadata["sdk_version"] == gradio.__version__
    assert (ROOT / metadata["app_file"]).exists()
    assert "ffmpeg" in (ROOT / "packages.txt").read_text().split()
    front, body = split_readme((ROOT / "README.md").read_text())
    assert front == front_matter(ROOT / "spaces.yaml") and body.startswith("# omni-demo")
