"""What makes the replies the page and the call show: the `Backend` protocol (protocol.py), met by
the engine itself, by an HTTP client of `omni_demo.serve` (remote.py) and by the ZeroGPU adapter
(zerogpu.py)."""
