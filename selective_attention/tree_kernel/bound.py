"""`bound`, flat: Quest's page bound on every complete leaf block, the top blocks attended exactly.

Every complete leaf block keeps `kbox = [max_i k_i, -min_i k_i]` (element-wise), so
[q+, -q-] . kbox = q+ . kmax + q- . kmin >= q.k for every key of the block. A row's blocks are bounded with one
matmul per KV head; the first `sink_blocks` and last `local_blocks` blocks are forced in; the top-W blocks
(W = budget / leaf_block, forced ones included) and the row's own partial block are attended exactly. With
`estimate="mean"` every other complete block adds one term n exp(q . k_mean) with value v_mean.
"""

from __future__ import annotations

import torch

from .config import TreeKernelConfig
from .key_tree import KeyTree
from .ops import Softmax, dot_rows, gather_nodes, reduce_heads, score_nodes

#: up to this many query rows gather their blocks; more rows (prefill) mask one score matrix instead
GATHER_ROWS = 8


def local_block(key, value, rows, positions, blocks, block, scaled, softmax) -> float:
    """Adds the row's own partial (incomplete) block, exactly; returns the number of keys it scored."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    q_len = positions.shape[0]
    local = (blocks * block)[:, None] + torch.arange(block, device=key.device)  # (Q, block)
    local_ok = (local <= positions[:, None]) & (local < key.shape[2])
    local = local.clamp(max=key.shape[2] - 1)
    local_ok = local_ok[None].expand(batch, q_len, block) & rows.gather(2, local[None].expand(batch, -1, -1))
    local_keys = key[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, dim)
    local_values = value[:, :, local.reshape(-1)].view(batch, kv_heads, 1, q_len, block, value.shape[-1])
    softmax.add(dot_rows(scaled, local_keys).masked_fill(~local_ok[:, None, None], float("-inf")), local_values)
    return float(local_ok.sum())


def flat_bound_rows(config: TreeKernelConfig, tree: KeyTree, key, value, query, positions, rows, budgets, visible, scaling,
                     windowed: bool, softcap: float | None = None):
    """Every complete leaf block's min/max bound in one matmul per KV head -> top-W blocks (sink and local
    blocks forced) -> exact softmax over their keys + the row's partial block (+ each other block's mean term).

    Visibility is per row (`rows`, (B, Q, kv)): under a sliding window a block may lie wholly or partly outside a
    row's window. Blocks the row cannot see are never chosen; a block it sees only in part is always computed
    exactly (its mean term would count keys outside the window); every exact key is masked by the row's own
    visibility.
    """
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block, device, sharing = tree.block, query.device, config.sharing
    blocks = ((positions + 1) // block).clamp(max=tree.num_blocks)  # complete causal blocks per row (Q,)
    partial = positions + 1 - blocks * block
    wanted = torch.round((budgets - partial[None]).clamp(min=0).double() / block).long().clamp(min=1)  # (B, Q)
    scaled = query * scaling
    softmax = Softmax(softcap)
    heads = (kv_heads if sharing != "all" else 1) * (n_rep if sharing == "per_head" else 1)
    exact, rest_terms = 0.0, 0.0
    if tree.num_blocks > 0 and int(blocks.max()) > 0:
        level = tree.level(0)
        count = level["count"]  # (B, N)
        nodes = torch.arange(count.shape[1], device=device)
        used = tree.num_blocks * block
        valid = (nodes < blocks[:, None])[None] & (count[:, None] > 0)  # (B, Q, N)
        forced = (nodes < config.sink_blocks)[None] | (nodes[None] >= blocks[:, None] - config.local_blocks)
        forced = forced[None] & valid
        if windowed:
            seen = rows[:, :, :used].reshape(batch, q_len, tree.num_blocks, block).sum(-1)  # row's keys per block
            valid = valid & (seen > 0)
            part_seen = valid & (seen < count[:, None])
            forced = (forced & valid) | part_seen
        # every forced block fits the width; a budget that covers the row's keys takes every block (exact)
        available = valid.sum(-1)
        wanted = torch.maximum(torch.minimum(wanted, available), forced.sum(-1))
        wanted = torch.where(budgets >= visible, available, wanted)
        bound = score_nodes(torch.cat([query.clamp(min=0), -query.clamp(max=0)], -1), level["kbox"])
        bound = reduce_heads(bound, sharing, "max")
        bound = torch.where(forced[:, None, None], torch.finfo(bound.dtype).max, bound)
        bound = bound.masked_fill(~valid[:, None, None], float("-inf"))
        width = int(wanted.max())
        top, kept = bound.topk(min(width, bound.shape[-1]), dim=-1)
        kept_ok = (torch.arange(top.shape[-1], device=device) < wanted[:, None, None, :, None]) & torch.isfinite(top)
        selected = torch.zeros_like(bound, dtype=torch.bool).scatter_(-1, kept, kept_ok)
        if q_len > GATHER_ROWS:
            # prefill: every row's selected blocks as a mask over one score matrix (the same terms as the
            # gather below, cheaper when many rows share the keys)
            mask = selected.repeat_interleave(block, -1) & rows[:, None, None, :, :used]
            softmax.add(score_nodes(scaled, key[:, :, :used]).masked_fill(~mask, float("-inf")), value[:, :, :used])
            exact += float(mask.sum()) / heads
        else:
            exact += gather_blocks(key, value, rows, kept, kept_ok, block, tree.num_blocks, scaled, softmax, heads)
        if config.estimate == "mean":
            rest = valid[:, None, None] & ~selected
            if windowed:
                rest = rest & ~part_seen[:, None, None]
            counts = count.clamp(min=1)[:, None, None, None]  # (B, 1, 1, 1, N)
            logits = score_nodes(scaled, level["ksum"]) / counts  # q . mean key
            softmax.add(logits.masked_fill(~rest, float("-inf")), level["vsum"], counts)
            rest_terms = float(rest.sum()) / heads
    exact += local_block(key, value, rows, positions, blocks, block, scaled, softmax)
    config.stats.add(q_len * batch, float(visible.sum()), exact, exact + rest_terms)
    return softmax.result()


def gather_blocks(key, value, rows, kept, kept_ok, block, num_blocks, scaled, softmax, heads) -> float:
    """Decode: gather the kept blocks (one contiguous block * D row per index, not single keys); `rows` (B, Q, kv)
    masks each row's keys (padding, window)."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    device = key.device
    used = num_blocks * block
    block_keys = gather_nodes(key[:, :, :used].reshape(batch, kv_heads, num_blocks, block * dim), kept)
    block_values = gather_nodes(value[:, :, :used].reshape(batch, kv_heads, num_blocks, -1), kept)
    key_positions = (kept[..., None] * block + torch.arange(block, device=device)).flatten(-2)  # (B, Hs, S, Q, W*b)
    row_visible = rows[:, None, None].expand(*key_positions.shape[:4], rows.shape[-1]).gather(-1, key_positions)
    valid_keys = kept_ok[..., None].expand(*kept_ok.shape, block).flatten(-2) & row_visible
    block_keys = block_keys.view(batch, kv_heads, *kept.shape[2:], block, dim).flatten(-3, -2)
    block_values = block_values.view(batch, kv_heads, *kept.shape[2:], block, -1).flatten(-3, -2)
    softmax.add(dot_rows(scaled, block_keys).masked_fill(~valid_keys, float("-inf")), block_values)
    return float(valid_keys.sum()) / heads

