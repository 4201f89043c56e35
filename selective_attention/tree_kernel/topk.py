"""`topk`: the exact per-row top-k oracle. It computes every score, so it bounds what selection alone can reach."""

from __future__ import annotations

import torch

from selective_attention.tree_kernel.config import TreeKernelConfig


def topk_rows(config: TreeKernelConfig, key: torch.Tensor, value: torch.Tensor, query: torch.Tensor,
              positions: torch.Tensor, rows: torch.Tensor, budgets: torch.Tensor, visible: torch.Tensor,
              scaling: float, softcap: float | None = None) -> torch.Tensor:
    """query (B, Hkv, R, Q, D), key/value (B, Hkv, kv, D), rows (B, Q, kv) -> (B, Hkv, R, Q, Dv).

    Every score is computed; each row keeps its `budgets` highest visible keys (per query head)."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    seen = int(positions.max()) + 1  # keys past the chunk's last row are invisible to all its rows
    key, value, rows = key[:, :, :seen], value[:, :, :seen], rows[..., :seen]
    scores = torch.einsum("bhrqd,bhkd->bhrqk", query, key.float()) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~rows[:, None, None], float("-inf"))
    k = max(1, int(budgets.max()))
    top, order = scores.topk(min(k, scores.shape[-1]), dim=-1)
    keep = torch.arange(top.shape[-1], device=top.device) < budgets[:, None, None, :, None]
    top = top.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(top, dim=-1).nan_to_num(0.0)
    dense = torch.zeros_like(scores).scatter_(-1, order, weights)
    kept = keep.expand(batch, 1, 1, q_len, keep.shape[-1]).sum(-1)[:, 0, 0].float()  # the same for every head
    config.stats.add(visible, budgets, kept, rescored=visible)
    return torch.einsum("bhrqk,bhkv->bhrqv", dense, value.float())

