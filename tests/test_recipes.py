"""Recipes: flat YAML configs parsed by HfArgumentParser (flags override), output-dir safety, Trainer+PEFT fine-tuning (both heads), masked-head evaluation and
the CPU smoke run through `accelerate launch` (tiny random Llama with the embedded tokenizer; one slow test on
the embedded SmolLM2 checks that the loss goes down)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from selective_attention.heads import save_head_scores, select_heads
from selective_attention.recipes import (FINETUNE_ARGUMENTS, MASKED_EVAL_ARGUMENTS, NEEDLE_ARGUMENTS, command_line, nli,
                                         parse_config, run_finetune, run_masked_eval)
from selective_attention.recipes.io import prepare_output_dir
from selective_attention.recipes.masked_eval import heads_for_count

from .conftest import build_tiny, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "configs" / "smoke_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, embedded_model_dir):
    """A tiny random Llama (2 layers x 4 heads) that uses the embedded model's tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    config = tiny_llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                               max_position_embeddings=512)
    model = build_tiny(config)
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run(tmp_path, model_dir, **values) -> tuple:
    """(ModelArguments, DataArguments, FinetuneArguments, TrainingArguments) for the tiny model, over smoke_cpu.yaml."""
    settings = {"model": str(model_dir), "output_dir": str(tmp_path / "run"),
                "dataset": "sample", "train_size": 8, "eval_size": 4, "test_size": 4, "max_length": 160,
                "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
                "num_train_epochs": 1, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
                "logging_steps": 1, "learning_rate": 1e-3, "max_new_tokens": 3}
    settings.update(values)
    return parse_config(FINETUNE_ARGUMENTS, SMOKE, values=settings)


# --- configs ------------------------------------------------------------------------------------------------------


def _gpu_free(path: Path) -> dict:
    """TrainingArguments refuses bf16 at construction on a machine without a GPU: parse GPU configs as fp32 there."""
    import torch

    return {"bf16": False} if "bf16: true" in path.read_text() and not torch.cuda.is_available() else {}


def test_repo_configs_load():
    paths = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        types = (MASKED_EVAL_ARGUMENTS if "masked" in path.name else NEEDLE_ARGUMENTS if "needle" in path.name
                 else FINETUNE_ARGUMENTS)
        parsed = parse_config(types, path, values=_gpu_free(path))
        assert parsed[-1].output_dir
    path = ROOT / "recipes" / "configs" / "llama32_1b_mnli.yaml"
    _, data, recipe, training = parse_config(FINETUNE_ARGUMENTS, path, values=_gpu_free(path))
    assert (recipe.lora["r"], recipe.lora["lora_alpha"], data.train_size, training.num_train_epochs,
            data.eval_size) == (32, 16, 500, 3, 50)
    assert len(recipe.lora["target_modules"]) == 7
    lora = recipe.lora_config("classification")  # peft's own config, not a copy of its fields
    assert (lora.r, lora.lora_alpha, lora.task_type, lora.modules_to_save) == (32, 16, "SEQ_CLS", ["score"])


def test_accelerate_configs_are_valid_for_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {path.stem: ClusterConfig.from_yaml_file(str(path)).distributed_type.value
             for path in (ROOT / "recipes" / "accelerate").glob("*.yaml")}
    # every file parses with accelerate's own schema; these five are the ones the recipes' docs name
    assert kinds.items() >= {"cpu": "NO", "single_gpu_bf16": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP",
                             "deepspeed_zero2": "DEEPSPEED"}.items()


def test_unknown_config_keys_are_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: x\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key.*learning_rat .*did you mean learning_rate.*known keys"):
        parse_config(FINETUNE_ARGUMENTS, path)
    path.write_text("output_dir: x\nnum_train_epoch: 3\n")
    with pytest.raises(ValueError, match=r"num_train_epoch\b.*did you mean num_train_epochs"):
        parse_config(FINETUNE_ARGUMENTS, path)
    path.write_text("model: x\n")
    with pytest.raises(ValueError, match="lacks required key.*output_dir"):
        parse_config(FINETUNE_ARGUMENTS, path)
    path.write_text("output_dir: x\nhead: regression\n")
    with pytest.raises(ValueError, match="unknown head 'regression'"):
        parse_config(FINETUNE_ARGUMENTS, path)
    path.write_text("output_dir: x\nlora: {r: 4, alpha: 8}\n")
    with pytest.raises(ValueError, match="lora: .*'alpha'"):
        parse_config(FINETUNE_ARGUMENTS, path)
    with pytest.raises(FileNotFoundError):
        parse_config(FINETUNE_ARGUMENTS, tmp_path / "none.yaml")
    for argv in (["--num_train_epochs"], ["--epochs", "1"], ["--head", "regression"]):  # argparse: exit 2, named
        with pytest.raises(SystemExit):
            command_line(FINETUNE_ARGUMENTS, ["--config", str(SMOKE), *argv])
        assert argv[0] in capsys.readouterr().err


