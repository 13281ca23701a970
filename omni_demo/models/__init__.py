"""Checkpoints: loading Qwen2.5-Omni through transformers (loading.py) and the random-weight
checkpoints the project builds itself, tiny or with the real 7B/3B widths (tiny.py)."""
