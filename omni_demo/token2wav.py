"""Token2Wav, chunk by chunk: codec tokens -> DiT mel windows -> BigVGAN -> 24 kHz samples.

Geometry (1 codec token = 2 mel frames = 480 samples; DiT block = 24 frames = 12 codes):
- Chunks are runs of codes. The first chunk is decoded as soon as `first_chunk_codes` exist,
  without look-ahead (it buys the first audio ~0.25 s of talker time); each later chunk once
  `future_context_codes` more than its end exist, or the reply has ended.
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

from .config import MEL_FRAMES_PER_CODE, StreamingConfig

HOP = 240  # samples per mel frame


@torch.no_grad()
def dit_sample(dit, codes, conditioning, reference_mel, noise, *, steps=10, guidance_scale=0.5, sway=-1.0):
    """Upstream `Qwen2_5OmniToken2WavDiTModel.sample`, with the initial noise passed in.

    codes [1, N] long, conditioning [1, enc_emb_dim], reference_mel [1, T, 80],
    noise [1, 2N, 80] -> mel [1, 80, 2N].
    """
    frames = noise.shape[1]
    speaker = conditioning.unsqueeze(1).repeat(1, frames, 1)

    def velocity(time_step, state):
        out = dit(
            hidden_states=state,
            quantized_code=codes,
            speaker_embedding=speaker,
            condition_vector=reference_mel,
            time_step=time_step,
            apply_cfg=True,  # conditioned and unconditioned halves in one batch of 2
        )
        guided, null = torch.chunk(out, 2, dim=0)
        return guided + (guided - null) * guidance_scale

    times = torch.linspace(0, 1, steps, device=codes.device, dtype=speaker.dtype)
    times += sway * (torch.cos(torch.pi / 2 * times) - 1 + times)
    trajectory = RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(times)
    return trajectory[-1].permute(0, 2, 1)


@torch.no_grad()
def vocode(bigvgan, mel) -> torch.Tensor:
    """mel [1, 80, F] -> [F * 240] float32 samples on the CPU."""
    return bigvgan(mel).reshape(-1).float()


class StreamingToken2Wav:
    """Stateful chunked decoder: `push` codes as they arrive, `flush` at the end of the reply.

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
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        frames = max_codes * MEL_FRAMES_PER_CODE
        self.noise = torch.randn(1, frames, self.dit.config.mel_dim, generator=generator).to(device)  # [1, F, 80]
        self.codes: list[int] = []
        self.decoded_codes = 0  # codes whose mel is final
        self.mel = torch.empty(1, self.dit.config.mel_dim, 0, device=device)  # [1, 80, final frames]
        self.vocoded_frames = 0  # frames whose samples were emitted
        self.samples_emitted = 0

    def _next_chunk_end(self) -> int:
        size = self.config.first_chunk_codes if self.decoded_codes == 0 else self.config.chunk_codes
        return self.decoded_codes + size

    def push(self, codes: list[int]) -> np.ndarray:
        if len(self.codes) + len(codes) > self.noise.shape[1] // MEL_FRAMES_PER_CODE:
            raise ValueError(f"more than max_codes={self.noise.shape[1] // MEL_FRAMES_PER_CODE} codec tokens")
        self.codes.extend(codes)
        while True:
            end = self._next_chunk_end()
            lookahead = 0 if self.decoded_codes == 0 else self.config.future_context_codes
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
        )
        keep = slice((start - window_start) * MEL_FRAMES_PER_CODE, (end - window_start) * MEL_FRAMES_PER_CODE)
        self.mel = torch.cat([self.mel, mel[:, :, keep]], dim=2)
        self.decoded_codes = end

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
        self.samples_emitted += len(samples)
        return samples
