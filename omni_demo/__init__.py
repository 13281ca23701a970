"""omni-demo: stream Qwen2.5-Omni's text and speech at the same time."""

__version__ = "0.1.0"
