"""Processor inputs assembled piece by piece, so that each media file is read and processed once.

The Qwen processor expands each media placeholder the chat template writes (<|IMAGE|>, <|AUDIO|>,
<|VIDEO|>) into that item's tokens and concatenates the items' tensors in message order.
`build_prompt` does the same one piece at a time: each image, audio clip and video goes through
the processor alone (the result is kept by content in a `MediaCache`), the template's own text
through the tokenizer, and the pieces are joined. The result equals one processor call over the
whole conversation (tests/test_prompt.py), with one difference on purpose: text that a person
wrote (system prompt included) is always plain text, so a typed "<|im_start|>" is a few ordinary
tokens, never a control token.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

PLACEHOLDERS = {"image": "<|IMAGE|>", "audio": "<|AUDIO|>", "video": "<|VIDEO|>"}
_TEXT = "\x00text{}\x00"  # stands in for the n-th text part while the template is rendered
_PIECES = re.compile(r"(\x00text\d+\x00|<\|IMAGE\|>|<\|AUDIO\|>|<\|VIDEO\|>)")


@dataclass
class MediaItem:
    """One media part, through the processor on its own."""

    key: str  # content digest of the file and how it was read (see media_key)
    token_ids: list[int]  # its placeholder as the processor expands it
    tensors: dict[str, torch.Tensor]  # its processor output (pixel_values, input_features, ...), on the CPU
    features: dict[int, torch.Tensor] = field(default_factory=dict)  # encoder outputs by placeholder id, [n, D]
    # What its tokens were computed from, as (digest, tokens) runs covering token_ids: one run for
    # a file processed whole; one per audio-encoder window for a clip heard while it was spoken
    # (omni_demo.engine.listening). Two items agree on their leading tokens as far as their runs agree.
    segments: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.segments:
            self.segments = [(self.key, len(self.token_ids))]

    @property
    def nbytes(self) -> int:
        tensors = [*self.tensors.values(), *self.features.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MediaSpan:
    item: MediaItem
    start: int  # its first token in input_ids
    end: int  # one past its last token


def agreeing_tokens(ours: list[tuple[str, int]], theirs: list[tuple[str, int]]) -> int | None:
    """Leading tokens two items' segments computed identically; None when they agree throughout."""
    if ours == theirs:
        return None
    tokens = 0
    for mine, other in zip(ours, theirs):
        if mine != other:
            break
        tokens += mine[1]
    return tokens


class MediaCache:
    """Media items by (party, content key); the least recently used leave first once over
    `max_bytes`. A party never sees another's items: a file another user sent is processed again,
    so its time says nothing of theirs. Thread-safe: requests read media before they wait for the model."""

    def __init__(self, max_bytes: int, party: str = ""):
        self.max_bytes = max_bytes
        self.party = party  # the party this view reads and writes for
        self.items: OrderedDict[tuple[str, str], MediaItem] = OrderedDict()
        self.lock = threading.Lock()

    def scoped(self, party: str) -> MediaCache:
        """A view of this cache (the same items, lock and budget) that reads and writes `party`'s items."""
        view = MediaCache.__new__(MediaCache)
        view.__dict__.update(self.__dict__, party=party)
        return view

    def get(self, key: str) -> MediaItem | None:
        with self.lock:
            item = self.items.get((self.party, key))
            if item is not None:
                self.items.move_to_end((self.party, key))
            return item

    def put(self, item: MediaItem) -> None:
        with self.lock:
            self.items[self.party, item.key] = item
            self.items.move_to_end((self.party, item.key))
        self.trim()

    def trim(self) -> None:
        """Evict until within budget (call again after features were added to an item)."""
        with self.lock:
            while len(self.items) > 1 and sum(item.nbytes for item in self.items.values()) > self.max_bytes:
                self.items.popitem(last=False)


