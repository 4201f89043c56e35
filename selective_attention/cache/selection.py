"""Choosing the full KV heads of a head-wise cache, and what the choice keeps.

A KV head is full when any query head it serves is a retrieval head, so its score is the maximum over its group
of the query heads' mean retrieval scores. Scores come from our head-score files (Retrieval_Head JSON + sidecar),
a dict of them, or a DuoAttention `full_attention_heads.tsv` (already one value per layer and KV head).
Selection: `full` = a count (int) or a fraction of the eligible KV heads (float in (0, 1]), or a score
`threshold`; "top" ranks by score with ties broken by a seeded shuffle, "random" draws with the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from selective_attention.cache.policy import HeadwisePolicy, layer_types, model_shape
from selective_attention.heads.scores import (
    HeadScores,
    check_head_scores,
    load_checked_head_scores,
    mean_scores,
)
from selective_attention.modeling import text_config

SELECTION_METHODS = ("top", "random")
KVScores = list[list[float]]  # [layer][kv_head]


def kv_head_scores(scores: HeadScores, num_layers: int, num_heads: int, num_kv_heads: int) -> KVScores:
    """Max of the mean query-head scores over each KV head's group (heads absent from `scores` count 0)."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads")
    groups = num_heads // num_kv_heads
    matrix = [[0.0] * num_kv_heads for _ in range(num_layers)]
    for (layer, head), value in mean_scores(scores).items():
        matrix[layer][head // groups] = max(matrix[layer][head // groups], value)
    return matrix


def load_duo_pattern(path: str | Path) -> KVScores:
    """A DuoAttention `full_attention_heads.tsv`: one row per layer, one tab-separated value per KV head."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DuoAttention pattern {path} does not exist")
    rows = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        return [[float(v) for v in row] for row in rows]
    except ValueError:
        raise ValueError(f"{path} is not a DuoAttention pattern: expected numbers separated by tabs") from None


def resolve_kv_scores(model: PreTrainedModel, scores) -> KVScores:
    """KV-head scores of `model` from a head-score JSON path, a DuoAttention .tsv path, a {"L-H": [...]} dict or a
    [layer][kv_head] matrix; checked against the model's shape (a file from another model is refused)."""
    num_layers, num_heads, num_kv_heads = model_shape(model)
    if isinstance(scores, (str, Path)):
        path = Path(scores)
        if path.suffix == ".tsv":
            return _checked_matrix(load_duo_pattern(path), num_layers, num_kv_heads, str(path))
        return kv_head_scores(load_checked_head_scores(path, num_layers, num_heads), num_layers, num_heads,
                              num_kv_heads)
    if isinstance(scores, dict):
        check_head_scores(scores, num_layers, num_heads, source="head scores")
        return kv_head_scores(scores, num_layers, num_heads, num_kv_heads)
    if isinstance(scores, (list, tuple)):
        return _checked_matrix([[float(v) for v in row] for row in scores], num_layers, num_kv_heads, "KV-head scores")
    raise ValueError(f"head scores must be a file path, a {{'L-H': [scores]}} dict or a matrix, got {type(scores)}")


def _checked_matrix(matrix: KVScores, num_layers: int, num_kv_heads: int, source: str) -> KVScores:
    if len(matrix) != num_layers or any(len(row) != num_kv_heads for row in matrix):
        shape = f"{len(matrix)} x {sorted({len(row) for row in matrix})}"
        raise ValueError(f"{source} has {shape} entries; this model has {num_layers} layers x {num_kv_heads} KV heads")
    return matrix


def full_count(full: int | float, eligible: int) -> int:
    """How many KV heads `full` asks for: an int is a count, a float a fraction of `eligible` (rounded up)."""
    if isinstance(full, bool) or not isinstance(full, (int, float)):
        raise ValueError(f"full must be a count (int) or a fraction (float in (0, 1]), got {full!r}")
    if isinstance(full, float):
        if not 0.0 < full <= 1.0:
            raise ValueError(f"fraction of full KV heads must lie in (0, 1], got {full}")
        return min(eligible, math.ceil(full * eligible - 1e-9))
    if not 0 <= full <= eligible:
        raise ValueError(f"asked for {full} full KV heads; the model has {eligible} that can stream")
    return full


def select_full_kv_heads(kv_scores: KVScores | None, eligible: list[tuple[int, int]], *, full: int | float | None,
                         threshold: float | None = None, method: str = "top", seed: int = 0) -> set[tuple[int, int]]:
    """(layer, kv_head) pairs to keep full among `eligible`, by count/fraction (`full`) or `threshold`."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {SELECTION_METHODS}")
    if (full is None) == (threshold is None):
        raise ValueError("give exactly one of full (count or fraction) and threshold")
    rng = random.Random(seed)
    if method == "random":
        if threshold is not None:
            raise ValueError("a score threshold needs method='top'")
        return set(rng.sample(eligible, full_count(full, len(eligible))))
    if kv_scores is None:
        if full is not None and full_count(full, len(eligible)) in (0, len(eligible)):
            return set(eligible) if full_count(full, len(eligible)) else set()
        raise ValueError("selecting retrieval KV heads needs head scores (a head-score file or DuoAttention pattern)")
    if threshold is not None:
        return {(layer, head) for layer, head in eligible if kv_scores[layer][head] >= threshold}
    tiebreak = {pair: rng.random() for pair in eligible}  # seeded: equal scores are ordered by the seed
    ranked = sorted(eligible, key=lambda pair: (-kv_scores[pair[0]][pair[1]], tiebreak[pair]))
    return set(ranked[: full_count(full, len(eligible))])


def headwise_policy(model: PreTrainedModel, scores=None, *, full: int | float | None = 0.25,
                    threshold: float | None = None, sink: int = 64, window: int = 256, method: str = "top",
                    seed: int = 0) -> HeadwisePolicy:
    """A checked policy for `model`: KV heads of full-attention layers chosen from `scores`; windowed layers
    (sliding / chunked) keep their own cache and count as full."""
    num_layers, num_heads, num_kv_heads = model_shape(model)
    types = layer_types(text_config(model))
    eligible = [(layer, head) for layer in range(num_layers) if types[layer] == "full_attention"
                for head in range(num_kv_heads)]
    if not eligible:
        raise ValueError("the model has no full-attention layer: every layer already keeps its own window")
    kv_scores = resolve_kv_scores(model, scores) if scores is not None else None
    chosen = select_full_kv_heads(kv_scores, eligible, full=full, threshold=threshold, method=method, seed=seed)
    pattern = [[1 if types[layer] != "full_attention" or (layer, head) in chosen else 0
                for head in range(num_kv_heads)] for layer in range(num_layers)]
    policy = HeadwisePolicy(pattern, sink=sink, window=window)
    policy.check_model(model)
    return policy


@dataclass(frozen=True)
class Budget:
    """KV positions and bytes a head-wise cache keeps against the `DynamicCache` of the same model."""

    length: int
    kept_positions: int  # summed over layers and KV heads, one sequence
    dense_positions: int
    kept_bytes: int  # keys + values, whole batch
    dense_bytes: int

    @property
    def fraction(self) -> float:
        return self.kept_positions / self.dense_positions

    @property
    def bytes_fraction(self) -> float:
        return self.kept_bytes / self.dense_bytes


def kv_budget(model: PreTrainedModel, policy: HeadwisePolicy, length: int, batch: int = 1) -> Budget:
    """What the caches hold after `length` positions (no padding): full heads `length`, streaming heads
    min(length, sink + window), sliding layers what `DynamicSlidingWindowLayer` keeps (window - 1)."""
    config = text_config(model)
    types = layer_types(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kept = dense = 0
    for layer, kind in enumerate(types):
        if kind == "full_attention":
            per_head = length
        else:
            window = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
            per_head = min(length, window - 1)
        dense += per_head * policy.num_kv_heads
        kept += sum(per_head if full else min(length, policy.sink + policy.window) for full in policy.pattern[layer])
    per_position = 2 * head_dim * itemsize * batch  # key + value
    return Budget(length, kept, dense, kept * per_position, dense * per_position)
