"""`selective-attention demo`: the default number of masked heads and the no-head-scores path."""

from __future__ import annotations

import json
import logging
from importlib import resources

import pytest
from transformers import AutoTokenizer

from selective_attention.cli import main
from selective_attention.cli.demo import default_head_count

from .conftest import build_tiny, tiny_llama_config


def test_default_head_count_is_a_share_of_the_heads():
    assert default_head_count(30 * 9) == 20  # SmolLM2-135M: 7.5% of 270 = 20.25
    assert default_head_count(18 * 4) == 5  # Gemma 3 270M: 7.5% of 72 = 5.4
    assert default_head_count(2 * 4) == 1  # never zero
    assert default_head_count(100, share=0.5) == 50


@pytest.fixture
def tiny_dir(tmp_path, embedded_model_dir):
    """A tiny random Llama with the SmolLM2 tokenizer: no head scores are shipped for it."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = build_tiny(tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512))
    path = tmp_path / "tiny-model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_demo_without_head_scores_says_so(tiny_dir, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="selective_attention.cli.demo"):
        assert main(["demo", "--model", str(tiny_dir), "--context-tokens", "200", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "top 1 retrieval heads masked: skipped, no head scores for this model" in out
    assert "1 random heads masked" in out  # the default share of 2 x 4 heads
    assert any("no head scores" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("heads", ["0", "9"])
def test_demo_refuses_head_counts_the_model_cannot_have(tiny_dir, heads, caplog):
    assert main(["demo", "--model", str(tiny_dir), "--num-heads", heads, "--context-tokens", "200"]) == 2
    assert any(f"--num-heads {heads}" in record.getMessage() for record in caplog.records)


def test_shipped_scores_follow_the_embedded_model_name():
    from selective_attention.heads import model_head_scores

    default, label = model_head_scores(None, None, 30, 9)
    assert label == "shipped SmolLM2 scores" and model_head_scores(None, "smollm2-135m", 30, 9) == (default, label)
    assert model_head_scores(None, "some/other-model", 30, 9) == (None, None)
    gemma, label = model_head_scores(None, "gemma3-270m", 18, 4)
    assert label == "shipped Gemma 3 270M scores" and len(gemma) == 18 * 4
    meta = json.loads(resources.files("selective_attention").joinpath("data/gemma3_270m_head_scores.meta.json")
                      .read_text())
    assert (meta["model"], meta["num_layers"], meta["num_heads"]) == ("gemma3-270m", 18, 4)
