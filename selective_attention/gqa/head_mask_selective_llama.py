"""A head mask persisted in a `selective_llama` config (`sa_masked_heads`, `sa_mask_mode`), applied by the model.

Part of the Hub modeling code (imports only torch): selective_attention's own attention functions (`sa_*`) apply
head masks themselves; under any other implementation `SelectiveLlamaAttention` calls `ablate_before` on the
query and `ablate_after` on the per-head output, with the same modes as selective_attention's `HeadMask`.
"""

from __future__ import annotations

import torch


class ConfigHeadMask:
    """A head mask read from the config; same attributes as selective_attention's `HeadMask`."""

    def __init__(self, heads, mode: str) -> None:
        self.heads = tuple(sorted(set(int(h) for h in heads)))
        self.mode = mode
        self._index: dict = {}
        self._mean_sum = None
        self._mean_count = None

    def index(self, device) -> torch.Tensor:
        if device not in self._index:
            self._index[device] = torch.tensor(self.heads, dtype=torch.long, device=device)
        return self._index[device]

    def __repr__(self) -> str:
        return f"ConfigHeadMask(heads={self.heads}, mode={self.mode!r})"


def config_head_masks(config) -> dict[int, ConfigHeadMask]:
    """Layer -> mask from `sa_masked_heads` ("L-H" strings) and `sa_mask_mode`."""
    heads = getattr(config, "sa_masked_heads", None) or []
    mode = getattr(config, "sa_mask_mode", None) or "zero"
    by_layer: dict[int, list[int]] = {}
    for item in heads:
        layer, head = (int(part) for part in str(item).split("-"))
        by_layer.setdefault(layer, []).append(head)
    return {layer: ConfigHeadMask(layer_heads, mode) for layer, layer_heads in by_layer.items()}


def ablate_before(mask, query: torch.Tensor) -> torch.Tensor:
    """Uniform ablation acts on the query (B, H, q, D): a zero query attends uniformly to every visible key."""
    if mask.mode == "uniform":
        return query.index_fill(1, mask.index(query.device), 0.0)
    return query


# Copied from selective_attention.attention.masked._valid_query_positions
def _valid_query_positions(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, batch: int) -> torch.Tensor | None:
    """(B, q) bool: query rows that are real tokens (a padded token cannot attend to its own key)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    rows = torch.arange(q_len, device=attention_mask.device)
    diagonal = attention_mask[:, 0, rows, rows + (kv_len - q_len)]
    valid = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return valid.expand(batch, q_len)


# Copied from selective_attention.attention.masked._mean_ablate with HeadMask->ConfigHeadMask
def _mean_ablate(mask: ConfigHeadMask, output: torch.Tensor, attention_mask, kv_len: int) -> torch.Tensor:
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


def ablate_after(mask, output: torch.Tensor, attention_mask, kv_len: int) -> torch.Tensor:
    """Zero or causal-running-mean ablation of the masked heads' outputs (B, q, H, D)."""
    if mask.mode == "zero":
        return output.index_fill(2, mask.index(output.device), 0.0)
    if mask.mode == "mean":
        return _mean_ablate(mask, output, attention_mask, kv_len)
    return output