def media_key(part: dict, with_audio: bool) -> str:
    """sha256 of the media's bytes and of every reading option in its part."""
    kind = part["type"]
    source = part[kind]
    digest = hashlib.sha256()
    if isinstance(source, np.ndarray):
        digest.update(np.ascontiguousarray(source).tobytes())
    elif hasattr(source, "tobytes"):  # a PIL image
        digest.update(source.tobytes())
    else:
        with open(source, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    options = sorted((k, str(v)) for k, v in part.items() if k not in ("type", kind))
    digest.update(repr((kind, with_audio, options)).encode())
    return f"{kind}:{digest.hexdigest()}"


def render_pieces(processor, messages: list[dict]) -> tuple[list[str], list[str]]:
    """The chat template with every text part held out. -> (template pieces, text parts): the
    pieces alternate with text-part and media markers, as `_PIECES` splits them."""
    texts: list[str] = []
    held_out = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": _TEXT.format(len(texts))})
                texts.append(part["text"])
            else:
                content.append({"type": part["type"], part["type"]: "…"})
        held_out.append({"role": message["role"], "content": content})
    rendered = processor.apply_chat_template(held_out, add_generation_prompt=True, tokenize=False)
    return _PIECES.split(rendered), texts


_TOKENIZER_LOCK = threading.Lock()


def encode(tokenizer, texts: list[str], *, split_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, without special tokens added; `split_special_tokens`: what a person
    typed, where "<|im_start|>" is plain text. One at a time across threads: transformers (5.23,
    tokenization_utils_tokenizers.py) sets that flag on the tokenizer's shared Rust backend for the
    call, so two requests prepared at once could each get the other's setting (a user's typed
    "<|im_end|>" read as a control token, or the template's split into plain text)."""
    with _TOKENIZER_LOCK:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]


def build_prompt(processor, messages: list[dict], items: list[MediaItem]) -> tuple[list[int], list[MediaSpan]]:
    """Token ids of the conversation with `items` (one per media part, in message order) in their
    places. -> (input ids, where each item sits)."""
    tokenizer = processor.tokenizer
    pieces, texts = render_pieces(processor, messages)
    ids: list[int] = []
    spans: list[MediaSpan] = []
    media = iter(items)
    for piece in pieces:
        if piece.startswith("\x00text"):
            text = texts[int(piece[5:-1])]
            ids += encode(tokenizer, [text], split_special_tokens=True)[0]
        elif piece in PLACEHOLDERS.values():
            item = next(media)
            spans.append(MediaSpan(item, len(ids), len(ids) + len(item.token_ids)))
            ids += item.token_ids
        elif piece:
            ids += encode(tokenizer, [piece], split_special_tokens=False)[0]
    return ids, spans


def count_tokens(processor, messages: list[dict], media_tokens: list[int]) -> tuple[list[int], int]:
    """Prompt tokens of each message, its media parts counted as `media_tokens` (in message order),
    and of what the template adds around the messages (a default system prompt, the generation
    prompt). One template render and one batched tokenizer call: linear in the conversation."""
    pieces, texts = render_pieces(processor, messages)
    media = iter(media_tokens)
    chunks: list[tuple[int, str, bool]] = []  # (block, text, typed by a person)
    extra: list[int] = [0]  # media tokens per block; a block starts at each <|im_start|>
    for piece in pieces:
        if piece.startswith("\x00text"):
            chunks.append((len(extra) - 1, texts[int(piece[5:-1])], True))
        elif piece in PLACEHOLDERS.values():
            extra[-1] += next(media)
        elif piece:
            for index, chunk in enumerate(piece.split("<|im_start|>")):
                if index:
                    extra.append(0)
                chunks.append((len(extra) - 1, "<|im_start|>" * bool(index) + chunk, False))
    blocks = list(extra)
    tokenizer = processor.tokenizer
    for split in (True, False):
        group = [(block, text) for block, text, typed in chunks if typed == split and text]
        if group:
            encoded = encode(tokenizer, [text for _, text in group], split_special_tokens=split)
            for (block, _), ids in zip(group, encoded):
                blocks[block] += len(ids)
    per_message = blocks[-1 - len(messages):-1]
    return per_message, sum(blocks) - sum(per_message)


def audio_feature_samples(extractor, samples: int) -> int:
    """The length a clip is zero-padded to before its log-mel features: whole seconds past its end
    and the STFT's reach. The processor pads every clip to 300 s instead (0.2-0.5 s of CPU per
    clip); over the clip's own frames the features are the same, bit for bit (tests/test_prompt.py),
    and the encoder reads those frames only."""
    second = extractor.sampling_rate
    return -(-(samples + extractor.n_fft) // second) * second


def process_media(processor, kind: str, key: str, media: dict) -> MediaItem:
    """One item through the processor: `media` holds its processor arguments (images=[...], ...)."""
    if media.get("audio"):
        longest = max(len(clip) for clip in media["audio"])
        media = {**media, "audio_kwargs": {"max_length": audio_feature_samples(processor.feature_extractor, longest)}}
    out = processor(text=[PLACEHOLDERS[kind]], return_tensors="pt", **media)
    tensors = {name: value for name, value in out.items() if name not in ("input_ids", "attention_mask")}
    return MediaItem(key, out["input_ids"][0].tolist(), tensors)


FRAME_TENSORS = ("input_features", "feature_attention_mask")  # [..., frames]: clips differ in length


def join_tensors(items: list[MediaItem]) -> dict[str, torch.Tensor]:
    """The items' tensors concatenated in order, as one processor call returns them; audio
    features and their masks are zero-padded to the longest clip (the processor pads with the
    clip's floor value instead: the encoder reads neither, the mask leaves those frames out)."""
    names = list(dict.fromkeys(name for item in items for name in item.tensors))
    joined = {}
    for name in names:
        parts = [item.tensors[name] for item in items if name in item.tensors]
        if name in FRAME_TENSORS:
            frames = max(part.shape[-1] for part in parts)
            parts = [torch.nn.functional.pad(part, (0, frames - part.shape[-1])) for part in parts]
        joined[name] = torch.cat(parts)
    return joined


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (input_ids [B, L], attention_mask [B, L]), padded on `side` as the tokenizer pads."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[index, span] = torch.tensor(row, dtype=torch.long)
        mask[index, span] = 1
    return ids, mask