def test_overrides_relative_files_and_convert_keys(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\ntrain_file: d.jsonl\nconvert_kv_heads: '29:1'\n"
                    "lora: {r: 8, target_modules: [q_proj, v_proj]}\n")
    (_, data, recipe, training), options = command_line(FINETUNE_ARGUMENTS, [
        "--config", str(path), "--num_train_epochs", "2", "--lora", "{target_modules: [q_proj]}", "--seed", "7",
        "--output-dir", str(tmp_path / "elsewhere"), "--overwrite"])
    assert training.num_train_epochs == 2 and recipe.lora["target_modules"] == ["q_proj"] and training.seed == 7
    assert recipe.lora["r"] == 8 and recipe.lora["lora_alpha"] == 16  # config file, then the default mapping
    assert training.output_dir == str(tmp_path / "elsewhere") and options.overwrite
    assert data.train_file == str(tmp_path / "d.jsonl")
    assert recipe.convert_kv_heads == "29:1" and recipe.convert_method == "mean"
    path.write_text("output_dir: out\nconvert_kv_heads: 1\nconvert_grouping: x\n")
    with pytest.raises(ValueError, match="convert_grouping"):
        parse_config(FINETUNE_ARGUMENTS, path)


def test_output_dir_is_never_clobbered(tmp_path):
    target = tmp_path / "out"
    assert prepare_output_dir(target) == target and target.is_dir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        prepare_output_dir(target)
    with pytest.raises(ValueError, match="not a recipe run"):
        prepare_output_dir(target, overwrite=True)
    assert (target / "notes.txt").exists()
    (target / "run_config.json").write_text("{}")
    prepare_output_dir(target, overwrite=True)
    assert list(target.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="no write access|not a directory"):
        prepare_output_dir(blocker / "sub")


# --- fine-tuning --------------------------------------------------------------------------------------------------


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generative_run_writes_adapter_metrics_and_real_predictions(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, masked_heads=["0-1", "1-3"], mask_mode="uniform")
    metrics = run_finetune(*config)
    out = Path(config[-1].output_dir)
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "adapter" / "adapter_config.json").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["after"]["test"]["accuracy"] == metrics["after"]["test"]["accuracy"]
    rows = _predictions(out / "predictions_after_test.jsonl")
    assert len(rows) == 4
    recomputed = sum(row["gold"] == row["predicted"] for row in rows) / len(rows)
    assert saved["after"]["test"]["accuracy"] == pytest.approx(recomputed)
    assert all(row["predicted"] == nli.LABELS[p] if (p := nli.parse_label(row["text"])) != nli.INVALID
               else row["predicted"] == "invalid" for row in rows)
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert not set(manifest["eval"]) & set(manifest["test"]) and not set(manifest["train"]) & set(manifest["test"])
    assert saved["train"]["steps"] == 2 and len(saved["train"]["loss_history"]) >= 2
    assert "before" in saved and saved["parameters"]["trainable"] < saved["parameters"]["total"]
    assert saved["masked_heads"] == ["0-1", "1-3"] and saved["mask_mode"] == "uniform"
    with pytest.raises(ValueError, match="already exists"):
        run_finetune(*config)


def test_loss_goes_down_on_a_repeated_batch(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, evaluate_before=False, train_size=4, eval_size=0, test_size=2,
                      eval_strategy="no", max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2)
    losses = [row["loss"] for row in run_finetune(*config)["train"]["loss_history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses


def test_classification_head_trains_lora_and_score(tmp_path, tiny_model_dir):
    config = tiny_run(tmp_path, tiny_model_dir, head="classification", merge=True, evaluate_before=False)
    metrics = run_finetune(*config)
    out = Path(config[-1].output_dir)
    with safe_open(out / "adapter" / "adapter_model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert any("score" in key for key in keys) and any("lora_A" in key for key in keys)
    assert metrics["after"]["test"]["count"] == 4 and metrics["after"]["test"]["invalid"] == 0
    rows = _predictions(out / "predictions_after_test.jsonl")
    assert sum(r["gold"] == r["predicted"] for r in rows) / 4 == pytest.approx(metrics["after"]["test"]["accuracy"])
    assert (out / "merged" / "config.json").exists() and list((out / "merged").glob("*.safetensors"))


def test_convert_then_finetune(tmp_path, tiny_model_dir):
    """`convert_kv_heads` runs selective_attention.gqa.convert first and fine-tunes the converted model."""
    config = tiny_run(tmp_path, tiny_model_dir, evaluate_before=False, convert_kv_heads="1:1", convert_method="mean",
                      convert_calibration_tokens=64, max_steps=1, per_device_train_batch_size=4)
    metrics = run_finetune(*config)
    out = Path(config[-1].output_dir)
    converted = json.loads((out / "converted" / "config.json").read_text())
    assert converted["model_type"] == "selective_llama" and converted["num_key_value_heads_per_layer"] == [2, 1]
    assert converted["conversion"]["method"] == "mean"
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"].endswith("converted")
    assert metrics["converted"].endswith("converted") and metrics["after"]["test"]["count"] == 4


def test_bad_data_fails_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "unsure"}) + "\n")
    config = parse_config(FINETUNE_ARGUMENTS, SMOKE, values={"output_dir": str(tmp_path / "run"), "train_file": str(bad),
                                                            "model": "/nonexistent/model"})
    with pytest.raises(ValueError, match="unknown label 'unsure'"):
        run_finetune(*config)


