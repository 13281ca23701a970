"""Where a model's files come from: a hub id (fetched once, or refused with advice), a local
directory (checked for every part), or a random checkpoint built offline ("tiny", "tiny-7b")."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from omni_demo.config import TINY_MODEL
from omni_demo.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)


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
        refuse_prequantized(str(path), json.loads((path / "config.json").read_text()))
        return str(path), (path / "tiny.json").exists()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"{name!r} is neither a local directory nor a hub id like Qwen/Qwen2.5-Omni-7B")
    refuse_prequantized(name)
    return fetch_from_hub(name), False


def resolve_config_path(name: str) -> str:
    """A directory holding `name`'s config.json; for a hub id only that file is fetched."""
    if name == TINY_MODEL or _REAL_SHAPE_MODEL.fullmatch(name) or Path(name).expanduser().exists():
        return resolve_model_path(name)[0]
    refuse_prequantized(name)
    from huggingface_hub import hf_hub_download

    try:
        return str(Path(hf_hub_download(name, "config.json")).parent)
    except Exception as exc:
        raise ModelLoadError(f"could not read the config of {name!r}: {first_line(exc)}") from exc


PREQUANTIZED_ADVICE = (
    "Transformers 5 loads GPTQ and AWQ checkpoints only through GPT-QModel, and GPT-QModel 7.7 requires "
    "Pillow 13, which Gradio 6.31 does not allow, so this app does not load them. Quantize the full "
    "checkpoint on load instead: --model {base} --quantize int4 (10.9 GB for the 7B with one 4,096-token "
    "reply window; see python -m omni_demo.memory)."
)


def refuse_prequantized(name: str, config: dict | None = None) -> None:
    """Fail at once, before any download, for Qwen's GPTQ/AWQ repositories or a checkpoint whose
    config says it was quantized by such a method."""
    method = (config or {}).get("quantization_config", {}).get("quant_method")
    named = re.search(r"-(GPTQ|AWQ)\b", name, re.IGNORECASE)
    if not (named or method):
        return
    kind = (method or named.group(1)).upper()
    base = re.sub(r"-(GPTQ|AWQ).*$", "", name, flags=re.IGNORECASE) if named else "Qwen/Qwen2.5-Omni-7B"
    raise ModelLoadError(f"{name!r} is a {kind} checkpoint. " + PREQUANTIZED_ADVICE.format(base=base))


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
