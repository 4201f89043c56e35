"""Attention-map figures: every head of a layer, one head across layers, head averages, before/after an intervention.

Maps are {layer: (heads, queries, keys)} weights, as `selective_attention.attention.maps.attention_maps` returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from selective_attention.plots.figure import save_figure

LABELLED_TOKENS = 48  # above this many tokens, axes show positions instead of token strings


def _draw(ax, weights: torch.Tensor, tokens: list[str], title: str) -> None:
    image = ax.imshow(weights.numpy(), cmap="viridis", aspect="auto", interpolation="nearest", vmin=0)
    ax.set_title(title, fontsize=9)
    if len(tokens) <= LABELLED_TOKENS:
        labels = [_printable(t) for t in tokens]
        ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), labels, fontsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    return image


def _grid(panels: list[tuple[torch.Tensor, str]], tokens: list[str], path: Path, title: str) -> Path:
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    size = 4.2 if len(tokens) <= LABELLED_TOKENS else 3.2
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax, (weights, name) in zip(axes.flat, panels):
        image = _draw(ax, weights, tokens, name)
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    return save_figure(figure, path, tight=False)


def plot_layer(maps: dict[int, torch.Tensor], tokens: list[str], layer: int, path: Path,
               heads: Iterable[int] | None = None, label: str = "") -> Path:
    """Every (or the chosen) head of one layer, one panel each."""
    heads = range(maps[layer].shape[0]) if heads is None else heads
    return _grid([(maps[layer][h], f"layer {layer} head {h}") for h in heads], tokens, path,
                 f"Attention, layer {layer} {label}".strip())


def plot_head_across_layers(maps: dict[int, torch.Tensor], tokens: list[str], head: int, path: Path,
                            label: str = "") -> Path:
    return _grid([(maps[layer][head], f"layer {layer} head {head}") for layer in sorted(maps)], tokens, path,
                 f"Head {head} across layers {label}".strip())


def _printable(token: str) -> str:
    """Tick label for a token: control characters (newlines, byte tokens of random models) as escapes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)


def plot_average(maps: dict[int, torch.Tensor], tokens: list[str], path: Path, label: str = "") -> Path:
    """Head-averaged map of each recorded layer."""
    return _grid([(maps[layer].mean(0), f"layer {layer}, mean over heads") for layer in sorted(maps)], tokens,
                 path, f"Head-averaged attention {label}".strip())


def plot_map_comparison(before: dict[int, torch.Tensor], after: dict[int, torch.Tensor], tokens: list[str],
                    layer: int, head: int, path: Path, labels: tuple[str, str] = ("before", "after")) -> Path:
    """One head before and after an intervention, and their difference."""
    a, b = before[layer][head], after[layer][head]
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    for ax, weights, name in ((axes[0], a, labels[0]), (axes[1], b, labels[1])):
        figure.colorbar(_draw(ax, weights, tokens, f"{name}: layer {layer} head {head}"), ax=ax, fraction=0.046)
    diff = (b - a).numpy()
    bound = max(abs(diff.min()), abs(diff.max()), 1e-6)
    image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    axes[2].set_title(f"{labels[1]} - {labels[0]}", fontsize=9)
    axes[2].set_xlabel("key")
    axes[2].set_ylabel("query")
    figure.colorbar(image, ax=axes[2], fraction=0.046)
    figure.tight_layout()
    return save_figure(figure, path, tight=False)
