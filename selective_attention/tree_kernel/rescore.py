"""`rescore`: the block bound proposes candidates, exact scores choose the keys.

Per row: every complete leaf block's bound (as `bound`); the best blocks holding `candidates` x budget keys (sink
and local blocks forced; by default one candidate set per KV head, shared by its query heads, so one read of the
candidate keys serves the whole group) are scored exactly; each query head keeps its top keys (forced keys first)
up to the budget and attends them, plus the row's own partial block, exactly. With `estimate="mean"`, rescored
keys that were not kept add their exact weight with their block's mean value (no extra reads: the block sums are
in the tree), and blocks never read add n exp(q . k_mean) with v_mean.

Costs per row (`TreeStats`): bounds = blocks bounded, rescored = keys scored exactly, exact = keys whose values
are read, terms = softmax terms. The prefill path computes one score matrix and masks it (an evaluation shortcut
that gives the same rows, tested); decode gathers only the candidate keys and the kept values.
"""

from __future__ import annotations

import torch

from selective_attention.tree_kernel.bound import (
    GATHER_ROWS,
    BlockBounds,
    block_bounds,
    complete_blocks,
    local_block,
    rest_estimate,
    top_blocks,
)
from selective_attention.tree_kernel.config import TreeKernelConfig
from selective_attention.tree_kernel.key_tree import KeyTree
from selective_attention.tree_kernel.ops import (
    IndexedValues,
    Softmax,
    dot_rows,
    gather_counts,
    gather_nodes,
    score_nodes,
)


def _keys_wanted(config: TreeKernelConfig, bounds: BlockBounds, budgets, visible, partial, block: int):
    """Keys kept and candidate blocks per row (B, Q): forced blocks always fit; a full budget takes everything."""
    available = bounds.valid.sum(-1)
    forced_keys = (bounds.forced.float() * bounds.level["count"][:, None]).sum(-1).long()
    keys = torch.maximum((budgets - partial[None]).clamp(min=0), forced_keys)
    width = torch.ceil(keys.double() * config.candidates / block).long()
    width = torch.maximum(torch.minimum(width, available), bounds.forced.sum(-1))
    full = budgets >= visible
    return torch.where(full, visible, keys), torch.where(full, available, width)


def _choose(scores: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor, keys: torch.Tensor):
    """scores (B, Hkv, R, Q, C); candidate / forced masks broadcast to it; keys (B, Q) -> kept order and mask."""
    ranking = torch.where(forced & candidate, float("inf"), scores).masked_fill(~candidate, float("-inf"))
    uniform = bool((keys == keys.max()).all())  # then the rank order is not needed (unsorted topk is faster)
    top, order = ranking.topk(min(int(keys.max()), ranking.shape[-1]), dim=-1, sorted=not uniform)
    keep_ok = (torch.arange(top.shape[-1], device=top.device) < keys[:, None, None, :, None]) & (top > float("-inf"))
    return order, keep_ok


def rescore_rows(config: TreeKernelConfig, tree: KeyTree, key, value, query, positions, rows, budgets, visible,
                 scaling, windowed: bool, softcap: float | None = None):
    """query (B, Hkv, R, Q, D), key/value (B, Hkv, kv, D), rows (B, Q, kv) -> (B, Hkv, R, Q, Dv)."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block = tree.block
    scaled = query * scaling
    softmax = Softmax(softcap)
    zeros = torch.zeros(batch, q_len, device=query.device)
    exact, terms, bounded, rescored = zeros, zeros, zeros, zeros
    blocks, partial = complete_blocks(tree, positions)
    bounds = block_bounds(config, tree, query, blocks, rows, windowed)
    if bounds is not None:
        used, count = bounds.num_blocks * block, bounds.level["count"]
        keys, width = _keys_wanted(config, bounds, budgets, visible, partial, block)
        candidates, candidates_ok, selected = top_blocks(bounds.bound, width)
        if q_len > GATHER_ROWS:
            candidate = selected.repeat_interleave(block, -1) & rows[:, None, None, :, :used]  # (B, Hs, S, Q, used)
            forced = bounds.forced.repeat_interleave(block, -1)[:, None, None]
            scores = score_nodes(scaled, key[:, :, :used].float())  # (B, Hkv, R, Q, used)
            order, keep_ok = _choose(scores, candidate, forced, keys)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, keep_ok)
            softmax.add(scores.masked_fill(~keep, float("-inf")), value[:, :, :used].float())
            drop_values, drop_counts = bounds.level["vsum"], count.clamp(min=1)[:, None, None, None]
        else:
            block_keys = gather_nodes(key[:, :, :used].reshape(batch, kv_heads, bounds.num_blocks, block * dim),
                                      candidates).float()
            block_keys = block_keys.view(batch, kv_heads, *candidates.shape[2:4], -1, dim)  # (B, Hkv, S, Q, C, D)
            positions_c = (candidates[..., None] * block + torch.arange(block, device=key.device)).flatten(-2)
            visible_c = rows[:, None, None].expand(*positions_c.shape[:4], rows.shape[-1]).gather(-1, positions_c)
            candidate = candidates_ok.repeat_interleave(block, -1) & visible_c  # (B, Hs, S, Q, C)
            forced = bounds.forced[:, None, None].expand(*candidates.shape[:4], -1).gather(-1, candidates)
            forced = forced.repeat_interleave(block, -1)
            scores = dot_rows(scaled, block_keys)  # (B, Hkv, R, Q, C)
            order, keep_ok = _choose(scores, candidate, forced, keys)
            kept_positions = positions_c.expand(*scores.shape).gather(-1, order)  # (B, Hkv, R, Q, K)
            softmax.add(scores.gather(-1, order).masked_fill(~keep_ok, float("-inf")),
                        IndexedValues(value, kept_positions))
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, keep_ok)
            drop_values = gather_nodes(bounds.level["vsum"], candidates)  # (B, Hkv, S, Q, W, Dv)
            drop_counts = gather_counts(count, candidates.reshape(batch, -1)).view(candidates.shape).clamp(min=1)
        # rescored keys not kept: their exact weight, carried by their block's mean value
        dropped = candidate & ~keep
        drop_terms = torch.zeros(scores.shape[:4], device=scores.device)
        if config.estimate == "mean" and bool(dropped.any()):
            # log of each block's dropped mass, shifted by the row's largest dropped score (one exp, no
            # logsumexp over 16-wide groups, which costs several passes over the score matrix)
            capped = softmax.cap(scores)
            shift = capped.masked_fill(~dropped, float("-inf")).amax(-1, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            mass = torch.exp(capped - shift).masked_fill_(~dropped, 0.0)
            lse = torch.log(mass.view(*scores.shape[:4], -1, block).sum(-1)) + shift  # (B, Hkv, R, Q, blocks)
            softmax.add(lse - torch.log(drop_counts), drop_values, drop_counts, capped=True)
            drop_terms = torch.isfinite(lse).sum(-1).float()
        rest = rest_estimate(config, bounds, selected, scaled, softmax, scaling)
        exact = keep_ok.sum(-1).float().mean((1, 2))
        rescored = candidate.sum(-1).float().mean((1, 2))
        terms = exact + drop_terms.mean((1, 2)) + rest.mean((1, 2))
        bounded = bounds.valid.sum(-1).float()
    local = local_block(key, value, rows, positions, blocks, block, scaled, softmax)
    config.stats.add(visible, budgets, exact + local, terms + local, bounded, rescored + local)
    return softmax.result()
