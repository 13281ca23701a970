"""One decode step of the thinker's or the talker's decoder stack, after a transformers prefill.

Both decoders call `step(embeds) -> hidden` on one of two twins, loaded with the prefill's cache:
- `PlainStep`: the stack's own transformers forward over the prefill's DynamicCache.
- `LeanStep`: the same arithmetic without the framework around it. Plain transformers decoding
  spends most of a one-token step on Cache objects, mask building, position and rotary tensors
  and output dataclasses; `LeanStep` keeps a preallocated KV cache per layer and precomputed
  rotary tables, and runs the ops of `Qwen2_5OmniDecoderLayer` with q/k/v and gate/up fused (so
  greedy tokens match `PlainStep` exactly). It holds one cache slot per reply of a batch and
  decodes a batch in one pass (`step_many`). On CUDA it is captured as CUDA graphs, one per
  (batch size, cache length) bucket (attention then runs over the whole bucket with a mask), at
  engine start, so the first reply does not pay for the capture.

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
    """One-token decode over static KV caches for a Qwen2.5-Omni text stack (`layers`, `norm`,
    `rotary_emb`): the thinker's language model or the talker's model. It holds one cache *slot*
    per reply that may run at once; `slot(i)` is reply i's decode step, and `step_many` decodes
    one token for several slots in one batched pass (the scheduler's step)."""

    def __init__(self, stack, max_len: int, slots: int = 1):
        config = stack.config
        self.stack = stack
        self.max_len = max_len
        self.slots = slots
        weight = stack.norm.weight
        self.device, self.dtype = weight.device, weight.dtype
        attn = stack.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
        # One slot more than asked: the scratch slot that a CUDA graph's padding rows write to.
        shape = (len(stack.layers), slots + 1, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, device=self.device, dtype=self.dtype)  # [layers, slots + 1, kv, T, hd]
        self.values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        # Decode positions advance all three mRoPE axes together, so one table covers them: [P, hd].
        positions = torch.arange(config.max_position_embeddings, device=self.device)
        cos, sin = stack.rotary_emb(weight, positions.view(1, 1, -1).expand(3, 1, -1))
        self.cos, self.sin = cos[0], sin[0]
        self.lengths = [0] * slots  # cached positions, per slot
        self.rope_offsets = [0] * slots  # mRoPE position minus cache position (the prompt's rope delta)
        self.graphs: dict[tuple[int, int], _GraphStep] = {}  # by (batch bucket, cache-length bucket)
        self.failed: list[tuple[int, int]] = []  # buckets whose capture failed (they and larger ones: eager)
        self.fused = [_fuse(layer) for layer in stack.layers]
        self.norm_weight, self.norm_eps = stack.norm.weight, stack.norm.variance_epsilon

    @staticmethod
    def slot_bytes(stack, max_len: int) -> int:
        """Bytes of one slot's KV cache for `stack` over `max_len` positions."""
        attn, weight = stack.layers[0].self_attn, stack.norm.weight
        return 2 * len(stack.layers) * attn.num_key_value_heads * attn.head_dim * max_len * weight.element_size()

    def slot(self, index: int) -> SlotStep:
        return SlotStep(self, index)

    def load(self, slot: int, cache, rope_offset: int) -> None:
        """Copy a transformers DynamicCache (after prefill) into `slot`; later positions are cache
        length + `rope_offset`."""
        self.rope_offsets[slot] = rope_offset
        for index, layer in enumerate(cache.layers):
            length = layer.keys.shape[2]
            self.keys[index, slot, :, :length] = layer.keys[0]
            self.values[index, slot, :, :length] = layer.values[0]
        self.lengths[slot] = cache.get_seq_length()

    def snapshot(self, slot: int):
        """`slot`'s KV cache so far, copied into a DynamicCache (the slot serves the next reply)."""
        n = self.lengths[slot]
        layers = [(k[slot : slot + 1, :, :n], v[slot : slot + 1, :, :n]) for k, v in zip(self.keys, self.values)]
        return kv_cache(layers, self.stack.config)

    @torch.inference_mode()
    def step_many(self, slots: list[int], embeds: torch.Tensor) -> torch.Tensor:
        """embeds [B, 1, D] of each slot's next token -> their last hidden states [B, 1, D] (final norm).
        On CUDA, through the graph of the smallest (batch, cache length) bucket that holds them."""
        lengths = [self.lengths[slot] for slot in slots]
        if max(lengths) >= self.max_len:
            raise RuntimeError(f"static KV cache full ({self.max_len} positions)")
        positions = [length + self.rope_offsets[slot] for slot, length in zip(slots, lengths)]
        graph = self._graph_for(len(slots), max(lengths) + 1)
        if graph is not None:
            hidden = graph.run(embeds, slots, positions, lengths)
        elif len(slots) == 1:
            hidden = self._step(embeds, slots, self.cos[positions], self.sin[positions], lengths)
        else:  # one attention call for the batch, each row masked to its own slot's positions
            index = torch.tensor(lengths, device=self.device)
            hidden = self._step_masked(embeds, torch.tensor(slots, device=self.device), self.cos[positions],
                                       self.sin[positions], index, max(lengths) + 1)
        for slot in slots:
            self.lengths[slot] += 1
        return hidden

    def _graph_for(self, batch: int, span: int) -> _GraphStep | None:
        fits = [key for key in self.graphs if key[0] >= batch and key[1] >= span]
        return self.graphs[min(fits)] if fits else None

    def _step(self, hidden, slots, cos, sin, lengths):
        """Eager: the decoder layers for one token per slot, written at each slot's cache position;
        each row attends to its own slot's [0, length] in a call of its own (a batch of one: the
        reference arithmetic; larger batches take `_step_masked`). Same ops as
        Qwen2_5OmniDecoderLayer, minus module dispatch, with q/k/v and gate/up as one matmul each
        and q and k rotated together."""
        batch = hidden.shape[0]
        cos, sin = cos.view(batch, 1, 1, -1), sin.view(batch, 1, 1, -1)
        for w, keys, values in zip(self.fused, self.keys, self.values):
            residual = hidden
            q, k, v = self._qkv(w, hidden, cos, sin)
            rows = []
            for row, (slot, index) in enumerate(zip(slots, lengths)):
                keys[slot, :, index] = k[row, :, 0]
                values[slot, :, index] = v[row, :, 0]
                rows.append(F.scaled_dot_product_attention(
                    q[row : row + 1], keys[slot : slot + 1, :, : index + 1], values[slot : slot + 1, :, : index + 1],
                    scale=w.scaling, enable_gqa=self.heads != self.kv_heads))
            out = torch.cat(rows) if batch > 1 else rows[0]
            hidden = self._after_attention(w, residual, out)
        return _rms_norm(hidden, self.norm_weight, self.norm_eps)

    def _step_masked(self, hidden, slot_ids, cos, sin, index, span):
        """A batch in one pass: slots and cache positions as tensors ([B] long), every row attending
        to the first `span` positions of its slot under a mask (no host sync: the CUDA graphs' body,
        one shape per bucket; eager, the step of a batch of more than one)."""
        batch, group = hidden.shape[0], self.heads // self.kv_heads
        cos, sin = cos.view(batch, 1, 1, -1), sin.view(batch, 1, 1, -1)
        mask = (torch.arange(span, device=hidden.device)[None, :] <= index[:, None]).view(batch, 1, 1, span)
        for w, keys, values in zip(self.fused, self.keys, self.values):
            residual = hidden
            q, k, v = self._qkv(w, hidden, cos, sin)
            keys[slot_ids, :, index] = k[:, :, 0]
            values[slot_ids, :, index] = v[:, :, 0]
            # Query head h reads kv head h // group (repeat_kv's order), so the heads sharing a kv head
            # go in as that head's `group` query positions: [B, kv, group, hd], no K/V repeated.
            out = F.scaled_dot_product_attention(
                q.reshape(batch, self.kv_heads, group, self.head_dim),
                keys[:, :, :span].index_select(0, slot_ids), values[:, :, :span].index_select(0, slot_ids),
                attn_mask=mask, scale=w.scaling)
            hidden = self._after_attention(w, residual, out.reshape(batch, self.heads, 1, self.head_dim))
        return _rms_norm(hidden, self.norm_weight, self.norm_eps)

    def _qkv(self, w, hidden, cos, sin):
        """hidden [B, 1, D] -> rotated q [B, heads, 1, hd], rotated k and v [B, kv, 1, hd]."""
        batch, qk_heads, hd = hidden.shape[0], self.heads + self.kv_heads, self.head_dim
        qkv = w.qkv(_rms_norm(hidden, w.input_norm, w.eps))
        qk = _rotate(qkv[..., : qk_heads * hd].view(batch, 1, qk_heads, hd).transpose(1, 2), cos, sin)
        v = qkv[..., qk_heads * hd :].view(batch, 1, self.kv_heads, hd).transpose(1, 2)
        return qk[:, : self.heads], qk[:, self.heads :], v

    @staticmethod
    def _after_attention(w, residual, out):
        hidden = residual + F.linear(out.transpose(1, 2).reshape(out.shape[0], 1, -1), w.o_weight)
        gate, up = w.gate_up(_rms_norm(hidden, w.post_norm, w.eps))
        return hidden + F.linear(w.act(gate) * up, w.down_weight)

    def capture(self, batches: list[int], spans: list[int]) -> None:
        """CUDA only: capture the step for each (batch, cache-length) bucket, smallest first; a
        bucket that fails (out of memory, say) and every larger one are left to the eager step.
        The graphs share one memory pool and one warm-up stream: they replay one at a time, from
        the scheduler's one loop, and each output is copied out at once (`_GraphStep.run`)."""
        keys = sorted((b, s) for b in set(batches) if b <= self.slots for s in set(spans) if s <= self.max_len)
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        for key in keys:
            if any(key[0] >= b and key[1] >= s for b, s in self.failed):
                continue
            try:
                self.graphs[key] = _GraphStep(self, *key, pool=pool, stream=stream)
            except Exception:
                log.exception("CUDA graph capture failed for (batch, cache length) %s: eager there", key)
                self.failed.append(key)
        torch.cuda.empty_cache()


class SlotStep:
    """One reply's decode step: a slot of a `LeanStep` (what the decoders call `decode_step`)."""

    def __init__(self, lean: LeanStep, slot: int):
        self.lean, self.slot = lean, slot

    def load(self, cache, rope_offset: int) -> None:
        self.lean.load(self.slot, cache, rope_offset)

    def snapshot(self):
        return self.lean.snapshot(self.slot)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds [1, 1, D] -> last hidden state [1, 1, D]: a batch of one."""
        return self.lean.step_many([self.slot], embeds)


class _FusedWeights:
    """One layer's tensors as plain attributes (no nn.Module lookups in the step). Quantized
    weights (omni_demo.models.quantize) are not concatenated: each projection runs on its own,
    through the quantization library's matmul."""

    def __init__(self, layer, qkv_weight=None, qkv_bias=None, gate_up_weight=None):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_weight, self.qkv_bias, self.gate_up_weight = qkv_weight, qkv_bias, gate_up_weight
        self.qkv_parts = [(m.weight, m.bias) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        self.gate_up_parts = [mlp.gate_proj.weight, mlp.up_proj.weight]
        self.o_weight, self.down_weight = attn.o_proj.weight, mlp.down_proj.weight
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.eps, self.scaling, self.act = layer.input_layernorm.variance_epsilon, attn.scaling, mlp.act_fn

    def qkv(self, hidden):
        if self.qkv_weight is not None:
            return F.linear(hidden, self.qkv_weight, self.qkv_bias)
        return torch.cat([F.linear(hidden, weight, bias) for weight, bias in self.qkv_parts], -1)

    def gate_up(self, hidden):
        if self.gate_up_weight is not None:
            return F.linear(hidden, self.gate_up_weight).chunk(2, -1)
        return [F.linear(hidden, weight) for weight in self.gate_up_parts]


def _fuse(layer) -> _FusedWeights:
    """Concatenate q/k/v (and gate/up) weights into one tensor and re-seat the modules' weights as
    views of it: same values, no second copy, and one matmul where there were three (two).
    For one-row inputs the fused matmul gives bit-identical outputs (checked by the tests).
    Quantized weights stay as they are (see `_FusedWeights`)."""
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "_omni_fused", None) is not None:
        return layer._omni_fused
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if any(type(module.weight.data) is not torch.Tensor for module in projections):
        layer._omni_fused = _FusedWeights(layer)
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
    """The decode step as one CUDA graph, for up to `batch` slots whose caches hold fewer than
    `span` positions. Padding rows write to the scratch slot (position 0) and are dropped."""

    def __init__(self, lean: LeanStep, batch: int, span: int, pool=None, stream=None):
        self.lean, self.batch, self.span = lean, batch, span
        device, hidden_size = lean.device, lean.stack.config.hidden_size
        self.embeds = torch.zeros(batch, 1, hidden_size, device=device, dtype=lean.dtype)
        self.slot_ids = torch.full((batch,), lean.slots, dtype=torch.long, device=device)  # all scratch
        self.position = torch.zeros(batch, dtype=torch.long, device=device)
        self.index = torch.zeros(batch, dtype=torch.long, device=device)
        stream = stream or torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph, as capture requires (it writes the scratch slot only)
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool), torch.inference_mode():
            self.output = self._body()  # [batch, 1, D] in the shared pool: another graph's replay reuses it

    def _body(self):
        lean = self.lean
        cos, sin = lean.cos.index_select(0, self.position), lean.sin.index_select(0, self.position)
        return lean._step_masked(self.embeds, self.slot_ids, cos, sin, self.index, self.span)

    def run(self, embeds, slots: list[int], positions: list[int], lengths: list[int]) -> torch.Tensor:
        """embeds [n, 1, D] of slots `slots` (n <= batch), at mRoPE `positions` and cache `lengths`
        -> their hidden states [n, 1, D], copied out of the graph's output."""
        n, pad = len(slots), self.batch - len(slots)
        self.embeds[:n].copy_(embeds)
        device = self.slot_ids.device
        self.slot_ids.copy_(torch.tensor(slots + [self.lean.slots] * pad, device=device))
        self.position.copy_(torch.tensor(positions + [0] * pad, device=device))
        self.index.copy_(torch.tensor(lengths + [0] * pad, device=device))
        self.graph.replay()
        return self.output[:n].clone()


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
