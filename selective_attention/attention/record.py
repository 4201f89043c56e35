"""`sa_record`: record attention weights of chosen layers while every other layer keeps its fast kernel.

Forcing `attn_implementation="eager"` on the whole model to get attention maps is slow and changes what runs. Here
the active implementation (SDPA, a masked or tree-kernel variant, ...) still runs in every layer; in the recorded
layers, if that function returns no weights, they are recomputed eagerly from the same query/key/mask (with the same
head mask applied), so the map shows what the model actually attends to.
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface

from selective_attention.attention.eager import eager_attention_forward
from selective_attention.attention.masked import MASK_ATTRIBUTE, masked

RECORD_ATTRIBUTE = "sa_record"
NAME = "sa_record"
_masked_eager = masked(eager_attention_forward)


class RecordSlot:
    """Where one module's weights go, and which implementation computes its output."""

    def __init__(self, base: str, record: bool) -> None:
        self.base = base
        self.record = record
        self.weights = None


def record_attention_forward(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    slot: RecordSlot | None = getattr(module, RECORD_ATTRIBUTE, None)
    if slot is None:
        return _masked_eager(module, query, key, value, attention_mask, *args, **kwargs)
    # Always a head-masking function, so masks set while recording apply in every layer.
    base = AttentionInterface().get_interface(slot.base, _masked_eager)
    if not getattr(base, "applies_head_masks", False):
        base = masked(base)
    output, weights = base(module, query, key, value, attention_mask, *args, **kwargs)
    if slot.record:
        if weights is None:
            head_mask = getattr(module, MASK_ATTRIBUTE, None)
            if head_mask is not None and head_mask.mode == "uniform":
                query = query.index_fill(1, head_mask.index(query.device), 0.0)
            _, weights = eager_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        slot.weights = weights.detach()
    return output, weights
