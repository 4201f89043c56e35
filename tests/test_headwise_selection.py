"""Choosing the full KV heads of a head-wise cache: group maximum, count / fraction / threshold, seeds, files."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from selective_attention.cache import (
    HeadwisePolicy,
    headwise_policy,
    kv_budget,
    kv_head_scores,
    load_duo_pattern,
    select_full_kv_heads,
)
from selective_attention.heads import save_head_scores
from selective_attention.heads.duo import duo_pattern, write_duo_pattern

from .conftest import build_tiny, tiny_llama_config

# 3 layers x 6 query heads x 3 KV heads (groups of 2)
SHAPE = dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
SCORES = {"0-1": [0.9, 0.7], "0-2": [0.1], "1-4": [0.5], "1-5": [0.6], "2-0": [0.2], "2-3": [0.0]}


def _model():
    return build_tiny(tiny_llama_config(**SHAPE))


def test_kv_head_score_is_the_group_maximum():
    matrix = kv_head_scores(SCORES, 3, 6, 3)
    assert matrix[0] == pytest.approx([0.8, 0.1, 0.0])  # head 1 (mean 0.8) serves KV head 0
    assert matrix[1] == pytest.approx([0.0, 0.0, 0.6])  # heads 4 and 5 share KV head 2: max, not sum
    assert matrix[2] == pytest.approx([0.2, 0.0, 0.0])


def test_count_fraction_and_threshold():
    model = _model()
    by_count = headwise_policy(model, SCORES, full=2, sink=4, window=8)
    assert by_count.pattern == ((1, 0, 0), (0, 0, 1), (0, 0, 0))
    by_fraction = headwise_policy(model, SCORES, full=0.3, sink=4, window=8)  # ceil(0.3 * 9) = 3
    assert by_fraction.pattern == ((1, 0, 0), (0, 0, 1), (1, 0, 0))
    by_threshold = headwise_policy(model, SCORES, full=None, threshold=0.15, sink=4, window=8)
    assert by_threshold.pattern == by_fraction.pattern
    assert headwise_policy(model, SCORES, full=1.0, sink=4, window=8).num_full == 9
    assert headwise_policy(model, None, full=0, sink=4, window=8).num_full == 0


def test_ties_are_broken_by_the_seed():
    eligible = [(layer, head) for layer in range(4) for head in range(4)]
    flat = [[0.0] * 4 for _ in range(4)]
    flat[2][1] = 1.0
    picks = {seed: select_full_kv_heads(flat, eligible, full=3, seed=seed) for seed in range(6)}
    assert all((2, 1) in chosen and len(chosen) == 3 for chosen in picks.values())
    assert picks[0] == select_full_kv_heads(flat, eligible, full=3, seed=0)
    assert len({frozenset(chosen) for chosen in picks.values()}) > 1


def test_random_selection_is_seeded_and_sized():
    model = _model()
    a = headwise_policy(model, SCORES, full=4, method="random", seed=3, sink=4, window=8)
    assert a == headwise_policy(model, SCORES, full=4, method="random", seed=3, sink=4, window=8)
    assert a.num_full == 4
    others = {headwise_policy(model, SCORES, full=4, method="random", seed=s, sink=4, window=8).pattern
              for s in range(5)}
    assert len(others) > 1


def test_duoattention_pattern_round_trip(tmp_path):
    model = _model()
    path = write_duo_pattern(tmp_path / "full_attention_heads.tsv", duo_pattern(SCORES, 3, 6, 3, top=3))
    assert load_duo_pattern(path) == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    policy = headwise_policy(model, path, full=None, threshold=1.0, sink=4, window=8)
    assert policy.pattern == ((1, 0, 0), (0, 0, 1), (0, 0, 0))


def test_head_score_file_with_matching_sidecar(tmp_path):
    path = tmp_path / "scores.json"
    save_head_scores(path, SCORES, {"model": "tiny", "num_layers": 3, "num_heads": 6})
    assert headwise_policy(_model(), path, full=2, sink=4, window=8).pattern[0] == (1, 0, 0)
    save_head_scores(path, SCORES, {"model": "tiny", "num_layers": 3, "num_heads": 12})
    with pytest.raises(ValueError, match="made for tiny with 3 layers x 12 heads"):
        headwise_policy(_model(), path, full=2, sink=4, window=8)


def test_policy_round_trips_through_a_dict_and_checks_itself():
    policy = HeadwisePolicy(((1, 0), (0, 0)), sink=2, window=3)
    assert HeadwisePolicy.from_dict(policy.to_dict()) == policy
    for bad, message in ((dict(pattern=((1, 2),)), "1 \\(full\\) or 0"), (dict(pattern=((1,), (1, 0))), "one row"),
                         (dict(pattern=((1,),), window=0), "window must be an integer >= 1"),
                         (dict(pattern=((1,),), sink=-1), "sink must be")):
        with pytest.raises(ValueError, match=message):
            HeadwisePolicy(**bad)
    with pytest.raises(ValueError, match="malformed head-wise policy"):
        HeadwisePolicy.from_dict({"pattern": [[1]]})


def test_budget_counts_sink_and_window():
    model = build_tiny(LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=64, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384))
    policy = headwise_policy(model, None, full=23, method="random", sink=64, window=256)
    budget = kv_budget(model, policy, 8192)
    assert budget.kept_positions == 23 * 8192 + 67 * 320
    assert budget.fraction == pytest.approx((23 * 8192 + 67 * 320) / (90 * 8192))
    assert budget.bytes_fraction == pytest.approx(budget.fraction)
    assert kv_budget(model, policy, 100).fraction == 1.0  # nothing dropped below sink + window


def test_embedded_model_defaults_to_the_shipped_headwise_scores(tmp_path):
    """Head-wise selection on the embedded SmolLM2 ranks by the shipped retrieval + echo + induction file (checked
    against SmolLM2's 30 x 9 shape); an explicit file always wins; another model gets nothing by default."""
    from selective_attention.heads import headwise_scores_path, load_checked_head_scores, mean_scores

    shipped = headwise_scores_path(None, None)
    assert shipped is not None and shipped.endswith("smollm2_headwise_scores.json")
    assert headwise_scores_path(None, "smollm2-135m") == shipped
    scores = load_checked_head_scores(shipped, 30, 9)
    assert len(scores) == 270 and max(mean_scores(scores).values()) == pytest.approx(1.0)  # each score over its max
    assert headwise_scores_path(tmp_path / "mine.json", None) == str(tmp_path / "mine.json")
    assert headwise_scores_path(None, "meta-llama/Llama-3.2-1B-Instruct") is None
