"""Head identifiers: parse, validate and group (layer, head) pairs.

The Retrieval_Head format names a head "L-H" (layer, then query head, both 0-based); we accept those strings,
`(layer, head)` pairs, or one comma-separated string.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Union

from .io import write_text

Head = tuple[int, int]
HeadSpec = Union[str, Iterable[Union[str, tuple[int, int], list[int]]]]

_HEAD_KEY = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def head_key(layer: int, head: int) -> str:
    """The Retrieval_Head key of a head: "L-H"."""
    return f"{layer}-{head}"


def parse_head(item: str | tuple[int, int] | list[int]) -> Head:
    """One head from "L-H" or (layer, head)."""
    if isinstance(item, str):
        match = _HEAD_KEY.match(item)
        if not match:
            raise ValueError(f"malformed head {item!r}: expected 'LAYER-HEAD', e.g. '14-3'")
        return int(match.group(1)), int(match.group(2))
    try:
        layer, head = item
        layer_i, head_i = int(layer), int(head)
    except (TypeError, ValueError):
        raise ValueError(f"malformed head {item!r}: expected a (layer, head) pair or a 'LAYER-HEAD' string") from None
    if layer_i != layer or head_i != head or isinstance(layer, bool) or isinstance(head, bool):
        raise ValueError(f"malformed head {item!r}: layer and head must be integers")
    return layer_i, head_i


def parse_heads(heads: HeadSpec) -> list[Head]:
    """A sorted, de-duplicated list of heads from any accepted spelling."""
    if isinstance(heads, str):
        heads = [part for part in heads.split(",") if part.strip()]
    return sorted({parse_head(item) for item in heads})


def validate_heads(heads: Iterable[Head], num_layers: int, num_heads: int) -> None:
    """Raise a ValueError naming the first head outside a model with this many layers and query heads."""
    for layer, head in heads:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
        if not 0 <= head < num_heads:
            raise ValueError(
                f"head {head} of layer {layer} out of range: the model has {num_heads} query heads per layer "
                f"(0..{num_heads - 1})"
            )


def group_by_layer(heads: Iterable[Head]) -> dict[int, tuple[int, ...]]:
    grouped: dict[int, list[int]] = {}
    for layer, head in heads:
        grouped.setdefault(layer, []).append(head)
    return {layer: tuple(sorted(set(hs))) for layer, hs in sorted(grouped.items())}


# --- head-score files -------------------------------------------------------------------------------------------
# `head_scores.json` is one JSON object {"L-H": [score per counted trial, ...]}, as nightdessert/Retrieval_Head
# writes it. Beside it, `head_scores.meta.json` records the model, its layer/head counts and the run settings,
# so that a file from another model is refused instead of silently masking the wrong heads.


HeadScores = dict[str, list[float]]


def sidecar_path(path: str | Path) -> Path:
    """head_scores.json -> head_scores.meta.json"""
    path = Path(path)
    return path.with_name(path.stem + ".meta.json")


def load_head_scores(path: str | Path) -> HeadScores:
    """Read a Retrieval_Head-format file; a clear ValueError for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"head-score file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"head-score file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"head-score file {path} must hold one JSON object {{'L-H': [scores]}}")
    for key, values in data.items():
        parse_head(key)
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"head-score file {path}: scores of {key!r} must be a list of numbers")
    return data


def load_sidecar(path: str | Path) -> dict | None:
    side = sidecar_path(path)
    return json.loads(side.read_text(encoding="utf-8")) if side.exists() else None


def save_head_scores(path: str | Path, scores: HeadScores, meta: dict | None = None) -> None:
    """Write scores (and the sidecar) atomically: an interrupted write never truncates an existing file."""
    path = Path(path)
    for target, payload in ((path, scores), (sidecar_path(path), meta)):
        if payload is not None:  # the Retrieval_Head layout: one line of JSON; the sidecar indented
            write_text(target, json.dumps(payload, indent=None if target == path else 2))


def check_head_scores(scores: HeadScores, num_layers: int, num_heads: int, meta: dict | None = None,
                      source: str = "head-score file") -> None:
    """Refuse scores that cannot belong to a model with `num_layers` x `num_heads` query heads."""
    if meta is not None:
        theirs = (meta.get("num_layers"), meta.get("num_heads"))
        if None not in theirs and theirs != (num_layers, num_heads):
            raise ValueError(
                f"{source} was made for {meta.get('model', 'another model')} with {theirs[0]} layers x {theirs[1]} "
                f"heads; this model has {num_layers} x {num_heads}"
            )
    try:
        validate_heads((parse_head(key) for key in scores), num_layers, num_heads)
    except ValueError as error:
        raise ValueError(f"{source} does not fit this model ({num_layers} layers x {num_heads} heads): {error}") from None


#: Head scores of the embedded SmolLM2 measured by `selective-attention detect` (see docs/retrieval.md).
EMBEDDED_MODEL_SCORES = "data/smollm2_head_scores.json"
#: Scores shipped per embedded model name (`--model`; None is the default SmolLM2): (package file, label).
SHIPPED_SCORES = {None: (EMBEDDED_MODEL_SCORES, "shipped SmolLM2 scores"),
                  "smollm2-135m": (EMBEDDED_MODEL_SCORES, "shipped SmolLM2 scores"),
                  "gemma3-270m": ("data/gemma3_270m_head_scores.json", "shipped Gemma 3 270M scores")}


def model_head_scores(path: str | Path | None, model: str | None, num_layers: int,
                      num_heads: int) -> tuple[HeadScores | None, str | None]:
    """Head scores for a model, checked against its shape: `path` when given, else (for an embedded model: `model`
    None or its name) the scores shipped with the package, else None. Returns the scores and where they came from."""
    if path:
        scores = load_head_scores(path)
        check_head_scores(scores, num_layers, num_heads, load_sidecar(path), source=str(path))
        return scores, str(path)
    if model not in SHIPPED_SCORES:
        return None, None
    relative, label = SHIPPED_SCORES[model]
    shipped = resources.files("selective_attention").joinpath(relative)
    if shipped.is_file():
        scores = load_head_scores(shipped)
        check_head_scores(scores, num_layers, num_heads, source=label)
        return scores, label
    return None, None


def mean_scores(scores: HeadScores) -> dict[Head, float]:
    """Mean score per head (an empty list scores 0)."""
    return {parse_head(key): (sum(values) / len(values) if values else 0.0) for key, values in scores.items()}


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
