"""The attention function registered as `sa_tree_kernel`, and `configure_tree_kernel` that switches a model to it.

Layers the module's `TreeKernelConfig` does not select run exact attention; head masks (`mask_heads`) still apply
(the function is wrapped by `masked`). `configure_tree_kernel` attaches a `TreeKernelState` to every attention
module through `intervene`: the config, and the module's key trees, carried between decode steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from selective_attention.attention.eager import exact_attention_forward
from selective_attention.attention.intervene import active_intervention, intervene
from selective_attention.attention.masked import masked
from selective_attention.modeling import (
    attention_modules,
    check_attention_interface,
    sliding_window_layers,
    text_config,
)
from selective_attention.tree_kernel.bound import flat_bound_rows
from selective_attention.tree_kernel.bound_tree import tree_bound_rows
from selective_attention.tree_kernel.config import FEATURE_METHODS, SAMPLED_METHODS, TreeKernelConfig
from selective_attention.tree_kernel.feature_maps import feature_map, random_features
from selective_attention.tree_kernel.key_tree import KeyTree
from selective_attention.tree_kernel.ops import row_mask
from selective_attention.tree_kernel.rescore import rescore_rows
from selective_attention.tree_kernel.rescore_decode import rescore_decode, sees_whole_prefix
from selective_attention.tree_kernel.sampled import sampled_rows
from selective_attention.tree_kernel.topk import topk_rows

logger = logging.getLogger(__name__)

NAME = "sa_tree_kernel"
STATE_ATTRIBUTE = "sa_tree_kernel"  # on each attention module: its TreeKernelState
CONFIG_KEY = "sa_tree_kernel"  # in the text config: the configuration, so that saved configs record it


@dataclass
class TreeKernelState:
    """What an attention module carries: the configuration, and its key trees (fresh with every configuration)."""

    config: TreeKernelConfig
    trees: dict = field(default_factory=dict)


def _trees(module: nn.Module | None, config: TreeKernelConfig) -> dict:
    """The module's key trees (a module given to `tree_attention` without a configuration gets a state here)."""
    if module is None:
        return {}
    state = getattr(module, STATE_ATTRIBUTE, None)
    if state is None:
        state = TreeKernelState(config)
        setattr(module, STATE_ATTRIBUTE, state)
    return state.trees


def _tree(trees: dict, config: TreeKernelConfig, key, value, key_valid, q_len: int, scaling: float) -> KeyTree:
    """The module's incrementally maintained tree for this method (rebuilt when the cache does not extend it)."""
    if config.method == "rescore" or (config.method == "bound" and config.descent == "flat"):
        spec = ("bound", config.leaf_block, ("ksum", "vsum") + (("kbox",) if config.rank != "mean" else ()), None)
    elif config.method == "bound":
        spec = ("bound", config.leaf_block, ("ksum", "vsum", "kmin", "kmax"), None)
    else:
        kind = FEATURE_METHODS.get(config.method)
        stats = ("ksum", "vsum", "feat") if kind else ("ksum", "vsum")
        spec = ("sampled", 1, stats, (kind, key.shape[-1], config.num_features, config.seed, scaling) if kind else None)
    tree = trees.get(spec)
    if tree is None:
        feature_fn = None
        if spec[3] is not None:
            features = random_features(spec[3][0], key.shape[-1], config.num_features, config.seed)
            root = math.sqrt(scaling)
            feature_fn = lambda keys: feature_map(keys * root, features)  # noqa: E731
        tree = trees[spec] = KeyTree(block=spec[1], stats=spec[2], feature_fn=feature_fn)
    return tree.update(key, value, key_valid, q_len)


