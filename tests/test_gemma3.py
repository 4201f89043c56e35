"""The second embedded model, Gemma 3 270M (18 layers, 4 query heads, 1 KV head; sliding window 512 on five of
every six layers): detection, the tree kernel and the converted checkpoint itself, on real weights.

Skipped unless the converted checkpoint is cached (`selective-attention assets --model gemma3-270m`, about two
minutes). Prompts are longer than the window, so sliding layers see only part of the prompt at decode.
"""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
import torch

from selective_attention.loading import assets
from selective_attention.tree_kernel import TreeKernelConfig, configure_tree_kernel
from selective_attention.loading.loader import load_model
from selective_attention.modeling import text_config
from selective_attention.retrieval.detect import DetectConfig, detect, retrieval_scores
from selective_attention.retrieval.corpus import load_haystack_text
from selective_attention.retrieval.needles import resolve_needles

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

GEMMA = "gemma3-270m"
NOT_CACHED = "Gemma 3 270M is not cached: run `selective-attention assets --model gemma3-270m`"
WINDOW = 512


def _require_gemma():
    if assets.cached_model_dir(GEMMA) is None:
        pytest.skip(NOT_CACHED)


@pytest.fixture(scope="module")
def gemma():
    _require_gemma()
    return load_model(GEMMA)


@pytest.fixture(scope="module")
def essay_ids(gemma):
    """700 tokens of the essays (more than the window), BOS first."""
    _, tokenizer = gemma
    return tokenizer(load_haystack_text()[:20000], return_tensors="pt").input_ids[:, :700]


def test_converted_checkpoint_is_gemma3_and_models_text(gemma, essay_ids):
    model, tokenizer = gemma
    config = json.loads((assets.cached_model_dir(GEMMA) / "config.json").read_text())
    assert "quantization_config" not in config
    text = text_config(model)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (18, 4, 1)
    assert text.sliding_window == WINDOW
    assert [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert essay_ids[0, 0].item() == tokenizer.bos_token_id
    # a broken dequantization (norm offsets, scaled embeddings) gives perplexity in the thousands
    with torch.inference_mode():
        loss = model(essay_ids, labels=essay_ids).loss.item()
    logger.info("Gemma 3 270M perplexity on 700 essay tokens: %.1f", math.exp(loss))
    assert math.exp(loss) < 60


def _brute_force_scores(eager, record: dict) -> dict[str, float]:
    """Retrieval scores from one no-cache forward pass over prompt + answer with eager attention: every row sees
    the full sequence under the model's own (windowed) mask, so an argmax is an absolute position by construction."""
    prompt, answer = record["input_ids"], record["response_ids"]
    ids = torch.tensor([prompt + answer[:-1]])
    with torch.inference_mode():
        attentions = eager(ids, output_attentions=True, use_cache=False).attentions
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))  # row t predicts answer[t]
    argmax = torch.stack([weights[0, :, rows].argmax(dim=-1) for weights in attentions])  # (layers, heads, steps)
    return retrieval_scores(argmax.permute(2, 0, 1), answer, prompt, tuple(record["needle_span"]))


def _assert_same_scores(got: dict[str, float], expected: dict[str, float], label: str) -> None:
    assert got.keys() == expected.keys(), (label, sorted(got), sorted(expected))
    for head, value in expected.items():
        assert got[head] == pytest.approx(value), (label, head)


def test_detect_matches_an_absolute_position_brute_force(gemma):
    model, tokenizer = gemma
    eager, _ = load_model(GEMMA, attn_implementation="eager")
    # needle outside the sliding window at decode (10%) and inside it (90%, where sliding heads retrieve)
    config = DetectConfig(lengths=[700], depths=[10.0, 90.0], needles=resolve_needles("sf"), chat=False,
                          max_new_tokens=16, save_inputs=True)
    result = detect(model, tokenizer, config, progress=False)
    assert len(result.records) == 2
    for record in result.records:
        assert record["prompt_tokens"] > WINDOW
        _assert_same_scores(record["scores"], _brute_force_scores(eager, record), f"depth {record['depth_percent']}")
    outside = next(r for r in result.records if r["depth_percent"] == 10.0)
    sliding = [layer for layer, kind in enumerate(text_config(model).layer_types) if kind == "sliding_attention"]
    assert not any(int(key.split("-")[0]) in sliding for key in outside["scores"])  # the window hides the needle


def test_probe_and_reference_agree_and_are_timed(gemma):
    model, tokenizer = gemma
    timings, scores = {}, {}
    for method in ("probe", "reference"):
        config = DetectConfig(lengths=[700], depths=[50.0], needles=resolve_needles("sf"), chat=False,
                              max_new_tokens=16, method=method)
        started = time.perf_counter()
        result = detect(model, tokenizer, config, progress=False)
        timings[method] = time.perf_counter() - started
        assert len(result.records) == 1
        scores[method] = result.records[0]["scores"]
    logger.warning("Gemma 3 270M, one 700-token trial: probe %.2fs, reference %.2fs (%.2fx)", timings["probe"],
                   timings["reference"], timings["reference"] / timings["probe"])
    _assert_same_scores(scores["probe"], scores["reference"], "probe vs reference")


def test_tree_kernel_bound_at_full_budget_equals_the_model(gemma, essay_ids):
    reference, _ = gemma
    model, _ = load_model(GEMMA)
    configure_tree_kernel(model, TreeKernelConfig(method="bound", fraction=1.0))
    with torch.inference_mode():
        expected = reference(essay_ids).logits
        got = model(essay_ids).logits
        error, scale = float((got - expected).abs().max()), float(expected.abs().max())
        assert error <= 1e-3 * scale, f"prefill logits differ by {error:.4g} (max |logit| {scale:.4g})"
        generated = {}
        for name, candidate in (("reference", reference), ("tree", model)):
            generated[name] = candidate.generate(essay_ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                                 return_dict_in_generate=True)
    assert torch.equal(generated["tree"].sequences, generated["reference"].sequences)
    for step, (got, expected) in enumerate(zip(generated["tree"].logits, generated["reference"].logits)):
        error, scale = float((got - expected).abs().max()), float(expected.abs().max())
        assert error <= 1e-3 * scale, f"decode step {step}: logits differ by {error:.4g} (max |logit| {scale:.4g})"
