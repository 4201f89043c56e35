"""Section 5: one decode step of attention alone, the tree kernel's `bound` selector against dense SDPA, at 32K
and 128K keys with the Llama-3.1-8B attention shape (32 query / 8 KV heads, head dim 128, bf16, batch 1).

As in benchmarks/tree_speed.py: the key tree is built once per length outside the timed region (a real decode
maintains it incrementally), the dense baseline is exactly what `attn_implementation="sdpa"` runs for this step,
and each ratio is dense ms / tree ms of the same run (above 1: the tree kernel is faster). The error is the max
absolute difference from dense attention; `exact keys` is the fraction of keys scored exactly. Check: with a
budget of every key the tree kernel must equal SDPA on the same inputs in float32 (tolerance 1e-4).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention.tree_kernel import TreeKernelConfig, tree_attention

from .common import Suite, check, median_ms, synchronize

EXACT_TOLERANCE = 1e-4


def _settings(tiny: bool) -> list[tuple[str, TreeKernelConfig]]:
    budget = 32 if tiny else 4096
    return [("bound fraction 0.1", TreeKernelConfig(method="bound", fraction=0.1, sharing="kv_group")),
            ("bound fraction 0.05", TreeKernelConfig(method="bound", fraction=0.05, sharing="kv_group")),
            (f"bound budget {budget}", TreeKernelConfig(method="bound", budget=budget, sharing="kv_group"))]


class _Attention(nn.Module):
    """What `sdpa_attention_forward` reads from a Llama attention module."""

    is_causal = True
    layer_idx = 0

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _one_length(suite: Suite, label: str, length: int, generator: torch.Generator) -> tuple[list[dict], dict]:
    """Rows (dense, then each tree setting) and the full-budget check at `length` keys."""
    config = suite.big_config()
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    scaling = dim ** -0.5
    attention = _Attention(heads // kv_heads)
    shape = dict(device=suite.device, dtype=suite.dtype, generator=generator)
    query = torch.randn(1, heads, 1, dim, **shape)  # (batch, heads, 1, head_dim): one decode step
    key = torch.randn(1, kv_heads, length, dim, **shape)  # (batch, kv_heads, keys, head_dim)
    value = torch.randn(1, kv_heads, length, dim, **shape)

    def dense() -> torch.Tensor:
        return sdpa_attention_forward(attention, query, key, value, None, scaling=scaling)[0]

    with torch.inference_mode():
        dense_ms = median_ms(dense, suite.device, suite.repeats * 3)
        reference = dense().float()
        rows = [dict(keys=label, key_count=length, method="dense sdpa", ms=dense_ms, speedup=1.0, max_abs_err=0.0,
                     exact_keys=1.0)]
        # in float32, so that the comparison is not blurred by rounding the outputs to bf16
        inputs = query.float(), key.float(), value.float()
        everything = TreeKernelConfig(method="bound", fraction=1.0, sharing="kv_group")
        exact = tree_attention(*inputs, None, everything, scaling=scaling)[0]
        error = float((exact - sdpa_attention_forward(attention, *inputs, None, scaling=scaling)[0]).abs().max())
        full_budget = check(f"{label}: tree kernel with every key == float32 SDPA", error <= EXACT_TOLERANCE,
                            max_abs_diff=error, tolerance=EXACT_TOLERANCE)
        for name, tree_config in _settings(suite.tiny):
            holder = nn.Module()  # carries the key tree between calls, as an attention module does
            holder.layer_idx = 0

            def step(tree_config: TreeKernelConfig = tree_config, holder: nn.Module = holder) -> torch.Tensor:
                return tree_attention(query, key, value, None, tree_config, scaling=scaling, module=holder)[0]

            synchronize(suite.device)
            start = time.perf_counter()
            step()  # builds the tree
            synchronize(suite.device)
            build_ms = (time.perf_counter() - start) * 1e3
            ms = median_ms(step, suite.device, suite.repeats * 3)
            tree_config.stats.reset()
            output = step().float()
            rows.append(dict(keys=label, key_count=length, method=name, ms=ms, speedup=dense_ms / ms,
                             max_abs_err=float((output - reference).abs().max()),
                             exact_keys=tree_config.stats.exact_fraction, first_call_with_tree_build_ms=build_ms))
    return rows, full_budget


def run(suite: Suite) -> dict:
    rows, checks = [], []
    generator = torch.Generator(device=suite.device).manual_seed(0)
    for label in ("32K", "128K"):
        length_rows, full_budget = _one_length(suite, label, suite.contexts[label], generator)
        rows += length_rows
        checks.append(full_budget)
        suite.empty_cache()
    config = suite.big_config()
    return dict(rows=rows, checks=checks, notes=[
        f"shape: batch 1, {config.num_attention_heads} query / {config.num_key_value_heads} KV heads, head dim "
        f"{config.head_dim}, {suite.dtype}; speedup = dense ms / tree ms (above 1: faster than SDPA)"])
