"""Calling a transformers model across the supported 5.x range.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name is deprecated there and
removed later); earlier 5.x releases accept only `past_key_values`. Everything that hands a cache to a forward
call spells it through `cache_kwargs`, decided once at import from the installed signature.
"""

from __future__ import annotations

import inspect

from transformers import LlamaModel

#: The forward argument name of the installed transformers: "cache" (>= 5.24) or "past_key_values".
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """`{CACHE_ARGUMENT: cache}`, to splat into a model's forward or `generate` call."""
    return {CACHE_ARGUMENT: cache}


def sliding_window_layers(config) -> set[int]:
    """Indices of the decoder layers that attend over a sliding window (from `layer_types`, else `sliding_window`).

    `config` may be a composite config: its text config is read.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        return {index for index, kind in enumerate(layer_types) if "sliding" in kind}
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return set(range(text.num_hidden_layers))
    return set()
