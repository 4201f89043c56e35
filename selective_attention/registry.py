"""One table: every attention function of the package, its mask builder, and the implementation it extends.

A custom attention function needs two registrations: the function itself in `AttentionInterface`, and a mask
builder in `AttentionMaskInterface`. Without the second, transformers builds no causal/padding mask for the custom
name and padding is silently lost. Names are plain words: transformers reads '/' and ':' as hub kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, flash_attention_mask, sdpa_mask

from selective_attention.attention.headwise import headwise_sdpa_attention
from selective_attention.attention.masked import masked, masked_eager_attention, masked_sdpa_attention
from selective_attention.attention.probe import probe_attention
from selective_attention.attention.record import record_attention_forward
from selective_attention.tree_kernel.attention import tree_kernel_sdpa


def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


#: Whether flash-attn imports here (checked once, at import).
FLASH_ATTN_AVAILABLE = _flash_attn_available()


@dataclass(frozen=True)
class Registration:
    """An attention function, the mask builder transformers must call for it, and the base implementation whose
    kernel (and mask format) it extends."""

    function: Callable
    mask: Callable
    base: str


REGISTRY: dict[str, Registration] = {
    "sa_masked_sdpa": Registration(masked_sdpa_attention, sdpa_mask, "sdpa"),
    "sa_masked_eager": Registration(masked_eager_attention, eager_mask, "eager"),
    "sa_probe": Registration(probe_attention, sdpa_mask, "sdpa"),
    # the eager mask: recorded layers need an explicit additive mask, and every kernel accepts one
    "sa_record": Registration(record_attention_forward, eager_mask, "eager"),
    "sa_tree_kernel": Registration(tree_kernel_sdpa, sdpa_mask, "sdpa"),
    "sa_headwise_sdpa": Registration(masked(headwise_sdpa_attention), sdpa_mask, "sdpa"),
}
if FLASH_ATTN_AVAILABLE:
    from transformers.integrations.flash_attention import flash_attention_forward

    # The name keeps "flash_attention_2": transformers picks flash code paths (2D masks, packed positions, kernel
    # version) by matching the implementation name.
    REGISTRY["sa_masked_flash_attention_2"] = Registration(masked(flash_attention_forward), flash_attention_mask,
                                                           "flash_attention_2")

#: base implementation -> its head-masking variant
MASKED_VARIANTS: dict[str, str] = {entry.base: name for name, entry in REGISTRY.items()
                                   if name.startswith("sa_masked_")}


def register_all() -> None:
    """Register every entry of `REGISTRY` with transformers (idempotent)."""
    for name, entry in REGISTRY.items():
        AttentionInterface.register(name, entry.function)
        AttentionMaskInterface.register(name, entry.mask)
