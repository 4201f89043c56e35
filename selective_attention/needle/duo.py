"""Export retrieval heads as a DuoAttention-style pattern: one row per layer, one tab-separated column per KV head,
1 where the KV head serves at least one of the top-k retrieval (query) heads (full attention), 0 elsewhere
(streaming heads). KV head of query head h: h // (num_heads / num_kv_heads), as `repeat_kv` expands them."""

from __future__ import annotations

from pathlib import Path

from ..heads import HeadScores, rank_heads


def duo_pattern(scores: HeadScores, num_layers: int, num_heads: int, num_kv_heads: int, top: int) -> list[list[int]]:
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads cannot be grouped over {num_kv_heads} KV heads")
    if not 1 <= top <= num_layers * num_heads:
        raise ValueError(f"top must lie in 1..{num_layers * num_heads}, got {top}")
    groups = num_heads // num_kv_heads
    pattern = [[0] * num_kv_heads for _ in range(num_layers)]
    for (layer, head), _ in rank_heads(scores)[:top]:
        if layer >= num_layers or head >= num_heads:
            raise ValueError(f"head {layer}-{head} does not exist in a {num_layers} x {num_heads} model")
        pattern[layer][head // groups] = 1
    return pattern


def write_duo_pattern(path: str | Path, pattern: list[list[int]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join("\t".join(str(v) for v in row) + "\n" for row in pattern), encoding="utf-8")
    partial.replace(path)
    return path
