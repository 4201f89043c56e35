"""Retrieval-head detection: probe == reference trial by trial, file format, resume/merge, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from selective_attention.heads import load_head_scores, load_sidecar, save_head_scores
from selective_attention.retrieval.detect import DetectConfig, assemble, detect, retrieval_scores
from selective_attention.retrieval.needles import resolve_needles
from tests.conftest import build_tiny, tiny_llama_config


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture
def tiny_real_vocab(tokenizer):
    """A tiny random Llama that speaks the SmolLM2 tokenizer's vocabulary (float64: no near-tie flips)."""
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return build_tiny(config, "sdpa", seed=0).double()


def config(**overrides) -> DetectConfig:
    settings = dict(lengths=[64, 96], depths=[0, 50, 100], needles=resolve_needles("sf"), max_new_tokens=6,
                    rouge_threshold=-1.0)  # a random model never answers: count every trial
    settings.update(overrides)
    return DetectConfig(**settings)


def test_retrieval_scores_follow_the_reference_definition():
    prompt = [5, 6, 7, 8, 9, 7]
    span = (1, 5)  # tokens 6, 7, 8, 9
    argmax = torch.tensor([[[2, 5]], [[0, 3]], [[2, 2]]])  # (steps=3, layers=1, heads=2)
    answer = [7, 8, 9]
    # step 0: head 0 -> key 2 (token 7 == 7, in span) hit; head 1 -> key 5 (token 7, outside span) no
    # step 1: head 0 -> key 0 (outside); head 1 -> key 3 (token 8 == 8) hit
    # step 2: key 2 holds 7, answer 9: no hit
    assert retrieval_scores(argmax, answer, prompt, span) == {"0-0": 0.25, "0-1": 0.25}


def test_probe_equals_reference_trial_by_trial(tmp_path, tiny_real_vocab, tokenizer):
    probe = detect(tiny_real_vocab, tokenizer, config(), tmp_path / "probe.json", model_name="tiny", progress=False)
    reference = detect(tiny_real_vocab, tokenizer, config(method="reference"), tmp_path / "ref.json",
                       model_name="tiny", progress=False)
    assert probe.new_trials == reference.new_trials == 6
    assert probe.scores == reference.scores
    assert json.loads((tmp_path / "probe.json").read_text()) == json.loads((tmp_path / "ref.json").read_text())
    for fast, slow in zip(probe.meta["trials"], reference.meta["trials"]):
        assert (fast["key"], fast["response_ids"], fast["scores"]) == (slow["key"], slow["response_ids"], slow["scores"])
    # the same without the shared-prefix cache
    plain = detect(tiny_real_vocab, tokenizer, config(reuse_prefix=False), None, model_name="tiny", progress=False)
    assert plain.scores == probe.scores


def test_file_format_and_resume(tmp_path, tiny_real_vocab, tokenizer):
    output = tmp_path / "head_scores.json"
    first = detect(tiny_real_vocab, tokenizer, config(depths=[0, 50]), output, model_name="tiny", progress=False)
    assert first.new_trials == 4
    scores = load_head_scores(output)
    assert sorted(scores) == sorted(f"{l}-{h}" for l in range(2) for h in range(4))
    assert all(len(values) == 4 for values in scores.values())
    meta = load_sidecar(output)
    assert (meta["model"], meta["num_layers"], meta["num_heads"], meta["num_key_value_heads"]) == ("tiny", 2, 4, 2)
    record = meta["trials"][0]
    assert {"context_length", "depth_percent", "needle_span", "response", "rouge1_recall", "counted"} <= set(record)
    assert "input_ids" not in record

    # a larger grid only runs what is missing; nothing is lost
    second = detect(tiny_real_vocab, tokenizer, config(depths=[0, 50, 100], save_inputs=True), output,
                    model_name="tiny", progress=False)
    assert second.new_trials == 2
    meta = load_sidecar(output)
    assert len(meta["trials"]) == 6
    assert sum("input_ids" in r for r in meta["trials"]) == 2
    third = detect(tiny_real_vocab, tokenizer, config(), output, model_name="tiny", progress=False)
    assert third.new_trials == 0
    assert all(len(values) == 6 for values in load_head_scores(output).values())
    # same content as one uninterrupted run
    fresh = detect(tiny_real_vocab, tokenizer, config(), tmp_path / "fresh.json", model_name="tiny", progress=False)
    assert fresh.scores == third.scores


def test_uncounted_trials_stay_out_of_the_lists(tmp_path, tiny_real_vocab, tokenizer):
    result = detect(tiny_real_vocab, tokenizer, config(lengths=[64], rouge_threshold=0.5), tmp_path / "h.json",
                    model_name="tiny", progress=False)
    assert result.meta["counted_trials"] == 0  # a random model never retrieves the needle
    assert all(values == [] for values in result.scores.values())
    assert len(result.meta["trials"]) == 3


