"""One decode step of the thinker's or the talker's decoder stack, after a transformers prefill.

Both decoders call `step(embeds) -> hidden` on one of two twins, loaded with the prefill's cache:
- `PlainStep`: the stack's own transformers forward over the prefill's DynamicCache.
- `LeanStep`: the same arithmetic without the framework around it. Plain transformers decoding
  spends most of a one-token step on Cache objects, mask building, position and rotary tensors
  and output dataclasses; `LeanStep` keeps a preallocated KV cache per layer and precomputed
  rotary tables, and runs the ops of `Qwen2_5OmniDecoderLayer` with q/k/v and gate/up fused (so
  greedy tokens match `PlainStep` exactly). On CUDA it is captured as CUDA graphs, one per
  cache-length bucket (attention then runs over the whole bucket with a mask), at engine start,
  so the first reply does not pay for the capture.

Decode positions advance all three mRoPE axes together: position = cache length + the prompt's
rope delta (`rope_offset`).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


class PlainStep:
    """The decoder stack's transformers forward over a DynamicCache: the reference twin of `LeanStep`."""

    def __init__(self, stack):
        self.stack = stack  # the thinker's language model or the talker's model
        self.cache = None
        self.rope_offset = 0

    def load(self, cache, rope_offset: int) -> None:
        """Continue from a prefill's DynamicCache; later positions are cache length + `rope_offset`."""
        self.cache, self.rope_offset = cache, rope_offset

    def snapshot(self):
        """The KV cache so far, as a DynamicCache of its own (this step's: it is not reused)."""
        return self.cache

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [1, 1, D] of the next token -> its last hidden state [1, 1, D] (final norm)."""
        position = self.cache.get_seq_length() + self.rope_offset
        positions = torch.full((3, 1, 1), position, dtype=torch.long, device=embeds.device)
        out = self.stack(inputs_embeds=embeds, position_ids=positions, past_key_values=self.cache, use_cache=True)
        return out.last_hidden_state


class LeanStep:
    """One-token decode over a static KV cache for a Qwen2.5-Omni text stack (`layers`, `norm`,
    `rotary_emb`): the thinker's language model or the talker's model. One per stack, shared by
    the replies, which run one at a time."""

    def __init__(self, stack, max_len: int):
        config = stack.config
        self.stack = stack
        self.max_len = max_len
        weight = stack.norm.weight
        self.device, self.dtype = weight.device, weight.dtype
        attn = stack.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        shape = (len(stack.layers), 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)  # [layers, 1, kv, T, hd]
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # Decode positions advance all three mRoPE axes together, so one table covers them: [P, hd].
        positions = torch.arange(config.max_position_embeddings, device=self.device)
        cos, sin = stack.rotary_emb(weight, positions.view(1, 1, -1).expand(3, 1, -1))
        self.cos, self.sin = cos[0], sin[0]
        self.length = 0  # cached positions
        self.rope_offset = 0  # mRoPE position minus cache position (the prompt's rope delta)
        self.graphs: dict[int, _GraphStep] = {}
        self.buckets: list[int] = []  # sorted keys of `graphs`
        self.fused = [_fuse(layer) for layer in stack.layers]
        self.norm_weight, self.norm_eps = stack.norm.weight, stack.norm.variance_epsilon

    def load(self, cache, rope_offset: int) -> None:
        """Copy a transformers DynamicCache (after prefill) into the static cache; later positions
        are cache length + `rope_offset`."""
        self.rope_offset = rope_offset
        for index, layer in enumerate(cache.layers):
            length = layer.keys.shape[2]
            self.keys[index, :, :, :length] = layer.keys
            self.values[index, :, :, :length] = layer.values
        self.length = cache.get_seq_length()

    def snapshot(self):
        """The KV cache so far, copied into a DynamicCache (the static one serves the next reply)."""
        return kv_cache([(k[:, :, : self.length], v[:, :, : self.length]) for k, v in zip(self.keys, self.values)],
                        self.stack.config)

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [1, 1, D] of the next token -> its last hidden state [1, 1, D] (final norm)."""
        if self.length >= self.max_len:
            raise RuntimeError(f"static KV cache full ({self.max_len} positions)")
        position = self.length + self.rope_offset
        bucket = next((b for b in self.buckets if b > self.length), None)
        if bucket is not None:
            hidden = self.graphs[bucket].run(embeds, position, self.length)
        else:
            hidden = self._step(embeds, self.cos[position], self.sin[position], self.length)
        self.length += 1
        return hidden

    def _step(self, hidden, cos, sin, index, mask=None, span=None):
        """The decoder layers for one token written at cache `index`. Eager: attend to [0, index];
        graph: attend to the first `span` positions under `mask` (index may be a tensor).
        Same ops as Qwen2_5OmniDecoderLayer, minus module dispatch, with q/k/v and gate/up as one
        matmul each and q and k rotated together (the rotation is elementwise per head)."""
        qk_heads, hd = self.heads + self.kv_heads, self.head_dim
        cos, sin = cos.view(1, 1, 1, -1), sin.view(1, 1, 1, -1)
        for w, keys, values in zip(self.fused, self.keys, self.values):
            residual = hidden
            qkv = F.linear(_rms_norm(hidden, w.input_norm, w.eps), w.qkv_weight, w.qkv_bias)
            qk = _rotate(qkv[..., : qk_heads * hd].view(1, 1, qk_heads, hd).transpose(1, 2), cos, sin)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            v = qkv[..., qk_heads * hd :].view(1, 1, self.kv_heads, hd).transpose(1, 2)
            if span is None:
                keys[:, :, index] = k[:, :, 0]
                values[:, :, index] = v[:, :, 0]
                keys, values = keys[:, :, : index + 1], values[:, :, : index + 1]
            else:
                keys.index_copy_(2, index, k)
                values.index_copy_(2, index, v)
                keys, values = keys[:, :, :span], values[:, :, :span]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=w.scaling,
                                                 enable_gqa=self.heads != self.kv_heads)
            hidden = residual + F.linear(out.transpose(1, 2).reshape(1, 1, -1), w.o_weight)
            residual = hidden
            gate, up = F.linear(_rms_norm(hidden, w.post_norm, w.eps), w.gate_up_weight).chunk(2, -1)
            hidden = residual + F.linear(w.act(gate) * up, w.down_weight)
        return _rms_norm(hidden, self.norm_weight, self.norm_eps)

    def capture(self, buckets: list[int]) -> None:
        """CUDA only: capture the step for each cache-length bucket (warm-up included). Nothing
        changes unless every capture succeeds."""
        graphs = {bucket: _GraphStep(self, bucket) for bucket in sorted(b for b in buckets if b <= self.max_len)}
        self.graphs, self.buckets = graphs, sorted(graphs)


