"""Sliding-window layers: positions are absolute everywhere.

A sliding layer's cache keeps only its last `window` positions, so at decode its key tensor starts late. Every check
here compares with a brute-force computation over the whole sequence (eager attention, no cache, the window applied
by the mask), never with another of our paths.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache, MistralConfig

from selective_attention.attention.probe import probing
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel
from selective_attention.heads import load_sidecar
from selective_attention.modeling import cache_kwargs
from selective_attention.retrieval.detect import DetectConfig, detect, retrieval_scores
from selective_attention.retrieval.generate import cropped, greedy_decode, prefix_cache, reference_decode
from selective_attention.retrieval.needles import resolve_needles
from tests.conftest import build_tiny

WINDOW = 8


def tiny_mistral(vocab_size: int = 16, window: int = WINDOW, attn: str = "sdpa"):
    config = MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=window, pad_token_id=0)
    return build_tiny(config, attn, seed=0).double()  # float64: no near-tie argmax flips


def brute_force_argmax(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """(steps, layers, heads): argmax key position of each generated token's row, from one uncached eager pass."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        sequence = torch.tensor([prompt + answer[:-1]])
        with torch.no_grad():
            attentions = model(sequence, use_cache=False, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
    return torch.stack([weights[0][:, rows].argmax(-1) for weights in attentions]).permute(2, 0, 1)


def _prompt(seed: int, length: int = 40) -> list[int]:
    return torch.randint(1, 16, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_and_reference_equal_brute_force_positions(seed):
    model = tiny_mistral()
    prompt = _prompt(seed)
    with probing(model) as recorder:
        fast = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=8, recorder=recorder)
    slow = reference_decode(model, prompt, stop_ids=set(), max_new_tokens=8)
    expected = brute_force_argmax(model, prompt, fast.tokens)
    assert fast.tokens == slow.tokens
    assert torch.equal(fast.argmax, expected)
    assert torch.equal(slow.argmax, expected)
    assert int(expected.min()) >= len(prompt) - WINDOW  # the window is binding: no key before it


def test_shared_prefix_on_sliding_cache_equals_fresh_prefill():
    """A cropped shared prefix rebuilds the window a sliding layer would hold, so trials decode as from scratch."""
    model = tiny_mistral()
    prompt = _prompt(7, length=50)
    shared = prefix_cache(model, prompt[:30])
    assert shared is not None and shared.layers[0].keys.shape[-2] == 30  # the whole prefix, window or not
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([prompt[:25]]), **cache_kwargs(fresh), use_cache=True)
    rebuilt = cropped(shared, 25, model.config)
    for ours, theirs in zip(rebuilt.layers, fresh.layers):
        assert type(ours) is type(theirs) and ours.get_seq_length() == theirs.get_seq_length() == 25
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-12)
    with probing(model) as recorder:
        full = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=6, recorder=recorder)
        reused = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=6, cache=rebuilt, cached_length=25,
                               recorder=recorder)
    assert full.tokens == reused.tokens
    assert torch.equal(full.argmax, reused.argmax)
    assert torch.equal(full.argmax, brute_force_argmax(model, prompt, full.tokens))


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_detect_scores_equal_brute_force_trial_by_trial(tmp_path, tokenizer):
    """Window (16) smaller than every prompt: scores read key positions from the whole sequence."""
    model = tiny_mistral(vocab_size=len(tokenizer), window=16)
    settings = dict(lengths=[64, 96], depths=[0, 50, 100], needles=resolve_needles("sf"), max_new_tokens=6,
                    rouge_threshold=-1.0, save_inputs=True)
    for method in ("probe", "reference"):
        output = tmp_path / f"{method}.json"
        result = detect(model, tokenizer, DetectConfig(method=method, **settings), output, model_name="tiny",
                        progress=False)
        assert result.new_trials == 6
        for trial in load_sidecar(output)["trials"]:
            argmax = brute_force_argmax(model, trial["input_ids"], trial["response_ids"])
            expected = retrieval_scores(argmax, trial["response_ids"], trial["input_ids"],
                                        tuple(trial["needle_span"]))
            assert trial["scores"] == expected, (method, trial["key"])


@pytest.mark.parametrize("method", ["dense", "topk", "bound"])
def test_tree_kernel_full_budget_equals_the_windowed_model(method):
    model = tiny_mistral()
    prompt = torch.tensor([_prompt(3, length=45)])
    with torch.no_grad():
        expected = model(prompt).logits
        configure_tree_kernel(model, TreeKernelConfig(method=method, fraction=1.0, leaf_block=4, min_keys=1))
        got = model(prompt).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # the tree kernel computes in float32


def test_tree_kernel_decode_full_budget_equals_dense_decode():
    model = tiny_mistral()
    prompt = _prompt(5, length=37)
    dense = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=10)
    configure_tree_kernel(model, TreeKernelConfig(method="bound", fraction=1.0, leaf_block=4, min_keys=1))
    tree = greedy_decode(model, prompt, stop_ids=set(), max_new_tokens=10)
    assert tree.tokens == dense.tokens


def test_tree_kernel_budgets_count_only_keys_in_the_window():
    model = tiny_mistral()
    config = configure_tree_kernel(model, TreeKernelConfig(method="bound", budget=4, leaf_block=2, min_keys=1))
    length = 30
    with torch.no_grad():
        model(torch.tensor([_prompt(9, length=length)]))
    per_layer = sum(min(p + 1, WINDOW) for p in range(length))
    assert config.stats.visible == 2 * per_layer  # two layers, each row sees at most WINDOW keys
    assert config.stats.exact <= config.stats.visible


@pytest.mark.parametrize("settings", [dict(method="alignment"), dict(method="bound", descent="tree")])
def test_prefix_walking_methods_refuse_sliding_layers(settings):
    model = tiny_mistral()
    with pytest.raises(ValueError, match="sliding window"):
        configure_tree_kernel(model, TreeKernelConfig(**settings))
