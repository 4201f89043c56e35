"""The head-wise KV pattern of a `selective_llama` checkpoint: `convert` writes it into the config (`sa_headwise`),
and the checkpoint's own modeling code then generates through a head-wise cache, without the plugin.

The pattern follows the converted layout: a KV head's score is the maximum over the query heads mapped to it (the
converted `kv_head_map`). Sliding-window layers and layers without contiguous query groups stay full.
"""

from __future__ import annotations

from pathlib import Path

from selective_attention.cache.selection import SELECTION_METHODS, full_count, select_full_kv_heads
from selective_attention.heads.scores import (
    check_head_scores,
    load_checked_head_scores,
    mean_scores,
)


def headwise_request(scores=None, *, full: int | float | None = 0.25, threshold: float | None = None, sink: int = 64,
                     window: int = 256, method: str = "top", seed: int = 0, num_layers: int, num_heads: int,
                     context: int | None = None) -> dict:
    """Check a head-wise request before any conversion work: the scores (a head-score JSON path or
    {"L-H": [...]} dict) fit the source's layers x query heads, sink / window / full are valid."""
    for name, value, low in (("sink", sink, 0), ("window", window, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if context is not None and sink + window > context:
        raise ValueError(f"sink + window = {sink + window} exceeds the model's context of {context} positions")
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {SELECTION_METHODS}")
    if (full is None) == (threshold is None):
        raise ValueError("give exactly one of full (count or fraction) and threshold")
    if isinstance(full, float):
        full_count(full, 1)  # range check of the fraction
    trivial = (isinstance(full, int) and full == 0) or (isinstance(full, float) and full == 1.0)
    if method == "top" and scores is None and not trivial:
        raise ValueError("selecting retrieval KV heads needs head scores (a head-score file)")
    if isinstance(scores, (str, Path)):
        scores = load_checked_head_scores(scores, num_layers, num_heads)
    elif scores is not None:
        check_head_scores(scores, num_layers, num_heads, source="head scores")
    return dict(scores=scores, full=full, threshold=threshold, sink=sink, window=window, method=method, seed=seed)


def checkpoint_pattern(request: dict, kv_maps: list[list[int]], kv_counts: list[int],
                       windows: list[int | None] | None = None) -> dict:
    """`sa_headwise` for a converted layout: {"pattern": [[1 full / 0 streaming per KV head] per layer], "sink",
    "window"}; rows have each layer's own KV-head count."""
    query = mean_scores(request["scores"]) if request["scores"] is not None else None
    kv_scores = [[0.0] * count for count in kv_counts]
    eligible = []
    for layer, (kv_map, count) in enumerate(zip(kv_maps, kv_counts)):
        groups = len(kv_map) // count
        contiguous = len(kv_map) % count == 0 and list(kv_map) == [h // groups for h in range(len(kv_map))]
        if contiguous and not (windows and windows[layer]):
            eligible += [(layer, head) for head in range(count)]
        for head, kv in enumerate(kv_map):
            if query is not None:
                kv_scores[layer][kv] = max(kv_scores[layer][kv], query.get((layer, head), 0.0))
    if not eligible:
        raise ValueError("no layer of the converted model can stream (all sliding-window or non-contiguous groups)")
    chosen = select_full_kv_heads(kv_scores if query is not None else None, eligible, full=request["full"],
                                  threshold=request["threshold"], method=request["method"], seed=request["seed"])
    allowed = set(eligible)
    pattern = [[0 if (layer, head) in allowed and (layer, head) not in chosen else 1 for head in range(count)]
               for layer, count in enumerate(kv_counts)]
    return {"pattern": pattern, "sink": request["sink"], "window": request["window"]}


def kept_fraction(settings: dict, length: int) -> float:
    """KV positions a checkpoint's head-wise cache keeps at `length` tokens, over what a full cache keeps."""
    heads = [v for row in settings["pattern"] for v in row]
    kept = sum(length if full else min(length, settings["sink"] + settings["window"]) for full in heads)
    return kept / (len(heads) * length)
