"""Needle-in-a-haystack heatmaps: depth x context length, one panel per run (LLMTest_NeedleInAHaystack's colours)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LinearSegmentedColormap

from selective_attention.plots.figure import save_figure

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
    return save_figure(fig, output)
