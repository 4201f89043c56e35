"""Model card and push, offline: the Hub API is mocked; --dry-run must not touch it at all."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard

from selective_attention import cli
from selective_attention.gqa import hub

from .conftest import build_tiny, tiny_llama_config


@pytest.fixture
def converted_dir(tmp_path) -> Path:
    """A real selective_llama checkpoint: tiny Llama whose last layer is mean-pooled to 1 KV head, 2 heads masked."""
    from selective_attention.gqa.convert import convert_model

    source = build_tiny(tiny_llama_config())
    ids = torch.randint(1, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    model, report = convert_model(source, {1: 1}, "mean", calibration_ids=ids)
    model.config.sa_masked_heads = ["0-1", "1-2"]
    model.config.sa_mask_mode = "uniform"
    path = tmp_path / "converted"
    model.save_pretrained(path)
    (path / "metrics.json").write_text(json.dumps({
        "head": "generative", "data_source": "nyu-mll/multi_nli", "data": {"train": 500, "eval": 50},
        "before": {"eval": {"accuracy": 0.34, "macro_f1": 0.2, "count": 50}},
        "after": {"eval": {"accuracy": 0.72, "macro_f1": 0.71, "count": 50}},
        "train": {"steps": 375, "loss_history": [{"step": 1, "loss": 2.5}, {"step": 375, "loss": 0.3}]}}))
    return path


def test_card_describes_the_variant(converted_dir):
    card = hub.build_model_card(converted_dir, "org/tiny-kv1")
    text = str(card)
    assert "KV heads per layer: layer 0: 2, layer 1: 1" in text
    assert "conversion: `mean`" in text and "layer 1:" in text.split("reconstruction error")[1]
    assert "masked heads (2, mode `uniform`): 0-1, 1-2" in text
    assert "| after fine-tuning | eval | 50 | 0.720 | 0.710 |" in text
    assert "trust_remote_code=True" in text and 'from_pretrained("org/tiny-kv1"' in text
    data = card.data.to_dict()
    assert "variable-gqa" in data["tags"] and data["datasets"] == ["nyu-mll/multi_nli"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.72


def test_card_for_a_plain_llama_and_an_adapter(tmp_path):
    plain = tmp_path / "plain"
    build_tiny(tiny_llama_config()).save_pretrained(plain)
    text = str(hub.build_model_card(plain))
    assert "KV heads: 2 in every layer (unchanged GQA)" in text and "trust_remote_code" not in text
    assert "No evaluation results" in text
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "meta-llama/Llama-3.2-1B-Instruct", "r": 32, "lora_alpha": 16,
         "target_modules": ["q_proj", "v_proj"]}))
    card = hub.build_model_card(adapter, "org/lora")
    assert "LoRA adapter (r=32, alpha=16)" in str(card) and "AutoPeftModelForCausalLM" in str(card)
    assert card.data.to_dict()["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    with pytest.raises(ValueError, match="not a checkpoint"):
        hub.build_model_card(tmp_path)


def test_push_uploads_code_weights_and_card(converted_dir):
    api = mock.MagicMock()
    plan = hub.push_to_hub(converted_dir, "org/tiny-kv1", private=True, api=api)
    api.create_repo.assert_called_once_with("org/tiny-kv1", private=True, exist_ok=True)
    (repo_id, operations), kwargs = api.create_commit.call_args
    uploaded = sorted(op.path_in_repo for op in operations)
    assert repo_id == "org/tiny-kv1" and uploaded == sorted(plan.files)
    assert {"config.json", "model.safetensors", "README.md", "metrics.json", "modeling_selective_llama.py",
            "configuration_selective_llama.py"} <= set(uploaded)
    card_op = next(op for op in operations if op.path_in_repo == "README.md")
    card = ModelCard.load(card_op.path_or_fileobj)
    assert "KV heads per layer" in card.text and "masked heads" in card.text


def test_dry_run_needs_no_network(converted_dir, capsys):
    with mock.patch.object(hub, "HfApi", side_effect=AssertionError("dry run must not build an HfApi")):
        assert cli.main(["push", str(converted_dir), "--repo-id", "org/tiny-kv1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload to org/tiny-kv1" in out and "modeling_selective_llama.py" in out
    assert "model.safetensors" in out
    assert "conversion: `mean`" in (converted_dir / "README.md").read_text()


def test_push_refuses_bad_input(converted_dir, tmp_path):
    with pytest.raises(ValueError, match="ORG/NAME"):
        hub.push_to_hub(converted_dir, "justname", dry_run=True)
    with pytest.raises(ValueError, match="invalid repo id"):
        hub.push_to_hub(converted_dir, "org/bad name!", dry_run=True)
    with pytest.raises(FileNotFoundError):
        hub.push_to_hub(tmp_path / "missing", "org/x", dry_run=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .safetensors"):
        hub.push_to_hub(empty, "org/x", dry_run=True)
    assert cli.main(["push", str(empty), "--repo-id", "org/x", "--dry-run"]) == 2
