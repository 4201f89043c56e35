"""Masked attention on the embedded SmolLM2 (real weights): unmasked wrappers equal transformers' kernels."""

from __future__ import annotations

import pytest
import torch

from selective_attention import mask_heads
from selective_attention.loading.loader import load_model

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole"]


@pytest.fixture(scope="module")
def smollm2(embedded_model_dir):
    return load_model(embedded_model_dir)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_unmasked_wrapper_equals_base_with_padding(smollm2, base):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.set_attn_implementation(base)
    try:
        with torch.no_grad():
            expected = model(**batch).logits
            model.set_attn_implementation(f"sa_masked_{base}")
            wrapped = model(**batch).logits
            alone = model(**tokenizer(PROMPTS[:1], return_tensors="pt")).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert (wrapped - expected).abs().max().item() <= 1e-5
    real = batch.attention_mask[0].bool()
    assert (wrapped[0, real] - alone[0]).abs().max().item() <= 1e-4


def test_generate_unmasked_and_masked(smollm2):
    model, tokenizer = smollm2
    inputs = tokenizer(PROMPTS[:1], return_tensors="pt")
    settings = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(**inputs, **settings)
    model.set_attn_implementation("sa_masked_sdpa")
    try:
        wrapped = model.generate(**inputs, **settings)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(plain.sequences, wrapped.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(plain.scores, wrapped.scores)) <= 1e-4
    every_head = [(layer, head) for layer in range(30) for head in range(9)]
    with mask_heads(model, every_head[::2], mode="zero"):
        ablated = model.generate(**inputs, **settings)
    assert not torch.equal(ablated.sequences, plain.sequences)
