"""Head identifiers: parse, validate and group (layer, head) pairs.

The Retrieval_Head format names a head "L-H" (layer, then query head, both 0-based); we accept those strings,
`(layer, head)` pairs, or one comma-separated string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Union

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
