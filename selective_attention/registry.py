"""One place where selective-attention's attention functions meet transformers' registries.

A custom attention function needs two registrations: the function itself in `AttentionInterface`, and a
mask builder in `AttentionMaskInterface`. Without the second, transformers builds no causal/padding mask
for the custom name and padding is silently lost.
"""

from __future__ import annotations

from typing import Callable

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask

MASK_FUNCTIONS: dict[str, Callable] = {"sdpa": sdpa_mask, "eager": eager_mask, "flash": flash_attention_mask}

#: Names this package registered, mapped to the mask kind they use.
REGISTERED: dict[str, str] = {}


def register_attention(name: str, function: Callable, mask: str) -> None:
    """Register `function` under `name` with the attention and mask interfaces.

    `mask` is one of "sdpa" (boolean mask or None), "eager" (additive float mask) or "flash" (2D padding mask).
    """
    if "/" in name or ":" in name:
        raise ValueError(f"attention name {name!r} must not contain '/' or ':' (transformers reads those as hub kernels)")
    if mask not in MASK_FUNCTIONS:
        raise ValueError(f"unknown mask kind {mask!r}; expected one of {sorted(MASK_FUNCTIONS)}")
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, MASK_FUNCTIONS[mask])
    REGISTERED[name] = mask


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


def register_all() -> None:
    """Register every attention function of the package (idempotent)."""
    from . import tree_kernel
    from .attention import masked, record

    masked.register()
    record.register()
    tree_kernel.register()
    # Optional modules register themselves when present (added by later features).
    for module_name in ("probe", "headwise"):
        try:
            module = __import__(f"selective_attention.attention.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as error:
            if error.name != f"selective_attention.attention.{module_name}":
                raise
            continue
        module.register()
