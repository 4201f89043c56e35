"""Heads as the unit of surgery: ids ("L-H"), score files, selection, head masks, comparison, DuoAttention export.

`ids`, `scores` and `selection` are re-exported here; `masking` (the `mask_heads` API, also at the package top),
`compare` and `duo` are imported from their modules.
"""

from selective_attention.heads.ids import (
    Head,
    HeadSpec,
    group_by_layer,
    head_key,
    parse_head,
    parse_heads,
    validate_heads,
)
from selective_attention.heads.scores import (
    EMBEDDED_HEADWISE_SCORES,
    EMBEDDED_MODEL_SCORES,
    SHIPPED_SCORES,
    HeadScores,
    check_head_scores,
    headwise_scores_path,
    load_checked_head_scores,
    load_head_scores,
    load_sidecar,
    mean_scores,
    model_head_scores,
    save_head_scores,
    sidecar_path,
)
from selective_attention.heads.selection import rank_heads, select_heads

__all__ = [
    "EMBEDDED_HEADWISE_SCORES", "EMBEDDED_MODEL_SCORES", "SHIPPED_SCORES", "Head", "HeadScores", "HeadSpec",
    "check_head_scores", "group_by_layer", "head_key", "headwise_scores_path", "load_checked_head_scores",
    "load_head_scores", "load_sidecar", "mean_scores", "model_head_scores", "parse_head", "parse_heads", "rank_heads",
    "save_head_scores", "select_heads", "sidecar_path", "validate_heads",
]
