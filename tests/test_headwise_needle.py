"""Needle grids and the CLI through the head-wise KV cache (tiny random Llama, SmolLM2 tokenizer)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from selective_attention.retrieval.evaluate import (
    NeedleConfig,
    load_manifest,
    load_results,
    run_needle_grid,
)
from selective_attention.retrieval.needles import resolve_needles

from .conftest import build_tiny, tiny_llama_config

GRID = dict(lengths=[96], depths=[0, 50, 100], needles=resolve_needles("sf"), max_new_tokens=5)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


@pytest.fixture
def tiny(tokenizer):
    config = tiny_llama_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return build_tiny(config, "sdpa", seed=0)


def _answers(model, tokenizer, path, **settings) -> list[str]:
    config = NeedleConfig(**{**GRID, **settings})
    return [r["model_response"] for r in run_needle_grid(model, tokenizer, config, path, model_name="t",
                                                         progress=False)]


def test_window_covering_the_prompt_answers_as_dense(tmp_path, tiny, tokenizer):
    dense = _answers(tiny, tokenizer, tmp_path / "dense")
    wide = _answers(tiny, tokenizer, tmp_path / "wide", kv_cache="headwise", full_kv_heads="0", sink=0, window=300)
    assert wide == dense
    assert tiny.config._attn_implementation == "sdpa"  # the head-wise attention was removed afterwards


def test_prefix_reuse_and_chunked_prefill_answer_alike(tmp_path, tiny, tokenizer):
    settings = dict(kv_cache="headwise", full_kv_heads="1", kv_select="random", seed=2, sink=4, window=16)
    reused = _answers(tiny, tokenizer, tmp_path / "a", **settings)
    plain = _answers(tiny, tokenizer, tmp_path / "b", reuse_prefix=False, **settings)
    chunked = _answers(tiny, tokenizer, tmp_path / "c", prefill_chunk=7, **settings)
    assert reused == plain == chunked
    manifest = load_manifest(tmp_path / "a")
    assert manifest["kv_cache"]["sink"] == 4 and sum(map(sum, manifest["kv_cache"]["pattern"])) == 1
    assert "1/4 KV heads full (random)" in manifest["label"]
    assert load_results(tmp_path / "a")[0]["kv_cache"].startswith("1/4 KV heads full")


def test_bad_kv_cache_settings():
    with pytest.raises(ValueError, match="unknown kv_cache"):
        NeedleConfig(**GRID, kv_cache="paged")
    with pytest.raises(ValueError, match="unknown kv_select"):
        NeedleConfig(**GRID, kv_select="best")


def test_cli_needle_headwise(tmp_path, tiny, tokenizer):
    from selective_attention.cli import main

    model_dir = tmp_path / "tiny-model"
    tiny.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"1-3": [0.9], "0-0": [0.2]}))
    grid = ["--model", str(model_dir), "--lengths", "64", "--depths", "50", "--max-new-tokens", "3"]
    run = tmp_path / "run"
    assert main(["needle", *grid, "--output", str(run), "--kv-cache", "headwise", "--full-kv-heads", "0.25",
                 "--head-scores", str(scores), "--sink", "4", "--window", "16"]) == 0
    assert load_manifest(run)["kv_cache"]["pattern"] == [[0, 0], [0, 1]]  # KV head 1 serves query head 3
    for bad in (["--full-kv-heads", "1.5"], ["--full-kv-heads", "0.5"], ["--full-kv-heads", "many"],
                ["--window", "600"]):
        target = tmp_path / "bad"
        assert main(["needle", *grid, "--output", str(target), "--kv-cache", "headwise", *bad]) == 2
        assert not target.exists()


def test_point_files_keep_the_reference_names(tmp_path):
    """gkamradt/LLMTest_NeedleInAHaystack and Retrieval_Head name a point `..._len_{L}_depth_{int(depth*100)}`
    with the depth in percent, so depth 100 is `depth_10000`: kept for byte-compatible folders."""
    from selective_attention.retrieval.evaluate import point_path

    needle = resolve_needles("sf")[0]
    assert point_path(tmp_path, 2000, 100.0, needle).name == "len_2000_depth_10000_sf_results.json"
    assert point_path(tmp_path, 2000, 25.0, needle).name == "len_2000_depth_2500_sf_results.json"