def test_eval_strategy_without_eval_examples_fails_before_loading_a_model(tmp_path):
    config = parse_config(FINETUNE_ARGUMENTS, SMOKE, values={"output_dir": str(tmp_path / "run"), "eval_size": 0,
                                                            "model": "/nonexistent/model"})
    with pytest.raises(ValueError, match="eval_strategy 'epoch' needs eval examples"):
        run_finetune(*config)


# --- masked-head evaluation ---------------------------------------------------------------------------------------


def test_heads_for_count_global_and_per_layer():
    scores = {"0-0": [0.9], "0-1": [0.1], "0-2": [0.5], "1-0": [0.2], "1-1": [0.8], "1-3": [0.3]}
    assert heads_for_count(scores, 2, order="bottom", scope="global", num_layers=2, num_heads=4) == \
        select_heads(scores, "bottom:2", num_layers=2, num_heads=4)
    assert heads_for_count(scores, 2, order="top", scope="global", num_layers=2, num_heads=4) == [(0, 0), (1, 1)]
    # per layer: unscored heads (0-3, 1-2) count as 0, so they are the bottom of their layer
    assert heads_for_count(scores, 1, order="bottom", scope="per_layer", num_layers=2, num_heads=4) == [(0, 3), (1, 2)]
    assert heads_for_count(scores, 2, order="top", scope="per_layer", num_layers=2, num_heads=4, layers=[1]) == \
        [(1, 1), (1, 3)]
    assert heads_for_count(scores, 0, order="bottom", scope="global", num_layers=2, num_heads=4) == []
    with pytest.raises(ValueError, match="out of range"):
        heads_for_count(scores, 1, order="bottom", scope="per_layer", num_layers=2, num_heads=4, layers=[5])


def test_masked_eval_sweep_writes_table_and_curve(tmp_path, tiny_model_dir):
    scores = {f"{layer}-{head}": [float((layer * 4 + head) % 5)] for layer in range(2) for head in range(4)}
    scores_path = tmp_path / "head_scores.json"
    save_head_scores(scores_path, scores, {"model": "tiny", "num_layers": 2, "num_heads": 4})
    model_args, data, sweep = parse_config(MASKED_EVAL_ARGUMENTS, values={
        "output_dir": str(tmp_path / "masked"), "model": str(tiny_model_dir), "head_scores": str(scores_path),
        "dataset": "sample", "train_size": 8, "eval_size": 4, "test_size": 4, "max_length": 160,
        "counts": [0, 2, 8], "mask_mode": "uniform", "max_new_tokens": 3})
    result = run_masked_eval(model_args, data, sweep)
    out = tmp_path / "masked"
    assert [row["masked"] for row in result["rows"]] == [0, 2, 8]
    assert result["rows"][1]["heads"] == ["{}-{}".format(*h) for h in select_heads(scores, "bottom:2")]
    assert result["mode"] == "uniform" and result["examples"] == 4
    assert (out / "masked_eval.png").stat().st_size > 1000
    table = (out / "masked_eval.md").read_text()
    assert "| 8 |" in table and "mode=uniform" in table
    assert json.loads((out / "masked_eval.json").read_text())["rows"][2]["masked"] == 8
    wrong = tmp_path / "other.json"
    save_head_scores(wrong, {"0-0": [1.0]}, {"model": "big", "num_layers": 30, "num_heads": 9})
    sweep.head_scores, sweep.output_dir = str(wrong), str(tmp_path / "masked2")
    with pytest.raises(ValueError, match="30 layers"):
        run_masked_eval(model_args, data, sweep)


# --- the CI smoke run through accelerate launch -------------------------------------------------------------------


def test_cpu_smoke_run_through_accelerate_launch(tmp_path, tiny_model_dir):
    out = tmp_path / "smoke"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "cpu.yaml"), "--num_cpu_threads_per_process", "2",
               str(ROOT / "recipes" / "mnli_finetune.py"), "--config", str(SMOKE), "--output-dir", str(out),
               "--model", str(tiny_model_dir), "--lora", "{r: 4}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == {"train": 12, "eval": 6, "test": 6}
    assert metrics["num_processes"] == 1 and metrics["device"] == "cpu"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["accuracy"]["after"]["test"] == round(metrics["after"]["test"]["accuracy"], 4)


@pytest.mark.slow
def test_embedded_model_loss_goes_down(tmp_path):
    """Three LoRA steps on one batch of the real SmolLM2: the answer-token loss must fall."""
    config = parse_config(FINETUNE_ARGUMENTS, SMOKE, values={
        "output_dir": str(tmp_path / "run"), "evaluate_before": False, "max_new_tokens": 2,
        "dataset": "sample", "train_size": 2, "eval_size": 0, "test_size": 1, "max_length": 128,
        "eval_strategy": "no", "max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 2e-3,
        "logging_steps": 1})
    losses = [row["loss"] for row in run_finetune(*config)["train"]["loss_history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
