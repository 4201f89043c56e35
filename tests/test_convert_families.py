"""convert beyond Llama: Mistral, Qwen2 and Qwen3 (biases, q/k norms, sliding windows) against transformers' own models."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, Qwen2Config, Qwen3Config

from selective_attention.gqa.convert import convert_model

from .conftest import build_tiny
from .test_convert import CALIBRATION, IDS, logits, measured_error
from .test_gqa import load_many_in_fresh_process

FAMILY_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, initializer_range=0.2)
WINDOW = 8  # shorter than IDS: sliding layers drop keys at prefill and while decoding
FAMILIES = {  # every attention feature that convert must carry over; windows on all layers or on layer 1 only
    "mistral": lambda: MistralConfig(**FAMILY_BASE, sliding_window=WINDOW),
    "qwen2": lambda: Qwen2Config(**FAMILY_BASE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": lambda: Qwen3Config(**FAMILY_BASE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1),
}
FEATURES = {"mistral": dict(sliding_window_per_layer=[WINDOW, WINDOW], qkv_bias=False, qk_norm=False),
            "qwen2": dict(sliding_window_per_layer=[None, WINDOW], qkv_bias=True, qk_norm=False),
            "qwen3": dict(sliding_window_per_layer=[None, WINDOW], qkv_bias=False, qk_norm=True)}


def family_source(name: str, attn: str = "sdpa", seed: int = 0):
    """A tiny random model of `name` whose biases and norm weights are not their trivial initial values."""
    model = build_tiny(FAMILIES[name](), attn, seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_duplicate_is_exact_on_families(name, attn):
    """Biases, q/k norms and sliding windows carried over: same logits (left-padded batch too), same greedy text."""
    source = family_source(name, attn)
    model, report = convert_model(source, "0:4", "duplicate")
    assert model.config.num_key_value_heads_per_layer == [4, 2] and report.layers[0].method == "duplicate"
    assert {key: getattr(model.config, key) for key in FEATURES[name]} == FEATURES[name]
    batch = torch.cat([IDS, IDS.flip(1)])
    attention = torch.ones_like(batch)
    batch[1, :5], attention[1, :5] = 0, 0  # left padding
    with torch.no_grad():
        expected = source(batch, attention_mask=attention).logits
        got = model(batch, attention_mask=attention).logits
    assert (got - expected)[attention.bool()].abs().max().item() <= 1e-5
    generate = dict(max_new_tokens=2 * WINDOW, do_sample=False)
    assert torch.equal(model.generate(IDS, **generate), source.generate(IDS, **generate))  # decoding past the window
    with pytest.raises(ValueError, match="need a dynamic cache"):  # a static cache would misplace the window
        model.generate(IDS, max_new_tokens=2, do_sample=False, cache_implementation="static")
    for layer in model.model.layers:  # the window matters: without it the same weights compute otherwise
        layer.self_attn.sliding_window = None
    assert (logits(model) - logits(source)).abs().max().item() > 1e-3


def test_reduced_families_errors_and_fresh_process(tmp_path):
    """Fewer KV heads on each family: measured error, and the checkpoints load with trust_remote_code alone."""
    models, checkpoints = [], []
    for name in sorted(FAMILIES):
        source = family_source(name, seed=2)
        out = tmp_path / name
        model, report = convert_model(source, "0:1,1:1", "similarity", calibration_ids=CALIBRATION, out_dir=out)
        for layer in (0, 1):
            assert report.layers[layer].error == pytest.approx(measured_error(source, model, layer), rel=1e-4), name
            assert report.layers[layer].error > 0
        models.append(model)
        checkpoints.append(out)
    for name, model, loaded in zip(sorted(FAMILIES), models, load_many_in_fresh_process(checkpoints, IDS, tmp_path)):
        torch.testing.assert_close(loaded, logits(model), atol=1e-5, rtol=1e-5, msg=name)
