"""Model introspection (text config, attention modules, shape, sliding layers) and calling a model across the
supported transformers 5.x range.

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
from torch import nn
from transformers import DynamicCache, LlamaModel, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

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


#: cache layer class -> layer type, for the two kinds of attention layer a `DynamicCache` holds
_CACHE_LAYER_TYPES = {DynamicLayer: "full_attention", DynamicSlidingWindowLayer: "sliding_attention"}


def cache_layer_types(config) -> list[str]:
    """Per layer, what `DynamicCache(config=config)` builds on the installed release: "full_attention" (keeps every
    position), "sliding_attention" (a sliding or chunked window), else the cache layer's class name.

    Asked of `DynamicCache` itself: `transformers.cache_utils.get_layer_types_and_kwargs` exists only from 5.16.
    """
    return [_CACHE_LAYER_TYPES.get(type(layer), type(layer).__name__) for layer in DynamicCache(config=config).layers]


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


def text_config(model: PreTrainedModel):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_modules(model: nn.Module) -> dict[int, list[nn.Module]]:
    """Attention modules by layer index: modules named *Attention* that carry an integer `layer_idx`."""
    layers: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and "Attention" in type(module).__name__:
            layers.setdefault(layer, []).append(module)
    return layers


def check_attention_interface(model: nn.Module) -> None:
    """Raise ValueError unless the model dispatches attention through transformers' `AttentionInterface`."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"{type(model).__name__} is not a transformers PreTrainedModel: head masking works on models whose "
            "attention goes through AttentionInterface"
        )
    if not type(model)._can_set_attn_implementation() or not attention_modules(model):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so its "
            "heads cannot be masked by selective-attention"
        )


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of the model's text decoder."""
    text = text_config(model)
    heads = text.num_attention_heads
    return text.num_hidden_layers, heads, getattr(text, "num_key_value_heads", None) or heads
