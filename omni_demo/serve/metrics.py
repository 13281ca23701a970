"""What an operator scrapes from `GET /metrics` (Prometheus text format, `prometheus_client`): replies
running and waiting, time to first text and first audio, the speech's real-time factor, tokens and
replies by how they ended, how many prompt tokens the conversation cache served, and the engine
scheduler's steps: how many replies each stage batched and how long it took."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from omni_demo.events import Finished

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)  # seconds
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)  # below 1: faster than real time
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # replies in one stage of a step
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # seconds per stage call


class ServerMetrics:
    """One server's metrics, in a registry of its own (two servers in one process stay apart)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        options = {"registry": self.registry, "namespace": "omni"}
        Gauge("replies_running", "Replies being generated now.", **options).set_function(running)
        Gauge("replies_waiting", "Replies admitted and waiting for the model.", **options).set_function(waiting)
        self.replies = Counter("replies", "Replies ended, by reason (eos, length, cancelled).", ["reason"], **options)
        self.first_text = Histogram("time_to_first_text_seconds", "Request start to the first text.",
                                    buckets=LATENCY_BUCKETS, **options)
        self.first_audio = Histogram("time_to_first_audio_seconds", "Request start to the first audio chunk.",
                                     buckets=LATENCY_BUCKETS, **options)
        self.rtf = Histogram("speech_real_time_factor", "Generation time over speech length, per reply.",
                             buckets=RTF_BUCKETS, **options)
        self.text_tokens = Counter("text_tokens", "Thinker tokens generated.", **options)
        self.audio_tokens = Counter("audio_tokens", "Talker codes generated (50 per second of speech).", **options)
        self.speech_seconds = Counter("speech_seconds", "Seconds of speech generated.", **options)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of the replies.", **options)
        self.cached_prompt_tokens = Counter("cached_prompt_tokens", "Prompt tokens the conversation cache served "
                                            "(the caller's own hits).", **options)
        self.batch_size = Histogram("step_batch_size", "Replies one stage of a scheduler step ran together "
                                    "(prefill, thinker, talker, dit, bigvgan).", ["stage"], buckets=BATCH_BUCKETS,
                                    **options)
        self.step_seconds = Histogram("step_seconds", "Time of one stage of a scheduler step.", ["stage"],
                                      buckets=STEP_BUCKETS, **options)

    def observe_step(self, stage: str, batch: int, seconds: float) -> None:
        """One stage of one scheduler step (an observer of omni_demo.engine.scheduler)."""
        self.batch_size.labels(stage).observe(batch)
        self.step_seconds.labels(stage).observe(seconds)

    def observe(self, finished: Finished) -> None:
        """One reply's figures, once it has ended."""
        stats = finished.stats
        self.replies.labels(finished.stop_reason).inc()
        if stats.time_to_first_text_s is not None:
            self.first_text.observe(stats.time_to_first_text_s)
        if stats.time_to_first_audio_s is not None:
            self.first_audio.observe(stats.time_to_first_audio_s)
        if stats.rtf is not None:
            self.rtf.observe(stats.rtf)
        self.text_tokens.inc(stats.text_tokens)
        self.audio_tokens.inc(stats.audio_tokens)
        self.speech_seconds.inc(stats.audio_s)
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.reused_prompt_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