def test_assemble_orders_counted_trials_and_fills_zeros():
    records = {
        "b": {"context_length_requested": 800, "depth_percent": 0.0, "needle": "sf", "counted": True,
              "scores": {"0-1": 0.5}},
        "a": {"context_length_requested": 400, "depth_percent": 50.0, "needle": "sf", "counted": True,
              "scores": {"0-0": 0.25}},
        "c": {"context_length_requested": 400, "depth_percent": 0.0, "needle": "sf", "counted": False,
              "scores": {"0-0": 1.0}},
    }
    assert assemble(records, 1, 2) == {"0-0": [0.25, 0.0], "0-1": [0.0, 0.5]}


def test_refuses_another_models_file(tmp_path, tiny_real_vocab, tokenizer):
    output = tmp_path / "head_scores.json"
    save_head_scores(output, {"0-0": [1.0]}, {"model": "big", "num_layers": 32, "num_heads": 32, "trials": []})
    before = output.read_text()
    with pytest.raises(ValueError, match="32 layers x 32 heads"):
        detect(tiny_real_vocab, tokenizer, config(), output, model_name="tiny", progress=False)
    assert output.read_text() == before

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"0-0": [0.5]}))
    with pytest.raises(ValueError, match="nothing was overwritten"):
        detect(tiny_real_vocab, tokenizer, config(), foreign, model_name="tiny", progress=False)


def test_refuses_context_above_model_maximum(tmp_path, tiny_real_vocab, tokenizer):
    with pytest.raises(ValueError, match="maximum of 512 positions"):
        detect(tiny_real_vocab, tokenizer, config(lengths=[600]), tmp_path / "h.json", model_name="tiny",
               progress=False)
    assert not (tmp_path / "h.json").exists()


@pytest.mark.parametrize("bad, match", [
    (dict(method="fast"), "unknown method"),
    (dict(depths=[120]), "depths"),
    (dict(lengths=[]), "context lengths"),
    (dict(needles=[]), "needle"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        config(**bad)


@pytest.mark.slow
def test_smollm2_small_grid(tmp_path, embedded_model_dir):
    """The real model answers, some head scores > 0.2, 30 x 9 keys, and a rerun resumes."""
    from selective_attention.loading.loader import load_model

    model, tokenizer = load_model(embedded_model_dir)
    output = tmp_path / "head_scores.json"
    grid = dict(lengths=[400, 800], needles=resolve_needles("sf"), max_new_tokens=32)
    first = detect(model, tokenizer, DetectConfig(depths=[0, 50], **grid), output, model_name="smol", progress=False)
    assert first.new_trials == 4
    second = detect(model, tokenizer, DetectConfig(depths=[0, 50, 100], **grid), output, model_name="smol",
                    progress=False)
    assert second.new_trials == 2
    scores = load_head_scores(output)
    assert len(scores) == 270
    meta = load_sidecar(output)
    assert len(meta["trials"]) == 6
    assert meta["counted_trials"] >= 4, [r["response"] for r in meta["trials"]]
    assert "San Francisco" in meta["trials"][0]["response"] or "Dolores" in meta["trials"][0]["response"]
    means = {key: sum(values) / len(values) for key, values in scores.items()}
    assert max(means.values()) > 0.2
    assert detect(model, tokenizer, DetectConfig(depths=[0, 50, 100], **grid), output, model_name="smol",
                  progress=False).new_trials == 0


def test_duo_pattern(tmp_path):
    from selective_attention.heads.duo import duo_pattern, write_duo_pattern

    scores = {"0-0": [0.1], "0-3": [0.9], "1-1": [0.5], "1-2": [0.0]}
    pattern = duo_pattern(scores, num_layers=2, num_heads=4, num_kv_heads=2, top=2)
    assert pattern == [[0, 1], [1, 0]]  # 0-3 -> KV head 1, 1-1 -> KV head 0
    path = write_duo_pattern(tmp_path / "pattern.tsv", pattern)
    assert path.read_text() == "0\t1\n1\t0\n"
    # a directory in duo-attention's layout: its loader reads the TSV with numpy and sink/recent from config.json
    directory = tmp_path / "attn_patterns" / "tiny"
    assert write_duo_pattern(directory, pattern, sink_size=32, recent_size=128) == directory / "full_attention_heads.tsv"
    heads = np.loadtxt(directory / "full_attention_heads.tsv", dtype=float, delimiter="\t")
    assert heads.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    config = json.loads((directory / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (32, 128)
    with pytest.raises(ValueError, match="grouped"):
        duo_pattern(scores, 2, 4, 3, 1)
    with pytest.raises(ValueError, match="top"):
        duo_pattern(scores, 2, 4, 2, 9)
