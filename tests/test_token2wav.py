"""The chunked Token2Wav against its one-shot twin, and its sample accounting at the seams."""

import numpy as np
import pytest
import torch

from omni_demo.config import StreamingConfig
from omni_demo.engine.token2wav import HOP, DiTVelocity, StreamingToken2Wav, dit_sample, vocode

WHOLE_CONTEXT = StreamingConfig(past_context_codes=10**6, future_context_codes=10**6, first_chunk_future_codes=10**6)


@pytest.fixture(scope="module")
def parts(loaded):
    t2w = loaded.model.token2wav
    speaker = loaded.model.speaker_map["Chelsie"]
    return t2w, speaker, speaker["cond"].float(), speaker["ref_mel"].float()


def codes_of(n, seed=0):
    return torch.randint(0, 8192, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def stream(streaming, codes, step=7):
    """Push codes a few at a time, as the talker would; returns every piece emitted, flush last."""
    pieces = [streaming.push(codes[i : i + step]) for i in range(0, len(codes), step)]
    return pieces + [streaming.flush()]


def test_velocity_and_sampler_are_bit_identical_to_upstream(parts):
    t2w, _, cond, ref = parts
    dit = t2w.code2wav_dit_model
    codes = torch.tensor([codes_of(41)])
    state, time_step = torch.randn(1, 82, 80), torch.tensor(0.37)
    with torch.no_grad():
        out = dit(hidden_states=state, quantized_code=codes, speaker_embedding=cond.unsqueeze(1).repeat(1, 82, 1),
                  condition_vector=ref, time_step=time_step, apply_cfg=True)
    guided, null = out.chunk(2)
    assert torch.equal(DiTVelocity(dit, codes, cond, ref)(time_step, state), guided + (guided - null) * 0.5)
    torch.manual_seed(11)
    upstream = dit.sample(cond, ref, codes)
    torch.manual_seed(11)
    assert torch.equal(dit_sample(dit, codes, cond, ref, torch.randn(1, 82, 80)), upstream)


def test_chunked_dit_with_whole_context_equals_one_shot_exactly(parts):
    t2w, speaker, cond, ref = parts
    codes = codes_of(130)
    streaming = StreamingToken2Wav(t2w, speaker, WHOLE_CONTEXT, max_codes=200, seed=5)
    stream(streaming, codes)
    assert streaming.chunks >= 4
    one_shot = dit_sample(t2w.code2wav_dit_model, torch.tensor([codes]), cond, ref, streaming.noise[:, :260])
    assert torch.equal(streaming.mel, one_shot)


def receptive_field_frames(bigvgan, frames=201) -> int:
    """How many mel frames either side of a frame change the vocoder's output (measured)."""
    mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(0)) * 2 - 5
    bumped = mel.clone()
    bumped[:, :, frames // 2] += 1.0
    changed = torch.nonzero(vocode(bigvgan, mel) != vocode(bigvgan, bumped)).flatten()
    return int(max(frames // 2 - changed.min() // HOP, changed.max() // HOP - frames // 2))


def test_chunked_vocoder_equals_one_shot_bigvgan(parts):
    t2w, speaker, _, _ = parts
    config = StreamingConfig()
    assert receptive_field_frames(t2w.code2wav_bigvgan_model) < config.vocoder_context_frames
    streaming = StreamingToken2Wav(t2w, speaker, config, max_codes=300, seed=1)
    pieces = stream(streaming, codes_of(250))
    streamed = np.concatenate(pieces)
    one_shot = vocode(t2w.code2wav_bigvgan_model, streaming.mel).numpy()
    assert streamed.shape == one_shot.shape
    # float32 convolutions block differently for different lengths: ~5e-5 apart on a +-1 waveform,
    # anywhere in a chunk, not just at seams.
    np.testing.assert_allclose(streamed, one_shot, atol=1e-4, rtol=0)


def test_production_context_error_is_measured(parts, record_property):
    """With the production context, chunked DiT approximates the one-shot decode; report how well."""
    t2w, speaker, cond, ref = parts
    codes = codes_of(300)
    streaming = StreamingToken2Wav(t2w, speaker, StreamingConfig(), max_codes=300, seed=2)
    wave = np.concatenate(stream(streaming, codes))
    one_shot_mel = dit_sample(t2w.code2wav_dit_model, torch.tensor([codes]), cond, ref, streaming.noise)
    one_shot_wave = vocode(t2w.code2wav_bigvgan_model, one_shot_mel).numpy()
    mel_error = ((streaming.mel - one_shot_mel).norm() / one_shot_mel.norm()).item()
    snr_db = 10 * np.log10(np.sum(one_shot_wave**2) / np.sum((wave - one_shot_wave) ** 2))
    record_property("mel_relative_error", mel_error)
    record_property("waveform_snr_db", snr_db)
    print(f"production context vs one-shot: mel relative error {mel_error:.4f}, waveform SNR {snr_db:.1f} dB")
    assert 0 < mel_error < 0.5 and np.isfinite(snr_db)


@pytest.mark.parametrize("n", [1, 5, 23, 24, 25, 100, 501])
def test_every_code_yields_exactly_480_samples(parts, n):
    t2w, speaker, _, _ = parts
    streaming = StreamingToken2Wav(t2w, speaker, StreamingConfig(), max_codes=n, seed=0)
    pieces = stream(streaming, codes_of(n, seed=n))
    assert sum(len(p) for p in pieces) == 480 * n
    assert streaming.mel.shape[2] * HOP == 480 * n
    assert all(np.isfinite(p).all() and np.abs(p).max(initial=0) <= 1 for p in pieces)


def test_first_audio_once_24_codes_exist_then_chunks_of_half_to_one_second(parts):
    t2w, speaker, _, _ = parts
    config = StreamingConfig()
    streaming = StreamingToken2Wav(t2w, speaker, config, max_codes=400, seed=0)
    codes = codes_of(400)
    assert len(streaming.push(codes[:23])) == 0
    first = streaming.push(codes[23:24])
    assert len(first) > 0, "the first chunk must come out at 24 codes"
    sizes = [len(streaming.push([code])) for code in codes[24:]]
    later = [size / 24000 for size in sizes if size]
    assert len(later) >= 5
    assert all(0.5 <= seconds <= 1.0 for seconds in later), later


def test_short_replies_still_get_audio(parts):
    t2w, speaker, _, _ = parts
    streaming = StreamingToken2Wav(t2w, speaker, StreamingConfig(), max_codes=10, seed=0)
    assert len(streaming.push([5, 6, 7])) == 0
    assert len(streaming.flush()) == 3 * 480


def test_too_many_codes_is_an_error(parts):
    t2w, speaker, _, _ = parts
    streaming = StreamingToken2Wav(t2w, speaker, StreamingConfig(), max_codes=4, seed=0)
    with pytest.raises(ValueError, match="max_codes=4"):
        streaming.push([1, 2, 3, 4, 5])


def test_push_many_batches_chunks_that_come_due_a_few_codes_apart(parts):
    """Two replies a few codes apart: after their first chunks, a due chunk waits (at most
    MAX_HOLD_STEPS codes) for the other's window of the same length, and they run as one DiT batch
    and one BigVGAN batch. Their samples are those of each stream alone, up to a batched matmul's
    rounding; the first chunk (whose window would grow while it waits) never waits."""
    from omni_demo.engine.token2wav import push_many

    t2w, speaker, _, _ = parts
    config, codes = StreamingConfig(), codes_of(160)
    alone = [np.concatenate(stream(StreamingToken2Wav(t2w, speaker, config, max_codes=200, seed=s), codes, step=1))
             for s in (1, 2)]
    pair = [StreamingToken2Wav(t2w, speaker, config, max_codes=200, seed=s) for s in (1, 2)]
    batches, got = [], [[], []]
    lag = 2  # the second reply is two codes behind the first
    for step in range(len(codes) + lag):
        items = [(s, [codes[n]] if 0 <= n < len(codes) else [], n == len(codes) - 1)
                 for s, n in ((pair[0], step), (pair[1], step - lag)) if 0 <= n < len(codes)]
        new = push_many(items, timer=lambda stage, batch, _: batches.append((stage, batch)))
        for (s, _, _), samples in zip(items, new):
            got[pair.index(s)].append(samples)
    assert ("dit", 2) in batches and ("bigvgan", 2) in batches
    for ours, theirs in zip(got, alone):
        ours = np.concatenate(ours)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=2e-4)
