"""Two head-score files side by side: per-head scatter, rank correlation and the overlap of their top-K sets.

Made for translation-retrieval heads (the Retrieval_Head reference's en-zh and en-de runs): are the heads that
copy an English needle out of an English haystack the same ones that copy it out of a Chinese haystack? Any two
files of one model compare (two languages, two quantizations, two needle sets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selective_attention.heads.ids import Head, head_key, parse_head
from selective_attention.heads.scores import load_head_scores, load_sidecar, mean_scores
from selective_attention.io import write_json

logger = logging.getLogger(__name__)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (most heads score 0, so ties matter for Spearman)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2.0
        start = stop + 1
    return ranks


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def top_k(means: dict[Head, float], k: int) -> list[Head]:
    """The k best heads with a positive score, ties broken by (layer, head) as `rank_heads` does."""
    ranked = sorted(means.items(), key=lambda item: (-item[1], item[0]))
    return [head for head, score in ranked[:k] if score > 0]


@dataclass
class Comparison:
    labels: tuple[str, str]
    heads: list[Head]
    scores_a: np.ndarray  # mean score per head, in `heads` order
    scores_b: np.ndarray
    k: int
    top_a: list[Head]
    top_b: list[Head]
    trials: tuple[int | None, int | None]  # counted trials behind each file

    @property
    def overlap(self) -> list[Head]:
        return sorted(set(self.top_a) & set(self.top_b))

    @property
    def jaccard(self) -> float | None:
        union = set(self.top_a) | set(self.top_b)
        return len(self.overlap) / len(union) if union else None

    @property
    def pearson(self) -> float | None:
        return _correlation(self.scores_a, self.scores_b)

    @property
    def spearman(self) -> float | None:
        return _correlation(_ranks(self.scores_a), _ranks(self.scores_b))

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "k": self.k, "counted_trials": list(self.trials),
                "top_a": [head_key(*h) for h in self.top_a], "top_b": [head_key(*h) for h in self.top_b],
                "overlap": [head_key(*h) for h in self.overlap], "overlap_count": len(self.overlap),
                "jaccard": self.jaccard, "pearson": self.pearson, "spearman": self.spearman,
                "heads_scoring_a": int((self.scores_a > 0).sum()), "heads_scoring_b": int((self.scores_b > 0).sum())}


def _label(path: Path, meta: dict | None) -> str:
    if meta and "language" in meta:
        return f"{meta['language']} needle / {meta.get('haystack_language', meta['language'])} haystack"
    return path.stem


def compare_head_scores(path_a: str | Path, path_b: str | Path, k: int = 20,
                        labels: tuple[str, str] | None = None) -> Comparison:
    """Compare two head-score files of the same model (refuses files of different shapes or models)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    path_a, path_b = Path(path_a), Path(path_b)
    scores_a, scores_b = load_head_scores(path_a), load_head_scores(path_b)
    meta_a, meta_b = load_sidecar(path_a), load_sidecar(path_b)
    if meta_a and meta_b:
        shape_a = (meta_a.get("num_layers"), meta_a.get("num_heads"))
        shape_b = (meta_b.get("num_layers"), meta_b.get("num_heads"))
        if shape_a != shape_b:
            raise ValueError(f"{path_a} has {shape_a[0]} x {shape_a[1]} heads, {path_b} {shape_b[0]} x {shape_b[1]}: "
                             "head scores of different models do not compare")
        if meta_a.get("model") != meta_b.get("model"):
            raise ValueError(f"{path_a} scores {meta_a.get('model')}, {path_b} scores {meta_b.get('model')}: "
                             "compare files of one model")
    if set(scores_a) != set(scores_b):
        only = sorted(set(scores_a) ^ set(scores_b))[:5]
        raise ValueError(f"{path_a} and {path_b} score different heads (e.g. {', '.join(only)})")
    heads = sorted(parse_head(key) for key in scores_a)
    means_a, means_b = mean_scores(scores_a), mean_scores(scores_b)
    counted = tuple((m or {}).get("counted_trials") for m in (meta_a, meta_b))
    for path, count in zip((path_a, path_b), counted):
        if count == 0:
            logger.warning("%s has no counted trial (the model never answered well enough): all its scores are 0",
                           path)
    return Comparison(labels=labels or (_label(path_a, meta_a), _label(path_b, meta_b)), heads=heads,
                      scores_a=np.array([means_a[h] for h in heads]), scores_b=np.array([means_b[h] for h in heads]),
                      k=k, top_a=top_k(means_a, k), top_b=top_k(means_b, k), trials=counted)


def write_comparison(comparison: Comparison, output: str | Path) -> Path:
    """The comparison's numbers as JSON (atomic)."""
    return write_json(output, comparison.to_dict())
