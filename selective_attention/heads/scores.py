"""Head-score files: `head_scores.json` is one JSON object {"L-H": [score per counted trial, ...]}, as
nightdessert/Retrieval_Head writes it. Beside it, `head_scores.meta.json` records the model, its layer/head counts
and the run settings, so that a file from another model is refused instead of silently masking the wrong heads.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from selective_attention.heads.ids import Head, parse_head, validate_heads
from selective_attention.io import write_text

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


def load_checked_head_scores(path: str | Path, num_layers: int, num_heads: int) -> HeadScores:
    """A head-score file (and its sidecar) checked against a model with `num_layers` x `num_heads` query heads."""
    scores = load_head_scores(path)
    check_head_scores(scores, num_layers, num_heads, load_sidecar(path), source=str(path))
    return scores


#: Head scores of the embedded SmolLM2 measured by `selective-attention detect` (see docs/retrieval.md).
EMBEDDED_MODEL_SCORES = "data/smollm2_head_scores.json"
#: Head-wise KV cache selection scores of the embedded SmolLM2: retrieval (a 132-trial detect grid), echo and
#: induction scores, each over its maximum, max per head (benchmarks/headwise_induction.py; docs/headwise_kv.md:
#: with retrieval scores alone a quarter of the KV heads full falls 12.7 points short of dense on the needle grid).
EMBEDDED_HEADWISE_SCORES = "data/smollm2_headwise_scores.json"
#: Scores shipped per embedded model name (`--model`; None is the default SmolLM2): (package file, label).
SHIPPED_SCORES = {None: (EMBEDDED_MODEL_SCORES, "shipped SmolLM2 scores"),
                  "smollm2-135m": (EMBEDDED_MODEL_SCORES, "shipped SmolLM2 scores"),
                  "gemma3-270m": ("data/gemma3_270m_head_scores.json", "shipped Gemma 3 270M scores")}


def model_head_scores(path: str | Path | None, model: str | None, num_layers: int,
                      num_heads: int) -> tuple[HeadScores | None, str | None]:
    """Head scores for a model, checked against its shape: `path` when given, else (for an embedded model: `model`
    None or its name) the scores shipped with the package, else None. Returns the scores and where they came from."""
    if path:
        return load_checked_head_scores(path, num_layers, num_heads), str(path)
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


def headwise_scores_path(path: str | Path | None, model: str | None) -> str | None:
    """What ranks KV heads for a head-wise cache: `path` when given, else for the embedded SmolLM2 (`model` None or
    its name) the shipped retrieval + echo + induction scores, else None."""
    if path:
        return str(path)
    if model not in (None, "smollm2-135m"):
        return None
    return str(resources.files("selective_attention").joinpath(EMBEDDED_HEADWISE_SCORES))
