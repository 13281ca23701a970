"""Ray Serve: the same HTTP server (`omni_demo.serve.http.create_app`) in N replicas, one GPU each. Ray routes each
request to the least busy replica, bounds the queue (503 past it), autoscales, health-checks the
replicas and replaces dead ones; none of that is ours.

    python -m omni_demo.serve --ray --replicas 2                      # this machine's GPUs
    RAY_ADDRESS=auto python -m omni_demo.serve --ray --replicas 8     # a running Ray cluster
    serve run serve_config.yaml                                       # Ray's own config file

Replica options are the server's model and API flags (`--model`, `--api-key`, `--max-media-mb`,
...), passed as a dict (`model: tiny` in serve_config.yaml). Where to listen and how many requests
may wait are Ray's deployment options: each replica gets up to max_ongoing_requests at once (its
--max-batch, else 8), which its engine batches, and Ray holds the others (up to
max_queued_requests) for the first replica with room.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from ray import serve

from .args import load_engine, replica_parser, server_config
from .http import RETRY_AFTER_S, ServerConfig, create_app

log = logging.getLogger(__name__)
APP_NAME = "omni"
REPLICA_BATCH = 8  # requests one replica batches, unless --max-ongoing-requests or --max-batch says otherwise


def replica_args(options: dict) -> argparse.Namespace:
    """The server flags' defaults, overridden by `options` (flag names with underscores)."""
    defaults = vars(replica_parser().parse_args([]))
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown replica options {unknown}; use the server's flags: {sorted(defaults)}")
    return argparse.Namespace(**{**defaults, **options})


@serve.deployment(
    max_ongoing_requests=REPLICA_BATCH,  # the replica's engine batches these; Ray holds the rest for a replica with room
    max_queued_requests=ServerConfig.max_waiting,  # per proxy; past it Ray answers 503, as our server does
    backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
    ray_actor_options={"num_cpus": 1, "num_gpus": 1},
)
@serve.ingress()
class OmniServer:
    """One replica: the model, its reply worker and the HTTP app."""

    def __init__(self, options: dict):
        args = replica_args(options)
        self.engine = load_engine(args)
        replica = serve.get_replica_context().replica_id.unique_id
        # No queue bound in the replica: Ray sends it at most max_ongoing_requests at once.
        self.config = server_config(args, max_waiting=None, server_id=f"{replica}@{os.getpid()}")
        self.asgi = None

    def __serve_build_asgi_app__(self):
        self.asgi = create_app(self.engine, self.config)
        return self.asgi

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes it replace the replica."""
        if self.asgi is not None and not self.asgi.state.server.worker.alive:
            raise RuntimeError("the reply worker thread has stopped")


def build(options: dict) -> serve.Application:
    """Application builder for `serve run` (import_path: omni_demo.serve.ray_replicas:build); `options`
    are the replica's server flags."""
    replica_args(options)  # fail here, not in every replica
    return OmniServer.bind(options)


def gpus_per_replica(args, cluster_gpus: float) -> float:
    """--gpus-per-replica, else 0 with --device cpu or on a cluster without GPUs (where a replica
    asking for one would wait forever), else 1."""
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    return 0 if args.device == "cpu" or not cluster_gpus else 1


def deployment_options(args, gpus: float) -> dict:
    options = {"ray_actor_options": {"num_cpus": 1, "num_gpus": gpus},
               "max_ongoing_requests": args.max_ongoing_requests or args.max_batch or REPLICA_BATCH,
               "max_queued_requests": args.max_queue}
    if args.max_replicas and args.max_replicas > args.replicas:
        options["autoscaling_config"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas,
                                         "target_ongoing_requests": options["max_ongoing_requests"] // 2 or 1}
    else:
        options["num_replicas"] = args.replicas
    return options


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_on_ray(args) -> int:
    """`python -m omni_demo.serve --ray`: start (or join, with RAY_ADDRESS) a Ray cluster and serve
    until Ctrl-C or SIGTERM, which delete the app (and stop a cluster this started)."""
    import ray

    signal.signal(signal.SIGTERM, _interrupt)
    defaults = vars(replica_parser().parse_args([]))
    options = {key: value for key, value in vars(args).items() if key in defaults}
    ray.init(include_dashboard=False)  # joins the cluster at RAY_ADDRESS, if set
    gpus = gpus_per_replica(args, ray.cluster_resources().get("GPU", 0))
    app = OmniServer.options(**deployment_options(args, gpus)).bind(options)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving on http://%s:%d/v1 with Ray Serve; Ctrl-C stops", args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
    return 0
