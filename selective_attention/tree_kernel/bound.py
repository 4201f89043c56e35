"""`bound`, flat: Quest's page bound on every complete leaf block, the top blocks attended exactly.

Every complete leaf block keeps `kbox = [max_i k_i, -min_i k_i]` (element-wise), so
[q+, -q-] . kbox = q+ . kmax + q- . kmin >= q.k for every key of the block. A row's blocks are bounded with one
matmul per KV head; the first `sink_blocks` and last `local_blocks` blocks are forced in; the top-W blocks
(W = budget / leaf_block, forced ones included) and the row's own partial block are attended exactly. With
`estimate="mean"` every other complete block adds one term n exp(q . k_mean) with value v_mean.

Keys and values stay in the cache's dtype; only what a row reads (gathered blocks, or the score matrix of a
prefill) is cast to float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selective_attention.tree_kernel.config import TreeKernelConfig
from selective_attention.tree_kernel.key_tree import KeyTree
from selective_attention.tree_kernel.ops import Softmax, dot_rows, gather_nodes, reduce_heads, score_nodes

#: up to this many query rows gather their blocks; more rows (prefill) mask one score matrix instead
GATHER_ROWS = 8


@dataclass
class BlockBounds:
    """The complete leaf blocks a chunk of rows can see, with their bounds.

    valid / forced / part_seen (B, Q, N); bound (B, Hs, S, Q, N): each block's rank score (`config.rank`: the
    upper bound, q . mean key, or their average), +max for forced blocks, -inf for invalid ones.
    N: the complete blocks up to the last row's (the tree's first N leaf blocks).
    """

    level: dict[str, torch.Tensor]
    valid: torch.Tensor
    forced: torch.Tensor
    part_seen: torch.Tensor | None
    bound: torch.Tensor
    mean_score: torch.Tensor | None = None  # q . mean key per head (B, Hkv, R, Q, N), when the rank computed it

    @property
    def num_blocks(self) -> int:
        return self.valid.shape[-1]


def complete_blocks(tree: KeyTree, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (Q,) -> complete causal blocks per row (Q,) and keys of the row's own incomplete block (Q,)."""
    blocks = ((positions + 1) // tree.block).clamp(max=tree.num_blocks)
    return blocks, positions + 1 - blocks * tree.block


def block_bounds(config: TreeKernelConfig, tree: KeyTree, query: torch.Tensor, blocks: torch.Tensor,
                 rows: torch.Tensor, windowed: bool) -> BlockBounds | None:
    """query (B, Hkv, R, Q, D), blocks (Q,), rows (B, Q, kv) -> the rows' block bounds (None when no row has a
    complete block).

    Visibility is per row: under a sliding window a block may lie wholly or partly outside a row's window. Blocks
    the row cannot see are invalid; a block it sees only in part is forced (attended exactly: its mean term would
    count keys outside the window); every exact key is still masked by the row's own visibility.
    """
    block, device = tree.block, query.device
    if tree.num_blocks == 0 or int(blocks.max()) == 0:
        return None
    # blocks past the chunk's last row are invisible to all its rows (prefill chunks see a causal prefix)
    seen_blocks = int(blocks.max())
    level = {name: (t[:, :seen_blocks] if name == "count" else t[:, :, :seen_blocks])
             for name, t in tree.level(0).items()}
    count = level["count"]  # (B, N)
    batch, q_len = rows.shape[:2]
    nodes = torch.arange(count.shape[1], device=device)
    valid = (nodes < blocks[:, None])[None] & (count[:, None] > 0)  # (B, Q, N)
    forced = (nodes < config.sink_blocks)[None] | (nodes[None] >= blocks[:, None] - config.local_blocks)
    forced = forced[None] & valid
    part_seen = None
    if windowed:
        used = seen_blocks * block
        seen = rows[:, :, :used].reshape(batch, q_len, seen_blocks, block).sum(-1)  # row's keys per block
        valid = valid & (seen > 0)
        part_seen = valid & (seen < count[:, None])
        forced = (forced & valid) | part_seen
    if config.rank != "bound":  # q . mean key: a block's typical score rather than its best possible one
        mean = score_nodes(query, level["ksum"]) / count.clamp(min=1)[:, None, None, None]
    if config.rank != "mean":
        bound = score_nodes(torch.cat([query.clamp(min=0), -query.clamp(max=0)], -1), level["kbox"])
    mean_score = mean if config.rank != "bound" else None
    bound = mean if config.rank == "mean" else 0.5 * (bound + mean) if config.rank == "mix" else bound
    bound = reduce_heads(bound, config.sharing, "max")
    bound = torch.where(forced[:, None, None], torch.finfo(bound.dtype).max, bound)
    bound = bound.masked_fill(~valid[:, None, None], float("-inf"))
    return BlockBounds(level, valid, forced, part_seen, bound, mean_score)


def top_blocks(bound: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bound (B, Hs, S, Q, N), wanted (B, Q) -> kept ids, kept_ok (B, Hs, S, Q, W) and the selection (.., N)."""
    width = min(int(wanted.max()), bound.shape[-1])
    # unsorted is faster; the rank order matters only when rows want different counts
    top, kept = bound.topk(width, dim=-1, sorted=not bool((wanted == wanted.max()).all()))
    kept_ok = (torch.arange(top.shape[-1], device=bound.device) < wanted[:, None, None, :, None]) & torch.isfinite(top)
    selected = torch.zeros_like(bound, dtype=torch.bool).scatter_(-1, kept, kept_ok)
    return kept, kept_ok, selected


def rest_estimate(config: TreeKernelConfig, bounds: BlockBounds, selected: torch.Tensor, scaled: torch.Tensor,
                  softmax: Softmax, scaling: float) -> torch.Tensor:
    """Adds n exp(q . k_mean), v_mean for every valid block not `selected` (B, Hs, S, Q, N); returns the terms
    per row and head (B, Hs, S, Q)."""
    rest = bounds.valid[:, None, None] & ~selected
    if bounds.part_seen is not None:
        rest = rest & ~bounds.part_seen[:, None, None]
    if config.estimate != "mean":
        return torch.zeros(rest.shape[:-1], device=rest.device)
    counts = bounds.level["count"].clamp(min=1)[:, None, None, None]  # (B, 1, 1, 1, N)
    if bounds.mean_score is not None:  # the rank computed it already (unscaled query)
        logits = bounds.mean_score * scaling
    else:
        logits = score_nodes(scaled, bounds.level["ksum"]) / counts  # q . mean key
    softmax.add(logits.masked_fill(~rest, float("-inf")), bounds.level["vsum"], counts)
    return rest.sum(-1).float()


def local_block(key, value, rows, positions, blocks, block, scaled, softmax) -> torch.Tensor:
    """Adds the row's own partial (incomplete) block, exactly; returns the keys it scored per row (B, Q)."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    q_len = positions.shape[0]
    local = (blocks * block)[:, None] + torch.arange(block, device=key.device)  # (Q, block)
    local_ok = (local <= positions[:, None]) & (local < key.shape[2])
    local = local.clamp(max=key.shape[2] - 1)
    local_ok = local_ok[None].expand(batch, q_len, block) & rows.gather(2, local[None].expand(batch, -1, -1))
    local_keys = key[:, :, local.reshape(-1)].float().view(batch, kv_heads, 1, q_len, block, dim)
    local_values = value[:, :, local.reshape(-1)].float().view(batch, kv_heads, 1, q_len, block, value.shape[-1])
    softmax.add(dot_rows(scaled, local_keys).masked_fill(~local_ok[:, None, None], float("-inf")), local_values)
    return local_ok.sum(-1).float()


def flat_bound_rows(config: TreeKernelConfig, tree: KeyTree, key, value, query, positions, rows, budgets, visible,
                    scaling, windowed: bool, softcap: float | None = None):
    """Every complete leaf block's bound -> top-W blocks (sink and local blocks forced) -> exact softmax over
    their keys + the row's partial block (+ each other block's mean term). (B, Hkv, R, Q, D) -> (.., Dv)."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block = tree.block
    scaled = query * scaling
    softmax = Softmax(softcap)
    per_row = torch.zeros(batch, 1, 1, q_len, device=query.device)
    exact, rest_terms, bounded = per_row, per_row, per_row[:, 0, 0]
    blocks, partial = complete_blocks(tree, positions)
    bounds = block_bounds(config, tree, query, blocks, rows, windowed)
    if bounds is not None:
        used = bounds.num_blocks * block
        wanted = torch.round((budgets - partial[None]).clamp(min=0).double() / block).long().clamp(min=1)
        # every forced block fits the width; a budget that covers the row's keys takes every block (exact)
        available = bounds.valid.sum(-1)
        wanted = torch.maximum(torch.minimum(wanted, available), bounds.forced.sum(-1))
        wanted = torch.where(budgets >= visible, available, wanted)
        kept, kept_ok, selected = top_blocks(bounds.bound, wanted)
        if q_len > GATHER_ROWS:
            # prefill: every row's selected blocks as a mask over one score matrix (the same terms as the
            # gather below, cheaper when many rows share the keys)
            mask = selected.repeat_interleave(block, -1) & rows[:, None, None, :, :used]
            softmax.add(score_nodes(scaled, key[:, :, :used].float()).masked_fill(~mask, float("-inf")),
                        value[:, :, :used].float())
            exact = mask.sum(-1).float()
        else:
            exact = gather_blocks(key, value, rows, kept, kept_ok, block, bounds.num_blocks, scaled, softmax)
        rest_terms = rest_estimate(config, bounds, selected, scaled, softmax, scaling)
        bounded = available.float()
    exact = exact.mean((1, 2)) + local_block(key, value, rows, positions, blocks, block, scaled, softmax)
    config.stats.add(visible, budgets, exact, exact + rest_terms.mean((1, 2)), bounded)
    return softmax.result()


def gather_blocks(key, value, rows, kept, kept_ok, block, num_blocks, scaled, softmax) -> torch.Tensor:
    """Decode: gather the kept blocks (one contiguous block * D row per index, not single keys); `rows` (B, Q, kv)
    masks each row's keys (padding, window). Returns the keys attended per row and selection head (B, Hs, S, Q)."""
    batch, kv_heads, dim = key.shape[0], key.shape[1], key.shape[-1]
    used = num_blocks * block
    block_keys = gather_nodes(key[:, :, :used].reshape(batch, kv_heads, num_blocks, block * dim), kept).float()
    block_values = gather_nodes(value[:, :, :used].reshape(batch, kv_heads, num_blocks, -1), kept).float()
    key_positions = (kept[..., None] * block + torch.arange(block, device=key.device)).flatten(-2)  # (B,Hs,S,Q,W*b)
    row_visible = rows[:, None, None].expand(*key_positions.shape[:4], rows.shape[-1]).gather(-1, key_positions)
    valid_keys = kept_ok[..., None].expand(*kept_ok.shape, block).flatten(-2) & row_visible
    block_keys = block_keys.view(batch, kv_heads, *kept.shape[2:], block, dim).flatten(-3, -2)
    block_values = block_values.view(batch, kv_heads, *kept.shape[2:], block, -1).flatten(-3, -2)
    softmax.add(dot_rows(scaled, block_keys).masked_fill(~valid_keys, float("-inf")), block_values)
    return valid_keys.sum(-1).float()
