"""Head ablation on top of transformers' own attention kernels.

Each wrapped function reads the `HeadMask` that `selective_attention.mask_heads` attached to the attention
module and ablates those query heads on the per-head output, before `o_proj`:

- ``zero``: the head's output is zero (true ablation, equal to zeroing the head's input columns of `o_proj`);
- ``uniform``: the head attends uniformly to every visible key (the Retrieval_Head reference zeroes the query);
- ``mean``: the head's output is replaced by its running mean over the positions seen so far in the sequence
  (causal, so prefill and step-by-step decoding agree; padded positions are left out).

A module without a mask costs one attribute lookup over the base kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention.attention.eager import eager_attention_forward

MASK_MODES = ("zero", "uniform", "mean")
MASK_ATTRIBUTE = "sa_head_mask"


@dataclass
class HeadMask:
    """Query heads of one attention module to ablate, and how."""

    heads: tuple[int, ...]
    mode: str = "zero"
    _index: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _mean_sum: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _mean_count: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {self.mode!r}; expected one of {', '.join(MASK_MODES)}")
        self.heads = tuple(sorted(set(int(h) for h in self.heads)))

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.heads, dtype=torch.long, device=device)
        return self._index[device]


def _valid_query_positions(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """(B, q) bool: query rows that are real tokens (a padded token cannot attend to its own key)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    rows = torch.arange(q_len, device=attention_mask.device)
    diagonal = attention_mask[:, 0, rows, rows + (kv_len - q_len)]
    valid = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return valid.expand(batch, q_len)


def _mean_ablate(mask: HeadMask, output: torch.Tensor, attention_mask, kv_len: int) -> torch.Tensor:
    batch, q_len = output.shape[:2]
    index = mask.index(output.device)
    selected = output.index_select(2, index).float()  # (B, q, h, D)
    valid = _valid_query_positions(attention_mask, q_len, kv_len, batch)
    weight = torch.ones(batch, q_len, device=output.device) if valid is None else valid.float()
    running_sum = torch.cumsum(selected * weight[:, :, None, None], dim=1)
    running_count = torch.cumsum(weight, dim=1)
    fresh = kv_len == q_len or mask._mean_sum is None or mask._mean_sum.shape[0] != batch
    if not fresh:
        running_sum = running_sum + mask._mean_sum[:, None]
        running_count = running_count + mask._mean_count[:, None]
    mask._mean_sum, mask._mean_count = running_sum[:, -1], running_count[:, -1]
    mean = running_sum / running_count.clamp(min=1)[:, :, None, None]
    return output.index_copy(2, index, mean.to(output.dtype))


def masked(base: Callable) -> Callable:
    """Wrap an attention function so that it applies the module's `HeadMask`."""

    def forward(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        mask: HeadMask | None = getattr(module, MASK_ATTRIBUTE, None)
        if mask is None or not mask.heads:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        if mask.mode == "uniform":
            query = query.index_fill(1, mask.index(query.device), 0.0)
        output, weights = base(module, query, key, value, attention_mask, *args, **kwargs)
        if mask.mode == "zero":
            # In place when no graph needs the original (saves a copy of the whole output at inference).
            fill = output.index_fill_ if not (torch.is_grad_enabled() and output.requires_grad) else output.index_fill
            output = fill(2, mask.index(output.device), 0.0)
        elif mask.mode == "mean":
            output = _mean_ablate(mask, output, attention_mask, key.shape[2])
        return output, weights

    forward.applies_head_masks = True  # lets callers tell a wrapped function from a bare kernel
    forward.__name__ = f"masked_{getattr(base, '__name__', 'attention')}"
    forward.__doc__ = f"{base.__name__} with selective-attention head ablation."
    return forward


masked_sdpa_attention = masked(sdpa_attention_forward)
masked_eager_attention = masked(eager_attention_forward)