def tree_kernel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """AttentionInterface function; exact SDPA for layers the module's `TreeKernelConfig` does not select."""
    state: TreeKernelState | None = getattr(module, STATE_ATTRIBUTE, None)
    config = state.config if state is not None else None
    softcap = kwargs.get("softcap")
    if config is None or config.method == "dense" or not config.applies_to(getattr(module, "layer_idx", None)):
        return exact_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    return tree_attention(query, key, value, attention_mask, config, scaling=scaling, module=module, softcap=softcap)


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   config: TreeKernelConfig, scaling: float | None = None, module: nn.Module | None = None,
                   softcap: float | None = None) -> tuple[torch.Tensor, None]:
    """Approximate causal attention; query (B, Hq, Q, D), key/value (B, Hkv, kv, D) -> ((B, Q, Hq, Dv), None).

    `attention_mask`: None (causal) or a 4D bool/additive mask (B or 1, 1, Q, kv). Without `module` the key tree
    is built from scratch (a configured module carries the incremental tree between decode steps). `softcap`: attention
    logit soft-capping (Gemma 2), supported by dense, topk, flat bound and rescore.
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if key.shape[-1] != dim:
        raise ValueError(f"query head dim {dim} does not match key head dim {key.shape[-1]}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries but only {kv_len} keys")
    scaling = dim ** -0.5 if scaling is None else float(scaling)
    dtype = query.dtype
    # keys and values stay in the cache's dtype: each selector casts only what it reads
    query = query.float()
    n_rep = q_heads // kv_heads
    if (config.method == "rescore" and q_len == 1 and softcap is None and config.sharing == "kv_group"
            and sees_whole_prefix(attention_mask)):  # generate's decode step: the lean path
        tree = _tree(_trees(module, config), config, key, value, None, q_len, scaling)
        output = rescore_decode(config, tree, key, value, query.view(batch, kv_heads, n_rep, dim), scaling)
        if output is not None:
            return output.reshape(batch, q_heads, 1, -1).transpose(1, 2).contiguous().to(dtype), None
    rows = row_mask(attention_mask, batch, q_len, kv_len, query.device)  # per-row visibility, window included
    key_valid = rows.any(1) if attention_mask is not None else None  # (B, kv) non-padding keys (builds the tree)
    positions = torch.arange(q_len, device=query.device) + (kv_len - q_len)
    windowed = False
    if key_valid is None:
        visible = (positions + 1).expand(batch, q_len)
    else:
        visible = rows.sum(-1)  # (B, Q): a sliding-window row sees fewer keys than its causal prefix
        windowed = bool((visible < key_valid.long().cumsum(1).gather(1, positions.expand(batch, q_len))).any())
    prefix_walk = config.walks_prefixes
    if softcap is not None and prefix_walk:
        raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) does not support "
                         "attention logit soft-capping: use dense, topk, rescore or bound with descent='flat'")
    if windowed and prefix_walk:
        raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) walks causal prefixes "
                         "and cannot honour a sliding window: use dense, topk, rescore or bound with descent='flat', "
                         "or "
                         "restrict `layers` to full-attention layers")
    if config.method == "dense":
        keys, values = key.float().repeat_interleave(n_rep, 1), value.float().repeat_interleave(n_rep, 1)
        if softcap is None:
            output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=rows[:, None],
                                                                      scale=scaling)
        else:  # (B, Hq, Q, kv) capped scores, as the model's eager attention computes them
            scores = torch.tanh(torch.matmul(query, keys.transpose(-1, -2)) * scaling / softcap) * softcap
            output = torch.matmul(torch.softmax(scores.masked_fill(~rows[:, None], float("-inf")), -1), values)
        config.stats.add(visible, None, visible)
        return output.transpose(1, 2).contiguous().to(dtype), None
    budgets = config.budgets(visible)
    grouped = query.view(batch, kv_heads, n_rep, q_len, dim)
    tree = None
    if config.method in ("bound", "rescore") + SAMPLED_METHODS:
        tree = _tree(_trees(module, config), config, key, value, key_valid, q_len, scaling)
    outputs = []
    for start in range(0, q_len, config.row_chunk):
        stop = min(q_len, start + config.row_chunk)
        part = (grouped[:, :, :, start:stop], positions[start:stop], rows[:, start:stop], budgets[:, start:stop],
                visible[:, start:stop])
        if config.method == "topk":
            out = topk_rows(config, key, value, *part, scaling, softcap)
        elif config.method == "rescore":
            out = rescore_rows(config, tree, key, value, *part, scaling, windowed, softcap)
        elif config.method == "bound" and config.descent == "flat":
            out = flat_bound_rows(config, tree, key, value, *part, scaling, windowed, softcap)
        elif config.method == "bound":
            out = tree_bound_rows(config, tree, key, value, key_valid, *part, scaling)
        else:
            out = sampled_rows(config, tree, key, value, key_valid, *part, scaling, getattr(module, "layer_idx", 0))
        outputs.append(out)
    output = torch.cat(outputs, dim=3).reshape(batch, q_heads, q_len, -1)
    return output.transpose(1, 2).contiguous().to(dtype), None


tree_kernel_sdpa = masked(tree_kernel_attention)



def configure_tree_kernel(model: nn.Module, config: TreeKernelConfig | None) -> TreeKernelConfig | None:
    """Attach `config` to the attention modules of `model` and switch it to `sa_tree_kernel` (an `intervene`
    intervention; configuring again replaces the config in place, with fresh key trees).

    `None` removes the configuration and returns to the implementation the model had before. Head masks set with
    `mask_heads` keep working (the function is wrapped by `masked`).
    """
    check_attention_interface(model)
    modules = attention_modules(model)
    text = text_config(model)
    if config is not None:
        missing = sorted(set(config.layers or ()) - set(modules))
        if missing:
            raise ValueError(f"tree-kernel layers {missing} do not exist (model has {len(modules)} layers)")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        if config.method in FEATURE_METHODS and config.num_features is not None and config.num_features < 1:
            raise ValueError("num_features must be >= 1")
        prefix_walk = config.walks_prefixes
        if prefix_walk and getattr(text, "attn_logit_softcapping", None):
            raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) does not support "
                             "attention logit soft-capping: use dense, topk, rescore or bound with descent='flat'")
        sliding = sorted(sliding_window_layers(model.config) & set(config.layers or modules))
        if sliding and prefix_walk:
            raise ValueError(f"tree-kernel method {config.method!r} (descent {config.descent!r}) walks causal "
                             f"prefixes and cannot honour the sliding window of layers {sliding}: use dense, topk, "
                             "rescore or bound with descent='flat', or choose full-attention layers with `layers`")
        logger.info("tree kernel %s on %s layers (head dim %d)", config.method,
                    "all" if config.layers is None else len(config.layers), head_dim)
    active = active_intervention(model, STATE_ATTRIBUTE)
    if config is None:
        if active is not None:
            active.remove()
        return None
    settings = {CONFIG_KEY: config.to_dict()}
    if active is not None:
        active.update(lambda layer: TreeKernelState(config), settings)
    else:
        intervene(model, STATE_ATTRIBUTE, lambda layer: TreeKernelState(config), NAME, settings, name=NAME)
    return config
