"""omni-demo web app: talk to Qwen2.5-Omni and hear it answer while it is still thinking.

    python app.py                   # Qwen/Qwen2.5-Omni-7B on the GPU
    python app.py --model tiny      # offline, tiny random-weight checkpoint (nonsense replies)
    python app.py --share           # plus a public https link (mic and webcam need https)
    python app.py --backend http://gpu-host:8000/v1   # UI only, replies from `python -m omni_demo.serve`

Every flag has an environment variable (OMNI_MODEL, OMNI_DEVICE, ...), for Spaces and containers.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from omni_demo.flags import add_model_arguments, batch_config, model_config

ASSETS = Path(__file__).resolve().parent / "assets"
# Gradio's worker threads: up to 16 replies streaming at once (--max-batch), up to 16 calls each
# holding one for its loop and one for its microphone, and room for everything else (Gradio: 40).
MAX_THREADS = 64


def env(name: str, default):
    return os.environ.get(name, default)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="0.0.0.0 to serve the network")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", default=bool(env("OMNI_SHARE", "")),
                        help="also serve a public https link through Gradio")
    parser.add_argument("--concurrency", type=int, default=int(env("OMNI_CONCURRENCY", 0)) or None,
                        help="typed replies the page hands the engine at once (default: twice its --max-batch, so "
                             "those beyond the batch wait in the engine's line, told why and for how long; with "
                             "--backend, 4); the rest wait in Gradio's queue")
    parser.add_argument("--max-queue", type=int, default=int(env("OMNI_MAX_QUEUE", 16)),
                        help="requests that may wait; past it users are told the server is busy")
    parser.add_argument("--max-upload-mb", type=float, default=float(env("OMNI_MAX_UPLOAD_MB", 100)))
    parser.add_argument("--auth", default=env("OMNI_AUTH", None), help="user:password for share links")
    parser.add_argument("--backend", default=env("OMNI_BACKEND", None),
                        help="URL of an OpenAI-compatible omni_demo.serve (…/v1): no model here")
    parser.add_argument("--api-key", default=env("OMNI_API_KEY", None), help="the --backend server's API key")
    return parser.parse_args(argv)


def voice_activity_model():
    """Each voice call's own VAD. Imported with the first call: a --backend UI that never starts a
    call never imports torch."""
    from omni_demo.call.vad import load_vad

    return load_vad()


def build_app(args):
    """Load the model (or connect to --backend) and return the configured Blocks (not launched)."""
    from omni_demo.app.page import build_demo

    if args.backend:  # the UI alone, in front of `python -m omni_demo.serve`: no model here
        from omni_demo.backends.remote import RemoteBackend

        backend = RemoteBackend(args.backend, args.api_key)
        limit = args.concurrency or 4
        return build_demo(backend, voice_activity_model, reply_limit=limit).queue(default_concurrency_limit=limit,
                                                                                  max_size=args.max_queue)
    from omni_demo.backends.zerogpu import ZeroGPUBackend, on_zerogpu
    from omni_demo.config import CacheConfig
    from omni_demo.engine.omni_engine import OmniEngine
    from omni_demo.models.loading import load_model, quiet_libraries

    quiet_libraries()
    loaded = load_model(model_config(args))
    zerogpu = on_zerogpu()
    # ZeroGPU lends the GPU per reply, to one call's process: state kept on it between replies would
    # not be there next time, and a loop thread of our own would not hold it. One reply at a time there.
    engine = OmniEngine(loaded, lean=args.lean, cache=CacheConfig(enabled=not zerogpu),
                        batch=batch_config(args, threaded=not zerogpu))
    backend = ZeroGPUBackend(engine) if zerogpu else engine
    concurrency = 1 if zerogpu else args.concurrency or 2 * engine.max_batch
    demo = build_demo(backend, voice_activity_model, reply_limit=concurrency)
    logging.getLogger("app").info("replies at once: %d (--max-batch %d, real-time guard %s)", concurrency,
                                  engine.max_batch, "on" if engine.batch.realtime_guard else "off")
    demo.queue(default_concurrency_limit=concurrency, max_size=args.max_queue)
    return demo


def auth_pair(value: str | None):
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("error: --auth needs user:password")
    return (user, password)


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    from omni_demo.backends.remote import RemoteError
    from omni_demo.errors import ModelLoadError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        demo = build_app(args)
    except (ModelLoadError, RemoteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # SIGTERM ends the server like Ctrl-C: Gradio closes, then exit handlers remove the app's temp folders.
    signal.signal(signal.SIGTERM, _interrupt)
    demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth_pair(args.auth),
        max_file_size=f"{args.max_upload_mb:g}mb", allowed_paths=[str(ASSETS)], show_error=True,
        max_threads=MAX_THREADS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
