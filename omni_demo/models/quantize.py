"""Weight-only quantization of the decoders' linears on load, with torchao.

What is quantized: every linear of the thinker's and the talker's decoder layers (q/k/v/o,
gate/up/down) and the thinker's lm_head when it has a weight of its own. The audio and vision
encoders, the embeddings and Token2Wav keep their precision (nothing here measured them as
harmless to quantize; Token2Wav runs in float32 upstream).

The formats, chosen per device because torchao 0.18 has no one int4 layout for both:
- int8: per output channel (`Int8WeightOnlyConfig`): int8 values, a float32 scale and an int8 zero
  point per row. On CPU and CUDA.
- int4 on CUDA: groups of 128 in tinygemm's tile-packed layout (`Int4WeightOnlyConfig`,
  `tile_packed_to_4d`, bfloat16 only); torchao pads the input width to a multiple of 1024.
- int4 on CPU: the same groups in the CPU tinygemm layout (torchao's prototype `Int4OpaqueTensor`),
  fast in bfloat16 only (1.7 ms against 51 ms in float32 for a 3584 x 18944 matmul here).
A linear a format cannot hold (a width that groups or packing cannot divide: the toy checkpoint's)
keeps its weight and is counted in `Quantized.kept`. `bytes_after` gives the exact bytes each
format holds, so the memory plan (omni_demo.models.memory) can be checked against a real model.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUPS = (128, 64, 32)  # the largest that divides a linear's input width is used
CUDA_INT4_IN_MULTIPLE, CUDA_INT4_OUT_MULTIPLE = 1024, 8  # tile-packed int4 pads to these


@dataclass
class Quantized:
    """What `quantize_model` did."""

    quantization: str
    done: list[str] = field(default_factory=list)  # module names now holding quantized weights
    kept: dict[str, str] = field(default_factory=dict)  # module name -> why its weight was kept

    def summary(self) -> str:
        if self.quantization == "none":
            return "no quantization"
        kept = f"; {len(self.kept)} kept ({next(iter(self.kept.values()))})" if self.kept else ""
        return f"{self.quantization}: {len(self.done)} decoder linears quantized with torchao{kept}"


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """{module name: linear} of what `quantize_model` quantizes (see the module's docstring)."""
    stacks = {"thinker.model.language_model": model.thinker.model.language_model}
    if getattr(model, "has_talker", False):
        stacks["talker.model"] = model.talker.model
    found = {f"{prefix}.{name}": module for prefix, stack in stacks.items()
             for name, module in stack.layers.named_modules(prefix="layers") if isinstance(module, torch.nn.Linear)}
    head = model.thinker.lm_head
    if head.weight is not model.thinker.get_input_embeddings().weight:  # a tied head shares the embedding's table
        found["thinker.lm_head"] = head
    return found


def int4_group(in_features: int) -> int | None:
    return next((group for group in INT4_GROUPS if in_features % group == 0), None)


def unfit_reason(out_features: int, in_features: int, quantization: str, device_type: str) -> str | None:
    """Why a linear of this shape keeps its weight under `quantization` on `device_type`; None if it fits."""
    if quantization != "int4":
        return None
    if int4_group(in_features) is None:
        return f"input width {in_features} is not a multiple of {INT4_GROUPS[-1]}"
    if device_type == "cpu" and out_features % 16:
        return f"output width {out_features} is not a multiple of 16"
    return None


def bytes_after(out_features: int, in_features: int, quantization: str, device_type: str, dtype: torch.dtype) -> int:
    """Exact bytes of one linear's weight (no bias) as torchao holds it after `quantization`."""
    element = torch.empty((), dtype=dtype).element_size()
    if quantization == "none" or unfit_reason(out_features, in_features, quantization, device_type):
        return out_features * in_features * element
    if quantization == "int8":  # int8 values; per row a float32 scale and an int8 zero point
        return out_features * (in_features + 4 + 1)
    group = int4_group(in_features)
    if device_type == "cuda":  # padded; scales and zeros in bfloat16
        in_features = math.ceil(in_features / CUDA_INT4_IN_MULTIPLE) * CUDA_INT4_IN_MULTIPLE
        out_features = math.ceil(out_features / CUDA_INT4_OUT_MULTIPLE) * CUDA_INT4_OUT_MULTIPLE
        element = 2
    return out_features * in_features // 2 + (in_features // group) * out_features * 2 * element


def _config(quantization: str, device_type: str, in_features: int):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if quantization == "int8":
        return Int8WeightOnlyConfig()
    if device_type == "cuda":
        return Int4WeightOnlyConfig(group_size=int4_group(in_features), int4_packing_format="tile_packed_to_4d")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=int4_group(in_features))


def quantize_model(model, quantization: str, device: torch.device) -> Quantized:
    """Quantize `target_linears(model)` in place; each is moved to `device` first, so a model read
    into host memory reaches a small GPU one quantized linear at a time."""
    result = Quantized(quantization)
    if quantization == "none":
        return result
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    from torchao.quantization import quantize_

    for name, linear in target_linears(model).items():
        reason = unfit_reason(linear.out_features, linear.in_features, quantization, device.type)
        if reason:
            result.kept[name] = reason
            continue
        linear.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchao's deprecation notes about its own internals
            quantize_(linear, _config(quantization, device.type, linear.in_features), filter_fn=lambda *_: True)
        result.done.append(name)
    log.info("quantized: %s", result.summary())
    return result


class HostEmbedding(torch.nn.Module):
    """An embedding table kept in host memory: the ids' rows are looked up there and sent to the
    device (a few rows per decode step). For the 7B this keeps 1.1 GB off a small GPU."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device):
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")  # not a parameter: `model.to(device)` leaves it
        self.device, self.num_embeddings, self.embedding_dim = device, *self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids.to("cpu"), self.table).to(self.device, non_blocking=True)


def embeddings_to_host(model, device: torch.device) -> bool:
    """Keep the thinker's embedding table in host memory on a GPU, unless the lm_head shares it."""
    stack = model.thinker.model.language_model
    if device.type != "cuda" or model.thinker.lm_head.weight is stack.embed_tokens.weight:
        return False
    stack.embed_tokens = HostEmbedding(stack.embed_tokens, device)
    return True


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass rather than a plain weight."""
    return type(weight.data) is not torch.Tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, a torchao subclass's inner tensors included."""
    if type(tensor.data) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers `module` holds, each counted once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
