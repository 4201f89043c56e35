"""Greedy answers of several needle trials decoded as one batch.

A decode step reads every weight of the model once; on a small model at a few thousand tokens that read, not the
attention over the cache, is most of the step. Trials whose prompts have the same length (one context length and
needle at several depths) sit at the same position at every step, so their caches stack along the batch axis with
no padding and no attention mask: each trial is prefilled on its own (from the shared-prefix cache), then all of
them decode together, and a trial leaves the batch when it produces an end token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from selective_attention.modeling import cache_kwargs
from selective_attention.retrieval.generate import Decoded, SharedPrefix
from selective_attention.retrieval.haystack import NeedlePrompt


def batch_groups(prompts: Sequence[NeedlePrompt], size: int) -> list[list[NeedlePrompt]]:
    """`prompts` in groups of at most `size` with equal prompt lengths, in the order each length first appears."""
    if size < 1:
        raise ValueError(f"decode batch size must be at least 1, got {size}")
    by_length: dict[int, list[list[NeedlePrompt]]] = {}
    order: list[list[NeedlePrompt]] = []
    for prompt in prompts:
        groups = by_length.setdefault(len(prompt.input_ids), [])
        if not groups or len(groups[-1]) == size:
            groups.append([])
            order.append(groups[-1])
        groups[-1].append(prompt)
    return order


def stack_caches(caches: list[DynamicCache]) -> DynamicCache:
    """One cache holding `caches` along the batch axis (equal lengths), built in the first one's layers; each
    layer of the others is released as soon as it is copied, so the peak is one layer above the inputs."""
    base = caches[0]
    if len(caches) == 1:
        return base
    for index, layer in enumerate(base.layers):
        others = [cache.layers[index] for cache in caches[1:]]
        if any(other.keys.shape[-2] != layer.keys.shape[-2] for other in others):
            raise ValueError("caches of different lengths cannot be stacked")
        layer.keys = torch.cat([layer.keys, *(other.keys for other in others)])
        layer.values = torch.cat([layer.values, *(other.values for other in others)])
        for other in others:
            other.keys = other.values = None
    return base


def decode_batch(model, prompts: Sequence[NeedlePrompt], *, stop_ids: set[int], max_new_tokens: int,
                 shared: SharedPrefix | None = None, recorder=None) -> list[Decoded]:
    """Greedy answers of `prompts` (all of one length): the same tokens and probe records as `greedy_decode` on
    each prompt alone, up to the rounding of batched matrix products.

    With a `ProbeRecorder` (rows=1) every forward call records, per trial, the argmax keys of the row that predicts
    the next token.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    length = len(prompts[0].input_ids)
    if any(len(prompt.input_ids) != length for prompt in prompts):
        raise ValueError("a decode batch needs prompts of one length")
    tokens: list[list[int]] = [[] for _ in prompts]
    steps: list[list[torch.Tensor]] = [[] for _ in prompts]
    caches: list[DynamicCache] = []

    def take(row: int, logits: torch.Tensor, record: torch.Tensor | None) -> bool:
        """Append trial `row`'s next token (and record); True while it goes on."""
        tokens[row].append(int(logits.argmax()))
        if record is not None:
            steps[row].append(record)
        return tokens[row][-1] not in stop_ids and len(tokens[row]) < max_new_tokens

    active: list[int] = []
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            cache, cached = shared.start(prompt) if shared is not None else (None, 0)
            if cache is None:
                cache, cached = DynamicCache(config=model.config), 0
            feed = torch.tensor([prompt.input_ids[cached:]], device=model.device)
            out = model(input_ids=feed, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            record = recorder.collect(length - 1)[:, 0, :, -1] if recorder is not None else None
            if take(row, out.logits[0, -1], record):
                active.append(row)
                caches.append(cache)
        batch = stack_caches(caches) if caches else None
        position = length - 1
        while active:
            feed = torch.tensor([[tokens[row][-1]] for row in active], device=model.device)
            out = model(input_ids=feed, **cache_kwargs(batch), use_cache=True, logits_to_keep=1)
            position += 1
            records = recorder.collect(position)[..., -1] if recorder is not None else None  # (layers, B, Hq)
            keep = [i for i, row in enumerate(active)
                    if take(row, out.logits[i, -1], None if records is None else records[:, i])]
            if len(keep) < len(active) and keep:
                batch.batch_select_indices(keep)
            active = [active[i] for i in keep]
    return [Decoded(t, torch.stack(s) if s else None) for t, s in zip(tokens, steps)]
