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
