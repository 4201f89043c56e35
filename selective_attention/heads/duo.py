"""Export retrieval heads as a DuoAttention pattern directory, the layout duo-attention's `load_attn_pattern` reads:

- `full_attention_heads.tsv`: one row per layer, one tab-separated column per KV head, 1 where the KV head serves at
  least one of the top-k retrieval (query) heads (full attention), 0 elsewhere (streaming heads). KV head of query
  head h: h // (num_heads / num_kv_heads), as `repeat_kv` expands them;
- `config.json`: `{"sink_size": S, "recent_size": W}`, the streaming heads' attention sink and recent window.
"""

from __future__ import annotations

from pathlib import Path

from selective_attention.heads.scores import HeadScores
from selective_attention.heads.selection import rank_heads
from selective_attention.io import write_json, write_text


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


PATTERN_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"


def write_duo_pattern(path: str | Path, pattern: list[list[int]], sink_size: int = 64, recent_size: int = 256) -> Path:
    """Write `pattern` + `config.json` into the directory `path` (or, for a `.tsv` path, that file and the config
    beside it); returns the TSV's path. Defaults: DuoAttention's sink 64 and recent window 256."""
    if sink_size < 0 or recent_size < 1:
        raise ValueError(f"sink_size must be >= 0 and recent_size >= 1, got {sink_size} and {recent_size}")
    path = Path(path)
    tsv = path if path.suffix == ".tsv" else path / PATTERN_FILE
    write_text(tsv, "".join("\t".join(str(v) for v in row) + "\n" for row in pattern))
    write_json(tsv.parent / CONFIG_FILE, {"sink_size": sink_size, "recent_size": recent_size})
    return tsv
