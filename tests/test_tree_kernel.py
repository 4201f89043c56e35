"""Tree-kernel attention: exactness at full budget (prefill, decode, GQA, padding), bad input, incremental tree."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from selective_attention import mask_heads
from selective_attention.tree_kernel import (METHODS, TreeKernelConfig, configure_tree_kernel,
                                                       tree_attention)
from selective_attention.tree_kernel.key_tree import KeyTree

from .conftest import build_tiny, tiny_llama_config


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2
    layer_idx = 0


def _dense(q, k, v, mask=None):
    return sdpa_attention_forward(_Module(), q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("method", METHODS)
def test_full_budget_equals_dense_prefill_gqa(method):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 37, 16), torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
    for sharing in ("per_head", "kv_group", "all"):
        config = TreeKernelConfig(method=method, fraction=1.0, leaf_block=4, sharing=sharing, row_chunk=16)
        out, _ = tree_attention(q, k, v, None, config)
        assert (out - _dense(q, k, v)).abs().max() <= 1e-5, (method, sharing)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_full_budget_equals_dense_in_generate_with_left_padding(method):
    config = tiny_llama_config()
    reference = build_tiny(config, "sdpa")
    model = build_tiny(config, "sdpa")
    configure_tree_kernel(model, TreeKernelConfig(method=method, fraction=1.0, leaf_block=4))
    ids = torch.randint(3, 128, (2, 23))
    attention = torch.ones_like(ids)
    ids[1, :5], attention[1, :5] = 0, 0  # left padding
    with torch.inference_mode():
        expected = reference(ids, attention_mask=attention).logits
        got = model(ids, attention_mask=attention).logits
        assert (got - expected)[attention.bool()].abs().max() <= 1e-4
        gen_ref = reference.generate(ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
        gen = model.generate(ids, attention_mask=attention, max_new_tokens=12, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert torch.equal(gen.sequences, gen_ref.sequences)
    assert max((a - b).abs().max() for a, b in zip(gen.logits, gen_ref.logits)) <= 1e-4


def test_decode_step_attention_equals_dense_fp32():
    """One decode query at a time against a growing cache: the incremental tree path, <= 1e-5."""
    torch.manual_seed(1)
    k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    holder = torch.nn.Module()
    config = TreeKernelConfig(method="bound", fraction=1.0, leaf_block=4)
    for length in range(40, 70):
        q = torch.randn(1, 4, 1, 16)
        out, _ = tree_attention(q, k[:, :, :length], v[:, :, :length], None, config, module=holder)
        assert (out - _dense(q, k[:, :, :length], v[:, :, :length])).abs().max() <= 1e-5


@pytest.mark.parametrize("estimate", ["mean", "none"])
def test_flat_bound_decode_equals_prefill_rows_at_partial_budget(estimate):
    """Decode gathers the kept blocks; prefill masks one score matrix: the same selection and terms per row."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    config = TreeKernelConfig(method="bound", fraction=0.25, leaf_block=4, estimate=estimate, min_keys=4)
    prefill, _ = tree_attention(q, k, v, None, config)
    assert (prefill - _dense(q, k, v)).abs().max() > 1e-3  # really approximate
    holder = torch.nn.Module()
    for length in range(60, 91, 3):
        step, _ = tree_attention(q[:, :, length - 1:length], k[:, :, :length], v[:, :, :length], None, config,
                                 module=holder)
        assert (step[:, 0] - prefill[:, length - 1]).abs().max() <= 1e-5, length


def test_flat_bound_keeps_sink_and_local_blocks():
    """With a budget of two blocks, the first and the latest complete block are the ones attended exactly."""
    torch.manual_seed(6)
    k, v = torch.randn(1, 1, 64, 8), torch.randn(1, 1, 64, 8)
    k[:, :, 20:24] *= 10  # keys a bound would otherwise prefer
    q = k[:, :, 21:22].clone()
    config = TreeKernelConfig(method="bound", budget=8, min_keys=1, leaf_block=4, estimate="none")
    out, _ = tree_attention(q, k, v, None, config)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[:4] = keep[60:64] = True  # sink block and the latest complete block (holding the row itself)
    expected = torch.softmax((q[0, 0] @ k[0, 0].T / 8 ** 0.5).masked_fill(~keep, float("-inf")), -1) @ v[0, 0]
    torch.testing.assert_close(out[0, 0, 0], expected[0])


