"""Token2Wav, chunk by chunk: codec tokens -> DiT mel windows -> BigVGAN -> 24 kHz samples.

Geometry (1 codec token = 2 mel frames = 480 samples; DiT block = 24 frames = 12 codes):
- Chunks are runs of codes. The first chunk is decoded as soon as `first_chunk_codes` exist,
  by default without waiting for look-ahead (that buys the first audio ~0.25 s of talker
  time; `first_chunk_future_codes` trades it back for accuracy); each later chunk once
  `future_context_codes` more than its end exist, or the reply has ended. The second chunk has
  `chunk_codes`; later ones double up to `max_chunk_codes`, since by then playback is ahead and
  bigger chunks re-decode less context.
- A chunk's DiT window starts `past_context_codes` before it, rounded down to a DiT block (block
  attention is counted from the window start, so windows must start on a block), and ends
  `future_context_codes` after it. Only the chunk's own frames are kept.
- One initial-noise tensor covers the whole reply and is sliced by absolute mel frame, so
  overlapping windows see the same noise at the same frame. With a window covering the whole
  reply the result is exactly the one-shot decode.
- BigVGAN sees `vocoder_context_frames` of final mel on each inner edge; the samples that belong
  to those frames are trimmed, so every frame is vocoded once and every code yields 480 samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

from omni_demo.config import MEL_FRAMES_PER_CODE, StreamingConfig

HOP = 240  # samples per mel frame
MAX_HOLD_STEPS = 4  # codec steps (80 ms of speech) a due chunk may wait for another reply's, to batch them


class DiTVelocity:
    """The DiT's velocity field over one window, for the ODE solver.

    Runs the same modules and ops as `Qwen2_5OmniToken2WavDiTModel.forward` with classifier-free
    guidance batched as 2 (so results are bit-identical), but computes once per window what
    upstream recomputes on every one of its 36 evaluations: the ECAPA speaker encoding (pass it in
    to share it across windows), the code embeddings, the rotary tables and the block masks.
    """

    def __init__(self, dit, codes, conditioning, reference_mel, *, guidance_scale=0.5, speaker_code=None):
        # codes [B, N]; conditioning [B, enc_emb_dim]; reference_mel [1, T, 80] (B = 1; else pass
        # speaker_code [2B, enc_dim]: every row's reference encoding, then every row's silence encoding)
        self.dit = dit
        self.guidance_scale = guidance_scale
        batch, frames = codes.shape[0], codes.shape[1] * dit.repeats
        if speaker_code is None:
            speaker_code = encode_speaker(dit, reference_mel)
        code_embed = torch.cat([dit.text_embed(codes), dit.text_embed(codes, drop_code=True)], dim=0)
        speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)
        speaker = torch.cat([speaker, torch.zeros_like(speaker)], dim=0)
        # Everything the input projection sees besides the noisy mel: [2B, F, enc_dim + emb_dim + enc_emb_dim]
        self.condition = torch.cat([speaker_code.unsqueeze(1).repeat(1, frames, 1), code_embed, speaker], dim=-1)
        positions = torch.arange(frames, device=codes.device)[None, :].repeat(2 * batch, 1)
        self.rotary = dit.rotary_embed(self.condition, positions)
        block = torch.arange(frames, device=codes.device) // dit.block_size
        block_diff = (block[None, :] - block[:, None]).expand(2 * batch, dit.num_attention_heads, frames, frames)
        self.masks = [
            (block_diff >= -float(layer.look_backward_block)) & (block_diff <= float(layer.look_ahead_block))
            for layer in dit.transformer_blocks
        ]

    def __call__(self, time_step, state):
        """state [B, F, 80] -> guided velocity [B, F, 80]."""
        dit = self.dit
        time = dit.time_embed(time_step.repeat(2 * state.shape[0]))
        hidden = dit.input_embed.proj(torch.cat([torch.cat([state, state], dim=0), self.condition], dim=-1))
        for layer, mask in zip(dit.transformer_blocks, self.masks):
            norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = layer.attn_norm(hidden, emb=time)
            hidden = hidden + gate_msa.unsqueeze(1) * layer.attn(norm, position_embeddings=self.rotary, attention_mask=mask)
            norm = layer.ff_norm(hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            hidden = hidden + gate_mlp.unsqueeze(1) * layer.ff(norm)
        out = dit.proj_out(dit.norm_out(hidden, time))
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * self.guidance_scale


def encode_speaker(dit, reference_mel):
    """ECAPA embedding of the reference mel and of silence (the unconditioned CFG half): [2, enc_dim]."""
    return dit.input_embed.spk_encoder(torch.cat([reference_mel, torch.zeros_like(reference_mel)], dim=0))


@torch.no_grad()
def dit_sample(dit, codes, conditioning, reference_mel, noise, *, steps=10, guidance_scale=0.5, sway=-1.0,
               speaker_code=None):
    """Upstream `Qwen2_5OmniToken2WavDiTModel.sample`, with the initial noise passed in.

    codes [B, N] long, conditioning [B, enc_emb_dim], reference_mel [1, T, 80] (or speaker_code, see
    DiTVelocity), noise [B, 2N, 80] -> mel [B, 80, 2N].
    """
    velocity = DiTVelocity(
        dit, codes, conditioning, reference_mel, guidance_scale=guidance_scale, speaker_code=speaker_code
    )
    times = torch.linspace(0, 1, steps, device=codes.device, dtype=noise.dtype)
    times += sway * (torch.cos(torch.pi / 2 * times) - 1 + times)
    trajectory = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(times)
    return trajectory[-1].permute(0, 2, 1)


@torch.no_grad()
def vocode(bigvgan, mel) -> torch.Tensor:
    """mel [1, 80, F] -> [F * 240] float32 samples on the CPU."""
    return bigvgan(mel).reshape(-1).float()


@torch.no_grad()
def vocode_many(bigvgan, mel) -> torch.Tensor:
    """mel [B, 80, F] -> [B, F * 240] float32 samples on the CPU."""
    return bigvgan(mel).reshape(mel.shape[0], -1).float()


@dataclass
class DitWindow:
    """One chunk's DiT work: the codes of its window, their noise, and the codes it makes final."""

    start: int  # first code made final
    end: int  # one past the last
    window_start: int  # first code of the window (block-aligned)
    codes: torch.Tensor  # [1, N] the window's codes
    noise: torch.Tensor  # [1, 2N, 80] their slice of the reply's noise


