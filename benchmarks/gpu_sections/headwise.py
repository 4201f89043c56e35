"""Section 4: the head-wise KV cache (a quarter of the KV heads full, sink 64 + window 256) against
`DynamicCache` at 32K and 128K tokens on the Llama-3.1-8B-shaped model.

Per context: bytes the cache holds after prefill (measured from its tensors), the same computed here from the
policy's pattern (full heads x every position + streaming heads x (sink + window)) as the check that memory is
really saved, decode ms/token (median over the decoded tokens), prefill seconds and peak CUDA memory. The dense
baseline prefills in one forward; the head-wise cache prefills in chunks (`prefill(..., chunk=)`), so its
streaming heads never hold more than sink + window + chunk positions. Scores are seeded random: which heads are
full does not change the cost.
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from transformers import DynamicCache

from selective_attention.modeling import cache_kwargs

from .common import Skip, Suite, check, decode_ms, peak_memory, random_ids, synchronize

FULL = 0.25


def _import_cache():
    try:
        from selective_attention.cache import cache_bytes, headwise_cache, prefill
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("selective_attention.cache"):
            raise Skip("selective_attention.cache not installed") from None
        raise
    return cache_bytes, headwise_cache, prefill


def _expected_bytes(pattern: list[list[int]], length: int, keep: int, head_dim: int, itemsize: int) -> int:
    """Keys + values of one sequence: full KV heads keep `length` positions, streaming ones min(length, keep)."""
    positions = sum(length if full else min(length, keep) for row in pattern for full in row)
    return positions * 2 * head_dim * itemsize


def _measure(suite: Suite, model, cache, ids: torch.Tensor, run_prefill, cache_bytes) -> dict:
    with peak_memory(suite.device) as memory:
        start = time.perf_counter()
        out = run_prefill(cache, ids)
        synchronize(suite.device)
        prefill_s = time.perf_counter() - start
        held = cache_bytes(cache)
        steps = decode_ms(model, cache, out.logits, suite.new_tokens, suite.device)
    return dict(prefill_s=prefill_s, cache_bytes=held, decode_ms_per_token=statistics.median(steps),
                peak_mib=memory["peak_mib"])


def run(suite: Suite) -> dict:
    cache_bytes, headwise_cache, prefill = _import_cache()
    model = suite.big_model()
    config = model.config
    sink, window, chunk = (4, 16, 32) if suite.tiny else (64, 256, 8192)
    rng = random.Random(0)
    scores = [[rng.random() for _ in range(config.num_key_value_heads)] for _ in range(config.num_hidden_layers)]
    rows, checks = [], []

    def dense_prefill(cache, ids):
        with torch.inference_mode():
            return model(input_ids=ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)

    for label in ("32K", "128K"):
        length = suite.contexts[label] - suite.new_tokens  # the last decode step attends to `context` keys
        ids = random_ids(config.vocab_size, length, suite.device)
        dense = _measure(suite, model, DynamicCache(config=config), ids, dense_prefill, cache_bytes)
        suite.empty_cache()
        with headwise_cache(model, scores, full=FULL, sink=sink, window=window) as cache:
            pattern = cache.policy.pattern
            ours = _measure(suite, model, cache, ids, lambda c, i: prefill(model, c, i, chunk=chunk), cache_bytes)
        suite.empty_cache()
        expected = _expected_bytes(pattern, length, sink + window, config.head_dim, model.dtype.itemsize)
        dense_expected = _expected_bytes(pattern, length, length, config.head_dim, model.dtype.itemsize)
        full_heads = sum(map(sum, pattern))
        rows.append(dict(context=label, prompt_tokens=length, cache="DynamicCache", **dense, bytes_ratio=1.0,
                         decode_ratio=1.0))
        rows.append(dict(context=label, prompt_tokens=length,
                         cache=f"head-wise {full_heads}/{len(pattern) * len(pattern[0])} KV heads full, "
                               f"sink {sink} + window {window}", **ours,
                         bytes_ratio=ours["cache_bytes"] / dense["cache_bytes"],
                         decode_ratio=ours["decode_ms_per_token"] / dense["decode_ms_per_token"]))
        checks.append(check(f"{label}: DynamicCache holds every position", dense["cache_bytes"] == dense_expected,
                            measured=dense["cache_bytes"], expected=dense_expected))
        checks.append(check(f"{label}: head-wise cache holds full heads x {length} + streaming heads x "
                            f"{sink + window} positions", ours["cache_bytes"] == expected,
                            measured=ours["cache_bytes"], expected=expected))
        del ids
    return dict(rows=rows, checks=checks, notes=[
        f"prefill chunk {chunk} tokens for the head-wise cache, one forward for DynamicCache; "
        "decode ratio = head-wise ms/token / DynamicCache ms/token (below 1 is faster)"])

