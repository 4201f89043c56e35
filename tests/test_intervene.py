"""`intervene`: one primitive under masks, probe, recorder; nested interventions unwind in reverse order."""

from __future__ import annotations

import pytest
import torch

from selective_attention import mask_heads, unmask_heads
from selective_attention.attention.intervene import active_interventions, intervene
from selective_attention.attention.masked import MASK_ATTRIBUTE
from selective_attention.attention.probe import probing
from selective_attention.attention.maps import record_attention
from selective_attention.modeling import attention_modules

from .conftest import build_tiny, tiny_llama_config


def test_nested_interventions_unwind_in_order():
    model = build_tiny(tiny_llama_config())
    ids = torch.tensor([[3, 5, 7, 9, 11, 13]])
    with torch.no_grad():
        plain = model(ids).logits
        with mask_heads(model, ["0-1"]) as mask:
            masked = model(ids).logits
            assert model.config._attn_implementation == "sa_masked_sdpa"
            with probing(model) as recorder:
                assert model.config._attn_implementation == "sa_probe"
                with record_attention(model, [1]) as record:
                    recorded = model(ids).logits
                    assert [h.name for h in active_interventions(model)] == [mask.name, "probe", "record attention"]
                assert record[1].shape == (1, 4, 6, 6)
                assert recorder.collect(last_position=5).shape == (2, 1, 4, 1)
                assert model.config._attn_implementation == "sa_probe"
            assert model.config._attn_implementation == "sa_masked_sdpa"
        assert model.config._attn_implementation == "sdpa"
        assert active_interventions(model) == []
        assert all(getattr(m, MASK_ATTRIBUTE) is None for ms in attention_modules(model).values() for m in ms)
        again = model(ids).logits
    torch.testing.assert_close(recorded, masked, rtol=0, atol=1e-6)  # masks stay on under probe and recorder
    torch.testing.assert_close(again, plain, rtol=0, atol=0)
    assert not torch.allclose(masked, plain)


def test_out_of_order_removal_is_refused_and_changes_nothing():
    model = build_tiny(tiny_llama_config())
    outer = mask_heads(model, ["0-0"])
    inner = intervene(model, "sa_example", lambda layer: layer, name="example")
    with pytest.raises(RuntimeError, match="reverse order"):
        outer.remove()
    assert outer.active and model.config._attn_implementation == "sa_masked_sdpa"
    inner.remove()
    outer.remove()
    assert model.config._attn_implementation == "sdpa"
    assert all(getattr(m, "sa_example") is None for ms in attention_modules(model).values() for m in ms)


def test_failing_value_changes_nothing():
    model = build_tiny(tiny_llama_config())

    def broken(layer: int):
        if layer == 1:
            raise ValueError("no value for layer 1")
        return layer

    with pytest.raises(ValueError, match="layer 1"):
        intervene(model, "sa_example", broken, "sa_masked_sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "sa_example") for ms in attention_modules(model).values() for m in ms)
    assert active_interventions(model) == []


def test_unmask_heads_pops_its_handles():
    model = build_tiny(tiny_llama_config())
    mask_heads(model, ["0-0"])
    mask_heads(model, ["1-2"], mode="uniform")
    unmask_heads(model)
    assert active_interventions(model) == []
    assert model.config._attn_implementation == "sdpa"
