"""The thinker's and the talker's decoders for one reply: a transformers prefill, then one token
at a time through a decode step (`PlainStep` or `LeanStep`, omni_demo.decode_step).

Thinker: feeding token t gives the logits of token t + 1 and token t's *reply part* (its input
embedding + its last hidden state), which is what the talker consumes at codec step t.
Talker: the thinker's prompt states, then one reply part per codec step -> codec tokens.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .decode_step import LeanStep, PlainStep
from .inputs import PreparedInputs

DecodeStep = PlainStep | LeanStep


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


class ThinkerDecoder:
    """Prompt (text and media) -> text tokens, one at a time."""

    def __init__(self, thinker, decode_step: DecodeStep):
        self.thinker = thinker
        self.decode_step = decode_step
        self.embed = thinker.get_input_embeddings()
        self.prompt_embeds = None  # [1, L, D] input embeddings after the multimodal merge
        self.prompt_hidden = None  # [1, L, D] last-layer hidden states (after the final norm)

    @torch.inference_mode()
    def prefill(self, inputs: PreparedInputs) -> torch.Tensor:
        """The whole prompt, media encoders included. -> logits of the first reply token [1, V]."""
        t = inputs.tensors
        positions, rope_delta = rope_index(self.thinker, t["input_ids"], inputs)
        cache = DynamicCache(config=self.thinker.config.text_config)
        out = self.thinker.model(
            **{k: v for k, v in t.items() if k != "attention_mask"},
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            use_audio_in_video=inputs.use_audio_in_video,
            output_hidden_states=True,
        )
        self.prompt_embeds, self.prompt_hidden = out.hidden_states[0], out.last_hidden_state
        self.decode_step.load(cache, rope_delta)
        return self.thinker.lm_head(out.last_hidden_state[:, -1])

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed `token` ([1] long, on the device). -> (next-token logits [1, V], its reply part [1, 1, D])."""
        embeds = self.embed(token.view(1, 1))
        hidden = self.decode_step.step(embeds)
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
        """Prompt states, the speaker's bos and reply part 0 ([1, L + 2, D]). -> first codec logits [1, V]."""
        input_ids = inputs.input_ids
        config = self.thinker_config
        # Media placeholders carry no text embedding for the talker (upstream zeroes them too).
        media_ids = [config.audio_token_index, config.image_token_index, config.video_token_index]
        is_media = torch.isin(input_ids, torch.tensor(media_ids, device=input_ids.device))
        prompt = thinker.prompt_hidden + thinker.prompt_embeds.masked_fill(is_media.unsqueeze(-1), 0.0)
        embeds = torch.cat([prompt, self.text_embedding(speaker_bos), first_reply_part], dim=1)
        embeds[:, -1] += self.codec_embed.weight[self.talker.codec_bos_token]
        embeds[:, -2] += self.codec_embed.weight[self.talker.codec_pad_token]
        talker_ids = torch.cat([input_ids, input_ids.new_tensor([[speaker_bos, self._position_safe(first_token)]])], 1)
        positions, rope_delta = rope_index(self.talker, talker_ids, inputs)
        cache = DynamicCache(config=self.talker.config)
        out = self.talker.model(inputs_embeds=self.talker.thinker_to_talker_proj(embeds), position_ids=positions,
                                past_key_values=cache, use_cache=True)
        self.decode_step.load(cache, rope_delta)
        return self.talker.codec_head(out.last_hidden_state[:, -1]).float()

    def _position_safe(self, token: int) -> int:
        """A random thinker can open its reply with <|vision_bos|> or <|audio_bos|>; the position
        code would then look for media after it and crash. Position it as plain text instead."""
        starts = {self.thinker_config.vision_start_token_id, self.thinker_config.audio_start_token_id}
        return self.text_start_token if token in starts else token

    @torch.inference_mode()
    def step(self, code: torch.Tensor, reply_part: torch.Tensor) -> torch.Tensor:
        """Feed codec token `code` ([1] long, on the device) with the thinker's reply part [1, 1, D]
        (or text_eos / text_pad once the text has ended). -> next codec logits [1, V]."""
        embeds = self.codec_embed(code.view(1, 1)) + reply_part
        hidden = self.decode_step.step(self.talker.thinker_to_talker_proj(embeds))
        return self.talker.codec_head(hidden[:, -1]).float()
