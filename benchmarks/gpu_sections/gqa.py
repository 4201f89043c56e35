"""Section 6: converted GQA models (`convert_model`) decoding at 8K tokens against the original.

The Llama-3.1-8B-shaped model (8 KV heads) converted to 16 KV heads by duplication (exact: the same function)
and to 4 KV heads by mean pooling (lossy). Per model: decode tokens/s (1000 / median ms per token after an 8K
prefill), KV-cache bytes after prefill, and ratios to the original measured in the same run. Check: the
duplicated model's next-token logits equal the original's within 2e-2 x max |logits| (bf16; only the kernel
shapes differ). A conversion that fails on the GPU is reported with its error and retried on the CPU.
"""

from __future__ import annotations

import logging
import statistics

import torch
from transformers import DynamicCache

from selective_attention.modeling import cache_kwargs
from selective_attention.gqa.convert import convert_model

from .common import Suite, check, decode_ms, random_ids

logger = logging.getLogger("gpu_suite")
TOLERANCE = 2e-2


def _kv_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _decode(suite: Suite, model, ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Prefill `ids`, decode `new_tokens`; (measurements, next-token logits after the prompt)."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)).logits
    held = _kv_bytes(cache)
    ms = statistics.median(decode_ms(model, cache, logits, suite.new_tokens, suite.device))
    return dict(decode_ms_per_token=ms, tokens_per_s=1000.0 / ms, kv_cache_bytes=held), logits[0, -1].float()


def _convert(suite: Suite, model, kv_heads: int, method: str) -> tuple[torch.nn.Module, str | None]:
    """(converted model on the suite's device, error of the GPU attempt if it fell back to the CPU)."""
    calibration = random_ids(model.config.vocab_size, 64, model.device, seed=3)
    try:
        converted, _ = convert_model(model, str(kv_heads), method=method, calibration_ids=calibration,
                                     dtype=model.dtype)
        return converted, None
    except Exception as error:  # noqa: BLE001  reported in the row, then retried where the converter is tested
        if model.device.type == "cpu":
            raise
        failure = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        logger.warning("convert_model(%s) on %s failed (%s); converting on the CPU", method, model.device, failure)
    device = model.device
    model.to("cpu")
    suite.empty_cache()
    try:
        converted, _ = convert_model(model, str(kv_heads), method=method, calibration_ids=calibration.cpu(),
                                     dtype=model.dtype)
    finally:
        model.to(device)
    return converted.to(device), failure


def run(suite: Suite) -> dict:
    model = suite.big_model()
    config = model.config
    kv = config.num_key_value_heads
    length = suite.contexts["8K"] - suite.new_tokens
    ids = random_ids(config.vocab_size, length, suite.device, seed=4)
    original, original_logits = _decode(suite, model, ids)
    rows = [dict(model=f"original ({kv} KV heads)", kv_heads=kv, **original, speed_ratio=1.0, kv_bytes_ratio=1.0)]
    checks = []
    for target, method in ((min(2 * kv, config.num_attention_heads), "duplicate"), (max(kv // 2, 1), "mean")):
        converted, failure = _convert(suite, model, target, method)
        measured, logits = _decode(suite, converted, ids)
        del converted
        suite.empty_cache()
        difference = float((logits - original_logits).abs().max())
        row = dict(model=f"{method} -> {target} KV heads", kv_heads=target, **measured,
                   speed_ratio=measured["tokens_per_s"] / original["tokens_per_s"],
                   kv_bytes_ratio=measured["kv_cache_bytes"] / original["kv_cache_bytes"],
                   next_token_logits_max_abs_diff=difference)
        if failure:
            row["converted_on"] = f"cpu (on {suite.device.type}: {failure})"
        rows.append(row)
        if method == "duplicate":
            tolerance = TOLERANCE * float(original_logits.abs().max())
            checks.append(check(f"duplicate -> {target} KV heads computes the original function",
                                difference <= tolerance, max_abs_diff=difference, tolerance=tolerance))
        if failure:
            checks.append(check(f"convert_model({method}) runs on {suite.device.type}", False, error=failure))
    return dict(rows=rows, checks=checks, notes=[
        f"prompt {length} tokens, {suite.new_tokens} decoded; speed_ratio = converted tokens/s / original tokens/s"])
