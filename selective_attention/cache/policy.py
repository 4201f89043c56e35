"""`HeadwisePolicy`: which KV heads of a model keep every position, and how much the others keep.

One row per layer, one 0/1 entry per KV head (1 = full, 0 = streaming), as DuoAttention's
`full_attention_heads.tsv`; plus `sink` and `window`. The policy is plain data: it is checked against a model,
written into a config (`to_dict`) and turned into per-module `HeadwisePlan`s.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from selective_attention.attention.headwise import HeadwisePlan
from selective_attention.modeling import cache_layer_types, text_config


def layer_types(config) -> list[str]:
    """Layer type of every layer of a text config, as `DynamicCache` builds them (e.g. "sliding_attention")."""
    return cache_layer_types(config)


def model_shape(model: PreTrainedModel) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model's text config."""
    config = text_config(model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, config.num_attention_heads, kv_heads


@dataclass(frozen=True)
class HeadwisePolicy:
    """Full (1) or streaming (0) per layer and KV head; streaming heads keep `sink` first + `window` last positions."""

    pattern: tuple[tuple[int, ...], ...]
    sink: int = 64
    window: int = 256

    def __post_init__(self) -> None:
        pattern = tuple(tuple(int(v) for v in row) for row in self.pattern)
        object.__setattr__(self, "pattern", pattern)
        if not pattern or not pattern[0] or any(len(row) != len(pattern[0]) for row in pattern):
            raise ValueError("a head-wise pattern needs one row per layer, each with one entry per KV head")
        if any(v not in (0, 1) for row in pattern for v in row):
            raise ValueError("head-wise pattern entries must be 1 (full) or 0 (streaming)")
        for name, value, low in (("sink", self.sink, 0), ("window", self.window, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def num_kv_heads(self) -> int:
        return len(self.pattern[0])

    def full_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(h for h, v in enumerate(self.pattern[layer]) if v)

    def streaming_heads(self, layer: int) -> tuple[int, ...]:
        return tuple(h for h, v in enumerate(self.pattern[layer]) if not v)

    @property
    def num_full(self) -> int:
        return sum(sum(row) for row in self.pattern)

    def plan(self, layer: int, groups: int) -> HeadwisePlan:
        return HeadwisePlan(self.full_heads(layer), self.streaming_heads(layer), groups, self.sink, self.window)

    def check_model(self, model: PreTrainedModel) -> None:
        """Raise ValueError unless this policy fits `model`: shape, context length, windowed layers left alone."""
        config = text_config(model)
        num_layers, num_heads, num_kv_heads = model_shape(model)
        if (self.num_layers, self.num_kv_heads) != (num_layers, num_kv_heads):
            raise ValueError(f"head-wise pattern is {self.num_layers} layers x {self.num_kv_heads} KV heads; the model "
                             f"has {num_layers} x {num_kv_heads}")
        context = getattr(config, "max_position_embeddings", None)
        if context is not None and self.sink + self.window > context:
            raise ValueError(f"sink + window = {self.sink + self.window} exceeds the model's context of {context} "
                             "positions: nothing would ever be dropped")
        for layer, kind in enumerate(layer_types(config)):
            if kind != "full_attention" and self.streaming_heads(layer):
                raise ValueError(f"layer {layer} is a {kind} layer with its own window; its KV heads must stay "
                                 "as they are (pattern 1)")

    def to_dict(self) -> dict:
        return {"pattern": [list(row) for row in self.pattern], "sink": self.sink, "window": self.window}

    @classmethod
    def from_dict(cls, data: dict) -> HeadwisePolicy:
        try:
            return cls(pattern=data["pattern"], sink=data["sink"], window=data["window"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"malformed head-wise policy {data!r}: {error}") from None

    def describe(self) -> str:
        total = self.num_layers * self.num_kv_heads
        return (f"{self.num_full}/{total} KV heads full, the others sink {self.sink} + window {self.window}")
