"""Load the Qwen2.5-Omni processor and model from a hub id, a local directory, "tiny", or
"tiny-7b" / "tiny-3b" (the real widths with 2 layers per stack; "tiny-7b-l4" for 4)."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from omni_demo.config import TINY_MODEL, ModelConfig
from omni_demo.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: "torch.nn.Module"  # Qwen2_5OmniForConditionalGeneration, eval mode, on `device`
    processor: object  # Qwen2_5OmniProcessor
    name: str  # what the user asked for ("tiny", a hub id, or a directory)
    path: str  # what was loaded from
    device: torch.device
    dtype: torch.dtype  # thinker and talker; token2wav always runs in float32
    attn: str
    is_random: bool  # a tiny or real-shape random checkpoint: nonsense replies

    @property
    def voices(self) -> list[str]:
        return sorted(self.model.speaker_map)

    @property
    def has_talker(self) -> bool:
        return bool(getattr(self.model, "has_talker", False))


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} was requested but CUDA is not available here; use --device cpu")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)  # one of config.DTYPES


def pick_attn(requested: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda"):
        raise ModelLoadError("flash_attention_2 needs CUDA and the flash-attn package; use --attn sdpa")
    return requested


_REQUIRED = {
    "config.json": ("config.json",),
    "speakers (spk_dict.pt)": ("spk_dict.pt",),
    "tokenizer": ("tokenizer.json", "vocab.json"),
    "processor config": ("processor_config.json", "preprocessor_config.json"),
    "weights": ("*.safetensors", "*.bin", "*.safetensors.index.json"),
}


def check_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming every part a local checkpoint directory lacks."""
    missing = [what for what, patterns in _REQUIRED.items() if not any(any(path.glob(p)) for p in patterns)]
    if missing:
        raise ModelLoadError(
            f"{path} is not a complete Qwen2.5-Omni checkpoint: missing {', '.join(missing)}. "
            "Download the whole model repository, or run with --model tiny for an offline demo."
        )


# "tiny-7b", "tiny-3b-l4": a random checkpoint at the real model's widths, built offline.
_REAL_SHAPE_MODEL = re.compile(rf"{TINY_MODEL}-(7b|3b)(?:-l(\d+))?")


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Return (what to pass to from_pretrained, whether it is a random-weight checkpoint)."""
    if name == TINY_MODEL:
        from .tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint()), True
    if match := _REAL_SHAPE_MODEL.fullmatch(name):
        from .tiny import DEFAULT_LAYERS, ensure_checkpoint

        layers = int(match.group(2) or DEFAULT_LAYERS)
        if layers < 2:
            raise ModelLoadError(f"{name!r}: a real-shape random checkpoint needs at least 2 layers")
        return str(ensure_checkpoint(match.group(1), layers)), True
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the checkpoint's directory")
        check_model_dir(path)
        return str(path), (path / "tiny.json").exists()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name!r} is neither a local directory nor a hub id like Qwen/Qwen2.5-Omni-7B")
    return fetch_from_hub(name), False


def fetch_from_hub(repo_id: str) -> str:
    """Local snapshot of a hub model: the cached one, else one download. Without a hub, one
    short probe fails fast with advice instead of minutes of per-file retries."""
    import huggingface_hub
    from huggingface_hub import model_info, snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (yet)
        pass
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                             "run with --model tiny for an offline demo")
    try:
        model_info(repo_id, timeout=10)
    except Exception as exc:
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({first_line(exc)}). "
            "Check the network or the model id, pass a local directory, or run with --model tiny "
            "(offline, random weights)."
        ) from exc
    log.info("downloading %s (about 22 GB for Qwen2.5-Omni-7B)", repo_id)
    return snapshot_download(repo_id)


def load_model(config: ModelConfig) -> LoadedModel:
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    path, is_random = resolve_model_path(config.model)
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    attn = pick_attn(config.attn, device)
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {config.model!r} from {path}: {first_line(exc)}") from exc
    model.to(device).eval()
    if getattr(model, "has_talker", False):
        model.token2wav.float()  # upstream requires float32 for the DiT and BigVGAN
    log.info("loaded %s on %s (%s, %s)", config.model, device, dtype, attn)
    return LoadedModel(model, processor, config.model, path, device, dtype, attn, is_random)


def build_random_model(omni_config, config: ModelConfig, processor) -> LoadedModel:
    """A randomly initialised model of any architecture (e.g. `Qwen2_5OmniConfig()`, the 7B
    defaults) built straight on the device, with random speakers. For benchmarks: no download."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    attn = pick_attn(config.attn, device)
    with torch.device(device):
        model = Qwen2_5OmniForConditionalGeneration._from_config(omni_config, dtype=dtype, attn_implementation=attn)
    model.eval().token2wav.float()
    dit = omni_config.token2wav_config.dit_config
    vocab = omni_config.thinker_config.text_config.vocab_size
    for index, name in enumerate(("Chelsie", "Ethan")):
        model.speaker_map[name] = {
            "bos_token": vocab - 1 - index,
            "cond": torch.randn(1, dit.enc_emb_dim),
            "ref_mel": torch.randn(1, 300, dit.mel_dim),
        }
    return LoadedModel(model, processor, "random", "random", device, dtype, attn, is_random=True)


def quiet_libraries() -> None:
    """Keep transformers' config chatter and progress bars off the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
