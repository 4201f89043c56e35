"""Attention maps: record the weights of chosen layers in one forward pass (figures: `selective_attention.plots`).

Recording goes through the registered `sa_record` function, so the model keeps its own kernels (and any head mask,
GQA layout or adapter) everywhere, and only the recorded layers materialise their q x k weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from selective_attention.attention.intervene import intervene
from selective_attention.attention.record import NAME, RECORD_ATTRIBUTE, RecordSlot
from selective_attention.modeling import attention_modules, check_attention_interface

logger = logging.getLogger(__name__)


@dataclass
class AttentionRecord:
    """Weights per recorded layer, (batch, query heads, queries, keys), filled by the forward pass."""

    slots: dict[int, list[RecordSlot]] = field(default_factory=dict)

    def __getitem__(self, layer: int) -> torch.Tensor:
        weights = self.slots[layer][0].weights
        if weights is None:
            raise KeyError(f"layer {layer} has not run a forward pass while recording")
        return weights

    @property
    def layers(self) -> list[int]:
        return sorted(self.slots)


@contextmanager
def record_attention(model: PreTrainedModel, layers: Iterable[int] | None = None) -> Iterator[AttentionRecord]:
    """Within the block, forward passes store the attention weights of `layers` (default: every layer)."""
    check_attention_interface(model)
    modules = attention_modules(model)
    chosen = sorted(modules) if layers is None else sorted(set(layers))
    unknown = [layer for layer in chosen if layer not in modules]
    if unknown:
        raise ValueError(f"layer(s) {unknown} out of range: the model has layers 0..{max(modules)}")
    previous = model.config._attn_implementation
    base = previous if previous != NAME else "sdpa"
    record = AttentionRecord({layer: [RecordSlot(base, record=True)] for layer in chosen})

    def slot(layer: int) -> RecordSlot:
        return record.slots[layer][0] if layer in record.slots else RecordSlot(base, record=False)

    with intervene(model, RECORD_ATTRIBUTE, slot, NAME, name="record attention"):
        yield record


def attention_maps(model: PreTrainedModel, tokenizer, text: str, layers: Iterable[int] | None = None,
                   chat: bool = False) -> tuple[dict[int, torch.Tensor], list[str]]:
    """{layer: (heads, q, k) weights} for one text, and its tokens as strings."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    with record_attention(model, layers) as record, torch.inference_mode():
        model(**inputs, use_cache=False)
    maps = {layer: record[layer][0].float().cpu() for layer in record.layers}
    tokens = [tokenizer.decode([i]) for i in inputs.input_ids[0].tolist()]
    return maps, tokens
