"""Two head-score files side by side: per-head scatter, rank correlation and the overlap of their top-K sets.

Made for translation-retrieval heads (the Retrieval_Head reference's en-zh and en-de runs): are the heads that
copy an English needle out of an English haystack the same ones that copy it out of a Chinese haystack? Any two
files of one model compare (two languages, two quantizations, two needle sets).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .heads import Head, head_key, load_head_scores, load_sidecar, mean_scores, parse_head

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


def plot_comparison(comparison: Comparison, output: str | Path, title: str | None = None,
                    annotate: int = 8) -> Path:
    """Scatter of per-head mean scores (x: file A, y: file B), top-K heads of each marked, overlap annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = comparison
    in_a = np.array([h in set(c.top_a) for h in c.heads])
    in_b = np.array([h in set(c.top_b) for h in c.heads])
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    groups = [(~in_a & ~in_b, "#b0b0b0", "other heads"), (in_a & ~in_b, "#1f77b4", f"top-{c.k} of A only"),
              (~in_a & in_b, "#ff7f0e", f"top-{c.k} of B only"), (in_a & in_b, "#2ca02c", f"top-{c.k} of both")]
    for mask, color, name in groups:
        if mask.any():
            ax.scatter(c.scores_a[mask], c.scores_b[mask], s=18, color=color, alpha=0.8,
                       label=f"{name} ({int(mask.sum())})")
    limit = max(float(c.scores_a.max(initial=0)), float(c.scores_b.max(initial=0)), 1e-3) * 1.08
    ax.plot([0, limit], [0, limit], color="#666666", lw=0.8, ls="--")
    ax.set_xlim(-0.02 * limit, limit)
    ax.set_ylim(-0.02 * limit, limit)
    best = sorted(range(len(c.heads)), key=lambda i: -(c.scores_a[i] + c.scores_b[i]))[:annotate]
    for i in best:
        if c.scores_a[i] + c.scores_b[i] > 0:
            ax.annotate(head_key(*c.heads[i]), (c.scores_a[i], c.scores_b[i]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"A: {c.labels[0]} (mean retrieval score)")
    ax.set_ylabel(f"B: {c.labels[1]} (mean retrieval score)")
    stats = [f"top-{c.k} overlap: {len(c.overlap)} (Jaccard {c.jaccard:.2f})" if c.jaccard is not None
             else f"top-{c.k} overlap: no scoring heads"]
    if c.spearman is not None:
        stats.append(f"Spearman {c.spearman:.2f}, Pearson {c.pearson:.2f}")
    stats.append(f"counted trials: A {c.trials[0]}, B {c.trials[1]}")
    ax.text(0.02, 0.98, "\n".join(stats), transform=ax.transAxes, va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="#cccccc"))
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title or "retrieval heads compared", fontsize=10)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.stem + ".partial" + output.suffix)
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    partial.replace(output)
    return output


def write_comparison(comparison: Comparison, output: str | Path) -> Path:
    """The comparison's numbers as JSON (atomic)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(comparison.to_dict(), indent=2), encoding="utf-8")
    partial.replace(output)
    return output
