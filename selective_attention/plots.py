"""Figures: needle-in-a-haystack heatmaps, head-score heatmap, top-k retrieval heads (matplotlib, PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from .heads import HeadScores, mean_scores, rank_heads  # noqa: E402

#: Red (fails) to green (retrieved), as in LLMTest_NeedleInAHaystack's figures.
NIAH_CMAP = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])


def niah_grid(results: list[dict]) -> tuple[list[float], list[int], np.ndarray]:
    """(depths, lengths, scores[depth, length]) averaged over needles; NaN where a point is missing."""
    if not results:
        raise ValueError("no needle results to plot")
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for result in results:
        cells[(float(result["depth_percent"]), int(result["context_length"]))].append(float(result["score"]))
    depths = sorted({d for d, _ in cells})
    lengths = sorted({n for _, n in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (depth, length), scores in cells.items():
        grid[depths.index(depth), lengths.index(length)] = float(np.mean(scores))
    return depths, lengths, grid


def plot_niah(runs: list[tuple[str, list[dict]]], output: str | Path, title: str | None = None) -> Path:
    """One heatmap per run (depth x context length, 0-100), side by side with a shared colour bar."""
    if not runs:
        raise ValueError("no runs to plot")
    fig, axes = plt.subplots(1, len(runs), figsize=(0.6 + 4.2 * len(runs), 3.8), squeeze=False, sharey=True)
    image = None
    for ax, (label, results) in zip(axes[0], runs):
        depths, lengths, grid = niah_grid(results)
        image = ax.imshow(grid, cmap=NIAH_CMAP, vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45 if len(lengths) > 6 else 0)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        mean = np.nanmean(grid)
        ax.set_title(f"{label}\nmean {mean:.1f}", fontsize=10)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not np.isnan(grid[i, j]) and grid.size <= 80:
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7, color="black")
    axes[0][0].set_ylabel("needle depth (%)")
    fig.colorbar(image, ax=axes[0].tolist(), label="score (ROUGE-1 recall x 100)", fraction=0.05, pad=0.02)
    if title:
        fig.suptitle(title, y=1.06)
    return _save(fig, output)


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
    return _save(fig, output)


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
    return _save(fig, output)


def _save(fig, output: str | Path) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output
