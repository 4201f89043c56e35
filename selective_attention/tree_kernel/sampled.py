"""The originating paper's sampled descent (`alignment`, `positive_alignment`, `favor+`, `favor+relu`, `rff`,
`time-decay`, `uniform`), with leaf = one key.

Buds start at the row's prefix roots; P at a time are drawn without replacement (Gumbel top-k) in proportion to
the method's mass and replaced by their children, until T = ceil(l^E) buds. Output = sum_b n_b w_b vmean_b /
sum_b n_b w_b, where a single-key bud is scored exactly and a larger bud by the method's estimate of exp(q.k) per
leaf. Defects of the originating code fixed here: the normaliser carries the leaf count n_b; the current token's
own key is part of its past; random features are drawn once per (d, R, seed).
"""

from __future__ import annotations

import math

import torch

from selective_attention.tree_kernel.config import EXP_SCALE_METHODS, FEATURE_METHODS, TreeKernelConfig
from selective_attention.tree_kernel.feature_maps import feature_map, random_features
from selective_attention.tree_kernel.key_tree import KeyTree
from selective_attention.tree_kernel.ops import Softmax, dot_rows, gather_counts, gather_nodes, reduce_heads


def _leaf_log_weight(config, tree, method, query, scaling, stats, level, index, visible_len):
    """log of the per-leaf weight estimate of exp(q.k * scaling) for buds (per head): (B, Hkv, R, Q, C)."""
    count = stats["count"]
    if method in ("alignment", "favor+relu", "time-decay", "uniform"):
        return dot_rows(query * scaling, stats["ksum"]) / count
    features = random_features(FEATURE_METHODS[method], query.shape[-1], config.num_features, config.seed)
    phi = feature_map(query * math.sqrt(scaling), features)  # (B, Hkv, R, Q, F)
    inner = dot_rows(phi, stats["feat"]).float()
    if method == "positive_alignment":
        return inner / count
    # The feature sums overflow at large key norms (exp(|k|^2/2) per key: inf, or inf - inf = nan for RFF's signed
    # features) and RFF estimates can be <= 0. Keep every estimate a finite positive number: an overflow counts
    # as the largest weight, a non-positive or undefined estimate as (almost) no mass, so no row's softmax
    # turns into inf - inf.
    finfo = torch.finfo(inner.dtype)
    return torch.log(inner.nan_to_num(nan=0.0, posinf=finfo.max).clamp(min=finfo.tiny) / count)


def _sampling_log_mass(config, method, query, scaling, stats, level, index, visible_len):
    """The sampling mass per bud (log): alignment family per-leaf estimate, time-decay sum of b^age, uniform 1."""
    count = stats["count"]
    if method == "uniform":
        return torch.zeros_like(count).expand(query.shape[0], query.shape[1], query.shape[2], *count.shape[3:])
    if method == "time-decay":
        size = (1 << level).double()
        end = (index.double() + 1) * size - 1
        base = math.log(config.decay)
        log_mass = (visible_len[:, None, None, :, None].double() - 1 - end) * base + torch.log(
            (1 - config.decay ** size) / (1 - config.decay))
        return log_mass.float().expand(query.shape[0], query.shape[1], query.shape[2], *count.shape[3:])
    if method == "favor+relu":
        features = random_features("favor+relu", query.shape[-1], config.num_features, config.seed)
        phi = feature_map(query * math.sqrt(scaling), features)
        return torch.log(dot_rows(phi, stats["feat"]).float().clamp(min=0) / count)
    return _leaf_log_weight(config, None, method, query, scaling, stats, level, index, visible_len)


def _bud_stats(tree: KeyTree, level, index, names, kv_heads):
    ids = index + torch.tensor([tree.offset(l) for l in range(tree.num_levels)], device=index.device)[level]
    out = {name: gather_nodes(tree.buffers[name], ids) for name in names}
    count = gather_counts(tree.buffers["count"], ids.flatten(1)).view(ids.shape)
    out["count_raw"] = count
    out["count"] = count.clamp(min=1)
    return out


