"""Tree-kernel figures: cumulative perplexity along a long text (as Quest draws it), passkey accuracy."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from selective_attention.plots.figure import save_figure


def cumulative_perplexity(nll: list[float]) -> np.ndarray:
    """exp(mean NLL of the first n tokens) for n = 1..T."""
    values = np.asarray(nll, dtype=np.float64)
    return np.exp(np.cumsum(values) / np.arange(1, values.size + 1))


def plot_cumulative_perplexity(dense: list[float], curves: dict[str, dict[str, list[float]]], output: str | Path,
                               title: str, first_position: int = 1) -> Path:
    """One column per budget: cumulative perplexity (top) and its excess over dense in % (bottom) vs position.

    `dense`: per-token NLL of dense attention; `curves`: budget label (keys, a fraction, E=...) -> configuration ->
    per-token NLL (same tokens); `first_position`: the position of the first token scored. A budget in keys is
    marked where rows start to exceed it."""
    budgets = sorted(curves, key=lambda label: (not label.isdigit(), int(label) if label.isdigit() else label))
    figure, axes = plt.subplots(2, len(budgets), figsize=(5 * len(budgets), 7), squeeze=False, sharex=True)
    reference = cumulative_perplexity(dense)
    positions = np.arange(first_position, first_position + reference.size)
    # one colour per configuration in every column, so a method is the same line across budgets
    labels = sorted({label for by_label in curves.values() for label in by_label})
    palette, size = (plt.get_cmap("tab10"), 10) if len(labels) <= 10 else (plt.get_cmap("tab20"), 20)
    colors = {label: palette(index % size) for index, label in enumerate(labels)}
    for column, budget in enumerate(budgets):
        top, bottom = axes[0, column], axes[1, column]
        top.plot(positions, reference, color="black", lw=1.2, label="dense")
        bottom.axhline(0, color="black", lw=1.2)
        for label, nll in curves[budget].items():
            curve = cumulative_perplexity(nll)
            top.plot(positions, curve, lw=1, label=label, color=colors[label])
            bottom.plot(positions, 100 * (curve / reference - 1), lw=1, color=colors[label])
        for axis in (top, bottom):
            if budget.isdigit() and int(budget) >= first_position:
                axis.axvline(int(budget), color="grey", ls=":", lw=0.8)
        top.set_yscale("log")
        bottom.set_yscale("symlog", linthresh=1.0)  # linear within +-1%, so a +2% and a +90% curve both read
        top.set_title(f"budget {budget} keys")
        top.set_ylabel("cumulative perplexity")
        bottom.set_ylabel("excess over dense (%)")
        bottom.set_xlabel("position (tokens)")
        top.legend(fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, output)


def plot_passkey(accuracy: dict[str, dict[int, dict[str, float]]], output: str | Path, title: str) -> Path:
    """accuracy: length -> budget (0 = dense) -> method -> accuracy; one panel per context length."""
    lengths = sorted(accuracy, key=int)
    figure, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 3.8), squeeze=False, sharey=True)
    for axis, length in zip(axes[0], lengths):
        by_budget = accuracy[length]
        budgets = sorted(int(b) for b in by_budget if int(b) > 0)
        methods = sorted({m for b in budgets for m in by_budget[str(b)]})
        for method in methods:
            axis.plot(budgets, [by_budget[str(b)].get(method, np.nan) for b in budgets], marker="o", label=method)
        if "0" in by_budget:
            axis.axhline(by_budget["0"]["dense"], color="black", ls="--", label="dense")
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.set_title(f"{length} tokens")
        axis.set_xlabel("budget (keys)")
        axis.set_ylim(-0.05, 1.05)
    axes[0, 0].set_ylabel("passkey accuracy")
    axes[0, -1].legend(fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, output)
