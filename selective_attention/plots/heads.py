"""Head-score figures: layer x head heatmap, top-k bar chart, two score files compared head by head."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from selective_attention.heads.ids import head_key
from selective_attention.heads.scores import HeadScores, mean_scores
from selective_attention.heads.selection import rank_heads
from selective_attention.plots.figure import save_figure

if TYPE_CHECKING:  # the comparison module computes, this one draws
    from selective_attention.heads.compare import Comparison


def head_matrix(scores: HeadScores, num_layers: int | None = None, num_heads: int | None = None) -> np.ndarray:
    means = mean_scores(scores)
    if not means:
        raise ValueError("the head-score file is empty")
    num_layers = num_layers or max(layer for layer, _ in means) + 1
    num_heads = num_heads or max(head for _, head in means) + 1
    matrix = np.zeros((num_layers, num_heads))
    for (layer, head), value in means.items():
        matrix[layer, head] = value
    return matrix


def plot_head_scores(scores: HeadScores, output: str | Path, title: str = "retrieval score",
                     num_layers: int | None = None, num_heads: int | None = None) -> Path:
    """Layer x head heatmap of mean retrieval scores."""
    matrix = head_matrix(scores, num_layers, num_heads)
    fig, ax = plt.subplots(figsize=(1.5 + 0.35 * matrix.shape[1], 1.2 + 0.16 * matrix.shape[0]))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(matrix.shape[1]))
    step = max(1, matrix.shape[0] // 16)
    ax.set_yticks(range(0, matrix.shape[0], step))
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="mean retrieval score")
    return save_figure(fig, output)


def plot_top_heads(scores: HeadScores, output: str | Path, k: int = 20, title: str | None = None) -> Path:
    """Horizontal bar chart of the k best heads."""
    ranked = rank_heads(scores)[:k]
    if not ranked:
        raise ValueError("the head-score file is empty")
    names = [f"{layer}-{head}" for (layer, head), _ in ranked]
    values = [value for _, value in ranked]
    fig, ax = plt.subplots(figsize=(5, 0.8 + 0.25 * len(ranked)))
    ax.barh(range(len(ranked)), values, color="#3A7DC9")
    ax.set_yticks(range(len(ranked)), names)
    ax.invert_yaxis()
    ax.set_xlabel("mean retrieval score")
    ax.set_ylabel("head (layer-head)")
    ax.set_title(title or f"top {len(ranked)} retrieval heads")
    return save_figure(fig, output)


def plot_score_comparison(comparison: "Comparison", output: str | Path, title: str | None = None,
                    annotate: int = 8) -> Path:
    """Scatter of per-head mean scores (x: file A, y: file B), top-K heads of each marked, overlap annotated."""
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
    return save_figure(fig, output, tight=False)