def test_incremental_tree_matches_rebuild():
    torch.manual_seed(2)
    k, v = torch.randn(2, 3, 200, 8), torch.randn(2, 3, 200, 8)
    grown = KeyTree(block=4, stats=("ksum", "vsum", "kmin", "kmax"))
    grown.update(k[:, :, :50], v[:, :, :50], None, q_len=50)
    for length in range(51, 201):
        grown.update(k[:, :, :length], v[:, :, :length], None, q_len=1)
    fresh = KeyTree(block=4, stats=("ksum", "vsum", "kmin", "kmax")).update(k, v, None, q_len=200)
    assert grown.sizes == fresh.sizes == [50, 25, 12, 6, 3, 1]
    for level in range(fresh.num_levels):
        for name, tensor in fresh.level(level).items():
            torch.testing.assert_close(grown.level(level)[name], tensor)
    top = fresh.level(5)
    torch.testing.assert_close(top["ksum"][:, :, 0], k[:, :, :128].sum(2))
    torch.testing.assert_close(top["kmax"][:, :, 0], k[:, :, :128].amax(2))


def test_bound_is_an_upper_bound():
    torch.manual_seed(3)
    k = torch.randn(1, 1, 64, 8)
    tree = KeyTree(block=8, stats=("kmin", "kmax")).update(k, k, None, q_len=64)
    q = torch.randn(8)
    for level in range(tree.num_levels):
        stats = tree.level(level)
        bound = (q.clamp(min=0) * stats["kmax"][0, 0]).sum(-1) + (q.clamp(max=0) * stats["kmin"][0, 0]).sum(-1)
        scores = (k[0, 0] @ q).view(-1, 8 << level).amax(-1)
        assert torch.all(bound >= scores - 1e-5)


def test_partial_budget_is_approximate_and_touches_fewer_keys():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    config = TreeKernelConfig(method="bound", fraction=0.1, leaf_block=8)
    out, _ = tree_attention(q, k, v, None, config)
    assert config.stats.exact_fraction < 0.15
    assert torch.isfinite(out).all()
    assert (out - _dense(q, k, v)).abs().max() > 1e-4


def test_head_masks_still_apply_on_tree_kernel():
    model = build_tiny(tiny_llama_config(), "sdpa")
    configure_tree_kernel(model, TreeKernelConfig(method="bound", fraction=1.0, leaf_block=4))
    ids = torch.randint(3, 128, (1, 12))
    with torch.inference_mode():
        plain = model(ids).logits
        with mask_heads(model, ["0-1"], mode="zero"):
            assert model.config._attn_implementation == "sa_tree_kernel"
            masked_logits = model(ids).logits
    assert not torch.allclose(plain, masked_logits)


def test_layers_not_selected_stay_exact():
    model = build_tiny(tiny_llama_config(), "sdpa")
    reference = build_tiny(tiny_llama_config(), "sdpa")
    configure_tree_kernel(model, TreeKernelConfig(method="uniform", exponent=0.3, layers=(1,)))
    ids = torch.randint(3, 128, (1, 40))
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
        expected = reference(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[1], expected[1])  # layer 0 untouched
    assert not torch.allclose(hidden[2], expected[2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(exponent=0.0), "exponent"), (dict(exponent=1.5), "exponent"), (dict(budget=0), "budget"),
    (dict(method="nope"), "unknown tree-kernel method"), (dict(fraction=2.0), "fraction"),
    (dict(sharing="heads"), "sharing"), (dict(leaf_block=0), "leaf_block"), (dict(descent="x"), "descent"),
    (dict(sink_blocks=-1), "sink_blocks"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeKernelConfig(**kwargs)


def test_dimension_mismatch_and_missing_layers():
    with pytest.raises(ValueError, match="head dim"):
        tree_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), None,
                       TreeKernelConfig())
    model = build_tiny(tiny_llama_config(), "sdpa")
    with pytest.raises(ValueError, match="do not exist"):
        configure_tree_kernel(model, TreeKernelConfig(layers=(7,)))


@pytest.mark.slow
def test_seed_descent_on_real_keys_stays_in_the_tree(embedded_model_dir):
    """Regression: on SmolLM2's keys the sampled descent once expanded an unchosen slot whose children did not
    exist in the tree (IndexError at 1024 tokens, alignment E=0.7)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selective_attention.retrieval.corpus import load_haystack_text

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32)
    ids = tokenizer(load_haystack_text(), return_tensors="pt").input_ids[:, :1024]
    configure_tree_kernel(model, TreeKernelConfig(method="alignment", exponent=0.7))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_rff_estimates_that_overflow_or_go_negative_stay_finite():
    """RFF kernel estimates overflow (exp of large norms) or are negative; the output must stay a finite average."""
    torch.manual_seed(5)
    q, k, v = torch.randn(1, 4, 64, 16) * 4, torch.randn(1, 2, 64, 16) * 4, torch.randn(1, 2, 64, 16)
    for seed in range(4):
        config = TreeKernelConfig(method="rff", exponent=0.3, seed=seed, num_features=2)
        out, _ = tree_attention(q, k, v, None, config)
        assert torch.isfinite(out).all(), seed
