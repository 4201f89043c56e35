"""The lean `rescore` decode step (fused C++ kernel and its PyTorch twin) against a brute-force loop with one
candidate set per KV group, and against the general path's cost counters."""

from __future__ import annotations

import math

import pytest
import torch

from selective_attention.tree_kernel import TreeKernelConfig, tree_attention
from selective_attention.tree_kernel.config import COUNTERS
from selective_attention.tree_kernel.native import ENV_SWITCH, rescore_kernel

BLOCK, BUDGET, FACTOR = 4, 14, 2.0


def _group_brute_force(q, k, v, estimate: str, rank: str):
    """One decode row of a KV group by explicit loops: q (R, D), k/v (L, D) -> (R, Dv).

    Blocks ranked by the group's best head, one sink and one local block forced, ceil(keys * FACTOR / BLOCK)
    candidate blocks; each head keeps its top keys (forced first), the partial block exactly, and with the mean
    estimate the dropped candidates (exact weight, block-mean value) and the unread blocks (n exp(q . k_mean))."""
    length, dim = k.shape
    n_blocks, scale = length // BLOCK, dim ** -0.5
    partial = list(range(n_blocks * BLOCK, length))
    forced = {0, n_blocks - 1}
    keys = max(BUDGET - len(partial), len(forced) * BLOCK)
    width = min(max(math.ceil(keys * FACTOR / BLOCK), len(forced)), n_blocks)
    best = []
    for b in range(n_blocks):
        rows = k[b * BLOCK:(b + 1) * BLOCK]
        per_head = []
        for qr in q:
            upper = float(sum(max(qr[i] * rows[:, i].max(), qr[i] * rows[:, i].min()) for i in range(dim)))
            mean = float(qr @ rows.mean(0))
            per_head.append({"bound": upper, "mean": mean, "mix": (upper + mean) / 2}[rank])
        best.append(max(per_head))
    others = sorted((b for b in range(n_blocks) if b not in forced), key=lambda b: -best[b])
    candidates = forced | set(others[:width - len(forced)])
    outputs = []
    for qr in q:
        scores = {j: float(qr @ k[j]) * scale for b in candidates for j in range(b * BLOCK, (b + 1) * BLOCK)}
        pinned = [j for j in scores if j // BLOCK in forced]
        ranked = sorted((j for j in scores if j // BLOCK not in forced), key=lambda j: -scores[j])
        kept = set(pinned + ranked[:keys - len(pinned)])
        terms = [(math.exp(scores[j]), v[j]) for j in kept]
        terms += [(math.exp(float(qr @ k[j]) * scale), v[j]) for j in partial]
        if estimate == "mean":
            for b in range(n_blocks):
                members = range(b * BLOCK, (b + 1) * BLOCK)
                mean_value = v[b * BLOCK:(b + 1) * BLOCK].mean(0)
                if b in candidates:
                    mass = sum(math.exp(scores[j]) for j in members if j not in kept)
                else:
                    mass = BLOCK * math.exp(float(qr @ k[b * BLOCK:(b + 1) * BLOCK].mean(0)) * scale)
                terms.append((mass, mean_value))
        outputs.append(sum(w * x for w, x in terms) / sum(w for w, _ in terms))
    return torch.stack(outputs)


def _inputs(seed: int, length: int):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, 1, 8, generator=generator)  # batch 2, 2 KV heads x 3 query heads
    k = torch.randn(2, 2, length, 8, generator=generator)
    v = torch.randn(2, 2, length, 8, generator=generator)
    k[:, :, 20:24] *= 3  # a block a bound prefers
    return q, k, v


@pytest.mark.parametrize("native", [True, False], ids=["fused", "torch-ops"])
@pytest.mark.parametrize("rank", ["bound", "mean", "mix"])
@pytest.mark.parametrize("estimate", ["none", "mean"])
@pytest.mark.parametrize("length", [64, 67])  # without and with a partial block
def test_decode_step_equals_group_brute_force(native, rank, estimate, length, monkeypatch):
    if native and rescore_kernel() is None:
        pytest.skip("no C++ toolchain for the fused kernel here (the PyTorch twin is tested below)")
    monkeypatch.setenv(ENV_SWITCH, "1" if native else "0")
    q, k, v = _inputs(length, length)
    config = TreeKernelConfig(method="rescore", budget=BUDGET, min_keys=1, leaf_block=BLOCK, candidates=FACTOR,
                              estimate=estimate, rank=rank)
    assert config.sharing == "kv_group"
    out, _ = tree_attention(q, k, v, None, config)  # (B, 1, Hq, D)
    for b in range(2):
        for h in range(2):
            expected = _group_brute_force(q[b, 3 * h:3 * h + 3, 0].double(), k[b, h].double(), v[b, h].double(),
                                          estimate, rank)
            torch.testing.assert_close(out[b, 0, 3 * h:3 * h + 3].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", ["1", "0"], ids=["fused", "torch-ops"])
@pytest.mark.parametrize("estimate", ["none", "mean"])
def test_lean_path_matches_the_general_path_rows_and_costs(native, estimate, monkeypatch):
    """Two decode rows through the general path (a query of two rows takes the per-row mask path) against the
    same rows one step at a time through the lean path: outputs, and every cost counter summed over the rows."""
    monkeypatch.setenv(ENV_SWITCH, native)
    _, k, v = _inputs(3, 67)
    rows = torch.randn(2, 6, 2, 8, generator=torch.Generator().manual_seed(4))  # positions 65 and 66

    def config() -> TreeKernelConfig:
        return TreeKernelConfig(method="rescore", budget=BUDGET, min_keys=1, leaf_block=BLOCK, candidates=FACTOR,
                                estimate=estimate, rank="mix")

    general, lean = config(), config()
    expected, _ = tree_attention(rows, k, v, None, general)
    first, _ = tree_attention(rows[:, :, :1], k[:, :, :66], v[:, :, :66], None, lean)
    second, _ = tree_attention(rows[:, :, 1:], k, v, None, lean)
    torch.testing.assert_close(torch.cat([first, second], 1), expected, atol=1e-5, rtol=1e-5)
    for name in COUNTERS:
        assert getattr(lean.stats.all, name) == pytest.approx(getattr(general.stats.all, name)), name
    assert lean.stats.all.rescored > lean.stats.all.exact  # candidates were scored beyond the kept keys


def test_budget_for_one_row_equals_the_tensor_budgets():
    for settings in (dict(budget=2048), dict(budget=5), dict(fraction=0.1), dict(fraction=0.25, min_keys=4),
                     dict(exponent=0.5), dict()):
        config = TreeKernelConfig(method="rescore", **settings)
        for visible in (0, 1, 3, 15, 16, 17, 100, 1023, 1024, 32768, 65537):
            assert config.budget_for(visible) == int(config.budgets(torch.tensor([float(visible)]))[0])


def test_kernel_kth_largest_is_exact():
    """The fused kernel's threshold (bit-by-bit search on order-preserving integer keys) against a sort: every
    k, ties, negative values, +-inf and signed zeros, sizes on both sides of the candidate counts used in decode."""
    kernel = rescore_kernel()
    if kernel is None:
        pytest.skip("no C++ toolchain for the fused kernel here")
    generator = torch.Generator().manual_seed(0)
    cases = [torch.randn(8192, generator=generator).exp(), torch.randn(2048, generator=generator) * 100,
             torch.randint(-3, 4, (1000,), generator=generator).float(),  # many ties
             torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 0.0, 3.4e38, -3.4e38, 1e-45]),
             torch.tensor([2.5]), torch.full((100,), 7.0),
             1 + torch.rand(5000, generator=generator) * 1e-3]  # the top 16 bits shared: the search narrows twice
    for values in cases:
        ordered = values.sort(descending=True).values
        n = values.numel()
        ks = {k for k in (1, 2, n // 4, n // 2, n - 1, n) if 1 <= k <= n}
        for k in sorted(ks) + torch.randint(1, n + 1, (20,), generator=generator).tolist():
            assert kernel.kth_largest(values, k) == float(ordered[k - 1]), (n, k)