@dataclass
class VocoderSpan:
    """One BigVGAN call's work: final mel frames from `begin` (context included), samples up to `stop`."""

    begin: int  # first mel frame vocoded (vocoder context before the new frames)
    stop: int  # one past the last frame whose samples are emitted
    mel: torch.Tensor  # [1, 80, F] frames begin..end of the final mel


class StreamingToken2Wav:
    """Token2Wav as a stateful stream: `push` codes as they arrive, `flush` at the end of the reply.

    Both return the newly final samples ([n] float32 numpy, possibly empty).
    """

    def __init__(self, token2wav, speaker: dict, config: StreamingConfig, *, max_codes: int, seed: int | None = None):
        self.dit = token2wav.code2wav_dit_model
        self.bigvgan = token2wav.code2wav_bigvgan_model
        self.config = config
        device = next(self.dit.parameters()).device
        self.device = device
        self.block_codes = self.dit.config.block_size // MEL_FRAMES_PER_CODE
        self.conditioning = speaker["cond"].to(device).float()  # [1, enc_emb_dim]
        self.reference_mel = speaker["ref_mel"].to(device).float()  # [1, T, 80]
        with torch.no_grad():
            self.speaker_code = encode_speaker(self.dit, self.reference_mel)  # once per reply
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        frames = max_codes * MEL_FRAMES_PER_CODE
        self.noise = torch.randn(1, frames, self.dit.config.mel_dim, generator=generator).to(device)  # [1, F, 80]
        self.codes: list[int] = []
        self.decoded_codes = 0  # codes whose mel is final
        self.chunks = 0  # DiT chunks decoded
        self.mel = torch.empty(1, self.dit.config.mel_dim, 0, device=device)  # [1, 80, final frames]
        self.vocoded_frames = 0  # frames whose samples were emitted
        self.held = 0  # steps its due chunk has waited for another reply's (push_many)

    def _next_chunk_end(self) -> int:
        config = self.config
        if self.chunks == 0:
            return config.first_chunk_codes
        return self.decoded_codes + min(config.chunk_codes * 2 ** (self.chunks - 1), config.max_chunk_codes)

    def push(self, codes: list[int]) -> np.ndarray:
        """Add codes; -> the samples they made final (decoding every chunk that is due)."""
        self.add(codes)
        return self._decode_due(final=False)

    def flush(self) -> np.ndarray:
        """The reply has ended: decode the rest. -> the last samples."""
        return self._decode_due(final=True)

    def _decode_due(self, *, final: bool) -> np.ndarray:
        while (window := self.next_window(final=final)) is not None:
            self.accept_mel(window, self.sample(window))
        span = self.vocoder_span(final=final)
        return np.zeros(0, dtype=np.float32) if span is None else self.accept_wave(span, vocode(self.bigvgan, span.mel))

    # The steps of push and flush, for a scheduler that batches them across replies (`push_many`).

    def add(self, codes: list[int]) -> None:
        if len(self.codes) + len(codes) > self.noise.shape[1] // MEL_FRAMES_PER_CODE:
            raise ValueError(f"more than max_codes={self.noise.shape[1] // MEL_FRAMES_PER_CODE} codec tokens")
        self.codes.extend(codes)

    def next_window(self, *, final: bool = False) -> DitWindow | None:
        """The next chunk's DiT window if that chunk is due: its look-ahead exists, or (`final`) the
        reply has ended and codes are left."""
        start, config = self.decoded_codes, self.config
        end = self._next_chunk_end()
        lookahead = config.first_chunk_future_codes if self.chunks == 0 else config.future_context_codes
        if final:
            if start >= len(self.codes):
                return None
            end = min(end, len(self.codes))
        elif len(self.codes) < end + lookahead:
            return None
        window_start = max(0, start - config.past_context_codes) // self.block_codes * self.block_codes
        window_end = min(len(self.codes), end + config.future_context_codes)
        codes = torch.tensor([self.codes[window_start:window_end]], device=self.device)
        noise = self.noise[:, window_start * MEL_FRAMES_PER_CODE : window_end * MEL_FRAMES_PER_CODE]
        return DitWindow(start, end, window_start, codes, noise)

    def upcoming(self) -> tuple[int, int] | None:
        """(codes still to come before the next chunk is due, its DiT window's length in codes), for
        the chunks after the first: their windows are fixed once due, so waiting a few codes for
        another reply's window of the same length changes nothing but when they run. The first
        chunk's window grows while it waits (no look-ahead by default): None, never held."""
        if self.chunks == 0:
            return None
        config = self.config
        end = self._next_chunk_end() + config.future_context_codes
        window_start = max(0, self.decoded_codes - config.past_context_codes) // self.block_codes * self.block_codes
        return end - len(self.codes), end - window_start

    def sample(self, window: DitWindow) -> torch.Tensor:
        """The window's mel [1, 80, 2N], decoded alone."""
        return dit_sample(self.dit, window.codes, self.conditioning, self.reference_mel, window.noise,
                          steps=self.config.ode_steps, guidance_scale=self.config.guidance_scale,
                          sway=self.config.sway_coefficient, speaker_code=self.speaker_code)

    def accept_mel(self, window: DitWindow, mel: torch.Tensor) -> None:
        """Keep the chunk's own frames of its window's mel [1, 80, 2N]: codes [start, end) are final."""
        keep = slice((window.start - window.window_start) * MEL_FRAMES_PER_CODE,
                     (window.end - window.window_start) * MEL_FRAMES_PER_CODE)
        self.mel = torch.cat([self.mel, mel[:, :, keep]], dim=2)
        self.decoded_codes = window.end
        self.chunks += 1
        self.held = 0

    def vocoder_span(self, *, final: bool) -> VocoderSpan | None:
        """Final frames to vocode, holding back `vocoder_context_frames` unless final; None: none yet."""
        total = self.mel.shape[2]
        stop = total if final else total - self.config.vocoder_context_frames
        if stop <= self.vocoded_frames:
            return None
        begin = max(0, self.vocoded_frames - self.config.vocoder_context_frames)
        return VocoderSpan(begin, stop, self.mel[:, :, begin:])

    def accept_wave(self, span: VocoderSpan, wave: torch.Tensor) -> np.ndarray:
        """The span's new samples, out of BigVGAN's wave [F * 240] for it."""
        samples = wave[(self.vocoded_frames - span.begin) * HOP : (span.stop - span.begin) * HOP].cpu().numpy()
        self.vocoded_frames = span.stop
        return samples


