"""sa_probe: same output as SDPA, argmax rows equal to the eager attention weights' argmax, head masks honoured."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import sdpa_mask

from selective_attention import mask_heads
from selective_attention.attention.probe import ProbeRecorder, _row_argmax, probing
from selective_attention.retrieval.generate import cropped, greedy_decode, prefix_cache, reference_decode
from selective_attention.retrieval.detect import retrieval_scores
from selective_attention.registry import REGISTRY
from tests.conftest import build_tiny, tiny_llama_config


def tiny(vocab: int = 16, **overrides):
    config = tiny_llama_config(vocab_size=vocab, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               **overrides)
    return build_tiny(config, "sdpa", seed=1).double()


def test_registered_with_sdpa_mask():
    assert REGISTRY["sa_probe"].mask is sdpa_mask


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_row_argmax_matches_eager_weights(mask_kind):
    torch.manual_seed(0)
    batch, q_heads, kv_heads, q_len, kv_len, dim = 2, 6, 3, 5, 9, 8
    query = torch.randn(batch, q_heads, q_len, dim, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, kv_len, dim, dtype=torch.float64)
    allowed = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    allowed[1, :, :, :2] = False  # left padding on the second sequence
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -1e9)}[mask_kind]
    effective = allowed if mask is not None else torch.ones_like(allowed).tril(kv_len - q_len)
    expanded = key.repeat_interleave(q_heads // kv_heads, dim=1)
    scores = (query @ expanded.transpose(2, 3)) * dim ** -0.5
    weights = scores.masked_fill(~effective, float("-inf")).softmax(-1)
    got = _row_argmax(None, query, key, mask, None, None, rows=3)
    assert torch.equal(got, weights[:, :, -3:].argmax(-1))


def test_probe_output_equals_sdpa():
    model = tiny()
    ids = torch.randint(0, 16, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).logits
        with probing(model, rows=2) as recorder:
            got = model(ids).logits
            record = recorder.collect(last_position=29)
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert record.shape == (3, 1, 4, 2)


def _prompt(seed: int, length: int = 40, vocab: int = 16) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_probe_decode_equals_reference_loop(seed):
    """Trial by trial: same tokens, same per-step per-head argmax, same retrieval scores (and some hits)."""
    model = tiny()
    prompt = _prompt(seed)
    span = (4, 36)
    with probing(model) as recorder:
        fast = greedy_decode(model, prompt, stop_ids={15}, max_new_tokens=12, recorder=recorder)
    slow = reference_decode(model, prompt, stop_ids={15}, max_new_tokens=12)
    assert fast.tokens == slow.tokens
    assert torch.equal(fast.argmax, slow.argmax)
    fast_scores = retrieval_scores(fast.argmax, fast.tokens, prompt, span)
    assert fast_scores == retrieval_scores(slow.argmax, slow.tokens, prompt, span)
    assert fast_scores, "random prompt over a 16-token vocabulary should give some hits"


def test_probe_from_shared_prefix_cache_equals_full_prefill():
    model = tiny()
    prompt = _prompt(7, length=50)
    shared = prefix_cache(model, prompt[:30])
    assert shared is not None
    with probing(model) as recorder:
        full = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=6, recorder=recorder)
        reused = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=6, cache=cropped(shared, 20, model.config),
                               cached_length=20, recorder=recorder)
        again = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=6, cache=cropped(shared, 25, model.config),
                              cached_length=25, recorder=recorder)
    assert shared.layers[0].keys.shape[-2] == 30  # the shared cache is left intact
    assert full.tokens == reused.tokens == again.tokens
    assert torch.equal(full.argmax, reused.argmax) and torch.equal(full.argmax, again.argmax)


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_probe_honours_head_masks(mode):
    model = tiny()
    prompt = _prompt(11)
    heads = ["0-1", "1-2", "2-0"]
    with mask_heads(model, heads, mode=mode):
        with probing(model) as recorder:
            assert model.config._attn_implementation == "sa_probe"
            fast = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=8, recorder=recorder)
        assert model.config._attn_implementation == "sa_masked_sdpa"
        slow = reference_decode(model, prompt, stop_ids=set(), max_new_tokens=8)
    unmasked = reference_decode(model, prompt, stop_ids=set(), max_new_tokens=8)
    assert fast.tokens == slow.tokens
    assert torch.equal(fast.argmax, slow.argmax)
    assert not torch.equal(slow.argmax, unmasked.argmax)


def test_collect_without_probe_is_an_error():
    with pytest.raises(RuntimeError, match="sa_probe"):
        ProbeRecorder().collect(0)
