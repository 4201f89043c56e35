"""Passkey retrieval: the Landmark prompt, the dense answer equal to transformers' own greedy `generate`, a full
budget equal to dense, and the command end to end on a tiny model with the real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selective_attention.cli import main
from selective_attention.tree_kernel import TreeKernelConfig
from selective_attention.tree_kernel.passkey import FILLER, QUESTION, answer_key, build_prompt, run_prompt

from .test_tree_ppl import tiny_checkpoint  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_places_the_key_at_the_depth(tokenizer, depth):
    prompt = build_prompt(tokenizer, 1024, depth, seed=3)
    text = tokenizer.decode(prompt.ids)
    assert abs(prompt.ids.numel() - 1024) < 40
    assert text.count(prompt.key) == 2 and len(prompt.key) == 5
    before, after = text.split(f"The pass key is {prompt.key}.")
    share = before.count(FILLER) / (before.count(FILLER) + after.count(FILLER))
    assert abs(share - depth) < 0.02
    assert tokenizer.decode(prompt.ids[-prompt.tail:]).strip() == QUESTION
    assert build_prompt(tokenizer, 1024, depth, seed=4).key != prompt.key


def test_answer_key():
    assert answer_key(" 60494. The") == "60494"
    assert answer_key(" sixty") is None


def test_dense_answer_is_greedy_generate_and_full_budget_is_dense(tiny_checkpoint, tokenizer):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    prompt = build_prompt(tokenizer, 300, 0.5, seed=0)
    with torch.no_grad():
        mask = torch.ones(1, prompt.ids.numel(), dtype=torch.long)
        generated = model.generate(prompt.ids[None], attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(generated[0, prompt.ids.numel():], skip_special_tokens=True)
    full = [(f"{m}@all", TreeKernelConfig(method=m, budget=1000, min_keys=1, leaf_block=4))
            for m in ("topk", "bound", "rescore")]
    partial = ("rescore@16", TreeKernelConfig(method="rescore", budget=16, min_keys=1, leaf_block=4,
                                              estimate="none"))
    results = run_prompt(model, tokenizer, prompt, [("dense", None), *full, partial], answer_tokens=6)
    assert results["dense"]["answer"] == expected
    for name, _ in full:
        assert results[name]["answer"] == expected, name
    assert results["rescore@16"]["costs"]["past_budget"]["exact"] <= 16


def test_cli_passkey(tiny_checkpoint, tmp_path):  # noqa: F811
    output = tmp_path / "passkey"
    assert main(["passkey", "--model", str(tiny_checkpoint), "--lengths", "200", "--depths", "0", "1", "--seeds", "0",
                 "--budgets", "16", "--methods", "topk", "rescore", "--leaf-block", "4", "--answer-tokens", "3",
                 "--dense-layers", "0", "--output", str(output)]) == 0
    trials = json.loads(output.with_suffix(".json").read_text())["trials"]
    assert set(trials) == {"200/0/0", "200/1/0"}
    results = trials["200/0/0"]["results"]
    assert set(results) == {"dense", "topk@16", "rescore@16"}
    assert results["rescore@16"]["costs"]["past_budget"]["exact"] == pytest.approx(16)  # layer 1 approximated
    assert "| rescore | 16 |" in output.with_suffix(".md").read_text()
    assert output.with_suffix(".png").stat().st_size > 0


def test_cli_passkey_refuses_an_output_from_other_settings_and_keeps_it(tmp_path, caplog):
    output = tmp_path / "passkey"
    saved = '{"settings": {"leaf_block": 8}, "trials": {"200/0/0": {}}}\n'
    output.with_suffix(".json").write_text(saved)
    assert main(["passkey", "--model", str(tmp_path / "no-model"), "--output", str(output)]) == 2
    assert "other settings (" in caplog.text and "leaf_block: 8 there, 16 here" in caplog.text
    assert output.with_suffix(".json").read_text() == saved


def test_cli_passkey_rerun_with_the_same_settings_adds_trials_and_keeps_the_done_ones(tiny_checkpoint, tmp_path):  # noqa: F811
    output = tmp_path / "passkey"
    flags = ["passkey", "--model", str(tiny_checkpoint), "--lengths", "200", "--seeds", "0", "--budgets", "16",
             "--methods", "topk", "--answer-tokens", "2", "--dense-layers", "0", "--output", str(output)]
    assert main(flags + ["--depths", "0"]) == 0
    first = json.loads(output.with_suffix(".json").read_text())["trials"]
    assert main(flags + ["--depths", "0", "1"]) == 0
    second = json.loads(output.with_suffix(".json").read_text())["trials"]
    assert set(second) == {"200/0/0", "200/1/0"} and second["200/0/0"] == first["200/0/0"]
