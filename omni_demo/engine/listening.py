"""Listening while the user speaks: a spoken turn's audio encoded and prefilled as it arrives.

Qwen2.5-Omni's audio encoder cuts its log-mel input into windows of `2 * n_window` frames (2 s)
and attends within each window only, so a window's encoder output depends on that window's
frames alone. A `Listener` therefore encodes each window as soon as its last frame can no longer
change, and prefills the thinker over the conversation so far plus the audio tokens of every
finished window, keeping the result in the engine's conversation cache. When the turn ends only
the last window and the assistant prefix remain; the reply then starts from the cache:

    listener = engine.listen(history, options)  # history: the conversation before this turn
    for pcm in microphone:                      # float32 mono at 16 kHz, any chunk size
        listener.feed_audio(pcm)
    messages = listener.end_turn()              # history + the user turn, its audio an array
    for event in engine.stream(messages, options): ...

Whisper-style log-mel features are clamped at the clip's maximum minus 8 (log10 units), and a
window encoded early knows only the maximum so far: when a later part of the clip is louder
than everything before it, the values of earlier windows under the new floor change: digital
silence, and in a quiet recording a few narrow mel bins (a 10 s clip over a 3e-3 noise floor
whose last second is the loudest changes 3 to 12 values per window). `end_turn` compares every
window heard with the whole clip's features:

- by default it keeps every leading window whose only differences are such values, the ones
  the whole clip clamps to its floor (sounds 80 dB under its loudest moment), and re-encodes
  from the first window that differs otherwise. The reply may then differ a little from the
  reply to the clip processed whole; `Listener.changed_values` and `max_difference` say by how
  much the features did, and the clip's part is marked `"listened": "floor"`, so its processed
  item is never mistaken for the exact one;
- with `exact=True` it keeps only the leading windows that are identical, and from the first
  that is not, the clip is encoded and prefilled again.

A window encoded alone equals its part of the whole-clip encoding up to float rounding (matmul
blocking depends on the shapes; the difference is around 1e-6 of the values), so an exact reply
after listening is the reply to the clip processed whole wherever greedy decoding is not balanced
on a knife's edge: in tests/test_listening.py it is the same token for token and code for code.

With the camera on, a `Watcher` (below) does the same for a turn's frames and sound together,
2 s chunk by 2 s chunk.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch

from omni_demo.config import INPUT_SAMPLE_RATE, GenerationOptions
from omni_demo.errors import InputError
from omni_demo.inputs.clips import VIDEO_FPS, VideoClip
from omni_demo.inputs.messages import normalize_conversation
from omni_demo.inputs.prepare import PreparedInputs, media_items, read_media
from omni_demo.inputs.prompt import (
    MediaItem,
    audio_feature_samples,
    build_prompt,
    join_tensors,
    media_key,
    process_media,
)

from .conversation_cache import Prefix
from .decoders import ThinkerDecoder

log = logging.getLogger(__name__)


@dataclass
class Window:
    """One audio-encoder window, encoded while the clip was still arriving."""

    digest: str  # of every sample heard when it was computed
    frames: torch.Tensor  # [128, 200] its log-mel features then
    output: torch.Tensor  # [50, D] its encoder output


class Listener:
    """One spoken user turn, heard as it arrives. Made by `OmniEngine.listen`."""

    kind = "audio"  # the turn's media part
    def __init__(self, engine, history: list[dict], options: GenerationOptions, exact: bool = False):
        if engine.conversation_cache is None:
            raise ValueError("listening needs the engine's conversation cache (CacheConfig(enabled=True))")
        self.engine = engine
        self.processor = engine.processor
        placeholder_turn = {"role": "user", "content": "…"}  # the spoken turn to come
        self.history = normalize_conversation([*history, placeholder_turn])[:-1]
        self.options = options
        self.media_cache = engine.media_cache_of(options)  # the party's view of the engine's
        self.exact = exact
        self.use_audio_in_video = options.use_audio_in_video
        audio = engine.model.config.thinker_config.audio_config
        self.extractor = self.processor.feature_extractor
        self.hop = self.extractor.hop_length  # 160 samples: one log-mel frame
        self.window_frames = 2 * audio.n_window  # 200 frames: 2 s, one encoder window
        self.audio_token = engine.model.config.thinker_config.audio_token_index
        self._chunks: list[np.ndarray] = []  # the samples heard (joined when read: see `samples`)
        self.heard = 0  # samples heard
        self.windows: list[Window] = []  # the windows finished and encoded so far
        self.history_items: list[MediaItem] | None = None
        self.partial: Prefix | None = None  # the newest prefix this turn's windows prefilled
        self.listening = True  # False: the turn is over the window, or listening failed; end_turn as ever
        # After end_turn: the leading windows kept, and how far their features were from the whole clip's
        self.windows_kept = 0
        self.changed_values = 0  # values under the whole clip's floor, heard above it (never with exact)
        self.max_difference = 0.0
        self.history_has_video = any(part["type"] == "video" for message in self.history for part in message["content"])

    @property
    def samples(self) -> np.ndarray:
        """Every sample heard so far, float32 (joined once per read, not once per chunk)."""
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)]
        return self._chunks[0]

    def feed_audio(self, pcm: np.ndarray) -> None:
        """Append float32 mono 16 kHz samples; encode and prefill every window they finish, as a job
        of the engine's scheduler (between two of its steps). Where the engine serves one reply at a
        time and one is running, the work waits for the next call (or `end_turn`)."""
        pcm = np.array(pcm, dtype=np.float32).reshape(-1)  # a copy: the caller may reuse its buffer
        limit = self.engine.limits.max_audio_s
        if (self.heard + len(pcm)) / INPUT_SAMPLE_RATE > limit:
            raise InputError(f"this turn's audio is over the limit of {limit:g} s")
        self._chunks.append(pcm)
        self.heard += len(pcm)
        if not (self.listening and self._finished_windows() > len(self.windows)):
            return
        try:
            self.engine.scheduler.call(self._catch_up, skip_if_busy=True)
        except Exception:  # listening only saves time: the turn is then processed whole, as ever
            log.exception("listening failed; this turn will be processed whole")
            self.listening, self.windows = False, []

    def end_turn(self, length: int | None = None) -> list[dict]:
        """The turn is over: the conversation to reply to, its last user turn this clip (an array
        part whose processed item, made of the windows heard, is in the engine's media cache).
        `length`: the turn is its first `length` samples (what came after, e.g. the pause that
        ended it, is left out, and so are the windows that read it). The listener itself is left
        as it was: if the user goes on speaking after all, feed it and end the turn again (a voice
        call starts its reply at a short pause, before the turn's end is certain)."""
        samples = self.samples[:length]
        if not len(samples):
            raise InputError("no audio was heard in this turn")
        part = {"type": "audio", "audio": samples}
        windows = self.windows[: self._finished_windows(len(samples))]
        if windows:
            # (skipped where replies run one at a time and one is running: processed whole, as ever)
            self.engine.scheduler.call(lambda: self._keep_item(part, windows), skip_if_busy=True)
        return self.history + [{"role": "user", "content": [part]}]

    def _keep_item(self, part: dict, windows: list[Window]) -> None:
        """The clip's item, made of the windows heard, into the engine's media cache."""
        item = self._whole_item(part, windows)
        if self.changed_values:  # not the item the processor makes of this clip: its own key
            part["listened"] = "floor"
            item.key = media_key(part, with_audio=False)
        self.media_cache.put(item)

    # -- windows ----------------------------------------------------------------------------

    def _finished_windows(self, heard: int | None = None) -> int:
        """Windows whose frames are final once `heard` samples (all so far, by default) have
        arrived: every sample a frame's STFT reads (n_fft / 2 on each side of its centre) is
        there. The last window is left for end_turn."""
        reach = self.extractor.n_fft // 2
        final_frames = max(0, ((self.heard if heard is None else heard) - reach) // self.hop)
        return final_frames // self.window_frames

    def _log_mel(self, samples: np.ndarray) -> torch.Tensor:
        """[128, frames] normalized log-mel features, padded as process_media pads a clip (so the
        frames equal those of the item it would make of these samples)."""
        out = self.extractor(samples, sampling_rate=INPUT_SAMPLE_RATE, return_tensors="pt", padding="max_length",
                             max_length=audio_feature_samples(self.extractor, len(samples)))
        return out["input_features"][0]

    def _encode(self, features: torch.Tensor) -> torch.Tensor:
        """[128, frames] (one window or less) -> audio encoder output [tokens, D]."""
        thinker = self.engine.model.thinker.model
        device = thinker.audio_tower.proj.weight.device
        mask = torch.ones(1, features.shape[1], dtype=torch.long, device=device)
        with torch.inference_mode():
            return thinker.get_audio_features(features[None].to(device), feature_attention_mask=mask).last_hidden_state

    def _catch_up(self) -> None:
        """Encode the newly finished windows, then prefill the thinker through their tokens."""
        self._encode_windows()
        self._prefill(self._partial_item())

    def _encode_windows(self) -> None:
        finished = self._finished_windows()
        features = self._log_mel(self.samples)
        digest = hashlib.sha256(self.samples.tobytes()).hexdigest()
        for index in range(len(self.windows), finished):
            frames = features[:, index * self.window_frames : (index + 1) * self.window_frames]
            self.windows.append(Window(f"heard:{digest}:{index}", frames, self._encode(frames)))

    def _partial_item(self) -> MediaItem:
        """The finished windows as one audio item (its tensors carry only what positions need)."""
        features = torch.cat([window.output for window in self.windows])
        frames = len(self.windows) * self.window_frames
        return MediaItem(
            key=self.windows[-1].digest,
            token_ids=[self.audio_token] * len(features),
            tensors={"feature_attention_mask": torch.ones(1, frames, dtype=torch.long)},
            features={self.audio_token: features},
            segments=[(window.digest, len(window.output)) for window in self.windows],
        )

    def _whole_item(self, part: dict, windows: list[Window]) -> MediaItem:
        """The clip (`part`'s audio) as process_media would read it, its encoder output taken from
        `windows` as long as their features equal the whole clip's, and computed for the rest."""
        key = media_key(part, with_audio=False)
        samples = part["audio"]
        frames = -(-len(samples) // self.hop)  # the processor's feature_attention_mask counts these
        features = self._log_mel(samples)[:, :frames]
        floor = features.min()  # where the whole clip clamps (its loudest value minus 8, normalized)
        kept = []
        self.changed_values, self.max_difference = 0, 0.0
        for index, window in enumerate(windows):
            theirs = features[:, index * self.window_frames : (index + 1) * self.window_frames]
            differs = window.frames != theirs
            if differs.any():
                if self.exact or not bool((theirs[differs] == floor).all()):
                    break
                self.changed_values += int(differs.sum())
                self.max_difference = max(self.max_difference, float((window.frames - theirs).abs().max()))
            kept.append(window)
        self.windows_kept = len(kept)
        outputs, segments = [w.output for w in kept], [(w.digest, len(w.output)) for w in kept]
        done = len(kept) * self.window_frames
        if done < frames:
            rest = self._encode(features[:, done:])
            outputs.append(rest)
            segments.append((f"{key}:from-frame-{done}", len(rest)))
        encoded = torch.cat(outputs)
        padded = audio_feature_samples(self.extractor, len(samples)) // self.hop  # as process_media pads
        mask = torch.zeros(1, padded, dtype=torch.long)
        mask[0, :frames] = 1
        # Without input_features: the encoder outputs are here, and nothing else reads them.
        return MediaItem(key, [self.audio_token] * len(encoded), {"feature_attention_mask": mask},
                         {self.audio_token: encoded}, segments)

    # -- prefill ----------------------------------------------------------------------------

    def _prefill(self, item: MediaItem) -> None:
        """Prefill the history and the item's tokens through the cache; keep the result there."""
        engine = self.engine
        if self.history_items is None:
            plans = engine.plan_media(self.history, self.options)  # as the reply's fit_context will
            self.history_items = media_items(self.processor, self.history, plans, self.use_audio_in_video,
                                             self.media_cache)
        messages = self.history + [{"role": "user", "content": [{"type": self.kind, self.kind: "heard so far"}]}]
        ids, spans = build_prompt(self.processor, messages, [*self.history_items, item])
        # Through the audio-end token: mRoPE positions are computed for whole <audio> blocks. The
        # cache serves later prompts only as far as their tokens agree, so that token's KV is never
        # reused; the positions before it are those of the whole turn.
        ids = ids[: spans[-1].end + 1]
        if len(ids) > engine.prompt_limit(self.options):  # the reply will leave older turns out: prefilling
            self.listening, self.windows = False, []  # this history would be work nobody reuses
            return
        items = [span.item for span in spans]
        input_ids = torch.tensor([ids], device=engine.loaded.device)
        tensors = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                   **{name: value.to(engine.loaded.device) for name, value in join_tensors(items).items()}}
        with_video = self.history_has_video or self.kind == "video"
        inputs = PreparedInputs(tensors, messages, self.use_audio_in_video and with_video, spans)
        thinker = ThinkerDecoder(engine.model.thinker, engine.decode_step("thinker"))
        thinker.prefill(inputs, engine.conversation_cache, self.options.cache_scope)
        replaces = thinker.supersedes(thinker.prefix is not None and thinker.prefix is self.partial)
        self.partial = thinker.kept_prefix(ids, spans, partial=True)
        engine.conversation_cache.add(self.partial, replaces=replaces)


# -- watching: a turn spoken with the camera on ---------------------------------------------------
# A camera turn's frames and sound encoded and prefilled chunk by chunk as they arrive, as
# `Listener` does above for a spoken turn's sound.
#
# With use_audio_in_video the processor lays a video with its sound out in 2 s chunks on one time
# axis (TMRoPE): `<|audio_bos|>`, then for each chunk its frames' tokens (4 frames at 2 per second:
# two temporal patches) and its 50 sound tokens, then `<|audio_eos|>`. Chunk j's tokens and
# positions are the same in a clip of j + 1 chunks as in any longer clip, and each chunk's encoder
# outputs depend on that chunk alone: Qwen2.5-Omni's vision tower attends within one temporal patch
# (its cu_seqlens run per frame pair), its audio encoder within one 2 s window. So a `Watcher`
# encodes each chunk once its frames and sound are final, and prefills the conversation through
# the chunks so far (the clip so far, through the processor, with their encoder outputs), keeping
# the result in the conversation cache:
#
#     watcher = engine.watch(history, options)   # history: the conversation before this turn
#     for pcm, frames in call:                   # the turn's sound, any chunk size; its frames so far
#         watcher.feed(frames, pcm)              #   (whole chunks of 4 that can no longer change)
#     messages = watcher.end_turn(frames)        # history + the turn as a VideoClip
#     for event in engine.stream(messages, options): ...
#
# At the end the clip's item is made whole: leading chunks whose frames and sound windows are those
# of the whole clip are kept (windows compared exactly, as `Listener(exact=True)` does: a window
# whose log-mel floor moved is encoded again), the rest is encoded there, so the reply is the reply
# to the clip processed whole (tests/test_video_call.py).

CHUNK_S = 2.0  # seconds per chunk: the processor's seconds_per_chunk, the audio encoder's window
CHUNK_FRAMES = round(CHUNK_S * VIDEO_FPS)  # 4 frames: two temporal patches
HEAVY = ("pixel_values_videos", "input_features")  # inputs the encoder outputs stand in for


@dataclass
class SeenChunk:
    """The frames of one chunk, encoded while the turn was still being spoken."""

    digest: str  # of its frames
    output: torch.Tensor  # [tokens, D] the vision tower's output


class Watcher(Listener):
    """One camera turn, seen and heard as it arrives. Made by `OmniEngine.watch`."""

    kind = "video"

    def __init__(self, engine, history: list[dict], options: GenerationOptions):
        if not options.use_audio_in_video:
            raise ValueError("watching reads a video with its sound: use_audio_in_video")
        super().__init__(engine, history, options, exact=True)
        self.video_token = engine.model.config.thinker_config.video_token_index
        self.frames = np.zeros((0, 0, 0, 3), np.uint8)  # the turn's final frames so far
        self.seen: list[SeenChunk] = []
        self.chunks_kept = 0  # after end_turn: the leading chunks that came from watching

    def feed(self, frames: np.ndarray, pcm: np.ndarray) -> None:
        """The turn's frames so far ([n, h, w, 3] uint8 at 2 per second, none of which can still
        change) and its newest samples; each chunk they complete is encoded and prefilled as a job
        of the engine's scheduler."""
        if len(frames) > len(self.frames):
            self.frames = np.asarray(frames, np.uint8)
        self.feed_audio(pcm)  # schedules the work where a sound window completes
        if self.listening and self._ready_chunks() > len(self.seen):  # (the frames came after the sound)
            self.engine.scheduler.call(self._catch_up, skip_if_busy=True)

    def end_turn(self, frames: np.ndarray, length: int | None = None) -> list[dict]:
        """The conversation to reply to: the history, then the turn's `frames` and its first
        `length` samples as one VideoClip (its item, made of the chunks watched, in the media cache)."""
        samples = self.samples[:length]
        if not len(samples):
            raise InputError("no audio was heard in this turn")
        part = {"type": "video", "video": VideoClip(np.asarray(frames, np.uint8), samples)}
        if self.seen:
            self.engine.scheduler.call(lambda: self._keep_clip(part), skip_if_busy=True)
        return self.history + [{"role": "user", "content": [part]}]

    # -- chunks -----------------------------------------------------------------------------

    def _ready_chunks(self) -> int:
        """Chunks whose frames and sound window are both final."""
        return min(len(self.frames) // CHUNK_FRAMES, self._finished_windows())

    def _catch_up(self) -> None:
        """Encode the newly final sound windows and chunks of frames; prefill through them."""
        self._encode_windows()
        ready = min(len(self.frames) // CHUNK_FRAMES, len(self.windows))
        if ready <= len(self.seen):
            return
        samples = self.samples[: round(ready * CHUNK_S * INPUT_SAMPLE_RATE)]
        item = self._clip_item(self.frames[: ready * CHUNK_FRAMES], samples, f"watched:{ready}")
        pixels, grid = item.tensors["pixel_values_videos"], item.tensors["video_grid_thw"]
        rows = len(pixels) // int(grid[0][0]) * (CHUNK_FRAMES // 2)  # pixel rows per chunk
        for index in range(len(self.seen), ready):
            frames = self.frames[index * CHUNK_FRAMES : (index + 1) * CHUNK_FRAMES]
            self.seen.append(SeenChunk(hashlib.sha256(frames.tobytes()).hexdigest(),
                                       self._vision(pixels[index * rows : (index + 1) * rows], grid, CHUNK_FRAMES // 2)))
        item.features = {self.video_token: torch.cat([chunk.output for chunk in self.seen[:ready]]),
                         self.audio_token: torch.cat([window.output for window in self.windows[:ready]])}
        item.tensors = {name: value for name, value in item.tensors.items() if name not in HEAVY}
        item.segments = self._segments(item.key, ready, item)
        self._prefill(item)

    def _clip_item(self, frames: np.ndarray, samples: np.ndarray, key: str) -> MediaItem:
        """The processor's item of these frames and this sound (tokens, grids, masks, pixels)."""
        part = {"type": "video", "video": VideoClip(frames, samples)}
        return process_media(self.processor, "video", key, read_media(part, None, with_audio=True))

    def _vision(self, pixel_values: torch.Tensor, grid: torch.Tensor, patches: int) -> torch.Tensor:
        """The vision tower's output [tokens, D] of `patches` temporal patches of one size."""
        thinker = self.engine.model.thinker.model
        device = thinker.audio_tower.proj.weight.device
        grid_thw = torch.tensor([[patches, int(grid[0][1]), int(grid[0][2])]], device=device)
        with torch.inference_mode():
            return thinker.get_video_features(pixel_values.to(device), grid_thw).pooler_output[0]

    def _segments(self, key: str, chunks: int, item: MediaItem) -> list[tuple[str, int]]:
        """(digest, tokens) runs of an item whose first `chunks` chunks came from watching: one per
        chunk (its frames and its sound window), the first with the item's opening token."""
        runs, used = [], 0
        for index in range(chunks):
            tokens = len(self.seen[index].output) + len(self.windows[index].output) + (index == 0)
            runs.append((f"{self.seen[index].digest}:{self.windows[index].digest}", tokens))
            used += tokens
        return runs + [(f"{key}:from-chunk-{chunks}", len(item.token_ids) - used)]

    def _keep_clip(self, part: dict) -> None:
        """The clip's item, made of the chunks watched, into the engine's media cache."""
        clip: VideoClip = part["video"]
        key = media_key(part, with_audio=True)
        item = self._clip_item(clip.frames, clip.audio, key)
        windows = self.windows[: self._finished_windows(len(clip.audio))]
        sound = self._whole_item({"type": "audio", "audio": clip.audio}, windows)  # exact: identical windows kept
        kept = 0
        while (kept < min(len(self.seen), self.windows_kept)
               and self.seen[kept].digest == hashlib.sha256(
                   clip.frames[kept * CHUNK_FRAMES : (kept + 1) * CHUNK_FRAMES].tobytes()).hexdigest()):
            kept += 1
        self.chunks_kept = kept
        pixels, grid = item.tensors["pixel_values_videos"], item.tensors["video_grid_thw"]
        patches = int(grid[0][0])
        outputs = [chunk.output for chunk in self.seen[:kept]]
        if kept * CHUNK_FRAMES // 2 < patches:
            rows = len(pixels) // patches
            outputs.append(self._vision(pixels[kept * CHUNK_FRAMES // 2 * rows :], grid,
                                        patches - kept * CHUNK_FRAMES // 2))
        item.features = {self.video_token: torch.cat(outputs), self.audio_token: sound.features[self.audio_token]}
        item.tensors = {name: value for name, value in item.tensors.items() if name not in HEAVY}
        item.segments = self._segments(key, kept, item)
        self.media_cache.put(item)
