"""`rescore` at decode, the path `generate` takes: one query row per sequence that sees its whole causal prefix.

The same selection and softmax terms as `rescore_rows` (tested against it and against a brute-force loop),
without the general path's per-row masks: every row of the batch has the same visible keys and budget, so a
step's widths are plain integers (`plan_step`), and the candidate set is shared by each KV group
(`sharing="kv_group"`), so each candidate key is read once for the group. The step runs as the fused C++ kernel
(`csrc/rescore_decode.cpp`, see `native.py`) when it is built and the cache is float32, else as the PyTorch ops
below: candidate keys gathered chunk by chunk, kept values read in place (`embedding_bag`), one running maximum
over the four groups of terms (kept keys; dropped candidates: exact weight, block-mean value; blocks never read:
n exp(q . k_mean), v_mean; the row's own partial block).

Falls back to `rescore_rows` (returns None) for what it does not cover: soft-capping, padding or a sliding
window (a row that does not see its whole prefix), other sharing modes, and budgets that cover every key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selective_attention.tree_kernel.config import TreeKernelConfig
from selective_attention.tree_kernel.key_tree import KeyTree
from selective_attention.tree_kernel.native import rescore_kernel
from selective_attention.tree_kernel.ops import IndexedValues, gather_nodes, row_mask

RANK_MODES = {"bound": 0, "mean": 1, "mix": 2}  # the fused kernel's codes for `config.rank`
_EMPTY = torch.empty(0, 0, 0, 0)  # no block boxes (rank "mean" does not build them)


def sees_whole_prefix(attention_mask: torch.Tensor | None) -> bool:
    """True when the mask of a single query row (B or 1, 1, 1, kv) hides nothing (no padding, no window)."""
    if attention_mask is None:
        return True
    batch, kv_len = attention_mask.shape[0], attention_mask.shape[-1]
    return bool(row_mask(attention_mask, batch, 1, kv_len, attention_mask.device).all())


#: candidate blocks gathered at a time: a chunk of keys (128 x 16 x 64 float32 = 512 KB) stays in the core's cache
#: between the gather and the product, so the keys are read from memory once
CHUNK_BLOCKS = 128


def _candidate_scores(blocks: torch.Tensor, candidates: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """blocks (B, Hkv, N, block * D) (the key cache by leaf block), candidates (B, Hkv, W), scaled (B, Hkv, R, D)
    -> (B, Hkv, R, W * block): the exact scores of the candidate blocks' keys, gathered chunk by chunk."""
    batch, kv_heads, width = candidates.shape
    dim = scaled.shape[-1]
    block = blocks.shape[-1] // dim
    scores = scaled.new_empty(batch, kv_heads, scaled.shape[2], width * block)
    chunk = min(CHUNK_BLOCKS, width)
    buffer = blocks.new_empty(chunk, block * dim)
    for b in range(batch):
        for h in range(kv_heads):
            for start in range(0, width, chunk):
                stop = min(width, start + chunk)
                keys = torch.index_select(blocks[b, h], 0, candidates[b, h, start:stop], out=buffer[:stop - start])
                keys = keys.view(-1, dim)
                torch.mm(scaled[b, h], (keys if keys.dtype == scaled.dtype else keys.float()).t(),
                         out=scores[b, h, :, start * block:stop * block])
    return scores


@dataclass(frozen=True)
class DecodePlan:
    """Integer widths of one decode step (every row of the batch sees the same `length` keys)."""

    length: int
    budget: int
    n_blocks: int  # complete leaf blocks
    partial: int  # keys of the row's own incomplete block
    forced: tuple[int, ...]  # sink and local block ids
    width: int  # candidate blocks
    keys: int  # kept keys per query head (the partial block's keys come on top)


def plan_step(config: TreeKernelConfig, length: int, block: int) -> DecodePlan | None:
    """The step's widths as `rescore_rows` computes them per row; None when the budget covers every key."""
    budget = config.budget_for(length)
    n_blocks = length // block
    if budget >= length or n_blocks == 0:
        return None
    sink = min(config.sink_blocks, n_blocks)
    forced = tuple(range(sink)) + tuple(range(max(n_blocks - config.local_blocks, sink), n_blocks))
    partial = length - n_blocks * block
    keys = max(budget - partial, len(forced) * block)
    width = min(max(math.ceil(keys * config.candidates / block), len(forced)), n_blocks)
    return DecodePlan(length, budget, n_blocks, partial, forced, width, min(keys, width * block))