class _FusedWeights:
    """One layer's tensors as plain attributes (no nn.Module lookups in the step)."""

    def __init__(self, layer, qkv_weight, qkv_bias, gate_up_weight):
        self.qkv_weight, self.qkv_bias, self.gate_up_weight = qkv_weight, qkv_bias, gate_up_weight
        self.o_weight, self.down_weight = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps, self.scaling, self.act = layer.input_layernorm.variance_epsilon, layer.self_attn.scaling, layer.mlp.act_fn


def _fuse(layer) -> _FusedWeights:
    """Concatenate q/k/v (and gate/up) weights into one tensor and re-seat the modules' weights as
    views of it: same values, no second copy, and one matmul where there were three (two).
    For one-row inputs the fused matmul gives bit-identical outputs (checked by the tests)."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "_omni_fused", None) is not None:
        return layer._omni_fused
    qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    start = 0
    for module in (attn.q_proj, attn.k_proj, attn.v_proj):
        module.weight.data = qkv_weight[start : start + module.out_features]
        module.bias.data = qkv_bias[start : start + module.out_features]
        start += module.out_features
    mlp.gate_proj.weight.data = gate_up[: mlp.gate_proj.out_features]
    mlp.up_proj.weight.data = gate_up[mlp.gate_proj.out_features :]
    layer._omni_fused = _FusedWeights(layer, qkv_weight, qkv_bias, gate_up)
    return layer._omni_fused


def _rms_norm(hidden, weight, eps):
    """Qwen2_5OmniRMSNorm.forward, op for op."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(dtype)


def _rotate(x, cos, sin):
    """apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


class _GraphStep:
    """The decode step as one CUDA graph, for caches of at most `span` positions."""

    def __init__(self, lean: LeanStep, span: int):
        self.lean = lean
        d, hidden = lean, lean.stack.config.hidden_size
        self.embeds = torch.zeros(1, 1, hidden, device=d.device, dtype=d.dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=d.device)
        self.index = torch.zeros(1, dtype=torch.long, device=d.device)
        self.mask = torch.zeros(1, 1, 1, span, dtype=torch.bool, device=d.device)  # True: may attend
        self.positions = torch.arange(span, device=d.device)
        saved = (d.keys.clone(), d.values.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph, as capture requires
                self._body(span)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.output = self._body(span)
        d.keys.copy_(saved[0])  # the warm-up wrote into the cache
        d.values.copy_(saved[1])

    def _body(self, span):
        d = self.lean
        cos, sin = d.cos.index_select(0, self.position)[0], d.sin.index_select(0, self.position)[0]
        torch.le(self.positions, self.index, out=self.mask[0, 0, 0])
        return d._step(self.embeds, cos, sin, self.index, mask=self.mask, span=span)

    def run(self, embeds, position: int, index: int) -> torch.Tensor:
        self.embeds.copy_(embeds)
        self.position.fill_(position)
        self.index.fill_(index)
        self.graph.replay()
        return self.output.clone()


def kv_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A DynamicCache holding copies of (keys, values) per layer, each [1, kv_heads, T, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys.clone(), values.clone(), index)
    return cache


def graph_buckets(max_len: int, smallest: int = 512) -> list[int]:
    """Powers of two from `smallest` up to the first that covers max_len."""
    buckets, size = [], smallest
    while True:
        buckets.append(min(size, max_len))
        if size >= max_len:
            return buckets
        size *= 2
