"""Masked-head attention: equivalence with transformers' own kernels and with weight surgery."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, MistralConfig, Qwen2Config
from transformers.masking_utils import AttentionMaskInterface

import selective_attention
from selective_attention import mask_heads, masked_heads, unmask_heads

from .conftest import build_tiny, tiny_llama_config

ATOL = 1e-5
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
FAMILIES = {
    "llama": lambda: tiny_llama_config(),
    "qwen2": lambda: Qwen2Config(**TINY),
    "mistral": lambda: MistralConfig(**TINY),
}


def _ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_registered_with_both_interfaces():
    for name in ("sa_masked_sdpa", "sa_masked_eager"):
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
        assert "/" not in name and ":" not in name


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_empty_mask_equals_base(family, base):
    model = build_tiny(FAMILIES[family](), attn_implementation=base)
    ids = _ids()
    expected = _logits(model, ids)
    model.set_attn_implementation(f"sa_masked_{base}")
    assert torch.allclose(_logits(model, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_left_padded_batch_matches_unpadded_rows(base):
    model = build_tiny(tiny_llama_config(), attn_implementation=f"sa_masked_{base}")
    ids = _ids(2, 10)
    padded = ids.clone()
    padded[0, :4] = 0
    attention_mask = torch.ones_like(padded)
    attention_mask[0, :4] = 0
    with mask_heads(model, ["1-2"], mode="mean"):
        batch_logits = _logits(model, padded, attention_mask=attention_mask)
        alone = _logits(model, padded[:1, 4:])
        full_row = _logits(model, ids[1:])
    assert torch.allclose(batch_logits[0, 4:], alone[0], atol=ATOL, rtol=0)
    assert torch.allclose(batch_logits[1], full_row[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_equals_o_proj_column_surgery(family):
    model = build_tiny(FAMILIES[family]())
    reference = build_tiny(FAMILIES[family]())
    layer, head = 1, 2
    attention = reference.model.layers[layer].self_attn
    with torch.no_grad():
        attention.o_proj.weight[:, head * attention.head_dim:(head + 1) * attention.head_dim] = 0
    ids = _ids()
    with mask_heads(model, [(layer, head)], mode="zero"):
        masked = _logits(model, ids)
    assert torch.allclose(masked, _logits(reference, ids), atol=ATOL, rtol=0)
    assert not torch.allclose(masked, _logits(model, ids), atol=1e-3)


@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uniform_equals_zeroed_query(family, base):
    """The reference code's ablation: the head's query is zero, so it attends uniformly to visible keys."""
    config = FAMILIES[family]()
    model = build_tiny(config, attn_implementation=base)
    reference = build_tiny(config, attn_implementation="eager")
    layer, head = 0, 3
    attention = reference.model.layers[layer].self_attn
    rows = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
    with torch.no_grad():
        attention.q_proj.weight[rows] = 0
        if attention.q_proj.bias is not None:
            attention.q_proj.bias[rows] = 0
    ids = _ids()
    with mask_heads(model, ["0-3"], mode="uniform"):
        masked = _logits(model, ids)
    assert torch.allclose(masked, _logits(reference, ids), atol=ATOL, rtol=0)


def test_mean_replaces_head_output_by_causal_running_mean():
    model = build_tiny(tiny_llama_config())
    layer, head = 1, 1
    o_proj = model.model.layers[layer].self_attn.o_proj
    dim = model.model.layers[layer].self_attn.head_dim
    captured = []
    hook = o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().clone()))
    ids = _ids()
    _logits(model, ids)
    with mask_heads(model, [(layer, head)], mode="mean"):
        _logits(model, ids)
    hook.remove()
    plain, ablated = captured
    cols = slice(head * dim, (head + 1) * dim)
    positions = torch.arange(1, ids.shape[1] + 1, dtype=plain.dtype)[None, :, None]
    expected = plain.clone()
    expected[:, :, cols] = torch.cumsum(plain[:, :, cols], dim=1) / positions
    assert torch.allclose(ablated, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "uniform", "mean"])
@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_generate_with_cache_matches_full_recompute(mode, base):
    """Masks apply at prefill and at every decode step: cached decoding equals recomputing from scratch."""
    model = build_tiny(tiny_llama_config(), attn_implementation=base)
    ids = _ids(1, 8)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with mask_heads(model, ["0-0", "0-1", "1-3"], mode=mode):
        cached = model.generate(ids, use_cache=True, output_scores=True, return_dict_in_generate=True, **settings)
        recomputed = model.generate(ids, use_cache=False, output_scores=True, return_dict_in_generate=True, **settings)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


def test_generate_unmasked_equals_plain_sdpa():
    model = build_tiny(tiny_llama_config())
    ids = _ids(1, 8)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    plain = model.generate(ids, **settings)
    model.set_attn_implementation("sa_masked_sdpa")
    wrapped = model.generate(ids, **settings)
    assert torch.equal(plain.sequences, wrapped.sequences)
    assert all(torch.allclose(a, b, atol=ATOL, rtol=0) for a, b in zip(plain.scores, wrapped.scores))


def test_handle_restores_model_and_config(tmp_path):
    model = build_tiny(tiny_llama_config())
    ids = _ids()
    before = _logits(model, ids)
    with mask_heads(model, "0-1,1-0", mode="uniform") as handle:
        assert model.config._attn_implementation == "sa_masked_sdpa"
        assert list(masked_heads(model)) == [(0, 1, "uniform"), (1, 0, "uniform")]
        assert model.config.sa_masked_heads == ["0-1", "1-0"]
        model.save_pretrained(tmp_path)
        assert '"sa_masked_heads"' in (tmp_path / "config.json").read_text()
        assert not torch.allclose(_logits(model, ids), before, atol=1e-4)
    assert "active=False" in repr(handle)
    assert model.config._attn_implementation == "sdpa"
    assert list(masked_heads(model)) == []
    assert torch.allclose(_logits(model, ids), before, atol=0, rtol=0)


def test_saved_mask_is_reapplied(tmp_path):
    model = build_tiny(tiny_llama_config())
    ids = _ids()
    with mask_heads(model, ["1-3"], mode="zero"):
        expected = _logits(model, ids)
        model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert selective_attention.apply_config_head_mask(loaded) is not None
    assert torch.allclose(_logits(loaded, ids), expected, atol=ATOL, rtol=0)


def test_unmask_heads_returns_to_base():
    model = build_tiny(tiny_llama_config(), attn_implementation="eager")
    mask_heads(model, ["0-0"])
    assert model.config._attn_implementation == "sa_masked_eager"
    unmask_heads(model)
    assert model.config._attn_implementation == "eager"
    assert list(masked_heads(model)) == []


@pytest.mark.parametrize(
    "heads, mode, message",
    [
        (["2-0"], "zero", "layer 2 out of range"),
        (["0-4"], "zero", "head 4 of layer 0 out of range"),
        ([(-1, 0)], "zero", "layer -1 out of range"),
        (["0_1"], "zero", "malformed head '0_1'"),
        (["a-b"], "zero", "malformed head"),
        ([(0, 1.5)], "zero", "malformed head"),
        (["0-1"], "scramble", "unknown mask mode 'scramble'"),
    ],
)
def test_bad_input_is_named(heads, mode, message):
    model = build_tiny(tiny_llama_config())
    with pytest.raises(ValueError, match=message):
        mask_heads(model, heads, mode=mode)
    assert model.config._attn_implementation == "sdpa"


def test_model_without_attention_interface_is_refused():
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        mask_heads(torch.nn.Linear(2, 2), ["0-0"])
    from .legacy_model import LegacyModel

    with pytest.raises(ValueError, match="does not route attention through"):
        mask_heads(LegacyModel(), ["0-0"])


def test_unknown_base_implementation_is_refused():
    model = build_tiny(tiny_llama_config())
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="has no masked variant"):
        mask_heads(model, ["0-0"])
