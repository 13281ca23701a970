"""Build a seeded, random-weight Qwen2.5-Omni checkpoint that loads like the real one.

    python -m omni_demo.models.tiny DIR                          # toy widths, ~6 MB
    python -m omni_demo.models.tiny DIR --shape 7b --layers 2    # the 7B's real widths, 2 layers per stack

Every sub-model (audio encoder, vision encoder, thinker, talker, DiT, BigVGAN) keeps the real
architecture, so `from_pretrained` and the processor take exactly the code path of
`Qwen/Qwen2.5-Omni-7B`. `--shape tiny` shrinks every width (fast, but it hides shape bugs);
`--shape 7b` / `3b` keep every width, head count, head_dim, mRoPE section, vocabulary, DiT and
BigVGAN geometry and special-token id of the real model and only have fewer layers. Replies are
nonsense by construction.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_SEED = 1234
# Bump when the checkpoint's contents change, so cached copies are rebuilt.
TINY_VERSION = 1
SHAPES_VERSION = 1  # likewise for the real-shape (7b, 3b) checkpoints
SHAPES = ("tiny", "7b", "3b")
DEFAULT_LAYERS = 2  # per stack, for the real-shape checkpoints

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


def _tokenizer(first_special_id: int = BPE_VOCAB_SIZE):
    """Byte-level BPE trained on TRAINING_TEXT, then Qwen's special tokens from `first_special_id`
    on. Above BPE_VOCAB_SIZE the vocabulary is padded with filler words up to that id."""
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
    if first_special_id > BPE_VOCAB_SIZE:
        _pad_vocabulary(bpe, first_special_id)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    assert bpe.token_to_id("<|endoftext|>") == first_special_id, "BPE vocabulary came out short"
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


def _pad_vocabulary(bpe, size: int) -> None:
    """Grow the trained BPE's vocabulary to `size` ids with filler words (" bako", " mitelu", ...):
    no merge produces them, so encoding is unchanged, and a random thinker's ids decode to words."""
    from tokenizers import models

    model = json.loads(bpe.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(merge) for merge in model["merges"]]
    if len(vocab) != BPE_VOCAB_SIZE:
        raise ValueError(f"trained vocabulary has {len(vocab)} tokens, not {BPE_VOCAB_SIZE}")
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    number = 0
    while len(vocab) < size:
        word, n = "", number
        while True:  # number in base len(syllables), at least two syllables
            word, n = syllables[n % len(syllables)] + word, n // len(syllables)
            if not n and len(word) >= 4:
                break
        number += 1
        vocab.setdefault("\u0120" + word, len(vocab))  # \u0120 is byte-level BPE's space
    bpe.model = models.BPE(vocab=vocab, merges=merges)


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
    """A Qwen2_5OmniConfig at toy widths, consistent where the model code requires it (mRoPE
    sections summing to head_dim / 2). What toy widths hide (heads x head_dim == hidden, one
    head_dim everywhere, a DiT codebook as large as the talker's vocabulary) the real-shape
    checkpoints of `shape_config` do not."""
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
    token2wav = _tiny_token2wav(std)
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=token2wav)


