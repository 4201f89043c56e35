"""`sa_headwise_sdpa`: head-wise attention (full KV heads see every key, streaming KV heads a sink and a recent
window) registered for any model that uses `AttentionInterface`, with `mask_heads` working on top.

The kernel lives in `selective_attention/gqa/headwise_attention_selective_llama.py`, self-contained so that
`selective_llama` checkpoints carry it; `selective_attention.cache` attaches the plans and builds the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention.gqa.headwise_attention_selective_llama import (
    LAYER_ATTRIBUTE,
    PLAN_ATTRIBUTE,
    HeadwisePlan,
    first_real_positions,
    headwise_attention,
)

NAME = "sa_headwise_sdpa"

__all__ = ["LAYER_ATTRIBUTE", "NAME", "PLAN_ATTRIBUTE", "HeadwisePlan", "first_real_positions",
           "headwise_sdpa_attention"]


def headwise_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """`headwise_attention` with SDPA for each head group: (batch, q, heads, head_dim), no weights."""
    return headwise_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              attention=sdpa_attention_forward, **kwargs)
