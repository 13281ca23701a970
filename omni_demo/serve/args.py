"""The HTTP server's flags: the model's (omni_demo.flags), the API's, where it listens, Ray Serve's.
`python -m omni_demo.serve --help` lists them."""

from __future__ import annotations

import argparse
import os

from omni_demo.flags import add_model_arguments, batch_config, model_config

from .http import ServerConfig
from .openai_protocol import MB, ApiLimits

SERVE_DOC = """OpenAI-compatible HTTP server: Chat Completions whose text and speech stream at the same time.

    python -m omni_demo.serve --model tiny                   # http://127.0.0.1:8000/v1
    python -m omni_demo.serve --api-key secret --host 0.0.0.0
    python -m omni_demo.serve --ray --replicas 2             # Ray Serve, one GPU per replica
"""


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the server listens and how many replies may wait: the whole server's flags (Ray Serve's
    proxy and queue with --ray)."""
    env = os.environ.get
    parser.add_argument("--host", default=env("OMNI_SERVE_HOST", "127.0.0.1"), help="0.0.0.0 to serve the network")
    parser.add_argument("--port", type=int, default=int(env("OMNI_SERVE_PORT", 8000)))
    parser.add_argument("--max-queue", type=int, default=ServerConfig.max_waiting,
                        help="replies that may wait for the model (with --ray: for a replica); past it: 503")


def add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """What each server (each Ray Serve replica) accepts."""
    limits = ApiLimits()
    parser.add_argument("--api-key", default=os.environ.get("OMNI_API_KEY"),
                        help="require 'Authorization: Bearer KEY'; several, comma-separated, are several parties, "
                             "each with its own conversation cache")
    parser.add_argument("--max-uploads-per-client", type=int, default=ServerConfig.max_uploads_per_client,
                        help="request bodies one client address may be sending at once; past it: 429")
    parser.add_argument("--metrics-key", default=os.environ.get("OMNI_METRICS_KEY"),
                        help="serve Prometheus metrics at /metrics to 'Authorization: Bearer KEY' (default: off)")
    parser.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    parser.add_argument("--max-request-mb", type=float, default=limits.max_request_bytes / MB,
                        help="largest request body (413 past it)")
    parser.add_argument("--max-media-mb", type=float, default=limits.max_media_bytes / MB,
                        help="largest decoded media part (413 past it)")
    parser.add_argument("--upload-timeout-s", type=float, default=limits.upload_timeout_s,
                        help="time a request body may take to arrive (408 past it)")
    parser.add_argument("--max-tokens", type=int, default=limits.max_tokens, help="ceiling of max_tokens")
    parser.add_argument("--max-audio-tokens", type=int, default=limits.max_audio_tokens,
                        help="ceiling of max_audio_tokens (50 per second of speech)")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Serve (--ray)")
    group.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve (pip install 'ray[serve]')")
    group.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling: the minimum)")
    group.add_argument("--max-replicas", type=int, help="autoscale up to this many replicas")
    group.add_argument("--gpus-per-replica", type=float,
                       help="default: 1; 0 with --device cpu or where the cluster has no GPU (an autoscaling "
                            "cluster whose GPU nodes start later needs 1 here)")
    group.add_argument("--max-ongoing-requests", type=int,
                       help="requests Ray sends one replica at once, which it batches (default: --max-batch, else "
                            "8); Ray holds the rest for the first replica with room")


def replica_parser() -> argparse.ArgumentParser:
    """The flags of one replica: the model's and the API's (`ray_replicas` takes them as options)."""
    parser = argparse.ArgumentParser(prog="python -m omni_demo.serve", description=SERVE_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_api_arguments(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = replica_parser()
    add_http_arguments(parser)
    add_ray_arguments(parser)
    return parser.parse_args(argv)


def server_config(args, max_waiting: int | None, server_id: str | None = None) -> ServerConfig:
    limits = ApiLimits(max_request_bytes=int(args.max_request_mb * MB), max_media_bytes=int(args.max_media_mb * MB),
                       upload_timeout_s=args.upload_timeout_s, max_tokens=args.max_tokens,
                       max_audio_tokens=args.max_audio_tokens)
    extra = {"server_id": server_id} if server_id else {}
    return ServerConfig(api_key=args.api_key or None, max_waiting=max_waiting, limits=limits,
                        model_name=args.served_model_name, max_uploads_per_client=args.max_uploads_per_client,
                        metrics_key=args.metrics_key or None, **extra)


def load_engine(args):
    from omni_demo.engine.omni_engine import OmniEngine
    from omni_demo.models.loading import load_model, quiet_libraries

    quiet_libraries()
    return OmniEngine(load_model(model_config(args)), lean=args.lean, batch=batch_config(args))
