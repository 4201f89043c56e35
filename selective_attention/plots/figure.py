"""Saving figures: PNG written atomically, the figure closed. No backend is forced: importing the package never
changes a notebook's matplotlib backend, and headless runs get matplotlib's own non-interactive default."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from selective_attention.io import atomic_path

DPI = 110


def save_figure(figure: Figure, output: str | Path, tight: bool = True) -> Path:
    """Write `figure` to `output` (format from its suffix) atomically and close it."""
    output = Path(output)
    with atomic_path(output) as partial:
        figure.savefig(partial, dpi=DPI, format=output.suffix.lstrip(".") or "png",
                       bbox_inches="tight" if tight else None)
    plt.close(figure)
    return output