def push_many(items: list[tuple[StreamingToken2Wav, list[int], bool]], timer=None) -> list[np.ndarray | Exception]:
    """`push` (then `flush`, where the bool says the reply has ended) for several replies' streams at
    once: their due DiT windows decoded together where they have the same length, then their
    vocoder spans likewise. -> each item's new samples, or the exception that ended that item
    alone (a batched call that fails is run again item by item, so the failure is the item's own).
    `timer(stage, batch, seconds)`, if given, hears each batched "dit" and "bigvgan" call."""
    results: list = [np.zeros(0, dtype=np.float32)] * len(items)
    for index, (stream, codes, _) in enumerate(items):
        _guard(results, index, stream.add, codes)
    for final in (False, True):
        indices = [i for i, (_, _, ended) in enumerate(items) if ended or not final]
        _decode_round({i: items[i][0] for i in indices if not isinstance(results[i], Exception)}, final, results, timer)
    return results


def _decode_round(streams: dict[int, StreamingToken2Wav], final: bool, results: list, timer) -> None:
    """Every due window of `streams` (by item index), then their vocoder spans, batched by shape
    (`_decode_due`'s work); new samples are appended to `results`, failures put there."""
    held: set[int] = set()
    while due := {i: window for i, stream in streams.items() if i not in held and not isinstance(results[i], Exception)
                  and (window := _guard(results, i, stream.next_window, final=final)) is not None}:
        if not final:
            held |= {i for i in due if _waits_for_company(streams, i, due)}
            if not (due := {i: window for i, window in due.items() if i not in held}):
                break
        for group in _same_shape(due, lambda i: due[i].codes.shape[1]):
            mels = _batched(timer, "dit", group, results, lambda g: _sample_many([(streams[i], due[i]) for i in g]))
            for i, mel in mels.items():
                _guard(results, i, streams[i].accept_mel, due[i], mel)
    spans = {i: span for i, stream in streams.items() if not isinstance(results[i], Exception)
             and (span := _guard(results, i, stream.vocoder_span, final=final)) is not None}
    for group in _same_shape(spans, lambda i: spans[i].mel.shape[2]):
        bigvgan = streams[group[0]].bigvgan
        waves = _batched(timer, "bigvgan", group, results,
                         lambda g: list(vocode_many(bigvgan, torch.cat([spans[i].mel for i in g]))))
        for i, wave in waves.items():
            if (new := _guard(results, i, streams[i].accept_wave, spans[i], wave)) is not None:
                results[i] = np.concatenate([results[i], new])


