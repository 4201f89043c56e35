"""`reproduce` wires every step together on a tiny model, writes an index from real outputs, and resumes."""

from __future__ import annotations

import json

import pytest

from selective_attention.reproduce import ReproduceConfig, load_reproduce_config, reproduce, write_results_doc

from .test_recipes import ROOT, tiny_model_dir  # noqa: F401  (fixture)


def _config(tmp_path, model_dir, **values) -> ReproduceConfig:
    settings = {
        "output_dir": str(tmp_path / "run"), "model": str(model_dir), "top_k": 2, "mask_modes": ["zero", "uniform"],
        "retrieval": {"detect_lengths": [60], "detect_depths": [0, 100], "detect_max_new_tokens": 3,
                      "lengths": [60], "depths": [50], "max_new_tokens": 3,
                      "rouge_threshold": -1.0, "plot_top": 4},  # a random model never answers: count every trial
        "finetune": {"dataset": "sample", "train_size": 4, "eval_size": 2, "test_size": 2, "max_length": 160,
                     "lora": {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0},
                     "num_train_epochs": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                     "logging_steps": 1, "max_new_tokens": 2},
        "variants": [{"name": "original"},
                     {"name": "kv1", "convert_kv_heads": "1:1", "convert_method": "mean",
                      "convert_calibration_tokens": 32}],
        "masked_eval": {"counts": [0, 2], "max_new_tokens": 2, "batch_size": 4},
        "masked_eval_orders": ["top"],
        "tree_ppl": {"context": 32, "windows": 1, "methods": ["dense", "topk"], "fractions": [0.5]},
    }
    settings.update(values)
    return load_reproduce_config(None, settings)


def test_reproduce_runs_every_step_and_resumes(tmp_path, tiny_model_dir):  # noqa: F811
    config = _config(tmp_path, tiny_model_dir)
    index = reproduce(config)
    out = index.parent
    text = index.read_text()
    for heading in ("## Retrieval heads", "## Needle in a haystack", "## MNLI-format LoRA fine-tuning",
                    "## Accuracy vs masked heads", "## Tree-kernel perplexity", "## Attention maps"):
        assert heading in text
    head_scores = json.loads((out / "retrieval" / "zero" / "head_scores.json").read_text())
    assert len(head_scores) == 2 * 4
    for line in text.splitlines():  # every embedded figure exists
        if line.startswith("![]("):
            assert (out / line[4:-1]).exists(), line
    summary = json.loads((out / "retrieval" / "uniform" / "summary.json").read_text())
    assert [row["mask"] for row in summary["runs"]] == ["top:2", "random:2", "bottom:2"]
    assert json.loads((out / "finetune" / "kv1" / "converted" / "config.json").read_text())[
        "num_key_value_heads_per_layer"] == [2, 1]
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"retrieval", "finetune", "masked_eval", "tree_ppl", "attention_map"}

    metrics_before = (out / "finetune" / "original" / "metrics.json").stat().st_mtime_ns
    reproduce(config)  # rerun: finished steps are reused, not redone
    assert (out / "finetune" / "original" / "metrics.json").stat().st_mtime_ns == metrics_before

    doc = write_results_doc(out, tmp_path / "docs")
    doc_text = doc.read_text()
    assert "## Beside the seeds' reported numbers" in doc_text and "0.34 -> 0.66-0.72" in doc_text
    for line in doc_text.splitlines():
        if line.startswith("![]("):
            assert (doc.parent / line[4:-1]).exists(), line


def test_reproduce_config_is_strict(tmp_path):
    with pytest.raises(ValueError, match="unknown step"):
        ReproduceConfig(steps=["retrieval", "nope"])
    with pytest.raises(ValueError, match="unique name"):
        ReproduceConfig(variants=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="tree_pl"):
        load_reproduce_config(None, {"tree_pl": []})


def test_repo_reproduce_config_loads():
    config = load_reproduce_config(ROOT / "recipes" / "reproduce.yaml")
    assert config.variants[0]["name"] == "original" and config.mask_modes == ["zero", "uniform"]