def _tiny_token2wav(std: float) -> dict:
    """Token2Wav at toy widths: a 4-layer DiT (blocks of 24 mel frames, one look-back and one
    look-ahead layer, as the real one has) and a BigVGAN whose upsampling makes 240 samples per frame."""
    return dict(
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


def _mrope(*section: int) -> dict:
    return {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": list(section)}


# transformers 5.23 documents `Qwen2_5OmniConfig()` as the 7B, but three widths and a layer count
# differ from the published Qwen/Qwen2.5-Omni-7B config.json: the vision tower is Qwen2.5-VL's, 1280 wide
# (`embed_dim`/`hidden_size` 1280; 3584 is only its merger's output), and the talker is 896 wide
# with 12 heads of head_dim 128 (q_proj 896 -> 1536) and 24 layers, not 3584 / 28 / 28.
# mrope_section is written out as the real config has it (the code falls back to [16, 24, 24]), and
# so is the thinker's <|vision_bos|> id, which its position code needs and the defaults lack.
REAL_7B = {
    "thinker_config": {
        "vision_start_token_id": 151652,
        "text_config": {"rope_parameters": _mrope(16, 24, 24)},
        "vision_config": {"hidden_size": 1280},
    },
    "talker_config": {"hidden_size": 896, "num_attention_heads": 12, "num_hidden_layers": 24,
                      "rope_parameters": _mrope(16, 24, 24)},
}

# Qwen/Qwen2.5-Omni-3B's config.json (huggingface.co/Qwen/Qwen2.5-Omni-3B), as changes to the 7B:
# a 2048-wide thinker (16 heads, 2 KV heads, head_dim 128) with its 151936-token vocabulary, and a
# talker of 14 heads of head_dim 64 whose mRoPE covers two axes. Audio encoder, vision tower (but
# their output width), DiT, BigVGAN and every special-token id are the 7B's. The hub is out of
# reach here; these numbers were read from ports that copy that file (an xtuner-style
# Qwen2_5Omni3BConfig, an MLX port, AXERA's 3B export with its 2048 -> 896 talker projection).
REAL_3B = {
    "thinker_config": {
        "text_config": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2},
        "audio_config": {"output_dim": 2048},
        "vision_config": {"out_hidden_size": 2048},
    },
    "talker_config": {"embedding_size": 2048, "intermediate_size": 4864, "num_attention_heads": 14,
                      "num_key_value_heads": 2, "head_dim": 64, "rope_parameters": _mrope(16, 16, 0)},
}


def _merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` written over it, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and key in out else copy.deepcopy(value)
    return out


def _config(changes: dict):
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(**copy.deepcopy(changes))


def _real_changes(shape: str) -> dict:
    if shape not in ("7b", "3b"):
        raise ValueError(f"shape must be one of {SHAPES[1:]}, not {shape!r}")
    return REAL_7B if shape == "7b" else _merged(REAL_7B, REAL_3B)


def real_config(shape: str = "7b"):
    """The published architecture of Qwen2.5-Omni-7B or -3B at full depth (random-init sizes)."""
    return _config(_real_changes(shape))


def _remap_layers(indexes, real_count: int, count: int) -> list[int]:
    """Layer indexes placed at the same relative depth in a stack of `count` layers."""
    return sorted({round(i * (count - 1) / (real_count - 1)) for i in indexes})


def _layer_changes(real, layers: int) -> dict:
    """Every stack cut to `layers` layers; layer-index lists kept in range and every kind kept."""
    vision = real.thinker_config.vision_config
    dit = real.token2wav_config.dit_config
    # Vision: full attention in every 8th block (7, 15, 23, 31); fewer blocks keep their last one full.
    full_attention = [i for i in vision.fullatt_block_indexes if i < layers] or [layers - 1]
    # DiT: look-back layers (0, 20) and a look-ahead layer (10) at the same relative depths.
    ahead = _remap_layers(dit.look_ahead_layers, dit.num_hidden_layers, layers)
    backward = [i for i in _remap_layers(dit.look_backward_layers, dit.num_hidden_layers, layers) if i not in ahead]
    return {
        "thinker_config": {
            "text_config": {"num_hidden_layers": layers},
            "audio_config": {"encoder_layers": layers},
            "vision_config": {"depth": layers, "fullatt_block_indexes": full_attention},
        },
        "talker_config": {"num_hidden_layers": layers},
        "token2wav_config": {"dit_config": {"num_hidden_layers": layers, "look_ahead_layers": ahead,
                                            "look_backward_layers": backward}},
    }


# The one change besides layer counts: the thinker's lm_head shares its embedding's weight (the
# real checkpoints keep a separate [vocab, hidden] lm_head). Same shapes, but it saves 2.2 GB of
# the 7B's float32 memory (545M parameters) and half as much on disk.
TIED_THINKER = {"thinker_config": {"tie_word_embeddings": True}}


def shape_config(shape: str, layers: int = DEFAULT_LAYERS):
    """The real `shape` (7b, 3b) with `layers` layers in every stack: audio encoder, vision tower,
    thinker, talker and DiT."""
    if layers < 2:
        raise ValueError("layers must be at least 2 (windowed and full-attention vision blocks, "
                         "look-back and look-ahead DiT layers)")
    changes = _merged(_real_changes(shape), _layer_changes(real_config(shape), layers))
    return _config(_merged(changes, TIED_THINKER))


def special_token_ids(config) -> dict[str, int]:
    """Qwen's special tokens at the config's ids. They are consecutive in SPECIAL_TOKENS order, so
    the config's <|AUDIO|> id fixes them all; every other id the config names is checked."""
    thinker, talker = config.thinker_config, config.talker_config
    first = thinker.audio_token_index - SPECIAL_TOKENS.index("<|AUDIO|>")
    ids = {name: first + index for index, name in enumerate(SPECIAL_TOKENS)}
    named = {
        "<|IMAGE|>": [thinker.image_token_index, talker.image_token_index],
        "<|VIDEO|>": [thinker.video_token_index, talker.video_token_index],
        "<|AUDIO|>": [talker.audio_token_index],
        "<|audio_bos|>": [thinker.audio_start_token_id, talker.audio_start_token_id],
        "<|audio_eos|>": [thinker.audio_end_token_id, talker.audio_end_token_id],
        "<|vision_bos|>": [thinker.vision_start_token_id, talker.vision_start_token_id],
        "<|vision_eos|>": [talker.vision_end_token_id],
    }
    for name, values in named.items():
        if any(value != ids[name] for value in values):
            raise ValueError(f"the config puts {name} at {values}, not at {ids[name]} as Qwen's order implies")
    return ids


def _speakers(config, bos: dict[str, int], frames: int) -> dict:
    import torch

    dit = config.token2wav_config.dit_config
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    speakers = {}
    for name, bos_token in bos.items():
        speakers[name] = {
            "bos_token": bos_token,
            "cond": torch.randn(1, dit.enc_emb_dim, generator=generator),  # [1, enc_emb_dim]
            "ref_mel": torch.randn(1, frames, dit.mel_dim, generator=generator),  # [1, frames, 80]
        }
    return speakers


def _silence_uncoded_ids(model) -> None:
    """Zero the talker's codec_head rows for ids the DiT cannot embed (its codebook is ids
    0..num_embeds, 8193; the talker's vocabulary runs to 8447). A trained talker never emits them
    and a random one would, and nothing downstream guards against it: token2wav fails with
    "IndexError: index out of range". A zero row's logit (0) never wins over ~8000 random ones
    (std ~0.6). The talker's end ids stay live."""
    import torch

    talker, dit = model.talker, model.config.token2wav_config.dit_config
    keep = {talker.codec_pad_token, talker.codec_eos_token}
    rows = [i for i in range(dit.num_embeds + 1, talker.codec_head.out_features) if i not in keep]
    with torch.no_grad():
        talker.codec_head.weight[rows] = 0


def build_checkpoint(out_dir: str | os.PathLike, shape: str = "tiny", layers: int = DEFAULT_LAYERS) -> Path:
    """Write the checkpoint to `out_dir` (created); same bytes for the same transformers version.
    `layers` applies to the real shapes only (the tiny one has its own)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5OmniForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TINY_SEED)
    if shape == "tiny":
        config = tiny_config()
        special = {name: _token_id(name) for name in SPECIAL_TOKENS}
        speaker_bos, ref_frames, marker = SPEAKER_BOS, 120, {"version": TINY_VERSION, "seed": TINY_SEED}
        model = Qwen2_5OmniForConditionalGeneration(config)
    else:
        config = shape_config(shape, layers)
        special = special_token_ids(config)
        # The speakers' text bos ids sit in the thinker's vocabulary past the tokenizer's, after
        # the talker's tts text pad/start/end ids, as the tiny checkpoint's do.
        after_tts = config.talker_config.tts_text_end_token_id + 1
        speaker_bos = {name: after_tts + index for index, name in enumerate(SPEAKER_BOS)}
        ref_frames = 300
        marker = {"version": SHAPES_VERSION, "seed": TINY_SEED, "shape": shape, "layers": layers}
        # Built and saved in bfloat16: half the memory and disk; loads in any dtype. Token2wav too
        # (transformers keeps it float32): a float32 load then copies every tensor and unmaps the
        # file, instead of keeping its 2.9 GB of bfloat16 pages resident for a few float32 views.
        model = Qwen2_5OmniForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.to(torch.bfloat16)
        _silence_uncoded_ids(model)
    model.eval()
    # Random weights never reach a stop token on their own; callers bound every length.
    model.generation_config = GenerationConfig(
        eos_token_id=[special["<|im_end|>"], special["<|endoftext|>"]],
        pad_token_id=special["<|endoftext|>"],
    )
    model.save_pretrained(out)
    del model
    torch.save(_speakers(config, speaker_bos, ref_frames), out / "spk_dict.pt")
    _processor(_tokenizer(special["<|endoftext|>"])).save_pretrained(out)
    (out / "tiny.json").write_text(json.dumps(marker))
    return out


def cache_dir(shape: str = "tiny", layers: int = DEFAULT_LAYERS) -> Path:
    root = Path(os.environ.get("OMNI_DEMO_CACHE") or Path.home() / ".cache" / "omni-demo")
    if shape == "tiny":
        return root / f"tiny-v{TINY_VERSION}"
    return root / f"{shape}-l{layers}-v{SHAPES_VERSION}"


def ensure_checkpoint(shape: str = "tiny", layers: int = DEFAULT_LAYERS) -> Path:
    """Build the checkpoint into the cache once (atomically), then reuse it."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    target = cache_dir(shape, layers)
    marker = target / "tiny.json"
    if marker.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{shape}-", dir=target.parent))
    if shape == "tiny":
        build_checkpoint(staging, shape, layers)
    else:  # in a child process: the caller keeps none of the build's ~4 GB of freed heap
        command = [sys.executable, "-m", "omni_demo.models.tiny", str(staging), "--shape", shape, "--layers", str(layers)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[2])
    try:
        staging.rename(target)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_checkpoint() -> Path:
    return ensure_checkpoint("tiny")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny: toy widths; 7b, 3b: the real model's widths with fewer layers")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                        help=f"layers per stack for 7b/3b (default {DEFAULT_LAYERS}, at least 2)")
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error("--layers must be at least 2")
    start = time.perf_counter()
    out = build_checkpoint(args.out_dir, args.shape, args.layers)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    what = "tiny" if args.shape == "tiny" else f"{args.shape}-shape, {args.layers}-layer"
    print(f"wrote {what} Qwen2.5-Omni checkpoint to {out} ({size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