def _waits_for_company(streams: dict[int, StreamingToken2Wav], index: int, due: dict) -> bool:
    """Whether the due chunk of streams[index] waits this step (at most MAX_HOLD_STEPS in all) for
    another stream whose window of the same length is due within those steps, to run with it."""
    stream = streams[index]
    if stream.upcoming() is None or stream.held >= MAX_HOLD_STEPS:
        return False
    length = due[index].codes.shape[1]
    for other_index, other in streams.items():
        upcoming = other.upcoming() if other_index not in due else None
        if upcoming is not None and 0 < upcoming[0] <= MAX_HOLD_STEPS - stream.held and upcoming[1] == length:
            stream.held += 1
            return True
    return False


def _batched(timer, stage: str, group: list[int], results: list, fn) -> dict:
    """fn(group) -> one output per item, timed; if it fails, each item alone (its failure its own)."""
    start = time.perf_counter()
    try:
        outputs = dict(zip(group, fn(group)))
    except Exception:
        outputs = {}
        for i in group:
            if (output := _guard(results, i, lambda i=i: fn([i])[0])) is not None:
                outputs[i] = output
    if timer is not None:
        timer(stage, len(group), time.perf_counter() - start)
    return outputs


def _guard(results: list, index: int, fn, *args, **kwargs):
    """fn(...), or None with the exception put in results[index]."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        results[index] = exc
        return None


def _sample_many(group: list[tuple[StreamingToken2Wav, DitWindow]]) -> list[torch.Tensor]:
    """Same-length DiT windows of several replies through one batched ODE. -> each one's mel [1, 80, 2N]."""
    if len(group) == 1:
        stream, window = group[0]
        return [stream.sample(window)]
    first = group[0][0]
    streams, windows = [stream for stream, _ in group], [window for _, window in group]
    speaker_code = torch.cat([s.speaker_code[:1] for s in streams] + [s.speaker_code[1:] for s in streams])
    mel = dit_sample(first.dit, torch.cat([w.codes for w in windows]), torch.cat([s.conditioning for s in streams]),
                     None, torch.cat([w.noise for w in windows]), steps=first.config.ode_steps,
                     guidance_scale=first.config.guidance_scale, sway=first.config.sway_coefficient,
                     speaker_code=speaker_code)
    return list(mel.split(1))


def _same_shape(indices, size) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for index in indices:
        groups.setdefault(size(index), []).append(index)
    return list(groups.values())
