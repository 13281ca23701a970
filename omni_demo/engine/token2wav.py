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

import numpy as np
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

from omni_demo.config import MEL_FRAMES_PER_CODE, StreamingConfig

HOP = 240  # samples per mel frame


class DiTVelocity:
    """The DiT's velocity field over one window, for the ODE solver.

    Runs the same modules and ops as `Qwen2_5OmniToken2WavDiTModel.forward` with classifier-free
    guidance batched as 2 (so results are bit-identical), but computes once per window what
    upstream recomputes on every one of its 36 evaluations: the ECAPA speaker encoding (pass it in
    to share it across windows), the code embeddings, the rotary tables and the block masks.
    """

    def __init__(self, dit, codes, conditioning, reference_mel, *, guidance_scale=0.5, speaker_code=None):
        # codes [1, N]; conditioning [1, enc_emb_dim]; reference_mel [1, T, 80]
        self.dit = dit
        self.guidance_scale = guidance_scale
        frames = codes.shape[1] * dit.repeats
        if speaker_code is None:
            speaker_code = encode_speaker(dit, reference_mel)
        code_embed = torch.cat([dit.text_embed(codes), dit.text_embed(codes, drop_code=True)], dim=0)
        speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)
        speaker = torch.cat([speaker, torch.zeros_like(speaker)], dim=0)
        # Everything the input projection sees besides the noisy mel: [2, F, enc_dim + emb_dim + enc_emb_dim]
        self.condition = torch.cat([speaker_code.unsqueeze(1).repeat(1, frames, 1), code_embed, speaker], dim=-1)
        positions = torch.arange(frames, device=codes.device)[None, :].repeat(2, 1)
        self.rotary = dit.rotary_embed(self.condition, positions)
        block = torch.arange(frames, device=codes.device) // dit.block_size
        block_diff = (block[None, :] - block[:, None]).expand(2, dit.num_attention_heads, frames, frames)
        self.masks = [
            (block_diff >= -float(layer.look_backward_block)) & (block_diff <= float(layer.look_ahead_block))
            for layer in dit.transformer_blocks
        ]

    def __call__(self, time_step, state):
        """state [1, F, 80] -> guided velocity [1, F, 80]."""
        dit = self.dit
        time = dit.time_embed(time_step.repeat(2))
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

    codes [1, N] long, conditioning [1, enc_emb_dim], reference_mel [1, T, 80],
    noise [1, 2N, 80] -> mel [1, 80, 2N].
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

    def _next_chunk_end(self) -> int:
        config = self.config
        if self.chunks == 0:
            return config.first_chunk_codes
        return self.decoded_codes + min(config.chunk_codes * 2 ** (self.chunks - 1), config.max_chunk_codes)

    def push(self, codes: list[int]) -> np.ndarray:
        if len(self.codes) + len(codes) > self.noise.shape[1] // MEL_FRAMES_PER_CODE:
            raise ValueError(f"more than max_codes={self.noise.shape[1] // MEL_FRAMES_PER_CODE} codec tokens")
        self.codes.extend(codes)
        while True:
            end = self._next_chunk_end()
            config = self.config
            lookahead = config.first_chunk_future_codes if self.chunks == 0 else config.future_context_codes
            if len(self.codes) < end + lookahead:
                break
            self._decode_chunk(end)
        return self._vocode(final=False)

    def flush(self) -> np.ndarray:
        while self.decoded_codes < len(self.codes):
            self._decode_chunk(min(self._next_chunk_end(), len(self.codes)))
        return self._vocode(final=True)

    def _decode_chunk(self, end: int) -> None:
        """Make the mel of codes [decoded_codes, end) final."""
        start = self.decoded_codes
        window_start = max(0, start - self.config.past_context_codes) // self.block_codes * self.block_codes
        window_end = min(len(self.codes), end + self.config.future_context_codes)
        codes = torch.tensor([self.codes[window_start:window_end]], device=self.device)
        noise = self.noise[:, window_start * MEL_FRAMES_PER_CODE : window_end * MEL_FRAMES_PER_CODE]
        mel = dit_sample(
            self.dit,
            codes,
            self.conditioning,
            self.reference_mel,
            noise,
            steps=self.config.ode_steps,
            guidance_scale=self.config.guidance_scale,
            sway=self.config.sway_coefficient,
            speaker_code=self.speaker_code,
        )
        keep = slice((start - window_start) * MEL_FRAMES_PER_CODE, (end - window_start) * MEL_FRAMES_PER_CODE)
        self.mel = torch.cat([self.mel, mel[:, :, keep]], dim=2)
        self.decoded_codes = end
        self.chunks += 1

    def _vocode(self, *, final: bool) -> np.ndarray:
        """Emit samples for final frames, holding back `vocoder_context_frames` unless final."""
        total = self.mel.shape[2]
        stop = total if final else total - self.config.vocoder_context_frames
        if stop <= self.vocoded_frames:
            return np.zeros(0, dtype=np.float32)
        begin = max(0, self.vocoded_frames - self.config.vocoder_context_frames)
        wave = vocode(self.bigvgan, self.mel[:, :, begin:])
        samples = wave[(self.vocoded_frames - begin) * HOP : (stop - begin) * HOP].cpu().numpy()
        self.vocoded_frames = stop
        return samples