def rescore_decode(config: TreeKernelConfig, tree: KeyTree, key: torch.Tensor, value: torch.Tensor,
                   query: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """query (B, Hkv, R, D) float32 (one row per sequence, at position kv - 1), key/value (B, Hkv, kv, D) ->
    (B, Hkv, R, Dv), or None when the general path must run (see module docstring). Runs the fused C++ kernel
    when it is available and the cache is float32, else the PyTorch ops below."""
    batch = query.shape[0]
    plan = plan_step(config, key.shape[2], tree.block)
    if plan is None or tree.num_blocks < plan.n_blocks:
        return None
    kernel = rescore_kernel() if key.dtype == value.dtype == torch.float32 else None
    if kernel is not None:  # level 0 of the tree's buffers starts at row 0: the kernel reads rows [0, N)
        stats = tree.buffers
        output, drops = kernel.rescore_decode(
            query, key, value, stats.get("kbox", _EMPTY), stats["ksum"], stats["vsum"], stats["count"],
            list(plan.forced), plan.n_blocks, tree.block, plan.width, plan.keys, RANK_MODES[config.rank],
            config.estimate == "mean", scaling)
    else:
        output, drop_terms = _rescore_decode_torch(config, tree, key, value, query, scaling, plan)
        drops = float(drop_terms.sum()) / drop_terms.numel()
    drop = drops + plan.n_blocks - plan.width if config.estimate == "mean" else 0.0
    config.stats.add_rows(batch, plan.length, plan.budget, plan.keys + plan.partial, plan.keys + plan.partial + drop,
                          plan.n_blocks, plan.width * tree.block + plan.partial)
    return output


def _rescore_decode_torch(config: TreeKernelConfig, tree: KeyTree, key: torch.Tensor, value: torch.Tensor,
                          query: torch.Tensor, scaling: float, plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in PyTorch ops -> output (B, Hkv, R, Dv), candidate blocks with a dropped key (B, Hkv, R)."""
    batch, kv_heads, n_rep, dim = query.shape
    block, n_blocks, width, keys = tree.block, plan.n_blocks, plan.width, plan.keys
    level = tree.level(0)
    ksum, vsum = level["ksum"][:, :, :n_blocks], level["vsum"][:, :, :n_blocks]  # (B, Hkv, N, D)
    count = level["count"][:, :n_blocks][:, None, None]  # (B, 1, 1, N): block sizes (block, no padding here)

    # rank every complete block (unscaled query, as `block_bounds`), one candidate set per KV group
    mean = None
    if config.rank != "bound" or config.estimate == "mean":
        mean = torch.matmul(query, ksum.transpose(-1, -2)) / count  # q . mean key (B, Hkv, R, N)
    if config.rank == "mean":
        rank = mean
    else:
        box = torch.cat([query.clamp(min=0), -query.clamp(max=0)], -1)
        rank = torch.matmul(box, level["kbox"][:, :, :n_blocks].transpose(-1, -2))
        rank = rank if config.rank == "bound" else 0.5 * (rank + mean)
    rank = rank.amax(2)  # (B, Hkv, N)
    forced = torch.tensor(plan.forced, device=key.device)
    rank[..., forced] = torch.finfo(rank.dtype).max
    candidates = rank.topk(width, dim=-1, sorted=False).indices  # (B, Hkv, W)

    # exact scores of the candidate blocks' keys, read once per KV group
    scaled = query * scaling
    scores = _candidate_scores(key[:, :, :n_blocks * block].reshape(batch, kv_heads, n_blocks, block * dim),
                               candidates, scaled)  # (B, Hkv, R, W * block)
    is_forced = torch.isin(candidates, forced).repeat_interleave(block, -1)[:, :, None]  # forced keys go first
    order = scores.masked_fill(is_forced, float("inf")).topk(keys, dim=-1, sorted=False).indices  # (B, Hkv, R, K)
    positions = (candidates[..., None] * block + torch.arange(block, device=key.device)).flatten(-2)

    local_keys = key[:, :, n_blocks * block:].float()  # the row's own partial block (B, Hkv, P, D)
    local = torch.matmul(scaled, local_keys.transpose(-1, -2))  # (B, Hkv, R, P)
    maximum = scores.amax(-1, keepdim=True)
    if plan.partial:
        maximum = torch.maximum(maximum, local.amax(-1, keepdim=True))
    if config.estimate == "mean":
        chosen = torch.zeros(batch, kv_heads, 1, n_blocks, dtype=torch.bool, device=key.device)
        chosen.scatter_(-1, candidates[:, :, None], True)
        rest = (mean * scaling).masked_fill(chosen, float("-inf"))  # blocks never read (B, Hkv, R, N)
        maximum = torch.maximum(maximum, (rest + torch.log(count)).amax(-1, keepdim=True))
    weights = torch.exp(scores - maximum)
    kept = weights.gather(-1, order)
    kept_positions = positions[:, :, None].expand(-1, -1, n_rep, -1).gather(-1, order)  # (B, Hkv, R, K)
    numerator = IndexedValues(value, kept_positions[:, :, :, None]).weighted(kept[:, :, :, None])[:, :, :, 0]
    denominator = kept.sum(-1)
    if plan.partial:
        local_weights = torch.exp(local - maximum)
        numerator = numerator + torch.matmul(local_weights, value[:, :, n_blocks * block:].float())
        denominator = denominator + local_weights.sum(-1)
    drop_terms = torch.zeros(batch, kv_heads, n_rep, device=query.device)
    if config.estimate == "mean":
        # dropped candidates: their exact weight, carried by their block's mean value
        dropped = weights.scatter(-1, order, 0.0).view(batch, kv_heads, n_rep, width, block).sum(-1)
        means = gather_nodes(vsum, candidates) / torch.gather(count[:, 0, 0], 1, candidates.flatten(1)).view(
            batch, kv_heads, width, 1)  # (B, Hkv, W, Dv) mean values
        numerator = numerator + torch.matmul(dropped, means)
        denominator = denominator + dropped.sum(-1)
        rest_weights = torch.exp(rest - maximum)
        numerator = numerator + torch.matmul(rest_weights, vsum)
        denominator = denominator + (rest_weights * count).sum(-1)
        kept_per_block = torch.zeros_like(dropped).scatter_add_(-1, order // block, torch.ones_like(kept))
        drop_terms = (kept_per_block < block).sum(-1).float()  # candidate blocks with a dropped key
    return numerator / denominator[..., None], drop_terms
