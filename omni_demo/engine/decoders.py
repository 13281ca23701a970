"""The thinker's and the talker's decoders for one reply: a transformers prefill, then one token
at a time through a decode step (`PlainStep` or `LeanStep`, omni_demo.engine.decode_step).

Thinker: feeding token t gives the logits of token t + 1 and token t's *reply part* (its input
embedding + its last hidden state), which is what the talker consumes at codec step t.
Talker: the thinker's prompt states, then one reply part per codec step -> codec tokens.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from transformers import DynamicCache

from omni_demo.config import CacheScope
from omni_demo.inputs.prepare import PreparedInputs
from omni_demo.inputs.prompt import MediaItem, MediaSpan

from .conversation_cache import ConversationCache, Prefix, crop
from .decode_step import PlainStep, SlotStep

DecodeStep = PlainStep | SlotStep


def rope_index(model, input_ids: torch.Tensor, inputs: PreparedInputs) -> tuple[torch.Tensor, int]:
    """mRoPE positions [3, 1, L] of `input_ids` (the thinker's prompt, or the talker's) and the
    rope delta: decode position minus cache length. `model` is the thinker or the talker."""
    t = inputs.tensors
    positions, delta = model.get_rope_index(
        input_ids,
        t.get("image_grid_thw"),
        t.get("video_grid_thw"),
        torch.ones_like(input_ids),
        inputs.use_audio_in_video,
        t["feature_attention_mask"].sum(-1) if "feature_attention_mask" in t else None,
        t.get("video_second_per_grid"),
    )
    return positions, int(delta)


def item_features(model, item: MediaItem) -> dict[int, torch.Tensor]:
    """A media item's encoder outputs by placeholder token id, each [n, D]: computed once per item
    (the item keeps them; see prompt.MediaCache). `model` is the thinker's multimodal model."""
    if not item.features:
        device = model.audio_tower.proj.weight.device  # the embedding table may live in host memory
        t = {name: value.to(device) for name, value in item.tensors.items()}
        config = model.config
        if "pixel_values" in t:
            item.features[config.image_token_id] = model.get_image_features(
                t["pixel_values"], t["image_grid_thw"]).pooler_output[0]
        if "pixel_values_videos" in t:
            item.features[config.video_token_id] = model.get_video_features(
                t["pixel_values_videos"], t["video_grid_thw"]).pooler_output[0]
        if "input_features" in t:
            item.features[config.audio_token_id] = model.get_audio_features(
                t["input_features"], feature_attention_mask=t["feature_attention_mask"]).last_hidden_state
    return item.features


def media_embeds(model, input_ids: torch.Tensor, start: int, media: list[MediaSpan]) -> torch.Tensor:
    """Input embeddings of input_ids[:, start:] with each media item's encoder outputs in its
    placeholders ([1, L - start, D]); items wholly before `start` are not encoded at all."""
    ids = input_ids[0]
    embeds = model.get_input_embeddings()(input_ids[:, start:])
    for span in media:
        if span.end <= start:
            continue
        for token_id, features in item_features(model, span.item).items():
            where = (ids[span.start : span.end] == token_id).nonzero()[:, 0] + span.start
            keep = where >= start
            embeds[0, where[keep] - start] = features[keep].to(embeds.dtype)
    return embeds


