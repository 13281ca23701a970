"""Tools around the app: the benchmark (bench.py, `python -m omni_demo.bench`), transformers'
reference `generate` for tests and the bench (reference.py), the Space metadata (spaces.py)."""
