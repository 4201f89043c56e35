"""`rescore`: bound candidates, exact choice. Checked against a brute-force loop over blocks and keys, decode against
prefill rows, and the decode path reading nothing but the candidate keys and the kept values."""

from __future__ import annotations

import math

import pytest
import torch

from selective_attention.tree_kernel import TreeKernelConfig, tree_attention

BLOCK, BUDGET, FACTOR = 4, 12, 2.0


def _brute_force(q, k, v, estimate: str, rank: str = "bound"):
    """One decode row (q (D,), k/v (L, D), L a multiple of BLOCK), per-head selection, by explicit loops.

    Returns the output and the ids of the candidate blocks and kept keys."""
    length, dim = k.shape
    n_blocks = length // BLOCK
    scale = dim ** -0.5
    bounds = []
    for b in range(n_blocks):
        keys = k[b * BLOCK:(b + 1) * BLOCK]
        upper = float(sum(max(q[i] * keys[:, i].max(), q[i] * keys[:, i].min()) for i in range(dim)))
        mean = float(q @ keys.mean(0))
        bounds.append({"bound": upper, "mean": mean, "mix": (upper + mean) / 2}[rank])
    forced = {0, n_blocks - 1}  # one sink block, one local block
    width = math.ceil(BUDGET * FACTOR / BLOCK)
    others = sorted((b for b in range(n_blocks) if b not in forced), key=lambda b: -bounds[b])
    candidates = sorted(forced | set(others[:width - len(forced)]))
    scores = {j: float(q @ k[j]) * scale for b in candidates for j in range(b * BLOCK, (b + 1) * BLOCK)}
    forced_keys = [j for j in scores if j // BLOCK in forced]
    rest_keys = sorted((j for j in scores if j // BLOCK not in forced), key=lambda j: -scores[j])
    kept = forced_keys + rest_keys[:BUDGET - len(forced_keys)]
    weights = {j: math.exp(scores[j]) for j in kept}
    numerator = sum(weights[j] * v[j] for j in kept)
    denominator = sum(weights.values())
    if estimate == "mean":
        for b in range(n_blocks):
            members = range(b * BLOCK, (b + 1) * BLOCK)
            vmean = v[b * BLOCK:(b + 1) * BLOCK].mean(0)
            if b in candidates:  # dropped candidates: exact weight, block-mean value
                mass = sum(math.exp(scores[j]) for j in members if j not in kept)
            else:  # never read: n exp(q . mean key)
                mass = BLOCK * math.exp(float(q @ k[b * BLOCK:(b + 1) * BLOCK].mean(0)) * scale)
            numerator = numerator + mass * vmean
            denominator += mass
    return numerator / denominator, candidates, kept


@pytest.mark.parametrize("rank", ["bound", "mean", "mix"])
@pytest.mark.parametrize("estimate", ["none", "mean"])
def test_decode_row_equals_brute_force(estimate, rank):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    k[0, 0, 20:24] *= 3  # a block that a bound prefers
    config = TreeKernelConfig(method="rescore", budget=BUDGET, min_keys=1, leaf_block=BLOCK, candidates=FACTOR,
                              estimate=estimate, sharing="per_head", rank=rank)
    out, _ = tree_attention(q, k, v, None, config)
    for head in range(2):
        expected, _, _ = _brute_force(q[0, head, 0].double(), k[0, 0].double(), v[0, 0].double(), estimate, rank)
        torch.testing.assert_close(out[0, 0, head].double(), expected, atol=1e-5, rtol=1e-5)
    assert config.stats.all.exact == pytest.approx(BUDGET)  # per row, averaged over the heads
    assert config.stats.all.rescored == pytest.approx(math.ceil(BUDGET * FACTOR / BLOCK) * BLOCK)


@pytest.mark.parametrize("estimate", ["none", "mean"])
def test_decode_reads_only_candidate_keys_and_kept_values(estimate):
    """Every key outside the candidate blocks and every value not kept set to NaN after the tree is built: the
    decode step gives the same output, so it never read them."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    config = TreeKernelConfig(method="rescore", budget=BUDGET, min_keys=1, leaf_block=BLOCK, candidates=FACTOR,
                              estimate=estimate)
    holder = torch.nn.Module()
    clean, _ = tree_attention(q, k, v, None, config, module=holder)  # builds the block summaries
    _, candidates, kept = _brute_force(q[0, 0, 0].double(), k[0, 0].double(), v[0, 0].double(), estimate)
    read_keys = torch.zeros(64, dtype=torch.bool)
    for b in candidates:
        read_keys[b * BLOCK:(b + 1) * BLOCK] = True
    read_values = torch.zeros(64, dtype=torch.bool)
    read_values[kept] = True
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[0, 0, ~read_keys] = float("nan")
    poisoned_v[0, 0, ~read_values] = float("nan")
    assert read_keys[0] and read_keys[-1]  # the sink and the latest block: the tree's fingerprint stays intact
    out, _ = tree_attention(q, poisoned_k, poisoned_v, None, config, module=holder)
    torch.testing.assert_close(out, clean)


@pytest.mark.parametrize("sharing", ["per_head", "kv_group"])
@pytest.mark.parametrize("estimate", ["none", "mean"])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("rank", ["bound", "mix"])
def test_decode_equals_prefill_rows_at_partial_budget(sharing, estimate, softcap, rank):
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    config = TreeKernelConfig(method="rescore", fraction=0.25, leaf_block=4, estimate=estimate, min_keys=4,
                              candidates=2, sharing=sharing, rank=rank)
    prefill, _ = tree_attention(q, k, v, None, config, softcap=softcap)
    holder = torch.nn.Module()
    for length in range(60, 91, 3):
        step, _ = tree_attention(q[:, :, length - 1:length], k[:, :, :length], v[:, :, :length], None, config,
                                 module=holder, softcap=softcap)
        assert (step[:, 0] - prefill[:, length - 1]).abs().max() <= 1e-5, length


def test_more_candidates_approach_the_oracle():
    """With every block a candidate and no estimate, rescore keeps each head's top keys: the top-k oracle's
    output on the same keys (the oracle here keeps the partial block and forced blocks too: none at this size)."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    config = TreeKernelConfig(method="rescore", budget=16, min_keys=1, leaf_block=4, candidates=100, estimate="none",
                              sink_blocks=0, local_blocks=0, sharing="per_head")
    oracle = TreeKernelConfig(method="topk", budget=16, min_keys=1)
    torch.testing.assert_close(tree_attention(q, k, v, None, config)[0], tree_attention(q, k, v, None, oracle)[0])


def test_bad_candidates():
    with pytest.raises(ValueError, match="candidates"):
        TreeKernelConfig(method="rescore", candidates=0.5)


def test_full_budget_equals_the_sliding_window_model_prefill_and_decode():
    from selective_attention.retrieval.generate import greedy_decode
    from selective_attention.tree_kernel import configure_tree_kernel

    from .test_sliding_window import _prompt, tiny_mistral

    model = tiny_mistral()
    prompt = _prompt(3, length=45)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits
        dense = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=10)
        configure_tree_kernel(model, TreeKernelConfig(method="rescore", fraction=1.0, leaf_block=4, min_keys=1))
        got = model(torch.tensor([prompt])).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # the tree kernel computes in float32
    assert greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=10).tokens == dense.tokens


