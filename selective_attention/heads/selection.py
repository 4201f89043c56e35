"""Choosing heads from a score file: rank by mean score, then "top:K", "bottom:K", seeded "random:K" or a list."""

from __future__ import annotations

import random

from selective_attention.heads.ids import Head, parse_heads
from selective_attention.heads.scores import HeadScores, mean_scores


def rank_heads(scores: HeadScores) -> list[tuple[Head, float]]:
    """Heads by mean score, highest first; ties broken by (layer, head) so rankings are reproducible."""
    return sorted(mean_scores(scores).items(), key=lambda item: (-item[1], item[0]))


def select_heads(scores: HeadScores | None, spec: str, *, seed: int = 0, num_layers: int | None = None,
                 num_heads: int | None = None) -> list[Head]:
    """Heads named by `spec`: "top:K", "bottom:K", "random:K" (seeded, never one of the top-K) or "L-H,L-H"."""
    kind, _, count = spec.partition(":")
    if kind not in ("top", "bottom", "random"):
        return parse_heads(spec)
    if not count.isdigit():
        raise ValueError(f"malformed head selection {spec!r}: expected top:K, bottom:K, random:K or 'L-H,L-H'")
    k = int(count)
    if scores is None:
        raise ValueError(f"{spec!r} needs a head-score file")
    ranked = [head for head, _ in rank_heads(scores)]
    if num_layers is not None and num_heads is not None:  # heads the file never scored count as 0
        known = set(ranked)
        ranked += [(l, h) for l in range(num_layers) for h in range(num_heads) if (l, h) not in known]
    if k > len(ranked):
        raise ValueError(f"asked for {k} heads but only {len(ranked)} are known")
    if kind == "top":
        return sorted(ranked[:k])
    if kind == "bottom":
        return sorted(ranked[len(ranked) - k:])
    pool = ranked[k:]
    if k > len(pool):
        raise ValueError(f"random:{k} must exclude the top {k} heads, leaving only {len(pool)} to draw from")
    return sorted(random.Random(seed).sample(pool, k))
