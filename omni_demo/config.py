"""Configuration dataclasses: what the engine is built with, and what one request asks for.

Units used throughout the project: one talker codec token = 2 DiT mel frames = 480 samples at
24 kHz (50 codec tokens per second of speech).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "Qwen/Qwen2.5-Omni-7B"
TINY_MODEL = "tiny"
DTYPES = ("auto", "bfloat16", "float16", "float32")  # "auto": bfloat16 on CUDA, float32 on CPU
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # "auto": flash_attention_2 if installed on CUDA
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")  # "auto": on CUDA the least that fits the free memory; CPU: none
SAMPLE_RATE = 24_000  # the spoken reply (Token2Wav's output)
INPUT_SAMPLE_RATE = 16_000  # what the audio feature extractor (and the VAD) read
SAMPLES_PER_CODE = 480
MEL_FRAMES_PER_CODE = 2
MAX_TOKENS = 1 << 20  # longest reply any request may ask for, in tokens (far beyond any window)
ASSETS = Path(__file__).resolve().parent.parent / "assets"  # example media the app and the bench use
STOP_GRACE_S = 1.0  # after a cancel, how long to wait for the reply's Finished (the engine sends it within a step)
MAX_SEED = 2**32 - 1  # torch and numpy generators both take it; seed + 1 is used for the talker

# Qwen2.5-Omni only speaks when it is given this exact system prompt (model card).
DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)


@dataclass(frozen=True)
class ModelConfig:
    """How the model is loaded. Resolved once at start-up."""

    model: str = DEFAULT_MODEL  # hub id, local directory, or "tiny" (built offline, random weights)
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU ("bfloat16", "float16", "float32")
    attn: str = "auto"  # "auto": flash_attention_2 with flash-attn on CUDA, else sdpa ("sdpa", "eager")
    quantize: str = "auto"  # weight-only quantization of the decoders' linears (omni_demo.models.quantize)
    context_window: int | None = None  # tokens each reply's static KV caches hold; None: the model's windows

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, not {self.quantize!r}")
        if self.context_window is not None and not 256 <= self.context_window <= MAX_TOKENS:
            raise ValueError(f"context_window must be between 256 and {MAX_TOKENS} tokens")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.attn not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, not {self.attn!r}")


@dataclass(frozen=True)
class StreamingConfig:
    """Chunk geometry of the streaming Token2Wav, in codec tokens unless named otherwise.

    DiT block attention is counted from the window start, so omni_demo.engine.token2wav rounds every
    window start down to a DiT block (24 mel frames = 12 codes); the fields need not be multiples.
    """

    first_chunk_codes: int = 24  # first chunk, decoded once it and its own look-ahead exist
    first_chunk_future_codes: int = 0  # look-ahead the first chunk waits for (0: latency over accuracy)
    chunk_codes: int = 36  # second chunk (0.72 s), decoded once its look-ahead exists
    max_chunk_codes: int = 48  # later chunks grow to this (0.96 s): less context re-decoded
    past_context_codes: int = 24  # DiT context before a chunk (2 blocks)
    future_context_codes: int = 12  # DiT look-ahead after a chunk (1 block)
    vocoder_context_frames: int = 20  # mel frames of BigVGAN overlap kept on each inner edge
    ode_steps: int = 10  # RK4 time points of the DiT flow (upstream: 10)
    guidance_scale: float = 0.5  # classifier-free guidance (upstream: 0.5)
    sway_coefficient: float = -1.0  # time-point sway (upstream: -1.0)

    def __post_init__(self):
        if min(self.first_chunk_codes, self.chunk_codes) < 1:
            raise ValueError("chunk sizes must be at least one codec token")
        if self.max_chunk_codes < self.chunk_codes:
            raise ValueError("max_chunk_codes cannot be below chunk_codes")
        if min(self.past_context_codes, self.future_context_codes, self.first_chunk_future_codes,
               self.vocoder_context_frames) < 0:
            raise ValueError("context sizes cannot be negative")


@dataclass(frozen=True)
class CacheScope:
    """Who may reuse what a reply leaves in the conversation cache and the media cache.

    A `private` party (a browser session; an API key with a cache_salt; by default, the one local
    user of the CLI or the bench) reuses its own entries as far as they agree. A shared party (an API
    key without a salt, which many clients may hold) reuses an entry of its own only up to the end of
    one of its whole prompts, never into a reply, and keeps no media between requests: a prompt that
    agrees with part of another client's message, or with a whole message and part of its reply,
    saves nothing. Across parties, only the default system prompt's tokens are shared.
    """

    party: str = ""  # the browser session, or a digest of the API key (and cache_salt)
    private: bool = True
    owner: str = ""  # whose share of the cache it draws on (an API key's salted parties: the key's); "": its own

    @property
    def quota_holder(self) -> str:
        return self.owner or self.party

    def __post_init__(self):
        if not isinstance(self.party, str) or not isinstance(self.owner, str) or not isinstance(self.private, bool):
            raise ValueError("a cache scope is a party name and whether it is private")


@dataclass(frozen=True)
class GenerationOptions:
    """One request's settings. Thinker sampling fields left as None use the checkpoint's
    generation_config, as upstream `generate` does; talker defaults are upstream's."""

    voice: str = "Chelsie"
    speech: bool = True  # False: text only; the talker and token2wav never run
    greedy: bool = False  # argmax in both decoders (repetition penalties still apply, as upstream)
    temperature: float | None = None  # thinker
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    talker_temperature: float = 0.9
    talker_top_k: int = 40
    talker_top_p: float = 0.8
    talker_repetition_penalty: float = 1.05
    max_new_tokens: int = 1024  # thinker tokens
    max_audio_tokens: int = 4096  # talker codec tokens (4096 = 82 s of speech)
    min_new_tokens: int = 0  # the thinker's end-of-turn tokens are suppressed until then (benchmarks)
    min_audio_tokens: int = 0  # the talker's end-of-speech tokens likewise
    use_audio_in_video: bool = False  # feed each video's sound track to the thinker
    seed: int | None = None  # seeds sampling and the DiT noise
    cache_scope: CacheScope = CacheScope()  # who may reuse this reply's cached state (and whose it may reuse)

    def __post_init__(self):
        for name in ("max_new_tokens", "max_audio_tokens", "min_new_tokens", "min_audio_tokens", "top_k",
                     "talker_top_k", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be a whole number, not {value!r:.40}")
        for name in ("temperature", "top_p", "repetition_penalty", "talker_temperature", "talker_top_p",
                     "talker_repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, not {value!r:.40}")
        if not 1 <= self.max_new_tokens <= MAX_TOKENS or not 1 <= self.max_audio_tokens <= MAX_TOKENS:
            raise ValueError(f"max_new_tokens and max_audio_tokens must be between 1 and {MAX_TOKENS}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens or not 0 <= self.min_audio_tokens <= self.max_audio_tokens:
            raise ValueError("a minimum length must be between 0 and its maximum")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and {MAX_SEED}")
        if not isinstance(self.cache_scope, CacheScope):
            raise ValueError(f"cache_scope must be a CacheScope, not {self.cache_scope!r:.40}")
        for name in ("temperature", "talker_temperature"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise ValueError(f"{name} must be above 0 and at most 100 (use greedy for argmax)")
        for name in ("top_p", "talker_top_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        for name in ("top_k", "talker_top_k"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} cannot be negative")
        for name in ("repetition_penalty", "talker_repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise ValueError(f"{name} must be above 0 and at most 100")


@dataclass(frozen=True)
class BatchConfig:
    """How the engine's scheduler shares the model between replies (omni_demo.engine.scheduler)."""

    max_batch: int | None = None  # replies decoded together (None: from the free memory and a slot's size)
    realtime_guard: bool = True  # admit a reply only while every running reply's speech is ahead of real time
    prefill_chunk_tokens: int = 512  # prompt tokens prefilled between two decode steps
    threaded: bool = True  # False: one reply at a time, in its caller's thread (ZeroGPU lends a GPU per call)

    def __post_init__(self):
        if self.max_batch is not None and not 1 <= self.max_batch <= 256:
            raise ValueError("max_batch must be between 1 and 256")
        if self.prefill_chunk_tokens < 16:
            raise ValueError("prefill_chunk_tokens must be at least 16")


@dataclass(frozen=True)
class CacheConfig:
    """What the engine keeps between turns (omni_demo.engine.conversation_cache, omni_demo.inputs.prompt.MediaCache)."""

    enabled: bool = True  # False: every turn is computed from scratch
    max_prefixes: int = 8  # conversation prefixes kept (at most half of them one party's), each with its thinker
    # and talker KV caches
    max_prefix_mb: float = 4096.0  # all kept prefixes together (7B, bf16: ~0.11 MB per token)
    max_media_mb: float = 1024.0  # processed media files and their encoder outputs

    def __post_init__(self):
        if self.max_prefixes < 1 or min(self.max_prefix_mb, self.max_media_mb) <= 0:
            raise ValueError("cache sizes must be positive")


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server, decided before any media is decoded (omni_demo.inputs.media);
    over a limit the user is told which one and by how much. The last turn must fit; older turns
    over a per-conversation budget are left out, oldest first, as for the context window."""

    max_audio_s: float = 300.0  # per audio clip (the processor's own longest)
    max_video_s: float = 180.0  # per video
    max_video_frames: int = 256  # frames read per video (qwen-omni-utils samples 2 per second)
    max_images_per_turn: int = 8
    max_audio_clips_per_turn: int = 4
    max_videos_per_turn: int = 2
    max_images_per_conversation: int = 16
    max_videos_per_conversation: int = 4
    max_audio_s_per_conversation: float = 900.0  # audio clips and videos' sound tracks together
    max_image_pixels: int = 50_000_000  # decoded pixels per image (JPEG decodes scaled down first)
    max_frame_pixels: int = 10_000_000  # decoded pixels per video frame (4K UHD: 8.3 M)
    max_image_tokens: int = 4096  # per image after resizing (the processor allows 16,384)
    max_video_tokens: int = 8192  # per video after resizing, its frames together
    max_messages: int = 8192  # chat messages in one request
    max_text_chars: int = 1_000_000  # characters of text in one request, history included
    max_context_tokens: int | None = None  # prompt tokens; None: the thinker's and talker's windows decide

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if name != "max_context_tokens" and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number")
