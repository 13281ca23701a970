"""Ray Serve on CPU: `python -m omni_demo.serve --ray --replicas 2` with the tiny model. Two
concurrent streams run at the same time on different replicas, and a killed replica is replaced
by Ray while the other keeps serving."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .serverhelpers import ApiServer

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

PROMPT = [{"role": "user", "content": "Tell me about the sea"}]
REPLY = dict(model="tiny", messages=PROMPT, stream=True, modalities=["text", "audio"], seed=1,
             audio={"voice": "Chelsie", "format": "pcm16"}, max_tokens=24,
             extra_body={"min_tokens": 24, "max_audio_tokens": 144, "min_audio_tokens": 144})


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def replica_ids(server, count: int, timeout: float = 120) -> set[str]:
    """Server ids ("replica@pid") seen on /health until `count` distinct ones answered."""
    seen, deadline = set(), time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        seen.add(server.health(timeout=60)["server"])
    assert len(seen) >= count, f"only {seen} answered"
    return seen


@pytest.fixture(scope="module")
def ray_server(tiny_dir):
    start = time.monotonic()
    # --max-queue 2: Ray's router counts a request as queued until it is assigned, so with 1 the second
    # of two simultaneous requests can be refused though a replica is idle (ray/serve/_private/router.py).
    # --max-batch 1: one reply per replica, so "both replicas busy" is two replies (a replica batches
    # up to its --max-batch; tests/test_batching.py checks the batching itself).
    server = ApiServer("--ray", "--replicas", "2", "--max-queue", "2", "--max-batch", "1",
                       env={"RAY_ADDRESS": None, "RAY_DISABLE_USAGE_STATS": "1"}).wait(timeout=300)
    replica_ids(server, 2)
    print(f"Ray Serve with 2 tiny replicas answered after {time.monotonic() - start:.1f} s")
    yield server
    server.stop_grace_s = 60.0  # a local Ray cluster takes its time to shut down
    server.stop()


def stream(server, record: dict) -> None:
    """One streamed reply (run in a thread): which replica served it, when its first audio came,
    when it ended, or the error it raised."""
    try:
        raw = client(server).chat.completions.with_raw_response.create(**REPLY)
        record["server"], record["samples"] = raw.headers["x-omni-server"], 0
        for chunk in raw.parse():
            data = chunk.model_dump()
            audio = (data["choices"][0]["delta"].get("audio") or {}) if data["choices"] else {}
            if audio.get("data"):
                record.setdefault("first_audio", time.monotonic())
                record["samples"] += len(audio["data"]) * 3 // 4 // 2
            record["finish_reason"] = data["choices"][0]["finish_reason"] if data["choices"] else None
        record["end"] = time.monotonic()
    except Exception as exc:
        record["error"] = repr(exc)


def test_two_streams_progress_at_once_on_different_replicas(ray_server):
    records = [{}, {}]
    threads = [threading.Thread(target=stream, args=(ray_server, record)) for record in records]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all("end" in r for r in records), records
    print("first audio / end (s):", [(round(r["first_audio"] - start, 2), round(r["end"] - start, 2))
                                     for r in records])
    assert records[0]["server"] != records[1]["server"], "Ray routed both replies to one replica"
    assert max(r["first_audio"] for r in records) < min(r["end"] for r in records), "the replies did not overlap"
    assert all(r["samples"] == 144 * 480 and r["finish_reason"] == "length" for r in records)


def test_a_disconnect_through_ray_stops_the_reply(ray_server):
    endless = {**REPLY, "extra_body": {"min_tokens": 24, "max_audio_tokens": 4000, "min_audio_tokens": 4000}}
    raw = client(ray_server).chat.completions.with_raw_response.create(**endless)
    server, stream = raw.headers["x-omni-server"], raw.parse()
    for chunk in stream:
        if chunk.choices and (chunk.choices[0].delta.model_dump().get("audio") or {}).get("data"):
            break
    stream.close()
    closed, status = time.monotonic(), {}
    while not (status.get("server") == server and status["running"] == 0) and time.monotonic() - closed < 30:
        status = ray_server.health()  # reaches that replica once Ray has cancelled the request there
    print(f"reply on {server} stopped {time.monotonic() - closed:.2f} s after the client disconnected")
    assert status["server"] == server and status["running"] == 0
    assert time.monotonic() - closed < 5


def test_past_max_queue_ray_answers_503(ray_server):
    endless = {**REPLY, "extra_body": {"min_tokens": 24, "max_audio_tokens": 4000, "min_audio_tokens": 4000}}
    streams = [client(ray_server).chat.completions.create(**endless) for _ in range(2)]
    for stream in streams:
        next(iter(stream))  # both replicas are busy
    replies = []
    waiters = [threading.Thread(target=lambda: replies.append(client(ray_server).chat.completions.create(
        model="tiny", messages=PROMPT, max_tokens=4))) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    time.sleep(1.0)  # the proxy holds both (--max-queue 2); no /health call here: it would wait in that queue too
    with pytest.raises(openai.APIStatusError) as raised:
        client(ray_server).chat.completions.create(model="tiny", messages=PROMPT, max_tokens=4)
    assert raised.value.status_code == 503 and raised.value.response.headers.get("retry-after")
    for stream in streams:
        stream.close()
    for waiter in waiters:
        waiter.join(60)
    assert len(replies) == 2, "the queued requests ran once the replicas were free"


def test_a_killed_replica_is_replaced_while_the_other_serves(ray_server):
    servers = replica_ids(ray_server, 2)
    busy = {}
    longer = threading.Thread(target=stream, args=(ray_server, busy))
    longer.start()
    while "server" not in busy:
        time.sleep(0.02)
    victim = (servers - {busy["server"]}).pop()
    os.kill(int(victim.rsplit("@", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()

    served_by = {client(ray_server).chat.completions.with_raw_response.create(
        model="tiny", messages=PROMPT, max_tokens=4).headers["x-omni-server"] for _ in range(3)}
    assert victim not in served_by
    longer.join(120)
    assert busy["finish_reason"] == "length" and busy["samples"] == 144 * 480, "the other replica kept streaming"

    deadline = time.monotonic() + 180
    while not (new := {ray_server.health(timeout=60)["server"]} - servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert new, "Ray did not replace the killed replica"
    print(f"replica {victim} killed; {new.pop()} serving {time.monotonic() - killed_at:.1f} s later")


def test_serve_config_yaml_is_valid_for_ray():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from omni_demo.serve.ray_replicas import OmniServer, build

    from .apphelpers import ROOT

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "omni_demo.serve.ray_replicas:build" and app.deployments[0].name == OmniServer.name
    build(app.args)  # every arg is a server flag
    with pytest.raises(ValueError, match="unknown replica options"):
        build({"modle": "tiny"})


def test_a_replica_asks_for_a_gpu_only_where_there_is_one():
    from omni_demo.serve.args import parse_args
    from omni_demo.serve.ray_replicas import gpus_per_replica

    auto = parse_args(["--ray", "--device", "auto"])
    assert gpus_per_replica(auto, cluster_gpus=4) == 1
    assert gpus_per_replica(auto, cluster_gpus=0) == 0, "it would wait forever for a GPU"
    assert gpus_per_replica(parse_args(["--ray", "--device", "cpu"]), cluster_gpus=4) == 0
    assert gpus_per_replica(parse_args(["--ray", "--gpus-per-replica", "0.5"]), cluster_gpus=0) == 0.5
