"""A long run: 50 consecutive spoken replies from the real app, memory measured before and after."""

import psutil
from gradio_client import Client

from .apphelpers import AppServer, collect, send

REPLIES = 50


def test_fifty_replies_without_memory_growth(tiny_dir, record_property):
    app = AppServer().wait()
    try:
        client = Client(app.url, verbose=False)
        process = psutil.Process(app.process.pid)
        for _ in range(3):  # warm-up: first-call allocations, imports, caches
            collect(*send(client, "warm up", max_new_tokens=16, max_speech_s=5))
        before = process.memory_info().rss
        completed = spoken = 0
        for index in range(REPLIES):
            reply = collect(*send(client, f"reply number {index}", max_new_tokens=16, max_speech_s=5, seed=index + 1))
            completed += "total" in reply.stats  # the engine's final event reached the UI
            spoken += len(reply.audio_updates) > 0
        after = process.memory_info().rss
    finally:
        app.stop()
    growth_mb = (after - before) / 2**20
    record_property("rss_before_mb", before / 2**20)
    record_property("rss_after_mb", after / 2**20)
    print(f"{completed}/{REPLIES} replies ({spoken} spoken); app RSS {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB "
          f"({growth_mb:+.1f} MB)")
    assert completed == REPLIES and spoken >= REPLIES - 5
    assert growth_mb < 64, f"memory grew by {growth_mb:.0f} MB over {REPLIES} replies"