def test_soft_capping_full_budget_equals_capped_attention_by_hand():
    torch.manual_seed(7)
    q, k, v = torch.randn(1, 4, 30, 8) * 3, torch.randn(1, 2, 30, 8) * 3, torch.randn(1, 2, 30, 8)
    scores = torch.tanh((q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 8 ** -0.5 / 5.0) * 5.0
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    expected = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    for estimate in ("none", "mean"):
        config = TreeKernelConfig(method="rescore", fraction=1.0, leaf_block=4, min_keys=1, estimate=estimate)
        out, _ = tree_attention(q, k, v, None, config, softcap=5.0)
        torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["topk", "bound", "rescore"])
def test_row_chunks_see_only_their_causal_prefix_and_give_the_same_rows(method):
    """Prefill chunks trim keys and blocks past their last row; the rows equal one chunk holding them all."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 120, 16), torch.randn(1, 2, 120, 16), torch.randn(1, 2, 120, 16)
    outs = [tree_attention(q, k, v, None, TreeKernelConfig(method=method, budget=24, leaf_block=8, row_chunk=chunk))[0]
            for chunk in (120, 16)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rank", ["mean", "mix"])
@pytest.mark.parametrize("method", ["bound", "rescore"])
def test_mean_rank_full_budget_equals_dense_prefill_and_decode(method, rank):
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 6, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    config = TreeKernelConfig(method=method, fraction=1.0, leaf_block=8, min_keys=1, rank=rank)
    dense, _ = tree_attention(q, k, v, None, TreeKernelConfig(method="dense"))
    torch.testing.assert_close(tree_attention(q, k, v, None, config)[0], dense, atol=1e-5, rtol=1e-5)
    holder = torch.nn.Module()
    for length in (40, 41, 56, 70):
        step, _ = tree_attention(q[:, :, length - 1:length], k[:, :, :length], v[:, :, :length], None, config,
                                 module=holder)
        torch.testing.assert_close(step[:, 0], dense[:, length - 1], atol=1e-5, rtol=1e-5)


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        TreeKernelConfig(method="rescore", rank="median")
    with pytest.raises(ValueError, match="tree descent"):
        TreeKernelConfig(method="bound", descent="tree", rank="mean")
