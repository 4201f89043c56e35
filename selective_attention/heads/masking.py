"""Public head-masking API: `mask_heads`, `unmask_heads`, `masked_heads`.

transformers 5 removed `head_mask` and `prune_heads`; we restore head surgery for any model whose attention
goes through `AttentionInterface` by attaching a `HeadMask` to each attention module and switching the model to
the matching `sa_masked_*` implementation. The mask is also written to the config (`sa_masked_heads`,
`sa_mask_mode`) so that `save_pretrained` records it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel

from selective_attention.attention.intervene import Intervention, active_interventions, intervene
from selective_attention.attention.masked import MASK_ATTRIBUTE, MASK_MODES, HeadMask
from selective_attention.heads.ids import Head, HeadSpec, group_by_layer, head_key, parse_heads, validate_heads
from selective_attention.modeling import attention_modules, check_attention_interface, text_config
from selective_attention.registry import MASKED_VARIANTS, REGISTRY

logger = logging.getLogger(__name__)

CONFIG_HEADS = "sa_masked_heads"
CONFIG_MODE = "sa_mask_mode"


def masked_implementation(current: str | None) -> str:
    """The sa_masked_* implementation to use for a model currently on `current`."""
    current = current or "sdpa"
    if current in REGISTRY:
        return current  # one of ours: it already honours head masks
    if current in MASKED_VARIANTS:
        return MASKED_VARIANTS[current]
    raise ValueError(
        f"attention implementation {current!r} has no masked variant; load the model with attn_implementation="
        f"one of {sorted(MASKED_VARIANTS)}"
    )


def base_implementation(current: str | None) -> str:
    for base, name in MASKED_VARIANTS.items():
        if current == name:
            return base
    return current or "sdpa"


class HeadMaskHandle(Intervention):
    """Returned by `mask_heads`: an `Intervention` that also says which heads it masks and how."""

    heads: list[Head]
    mode: str

    def __repr__(self) -> str:
        return f"HeadMaskHandle({len(self.heads)} heads, mode={self.mode!r}, active={self.active})"


def mask_heads(model: PreTrainedModel, heads: HeadSpec, mode: str = "zero") -> HeadMaskHandle:
    """Ablate `heads` of `model` at prefill and decode until the returned handle is removed.

    `heads`: "L-H" strings, (layer, head) pairs, or "L-H,L-H". `mode`: "zero", "uniform" or "mean".
    Replaces any mask the model already has (the handle brings it back).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {', '.join(MASK_MODES)}")
    check_attention_interface(model)
    parsed = parse_heads(heads)
    config = text_config(model)
    validate_heads(parsed, config.num_hidden_layers, config.num_attention_heads)
    implementation = masked_implementation(model.config._attn_implementation)
    missing = sorted({layer for layer, _ in parsed} - set(attention_modules(model)))
    if missing:
        raise ValueError(f"no attention module found for layer(s) {missing}")
    grouped = group_by_layer(parsed)
    handle = intervene(model, MASK_ATTRIBUTE, lambda layer: HeadMask(grouped[layer], mode) if layer in grouped else None,
                       implementation, config={CONFIG_HEADS: [head_key(layer, head) for layer, head in parsed],
                                               CONFIG_MODE: mode}, name=f"mask_heads({len(parsed)} heads, {mode})",
                       handle=HeadMaskHandle)
    handle.heads, handle.mode = parsed, mode
    logger.info("masked %d heads (%s) with %s", len(parsed), mode, implementation)
    return handle


def unmask_heads(model: PreTrainedModel) -> None:
    """Remove every head mask and return to the unmasked base implementation.

    Active `mask_heads` handles on top of the model's intervention stack are removed (innermost first); masks set
    some other way (a saved config re-applied by hand) are cleared too."""
    for handle in reversed(active_interventions(model)):
        if not isinstance(handle, HeadMaskHandle):
            break
        handle.remove()
    for layer_modules in attention_modules(model).values():
        for module in layer_modules:
            setattr(module, MASK_ATTRIBUTE, None)
    config = text_config(model)
    setattr(config, CONFIG_HEADS, None)
    setattr(config, CONFIG_MODE, None)
    base = base_implementation(model.config._attn_implementation)
    if base != model.config._attn_implementation:
        model.set_attn_implementation(base)


def masked_heads(model: nn.Module) -> Iterator[tuple[int, int, str]]:
    """(layer, head, mode) for every head currently masked."""
    for layer, layer_modules in sorted(attention_modules(model).items()):
        mask = getattr(layer_modules[0], MASK_ATTRIBUTE, None)
        if mask is not None:
            for head in mask.heads:
                yield layer, head, mask.mode


def apply_config_head_mask(model: PreTrainedModel) -> HeadMaskHandle | None:
    """Re-apply the mask recorded in a saved config (`sa_masked_heads`), if any."""
    config = text_config(model)
    heads = getattr(config, CONFIG_HEADS, None)
    if not heads:
        return None
    return mask_heads(model, heads, getattr(config, CONFIG_MODE, None) or "zero")
