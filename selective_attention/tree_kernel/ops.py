"""Tensor helpers shared by the selectors: gathers, head sharing, dot products and a multi-part softmax.

Query rows are grouped by KV head: (B, Hkv, R, Q, D) with R = query heads per KV head. A selection shared by a
group of heads has S in {1, R} rows on that axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def gather_nodes(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer (B, H, N, X), index (B, Hi, *rest) with Hi in {1, H} -> (B, H, *rest, X).

    Reads only the gathered rows whatever the buffer's strides: a slice of a KV cache is not contiguous, and
    flattening it would copy the whole cache, so each (batch, head) matrix, whose rows are contiguous, is gathered
    on its own (a contiguous buffer takes one `index_select` on its flat view)."""
    batch, heads, nodes, width = buffer.shape
    if buffer.is_contiguous():
        base = (torch.arange(batch * heads, device=buffer.device) * nodes).view(batch, heads, *[1] * (index.dim() - 2))
        flat = (base + index).reshape(-1)
        return buffer.view(-1, width).index_select(0, flat).view(batch, heads, *index.shape[2:], width)
    shared = index.shape[1] == 1
    out = buffer.new_empty(batch, heads, index[0, 0].numel(), width)
    for b in range(batch):
        for h in range(heads):
            torch.index_select(buffer[b, h], 0, index[b, 0 if shared else h].reshape(-1), out=out[b, h])
    return out.view(batch, heads, *index.shape[2:], width)


def gather_counts(buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """buffer (B, N), index (B, *rest) -> (B, *rest)."""
    batch, nodes = buffer.shape
    base = (torch.arange(batch, device=buffer.device) * nodes).view(batch, *[1] * (index.dim() - 1))
    return buffer.reshape(-1).index_select(0, (base + index).reshape(-1)).view(index.shape)


def reduce_heads(scores: torch.Tensor, sharing: str, how: str) -> torch.Tensor:
    """(B, Hkv, R, ...) per-head scores -> the selection groups' scores (B, Hs, S, ...), by max or logsumexp."""
    if sharing == "per_head":
        return scores
    dims = (2,) if sharing == "kv_group" else (1, 2)
    return scores.amax(dims, keepdim=True) if how == "max" else scores.logsumexp(dims, keepdim=True)


def selection_heads(sharing: str, kv_heads: int, n_rep: int) -> tuple[int, int]:
    """(Hs, S): how many selections a layer makes per KV-head axis and per group axis."""
    return (kv_heads if sharing != "all" else 1), (n_rep if sharing == "per_head" else 1)


def dot_rows(query: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """query (B, Hkv, R, Q, D) . rows (B, Hkv, S, Q, C, D) with S in {1, R} -> (B, Hkv, R, Q, C)."""
    if rows.shape[2] == query.shape[2] and query.shape[2] != 1:
        return torch.einsum("bhsqd,bhsqcd->bhsqc", query, rows)
    return torch.einsum("bhrqd,bhqcd->bhrqc", query, rows[:, :, 0])


def score_nodes(query: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """query (B, Hkv, R, Q, D) . nodes (B, Hkv, N, D) -> (B, Hkv, R, Q, N), one matmul per KV head."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    return torch.matmul(query.reshape(batch, kv_heads, n_rep * q_len, dim), nodes.transpose(-1, -2)).view(
        batch, kv_heads, n_rep, q_len, nodes.shape[2])


def weighted_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights (B, Hkv, R, Q, C) x values (B, Hkv, S, Q, C, Dv) or (B, Hkv, C, Dv) -> (B, Hkv, R, Q, Dv)."""
    if values.dim() == 4:  # (B, Hkv, C, Dv): the same terms for every row
        return torch.matmul(weights.flatten(2, 3), values).view(*weights.shape[:4], values.shape[-1])
    if values.shape[2] == weights.shape[2] and weights.shape[2] != 1:
        return torch.einsum("bhsqc,bhsqcv->bhsqv", weights, values)
    return torch.einsum("bhrqc,bhqcv->bhrqv", weights, values[:, :, 0])


@dataclass
class IndexedValues:
    """Values read in place: rows `index` (B, H, R, Q, K) of `cache` (B, H, L, Dv), never gathered into a copy
    (`embedding_bag` fuses the gather with the weighted sum; float32 caches, else one gather)."""

    cache: torch.Tensor
    index: torch.Tensor

    def weighted(self, weights: torch.Tensor) -> torch.Tensor:
        """weights (B, H, R, Q, K) -> (B, H, R, Q, Dv)."""
        if self.cache.dtype != torch.float32:
            return weighted_values(weights, gather_nodes(self.cache, self.index).float())
        batch, heads, width = self.cache.shape[0], self.cache.shape[1], self.index.shape[-1]
        out = weights.new_empty(*weights.shape[:4], self.cache.shape[-1])
        for b in range(batch):
            for h in range(heads):
                out[b, h] = torch.nn.functional.embedding_bag(
                    self.index[b, h].reshape(-1, width), self.cache[b, h],
                    per_sample_weights=weights[b, h].reshape(-1, width), mode="sum").view(out.shape[2:])
        return out


class Softmax:
    """Accumulates sum exp(logit) value over several groups of terms with one running maximum.

    With `softcap` (Gemma 2) every finite logit s becomes softcap * tanh(s / softcap), as the model's eager
    attention does; a monotonic map, so selections ranked on raw scores or bounds stay valid."""

    def __init__(self, softcap: float | None = None) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor | IndexedValues, torch.Tensor | None]] = []
        self.softcap = softcap

    def add(self, logits: torch.Tensor, values: torch.Tensor | IndexedValues, counts: torch.Tensor | None = None,
            capped: bool = False) -> None:
        """Terms exp(logit) value; with `counts` (broadcast to logits) the terms are n exp(logit) (values / n)
        and `values` are the n-key sums, which saves dividing every node's sums by its count. `capped`: the
        logits were soft-capped by the caller (e.g. a log-sum of capped scores)."""
        if self.softcap is not None and not capped:
            logits = torch.where(torch.isfinite(logits), torch.tanh(logits / self.softcap) * self.softcap, logits)
        self.parts.append((logits, values, counts))

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        """The soft-capped scores (unchanged without a cap)."""
        return scores if self.softcap is None else torch.tanh(scores / self.softcap) * self.softcap

    def result(self) -> torch.Tensor:
        maximum = None
        for logits, _, counts in self.parts:
            part = (logits if counts is None else logits + torch.log(counts)).amax(-1)
            maximum = part if maximum is None else torch.maximum(maximum, part)
        maximum = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
        numerator, denominator = 0.0, 0.0
        for logits, values, counts in self.parts:
            weights = torch.exp(logits - maximum[..., None])
            weighted = values.weighted(weights) if isinstance(values, IndexedValues) else weighted_values(weights,
                                                                                                        values)
            numerator = numerator + weighted
            denominator = denominator + (weights.sum(-1) if counts is None else (weights * counts).sum(-1))
        return numerator / denominator.clamp(min=1e-30)[..., None]


def row_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """(B, Q, kv) bool: which keys each query row may see (causal when the mask is None)."""
    if attention_mask is None:
        positions = torch.arange(kv_len, device=device)
        rows = torch.arange(q_len, device=device) + (kv_len - q_len)
        return (positions[None, :] <= rows[:, None]).expand(batch, q_len, kv_len)
    mask = attention_mask[:, 0]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(batch, q_len, kv_len)
