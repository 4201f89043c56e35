"""Kernel-analysis figure: each feature map's estimate of exp(q.k / sqrt d) against the exact value, by cosine."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from selective_attention.plots.figure import save_figure


def plot_kernel_estimates(results: dict[str, dict], cosines: list[float], methods: list[str], output: str | Path,
                          title: str) -> Path:
    """One panel per method: exact value, mean estimate and +-1 std band (`results[method]` lists per cosine)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for axis, method in zip(axes.flat, methods):
        r = results[method]
        axis.plot(cosines, r["exact"], "k--", label="exact exp(q.k/sqrt d)")
        axis.plot(cosines, r["mean"], label="mean estimate")
        axis.fill_between(cosines, [m - s for m, s in zip(r["mean"], r["std"])],
                          [m + s for m, s in zip(r["mean"], r["std"])], alpha=0.3, label="+-1 std")
        axis.set_yscale("symlog")
        axis.set_title(f"{method} (std/mean at cos=1: {r['ratio'][-1]:.3g})")
        axis.set_xlabel("cosine(q, k)")
        axis.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, output, tight=False)