def sampled_rows(config: TreeKernelConfig, tree: KeyTree, key, value, key_valid, query, positions, rows, budgets,
                 visible, scaling, layer: int | None):
    """The sampled descent (vectorised over rows and heads; one Python iteration per P expansions)."""
    batch, kv_heads, n_rep, q_len, dim = query.shape
    device, method, sharing = query.device, config.method, config.sharing
    sel_heads = kv_heads if sharing != "all" else 1
    sel_rep = n_rep if sharing == "per_head" else 1
    shape = (batch, sel_heads, sel_rep, q_len)
    leaves = (positions + 1).clamp(max=tree.num_blocks)  # single-key leaves: the row's own key included
    top = int(leaves.max()).bit_length() - 1
    levels = torch.arange(top, -1, -1, device=device)
    shifted = leaves[:, None] >> levels  # (Q, L)
    root_ok = (shifted & 1).bool()
    roots = (shifted - 1).clamp(min=0)
    parallel = config.parallel_buds()
    n_roots = levels.numel()
    capacity = int(budgets.max()) + n_roots + parallel + 1
    bud_level = torch.zeros(*shape, capacity, dtype=torch.long, device=device)
    bud_index = torch.zeros_like(bud_level)
    bud_ok = torch.zeros(*shape, capacity, dtype=torch.bool, device=device)
    bud_level[..., :n_roots] = levels
    bud_index[..., :n_roots] = roots
    bud_ok[..., :n_roots] = root_ok
    feat_names = ("ksum", "feat") if method in FEATURE_METHODS else ("ksum",)
    mass_names = ("feat",) if method in FEATURE_METHODS else (("ksum",) if method == "alignment" else ())

    def log_mass(level, index):
        stats = _bud_stats(tree, level, index, mass_names, kv_heads)
        per_head = _sampling_log_mass(config, method, query, scaling, stats, level, index, visible)
        per_head = per_head.masked_fill(~torch.isfinite(per_head), float("-inf"))
        return reduce_heads(per_head, sharing, "logsumexp"), stats["count_raw"] > 0

    mass = torch.full((*shape, capacity), float("-inf"), device=device)
    root_mass, root_nonempty = log_mass(bud_level[..., :n_roots], bud_index[..., :n_roots])
    mass[..., :n_roots] = root_mass
    bud_ok[..., :n_roots] &= root_nonempty
    count = bud_ok.sum(-1)
    evaluated = count.float()  # node masses computed per row (the sampled descent's bound evaluations)
    next_slot = torch.full_like(count, n_roots)
    target = budgets.view(batch, 1, 1, q_len)
    generator = torch.Generator(device="cpu").manual_seed(config.seed * 1000 + (layer or 0))
    trash = capacity - 1
    while True:
        room = (target - count).clamp(min=0, max=parallel)
        expandable = bud_ok & (bud_level > 0)
        if not bool(((room > 0) & expandable.any(-1)).any()):
            break
        gumbel = -torch.log(-torch.log(torch.rand(mass.shape, generator=generator).clamp(1e-20, 1.0 - 1e-7)))
        keys = torch.where(expandable, torch.nan_to_num(mass, neginf=-1e30) + gumbel.to(device), float("-inf"))
        values, pick = keys.topk(parallel, dim=-1)
        chosen = (torch.arange(parallel, device=device) < room[..., None]) & torch.isfinite(values)
        parent_level, parent_index = bud_level.gather(-1, pick), bud_index.gather(-1, pick)
        # Unchosen picks may point at slots holding no complete node (their children need not exist in the
        # tree's buffers): send them to leaf 0, their results land in the trash slot anyway.
        child_level = torch.where(chosen, parent_level - 1, 0)
        left = torch.where(chosen, 2 * parent_index, 0)
        right = torch.where(chosen, 2 * parent_index + 1, 0)
        left_mass, left_ok = log_mass(child_level, left)
        right_mass, right_ok = log_mass(child_level, right)
        evaluated += 2 * chosen.sum(-1)
        slot_left = torch.where(chosen, pick, trash)
        slot_right = torch.where(chosen, next_slot[..., None] + chosen.long().cumsum(-1) - 1, trash)
        for slots, index, bud_mass, nonempty in ((slot_left, left, left_mass, left_ok),
                                                 (slot_right, right, right_mass, right_ok)):
            bud_level.scatter_(-1, slots, child_level)
            bud_index.scatter_(-1, slots, index)
            mass.scatter_(-1, slots, bud_mass)
            bud_ok.scatter_(-1, slots, nonempty)
        bud_ok[..., trash] = False
        count = bud_ok.sum(-1)  # an all-padding child is dropped and does not use the budget
        next_slot = next_slot + chosen.sum(-1)
    # output: exact weight on single-key buds, the method's estimate of exp(score) per leaf elsewhere
    stats = _bud_stats(tree, bud_level, bud_index, feat_names + ("vsum",), kv_heads)
    # a bud holding one valid key is exact: a leaf, or (left padding) a node whose other keys are all padding;
    # ksum is then that key (padding is masked out of the sums), whatever the feature estimate would say
    single = stats["count_raw"] == 1
    exact = dot_rows(query * scaling, stats["ksum"])
    estimate_method = method if method in EXP_SCALE_METHODS else "alignment"
    estimate = _leaf_log_weight(config, tree, estimate_method, query, scaling, stats, bud_level, bud_index, visible)
    count = stats["count"]
    logits = torch.where(single, exact, estimate) + torch.log(count)
    logits = logits.masked_fill(~bud_ok, float("-inf")).masked_fill(torch.isnan(logits), float("-inf"))
    vsum_count = stats["count"][..., None]
    softmax = Softmax()
    softmax.add(logits, stats["vsum"] / vsum_count)
    leaves_used = (bud_ok & single).sum(-1).float()
    config.stats.add(visible, budgets, leaves_used.mean((1, 2)), bud_ok.sum(-1).float().mean((1, 2)),
                     evaluated.mean((1, 2)))
    return softmax.result()

