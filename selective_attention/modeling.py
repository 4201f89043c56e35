"""Calling a transformers model across the supported 5.x range.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` (the old name is deprecated there and
removed later); earlier 5.x releases accept only `past_key_values`. Everything that hands a cache to a forward
call spells it through `cache_kwargs`, decided once at import from the installed signature; the returned cache
is read with `output_cache` (the output field was renamed with it).

transformers 5.17 added `GgufConfig`: from then on a `.gguf` file loads with its weights left in GGUF blocks
unless asked to dequantize; earlier releases always dequantize. `gguf_dequantize_kwargs` asks for dense weights
on every release.
"""

from __future__ import annotations

import inspect

import transformers
from transformers import LlamaModel

#: The forward argument name of the installed transformers: "cache" (>= 5.24) or "past_key_values".
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

#: Whether the installed transformers has `GgufConfig` (>= 5.17); without it a .gguf load always dequantizes.
HAS_GGUF_CONFIG = hasattr(transformers, "GgufConfig")


def cache_kwargs(cache) -> dict:
    """`{CACHE_ARGUMENT: cache}`, to splat into a model's forward or `generate` call."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output):
    """The cache a forward call returned (`output.cache` from 5.24, `output.past_key_values` before)."""
    return getattr(output, CACHE_ARGUMENT)


def gguf_dequantize_kwargs() -> dict:
    """`from_pretrained(..., gguf_file=...)` kwargs that load a .gguf file as dense weights on every 5.x release."""
    return {"quantization_config": transformers.GgufConfig(dequantize=True)} if HAS_GGUF_CONFIG else {}


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
