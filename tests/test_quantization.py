"""Quantized models on CPU (torchao int8 weight-only): loading, detection (probe == reference), masking, sidecar
records; bitsandbytes choices refuse clearly where they cannot run."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from selective_attention.loading import quantization
from selective_attention.heads import load_sidecar
from selective_attention.loading.loader import load_model
from selective_attention.heads.masking import mask_heads
from selective_attention.retrieval.detect import DetectConfig, detect
from selective_attention.retrieval.needles import resolve_needles
from selective_attention.loading.quantization import MissingBackendError, describe, quantize_model
from tests.conftest import build_tiny, tiny_llama_config

pytest.importorskip("torchao", reason="torchao is the CPU quantization backend (a package dependency)")


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def _tiny(tokenizer, seed=0):
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return build_tiny(config, "sdpa", seed=seed)


def _is_quantized(linear) -> bool:
    return type(linear.weight).__module__.startswith("torchao")


def test_int8_weight_only_quantizes_the_projections_and_stays_close(tokenizer):
    model = _tiny(tokenizer)
    ids = torch.tensor([tokenizer("The password to the shed is blue tangerine.")["input_ids"]])
    with torch.inference_mode():
        reference = model(ids).logits
    quantize_model(model, "int8")
    attention = model.model.layers[0].self_attn
    assert all(_is_quantized(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert model.sa_quantization == describe("int8") and model.sa_quantization["backend"] == "torchao"
    with torch.inference_mode():
        quantized = model(ids).logits
    error = (quantized - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05  # really quantized, still the same function up to int8 rounding


def test_detection_on_a_quantized_model_probe_equals_reference(tmp_path, tokenizer):
    model = quantize_model(_tiny(tokenizer), "int8")
    config = dict(lengths=[80], depths=[0, 50, 100], needles=resolve_needles("sf"), max_new_tokens=5,
                  rouge_threshold=-1.0)
    probe = detect(model, tokenizer, DetectConfig(**config), tmp_path / "probe.json", model_name="tiny-int8",
                   progress=False)
    reference = detect(model, tokenizer, DetectConfig(method="reference", **config), tmp_path / "ref.json",
                       model_name="tiny-int8", progress=False)
    for mine, theirs in zip(probe.records, reference.records):
        assert mine["response_ids"] == theirs["response_ids"]
        assert mine["scores"] == pytest.approx(theirs["scores"])
    assert probe.scores == reference.scores
    meta = load_sidecar(tmp_path / "probe.json")
    assert meta["quantization"]["method"] == "int8" and meta["quantization"]["bits"] == 8


def test_masking_works_on_a_quantized_model(tokenizer):
    model = quantize_model(_tiny(tokenizer), "int8")
    ids = torch.tensor([tokenizer("Hello there, general Kenobi.")["input_ids"]])
    with torch.inference_mode():
        before = model(ids).logits
        with mask_heads(model, [(0, 1), (1, 3)], mode="zero"):
            masked = model(ids).logits
        after = model(ids).logits
    assert (masked - before).abs().max() > 1e-4
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_load_model_quantize_int8_from_a_checkpoint(tmp_path, tokenizer):
    model = _tiny(tokenizer)
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, _ = load_model(tmp_path / "tiny", quantize="int8")
    assert _is_quantized(loaded.model.layers[1].mlp.down_proj)
    assert loaded.sa_quantization["method"] == "int8"
    assert quantization.describe_model(loaded)["backend"] == "torchao"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0.05, atol=0.05)


def test_bad_quantization_choices(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantization.get_method("int3")
    real = quantization.package_available
    monkeypatch.setattr(quantization, "package_available", lambda name: False if name == "torchao" else real(name))
    with pytest.raises(MissingBackendError, match="--quantize int8 needs torchao.*pip install torchao"):
        quantization.check_available("int8")
    monkeypatch.setattr(quantization, "package_available", lambda name: False if name == "bitsandbytes" else True)
    with pytest.raises(MissingBackendError, match="pip install bitsandbytes"):
        quantization.check_available("4bit")
    monkeypatch.setattr(quantization, "package_available", lambda name: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--quantize int8"):
        quantization.check_available("8bit")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="cannot be combined with a .gguf"):
        load_model(gguf, quantize="int8")


def test_bitsandbytes_configs_follow_the_reference():
    config = quantization._bnb_4bit(torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert quantization._bnb_8bit(torch.float16).load_in_8bit
