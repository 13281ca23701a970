"""`python -m omni_demo.serve`: the OpenAI-compatible server under uvicorn, or on Ray Serve (--ray)."""

from __future__ import annotations

import logging
import sys

from omni_demo.errors import ModelLoadError

from .args import load_engine, parse_args, server_config
from .http import create_app


def main(argv=None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.ray:
        from .ray_replicas import run_on_ray  # imports ray, which a plain server never needs

        return run_on_ray(args)
    try:
        engine = load_engine(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(engine, server_config(args, args.max_queue)), host=args.host, port=args.port,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
