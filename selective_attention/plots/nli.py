"""NLI accuracy vs number of masked heads (the masked-evaluation recipe's curve)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from selective_attention.plots.figure import save_figure


def plot_masked_accuracy(rows: list[dict], output: str | Path, title: str, chance: float) -> Path:
    """Accuracy and macro F1 per point (`rows`: masked, accuracy, macro_f1), with the chance line."""
    fig, axis = plt.subplots(figsize=(5.5, 3.6))
    counts = [row["masked"] for row in rows]
    axis.plot(counts, [row["accuracy"] for row in rows], marker="o", label="accuracy")
    axis.plot(counts, [row["macro_f1"] for row in rows], marker="s", linestyle="--", label="macro F1")
    axis.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    axis.set_xlabel("masked heads")
    axis.set_ylabel("MNLI score")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    return save_figure(fig, output)