class ThinkerDecoder:
    """Prompt (text and media) -> text tokens, one at a time."""

    def __init__(self, thinker, decode_step: DecodeStep):
        self.thinker = thinker
        self.decode_step = decode_step
        self.embed = thinker.get_input_embeddings()
        self.media_ids = [thinker.config.audio_token_index, thinker.config.image_token_index,
                          thinker.config.video_token_index]
        self.positions = None  # [3, L] the prompt's mRoPE positions
        self.rope_delta = 0  # decode position minus cache length
        self.prompt_states = None  # [1, L, D] what the talker's prefill reads: last hidden + input embedding
        self.reused = 0  # prompt tokens whose state came from the conversation cache
        self.prefix: Prefix | None = None  # the kept prefix they came from
        self.own = False  # that prefix is this party's own, reused as such (the usage figures count it)
        self.scope = CacheScope()  # whose prefixes it may reuse; what it keeps is that party's

    def prefill(self, inputs: PreparedInputs, cache: ConversationCache | None = None,
                scope: CacheScope = CacheScope()) -> torch.Tensor:
        """`prefill_chunks` in one go. -> logits of the first reply token [1, V]."""
        chunks = self.prefill_chunks(inputs, cache, scope)
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    @torch.inference_mode()
    def prefill_chunks(self, inputs: PreparedInputs, cache: ConversationCache | None = None,
                       scope: CacheScope = CacheScope(), chunk_tokens: int | None = None) -> Generator[None, None, torch.Tensor]:
        """The prompt, media encoders included, from the longest prefix `cache` lets `scope` reuse,
        in pieces: it yields after each media item's encoders and after each `chunk_tokens` of the
        language model (None: the whole prompt at once), so a scheduler can decode other replies in
        between. Returns the logits of the first reply token [1, V]."""
        ids = inputs.input_ids
        positions, self.rope_delta = rope_index(self.thinker, ids, inputs)
        self.positions = positions[:, 0]
        self.scope = scope
        if cache is not None:
            reuse = cache.longest(ids[0].tolist(), self.positions, inputs.media, scope)
            self.prefix, self.reused, self.own = reuse.prefix, reuse.length, reuse.own
        reused, config = self.reused, self.thinker.config.text_config
        for span in inputs.media:
            if span.end > reused and not span.item.features:
                item_features(self.thinker.model, span.item)
                yield
        kv = crop(self.prefix.thinker_kv, reused, config) if reused else DynamicCache(config=config)
        embeds = media_embeds(self.thinker.model, ids, reused, inputs.media)
        length = embeds.shape[1]
        step = chunk_tokens or length
        hidden = []
        for start in range(0, length, step):
            out = self.thinker.model.language_model(
                inputs_embeds=embeds[:, start : start + step], past_key_values=kv, use_cache=True,
                position_ids=positions[:, :, reused + start : reused + start + step])
            hidden.append(out.last_hidden_state)
            if start + step < length:
                yield
        hidden = torch.cat(hidden, 1) if len(hidden) > 1 else hidden[0]
        is_media = torch.isin(ids[:, reused:], torch.tensor(self.media_ids, device=ids.device)).unsqueeze(-1)
        states = hidden + embeds.masked_fill(is_media, 0.0)  # media carry no text embedding
        self.prompt_states = torch.cat([self.prefix.states[:, :reused], states], 1) if reused else states
        self.decode_step.load(kv, self.rope_delta)
        return self.thinker.lm_head(hidden[:, -1])

    def kept_prefix(self, token_ids: list[int], media: list[MediaSpan], reply_parts: list[torch.Tensor] = (),
                    talker: tuple | None = None, partial: bool = False) -> Prefix:
        """What later turns may reuse of this prefill and the reply tokens fed since (one reply part
        [1, 1, D] each): `token_ids` are the prompt's and those tokens. `talker`: (the talker's KV
        over the prompt, its positions) when the talker ran; else the reused prefix's, while true."""
        prompt_len = self.positions.shape[1]
        fed = torch.arange(prompt_len, prompt_len + len(reply_parts), device=self.positions.device)
        positions = torch.cat([self.positions, (fed + self.rope_delta).expand(3, -1)], 1)
        if talker is None:
            talker = self.prefix.talker_state(self.reused) if self.prefix is not None else (None, None)
        return Prefix(token_ids=token_ids, positions=positions, media={span.start: span.item.segments for span in media},
                      thinker_kv=self.decode_step.snapshot(), states=torch.cat([self.prompt_states, *reply_parts], 1),
                      talker_kv=talker[0], talker_positions=talker[1], partial=partial, scope=self.scope,
                      prompt_len=prompt_len)

    def supersedes(self, partial_of_this_turn: bool) -> Prefix | None:
        """The kept prefix the one this prefill leaves replaces: the party's own that it reused
        whole, or a spoken turn's windows it grew from. None: every kept prefix stays."""
        prefix = self.prefix
        if prefix is None or not self.own:
            return None
        return prefix if prefix.superseded_by(self.reused, partial_of_this_turn) else None

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `token` ([1] long, on the device). -> (next-token logits [1, V], its reply part [1, 1, D])."""
        embeds = self.input_embeds(token)
        return self.outputs(self.decode_step.step(embeds), embeds)

    # A batched step (omni_demo.engine.scheduler) is `input_embeds`, the stack over every reply's
    # rows at once, then `outputs` over those rows: the same arithmetic as `step`, split in two.
    @torch.inference_mode()
    def input_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] long -> their input embeddings [B, 1, D]."""
        return self.embed(tokens.view(-1, 1))

    @torch.inference_mode()
    def outputs(self, hidden: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, embeds [B, 1, D] -> (next-token logits [B, V], reply parts [B, 1, D])."""
        return self.thinker.lm_head(hidden[:, -1]), hidden + embeds


class TalkerDecoder:
    """Thinker states -> codec tokens, on the conditioning upstream intends for every prompt: codec
    pad/bos embeddings added to the last two prefill positions and 3-D mRoPE positions. (In
    transformers 5.x `generate` drops an all-ones attention mask and the talker then skips both;
    see generation/utils.py, "We can drop the mask altogether".)"""

    def __init__(self, model, decode_step: DecodeStep):
        self.talker = model.talker
        self.decode_step = decode_step
        self.thinker_config = model.config.thinker_config
        self.text_start_token = model.config.talker_config.tts_text_start_token_id
        self.text_embed = model.thinker.get_input_embeddings()
        self.codec_embed = self.talker.get_input_embeddings()
        self.positions = None  # [3, L] the talker's mRoPE positions over the prompt
        self.cache = None  # the prefill's DynamicCache (the conversation cache keeps its prompt part)

    def prompt_codes(self, prompt_len: int) -> list[int]:
        """The codec ids `generate` puts under the prompt: what its repetition penalty sees."""
        talker = self.talker
        return [talker.codec_mask_token] * prompt_len + [talker.codec_pad_token, talker.codec_bos_token]

    def text_embedding(self, token_id: int) -> torch.Tensor:
        """The thinker's input embedding of one token: [1, 1, D]."""
        return self.text_embed(torch.tensor([[token_id]], device=self.talker.device))

    @torch.inference_mode()
    def prefill(self, inputs: PreparedInputs, thinker: ThinkerDecoder, speaker_bos: int, first_token: int,
                first_reply_part: torch.Tensor) -> torch.Tensor:
        """Prompt states, the speaker's bos and reply part 0 ([1, L + 2, D]), from the prompt
        positions the thinker's reused prefix also covers for the talker. -> first codec logits [1, V]."""
        input_ids = inputs.input_ids
        embeds = torch.cat([thinker.prompt_states, self.text_embedding(speaker_bos), first_reply_part], dim=1)
        embeds[:, -1] += self.codec_embed.weight[self.talker.codec_bos_token]
        embeds[:, -2] += self.codec_embed.weight[self.talker.codec_pad_token]
        talker_ids = torch.cat([input_ids, input_ids.new_tensor([[speaker_bos, self._position_safe(first_token)]])], 1)
        positions, rope_delta = rope_index(self.talker, talker_ids, inputs)
        self.positions = positions[:, 0, : input_ids.shape[1]]  # [3, L] over the prompt
        reused = self._reusable(thinker)
        config = self.talker.config
        self.cache = crop(thinker.prefix.talker_kv, reused, config) if reused else DynamicCache(config=config)
        out = self.talker.model(inputs_embeds=self.talker.thinker_to_talker_proj(embeds[:, reused:]),
                                position_ids=positions[:, :, reused:], past_key_values=self.cache, use_cache=True)
        self.decode_step.load(self.cache, rope_delta)
        return self.talker.codec_head(out.last_hidden_state[:, -1]).float()

    def _reusable(self, thinker: ThinkerDecoder) -> int:
        """Prompt positions whose talker KV the thinker's prefix holds: states and positions equal."""
        prefix = thinker.prefix
        if prefix is None or prefix.talker_kv is None:  # that turn never reached the talker
            return 0
        length = min(thinker.reused, prefix.talker_len)
        differs = (prefix.talker_positions[:, :length] != self.positions[:, :length]).any(0).nonzero()
        return int(differs[0]) if len(differs) else length

    def _position_safe(self, token: int) -> int:
        """A random thinker can open its reply with <|vision_bos|> or <|audio_bos|>; the position
        code would then look for media after it and crash. Position it as plain text instead."""
        starts = {self.thinker_config.vision_start_token_id, self.thinker_config.audio_start_token_id}
        return self.text_start_token if token in starts else token

    @torch.inference_mode()
    def step(self, code: torch.Tensor, reply_part: torch.Tensor) -> torch.Tensor:
        """Feed codec token `code` ([1] long, on the device) with the thinker's reply part [1, 1, D]
        (or text_eos / text_pad once the text has ended). -> next codec logits [1, V]."""
        return self.logits(self.decode_step.step(self.input_embeds(code, reply_part)))

    @torch.inference_mode()
    def input_embeds(self, code: torch.Tensor, reply_part: torch.Tensor) -> torch.Tensor:
        """The talker stack's input for one codec step: [1, 1, D_talker]."""
        return self.talker.thinker_to_talker_proj(self.codec_embed(code.view(1, 1)) + reply_part)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, 1, D_talker] -> codec logits [B, V] (float32)."""
        return self.talker.codec_head(hidden[:, -1]).float()
