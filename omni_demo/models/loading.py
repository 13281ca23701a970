"""Load the Qwen2.5-Omni processor and model from a hub id, a local directory, "tiny", or
"tiny-7b" / "tiny-3b" (the real widths with 2 layers per stack; "tiny-7b-l4" for 4)."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from omni_demo.config import ModelConfig
from omni_demo.errors import ModelLoadError, first_line

from .checkpoints import resolve_model_path

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
    quantization: str = "none"  # of the decoders' linears (omni_demo.models.quantize)
    context_window: int | None = None  # tokens per reply's static caches; None: the model's own windows

    @property
    def precision(self) -> str:
        """What the banner and /v1/models say: "bfloat16", "bfloat16, int4 decoders"."""
        dtype = str(self.dtype).removeprefix("torch.")
        return dtype if self.quantization == "none" else f"{dtype}, {self.quantization} decoders"

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


def pick_dtype(requested: str, device: torch.device, quantize: str = "none") -> torch.dtype:
    """auto: bfloat16 on CUDA and for quantized weights (torchao's int4 kernels run in bfloat16),
    else float32."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" or quantize not in ("none", "auto") else torch.float32
    return getattr(torch, requested)  # one of config.DTYPES


def pick_attn(requested: str, device: torch.device) -> str:
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if has_flash and device.type == "cuda" else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda"):
        raise ModelLoadError("flash_attention_2 needs CUDA and the flash-attn package; use --attn sdpa")
    return requested


def load_model(config: ModelConfig) -> LoadedModel:
    from transformers import AutoProcessor, Qwen2_5OmniForConditionalGeneration

    path, is_random = resolve_model_path(config.model)
    device = pick_device(config.device)
    quantization = pick_quantization(config, path, device)
    dtype = pick_dtype(config.dtype, device, quantization)
    attn = pick_attn(config.attn, device)
    try:
        processor = AutoProcessor.from_pretrained(path)
        model = Qwen2_5OmniForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {config.model!r} from {path}: {first_line(exc)}") from exc
    quantize(model, quantization, device)
    model.to(device).eval()
    if getattr(model, "has_talker", False):
        model.token2wav.float()  # upstream requires float32 for the DiT and BigVGAN
    log.info("loaded %s on %s (%s, %s, %s)", config.model, device, dtype, attn,
             "not quantized" if quantization == "none" else quantization)
    return LoadedModel(model, processor, config.model, path, device, dtype, attn, is_random, quantization,
                       config.context_window)


def quantize(model, quantization: str, device: torch.device) -> None:
    """--quantize's work once the weights are read (omni_demo.models.quantize)."""
    if quantization == "none":
        return
    from .quantize import embeddings_to_host, quantize_model

    quantize_model(model, quantization, device)  # linear by linear to the device: a small GPU never holds them whole
    if embeddings_to_host(model, device):
        log.info("the thinker's embedding table stays in host memory")


def pick_quantization(config: ModelConfig, omni_config, device: torch.device) -> str:
    """--quantize, with auto resolved before any weight loads: none on a CPU; on CUDA the least
    quantization whose memory plan fits the free memory (omni_demo.models.memory)."""
    if config.quantize != "auto":
        if config.quantize != "none" and importlib.util.find_spec("torchao") is None:
            raise ModelLoadError("--quantize needs torchao: pip install -r requirements.txt")
        return config.quantize
    if device.type != "cuda":
        return "none"
    from transformers import AutoConfig

    from .memory import auto_quantization

    if isinstance(omni_config, str):  # a checkpoint directory
        omni_config = AutoConfig.from_pretrained(omni_config)
    free = torch.cuda.mem_get_info(device)[0]
    dtype = pick_dtype(config.dtype, device, "int4")
    chosen, why = auto_quantization(omni_config, config.model, dtype, device, free, window=config.context_window)
    log.warning(why)
    print(why, flush=True)
    return chosen


def build_random_model(omni_config, config: ModelConfig, processor) -> LoadedModel:
    """A randomly initialised model of any architecture (e.g. `Qwen2_5OmniConfig()`, the 7B
    defaults) built straight on the device, with random speakers, then quantized as --quantize
    says. For benchmarks: no download."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    device = pick_device(config.device)
    quantization = pick_quantization(config, omni_config, device)
    dtype = pick_dtype(config.dtype, device, quantization)
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
    quantize(model, quantization, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unquantized weights' blocks
    return LoadedModel(model, processor, "random", "random", device, dtype, attn, True, quantization,
                       config.context_window)


def quiet_libraries() -> None:
    """Keep transformers' config chatter and progress bars off the user's terminal."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
