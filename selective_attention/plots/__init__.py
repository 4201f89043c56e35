"""Every figure of the package (matplotlib, PNG, written atomically)."""

from selective_attention.plots.attention import plot_average, plot_head_across_layers, plot_layer, plot_map_comparison
from selective_attention.plots.figure import save_figure
from selective_attention.plots.heads import head_matrix, plot_head_scores, plot_score_comparison, plot_top_heads
from selective_attention.plots.niah import NIAH_CMAP, niah_grid, plot_niah

__all__ = [
    "NIAH_CMAP",
    "head_matrix",
    "niah_grid",
    "plot_average",
    "plot_head_across_layers",
    "plot_head_scores",
    "plot_layer",
    "plot_map_comparison",
    "plot_niah",
    "plot_score_comparison",
    "plot_top_heads",
    "save_figure",
]
