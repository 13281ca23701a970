"""Build a tiny, seeded, random-weight Qwen2.5-Omni checkpoint that loads like the real one.

    python -m omni_demo.tiny DIR

Every sub-model (audio encoder, vision encoder, thinker, talker, DiT, BigVGAN) keeps the real
architecture at toy sizes, so `from_pretrained` and the processor take exactly the code path of
`Qwen/Qwen2.5-Omni-7B`. Its replies are nonsense by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

TINY_SEED = 1234
# Bump when the checkpoint's contents change, so cached copies are rebuilt.
TINY_VERSION = 1

# Qwen's special tokens, in Qwen's order (ids follow the byte-level BPE vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
    "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
BPE_VOCAB_SIZE = 480
# The thinker embeds a few ids that the tokenizer never emits (as the real model does above
# 151664): the talker's text bos/eos/pad and the speakers' bos tokens.
TEXT_VOCAB_SIZE = 512
TTS_TEXT_PAD, TTS_TEXT_START, TTS_TEXT_END = 505, 506, 507
SPEAKER_BOS = {"Chelsie": 508, "Ethan": 509}

# The real model's chat template (chat_template.json of Qwen/Qwen2.5-Omni-7B).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech.",
    "You are a helpful assistant.",
    "Hello! What can you see in this picture? Describe the image and the sound.",
    "What is the person in the video drawing? Please answer in a cheerful voice.",
    "The quick brown fox jumps over the lazy dog. 0123456789, ?!.:;'\"()-",
    "Tell me a short story about a robot who learns to sing.",
]


def _token_id(name: str) -> int:
    return BPE_VOCAB_SIZE + SPECIAL_TOKENS.index(name)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    assert bpe.token_to_id("<|endoftext|>") == BPE_VOCAB_SIZE, "BPE vocabulary came out short"
    return Qwen2TokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|IMAGE|>",
            "audio_token": "<|AUDIO|>",
            "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
    )


def _processor(tokenizer):
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, chunk_length=300),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config():
    """A Qwen2_5OmniConfig at toy sizes; constraints are listed in shared NOTES.md."""
    from transformers import Qwen2_5OmniConfig

    std = 0.1  # at 0.02 every prompt got the same reply
    special = {name: _token_id(name) for name in SPECIAL_TOKENS}
    mm_ids = dict(
        audio_token_index=special["<|AUDIO|>"],
        image_token_index=special["<|IMAGE|>"],
        video_token_index=special["<|VIDEO|>"],
        audio_start_token_id=special["<|audio_bos|>"],
        audio_end_token_id=special["<|audio_eos|>"],
    )
    text = dict(
        vocab_size=TEXT_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        initializer_range=std, eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
    )
    thinker = dict(
        **mm_ids,
        vision_start_token_id=special["<|vision_bos|>"],
        text_config=text,
        audio_config=dict(
            num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
            d_model=32, output_dim=64, n_window=100, max_source_positions=1500, initializer_range=std,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
            fullatt_block_indexes=[1], initializer_range=std,
        ),
        initializer_range=std,
    )
    talker = dict(
        **mm_ids,
        vision_start_token_id=special["<|vision_bos|>"],
        vision_end_token_id=special["<|vision_eos|>"],
        vocab_size=8448, embedding_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        tts_text_start_token_id=TTS_TEXT_START, tts_text_end_token_id=TTS_TEXT_END,
        tts_text_pad_token_id=TTS_TEXT_PAD, initializer_range=std,
    )
    token2wav = dict(
        dit_config=dict(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, head_dim=16, ff_mult=2,
            emb_dim=16, enc_emb_dim=16, enc_dim=16, enc_channels=[32, 32, 32, 64],
            enc_kernel_sizes=[5, 3, 3, 1], enc_dilations=[1, 2, 3, 1], enc_attention_channels=16,
            enc_se_channels=16, num_embeds=8448, mel_dim=80, block_size=24, repeats=2,
            look_backward_layers=[0, 3], look_ahead_layers=[2], max_position_embeddings=32768,
            initializer_range=std,
        ),
        bigvgan_config=dict(
            mel_dim=80, upsample_initial_channel=64, upsample_rates=[8, 5, 6],
            upsample_kernel_sizes=[16, 11, 12], resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], initializer_range=std,
        ),
    )
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def _speakers(config) -> dict:
    import torch

    dit = config.token2wav_config.dit_config
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    speakers = {}
    for name, bos in SPEAKER_BOS.items():
        speakers[name] = {
            "bos_token": bos,
            "cond": torch.randn(1, dit.enc_emb_dim, generator=generator),  # [1, enc_emb_dim]
            "ref_mel": torch.randn(1, 120, dit.mel_dim, generator=generator),  # [1, frames, 80]
        }
    return speakers


def build_tiny_checkpoint(out_dir: str | os.PathLike) -> Path:
    """Write the checkpoint to `out_dir` (created); same bytes for the same transformers version."""
    import torch
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    torch.manual_seed(TINY_SEED)
    model = Qwen2_5OmniForConditionalGeneration(config).eval()
    # Random weights never reach a stop token on their own; callers bound every length.
    model.generation_config = GenerationConfig(
        eos_token_id=[_token_id("<|im_end|>"), _token_id("<|endoftext|>")],
        pad_token_id=_token_id("<|endoftext|>"),
    )
    model.save_pretrained(out)
    torch.save(_speakers(config), out / "spk_dict.pt")
    _processor(_tokenizer()).save_pretrained(out)
    (out / "tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": TINY_SEED}))
    return out


def tiny_cache_dir() -> Path:
    root = os.environ.get("OMNI_DEMO_CACHE") or Path.home() / ".cache" / "omni-demo"
    return Path(root) / f"tiny-v{TINY_VERSION}"


def ensure_tiny_checkpoint() -> Path:
    """Build the tiny checkpoint into the cache once (atomically), then reuse it."""
    target = tiny_cache_dir()
    marker = target / "tiny.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=target.parent))
    build_tiny_checkpoint(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    args = parser.parse_args(argv)
    out = build_tiny_checkpoint(args.out_dir)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote tiny Qwen2.5-Omni checkpoint to {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
