"""`bound`, `descent="tree"`: the hierarchical version of the block bound, kept for comparison.

Level by level, every row keeps its best `beam * W` nodes (W = budget / leaf_block; W at the leaves) among the
children of the nodes it kept above plus its prefix root at this level (a Fenwick split of its causal past). The
kept leaf blocks and the row's own partial block are attended exactly; with `estimate="mean"` every node dropped
on the way adds its representative n exp(q . k_mean), v_mean. Dropped nodes and kept leaves partition the past.
It is slower and less accurate than the flat bound here: big nodes' bounds are loose, so good blocks are pruned.
"""

from __future__ import annotations

import math

import torch

from selective_attention.tree_kernel.bound import local_block
from selective_attention.tree_kernel.config import TreeKernelConfig
from selective_attention.tree_kernel.key_tree import KeyTree, prefix_roots
from selective_attention.tree_kernel.ops import Softmax, dot_rows, gather_counts, gather_nodes, reduce_heads


def tree_bound_rows(config: TreeKernelConfig, tree: KeyTree, key, value, key_valid, query, positions, rows, budgets,
                    visible, scaling):
    """Hierarchical top-W descent on the min/max bound; exact on kept leaves, estimated on the rest."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    block, device = tree.block, query.device
    sharing = config.sharing
    sel_heads = kv_heads if sharing != "all" else 1
    sel_rep = n_rep if sharing == "per_head" else 1
    blocks = ((positions + 1) // block).clamp(max=tree.num_blocks)  # complete visible blocks per row (Q,)
    partial = positions + 1 - blocks * block
    wanted = torch.round((budgets - partial[None]).clamp(min=0).double() / block).long()
    wanted = torch.minimum(wanted.clamp(min=1), blocks[None].expand_as(wanted))  # (B, Q)
    width = int(wanted.max()) if blocks.numel() else 0
    softmax = Softmax()
    positive, negative = query.clamp(min=0) * scaling, query.clamp(max=0) * scaling
    scaled = query * scaling
    shape = (batch, sel_heads, sel_rep, q_len)
    exact_blocks = torch.zeros(batch, sel_heads, sel_rep, q_len, device=device)
    frontier_terms = torch.zeros_like(exact_blocks)
    bounded = torch.zeros_like(exact_blocks)
    if width > 0:
        top = int(blocks.max()).bit_length() - 1
        kept = torch.zeros(*shape, 0, dtype=torch.long, device=device)
        kept_ok = torch.zeros(*shape, 0, dtype=torch.bool, device=device)
        counts, kmin, kmax = tree.buffers["count"], tree.buffers["kmin"], tree.buffers["kmax"]
        for level in range(top, -1, -1):
            root, has_root = prefix_roots(blocks, level)
            offset = tree.offset(level)
            candidates = torch.cat([2 * kept, 2 * kept + 1, root.view(1, 1, 1, q_len, 1).expand(*shape, 1)], -1)
            ok = torch.cat([kept_ok, kept_ok, has_root.view(1, 1, 1, q_len, 1).expand(*shape, 1)], -1)
            ids = candidates + offset
            ok = ok & (gather_counts(counts, ids.flatten(1)).view(ids.shape) > 0)
            bound = dot_rows(positive, gather_nodes(kmax, ids)) + dot_rows(negative, gather_nodes(kmin, ids))
            bound = reduce_heads(bound, sharing, "max").masked_fill(~ok, float("-inf"))
            bounded += ok.sum(-1)
            keep = wanted if level == 0 else (wanted.double() * config.beam).ceil().long()
            limit = width if level == 0 else int(math.ceil(width * config.beam))
            values, order = bound.topk(min(limit, bound.shape[-1]), dim=-1)
            chosen = torch.arange(values.shape[-1], device=device) < keep[:, None, None, :, None]
            chosen = chosen & torch.isfinite(values)
            kept, kept_ok = candidates.gather(-1, order), chosen
            dropped = ok & ~torch.zeros_like(ok).scatter(-1, order, chosen)
            if config.estimate == "mean" and bool(dropped.any()):
                count = gather_counts(counts, ids.flatten(1)).view(ids.shape).clamp(min=1)
                mean_key = gather_nodes(tree.buffers["ksum"], ids) / count[..., None]
                vmean = gather_nodes(tree.buffers["vsum"], ids) / count[..., None]
                logits = dot_rows(scaled, mean_key) + torch.log(count)
                logits = logits.masked_fill(~dropped, float("-inf"))
                softmax.add(logits, vmean)
                frontier_terms += dropped.sum(-1)
        # exact scores on the kept leaf blocks
        exact_blocks = kept_ok.sum(-1).float()
        offsets = torch.arange(block, device=device)
        key_positions = (kept[..., None] * block + offsets).flatten(-2)  # (B, Hs, S, Q, W*block)
        valid = kept_ok[..., None].expand(*kept_ok.shape, block).flatten(-2)
        if key_valid is not None:
            valid = valid & key_valid.gather(1, key_positions.flatten(1)).view(key_positions.shape)
        softmax.add(dot_rows(scaled, gather_nodes(key, key_positions).float()).masked_fill(~valid, float("-inf")),
                    gather_nodes(value, key_positions).float())
    exact = exact_blocks.mean((1, 2)) * block + local_block(key, value, rows, positions, blocks, block, scaled,
                                                            softmax)
    config.stats.add(visible, budgets, exact, exact + frontier_terms.mean((1, 2)), bounded.mean((1, 2)))
    return softmax.result()

