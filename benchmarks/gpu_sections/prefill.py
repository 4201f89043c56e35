"""Section 2: what masking heads costs at prefill, at 8K and 32K tokens, on the Llama-3.1-8B-shaped model.

One forward over the whole prompt (no cache, logits of the last token only), median of `repeats`, for the plain
kernel, its `sa_masked_*` name with nothing masked, and 30 seeded random heads masked in each mode (the seed
experiments mask 30 heads). Ratio = variant time / plain-kernel time of the same length, same run: 1.00 means free.
"""

from __future__ import annotations

import random

import torch

from selective_attention import mask_heads
from selective_attention.attention.masked import MASK_MODES
from selective_attention.registry import FLASH_ATTN_AVAILABLE, MASKED_VARIANTS

from .common import Suite, median_ms, random_ids

HEADS = 30


def _heads(layers: int, heads: int, count: int, seed: int = 0) -> list[tuple[int, int]]:
    every = [(layer, head) for layer in range(layers) for head in range(heads)]
    return sorted(random.Random(seed).sample(every, min(count, len(every))))


def _one_length(suite: Suite, model, label: str, kernels: list[str], heads: list[tuple[int, int]]) -> list[dict]:
    length = suite.contexts[label]
    ids = random_ids(model.config.vocab_size, length, suite.device)

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    rows = []
    for kernel in kernels:
        model.set_attn_implementation(kernel)
        base_ms = median_ms(prefill, suite.device, suite.repeats)  # its warm-up call also warms this length
        rows.append(dict(context=label, tokens=length, variant=kernel, heads_masked=0, ms=base_ms, ratio=1.0))
        model.set_attn_implementation(MASKED_VARIANTS[kernel])
        ms = median_ms(prefill, suite.device, suite.repeats, warmup=0)
        rows.append(dict(context=label, tokens=length, variant=f"{MASKED_VARIANTS[kernel]} (none masked)",
                         heads_masked=0, ms=ms, ratio=ms / base_ms))
        model.set_attn_implementation(kernel)
        # every mode on SDPA; flash only with `zero` (the modes add the same ops to either kernel)
        for mode in MASK_MODES if kernel == "sdpa" else ("zero",):
            with mask_heads(model, heads, mode):
                ms = median_ms(prefill, suite.device, suite.repeats, warmup=0)
            rows.append(dict(context=label, tokens=length, variant=f"{MASKED_VARIANTS[kernel]} {mode}",
                             heads_masked=len(heads), ms=ms, ratio=ms / base_ms))
    model.set_attn_implementation("sdpa")
    return rows


def run(suite: Suite) -> dict:
    model = suite.big_model()
    config = model.config
    heads = _heads(config.num_hidden_layers, config.num_attention_heads, 2 if suite.tiny else HEADS)
    flash = suite.cuda and FLASH_ATTN_AVAILABLE
    kernels = ["sdpa"] + (["flash_attention_2"] if flash else [])
    rows = []
    for label in ("8K", "32K"):
        rows += _one_length(suite, model, label, kernels, heads)
        suite.empty_cache()
    why = "no CUDA device" if FLASH_ATTN_AVAILABLE else "flash-attn is not installed"
    note = "flash_attention_2 timed" if flash else f"flash_attention_2 not timed: {why}"
    return dict(rows=rows, checks=[], notes=[f"{len(heads)} heads masked: {heads}", note])
