"""Greedy decoding for needle trials: stops at the tokenizer's end tokens, can start from a shared-prefix KV cache,
and hands each step's probe record to the caller.

A hand-written loop (rather than `generate`) because the detector needs, per forward call, the probe's argmax
for the row that produced the next token, and because trials restart from a cropped copy of one prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from selective_attention.attention.probe import key_offset
from selective_attention.modeling import cache_kwargs

#: End-of-turn tokens of common chat templates, used when present in the vocabulary.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """The tokenizer's EOS, the generation config's EOS ids, and chat end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()

    def add(value) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple, set)):
            for item in value:
                add(item)
        else:
            ids.add(int(value))

    add(tokenizer.eos_token_id)
    if model is not None and getattr(model, "generation_config", None) is not None:
        add(model.generation_config.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in CHAT_END_TOKENS:
        if token in vocab:
            add(vocab[token])
    return ids


@dataclass
class Decoded:
    tokens: list[int]  # generated ids, the stop token included when one was produced
    argmax: torch.Tensor | None  # (steps, layers, heads): key each query head attended to most, per generated token


def prefix_cache(model, input_ids: list[int]) -> DynamicCache | None:
    """KV cache of a shared prefix holding every position of every layer, or None when there is nothing to share.

    Built without the model's config, so sliding-window layers are plain `DynamicLayer`s too and keep their whole
    past (their window is applied by the attention mask, not the cache): `cropped` can then rebuild, for any
    shorter length, the window such a layer would hold.
    """
    if not input_ids:
        return None
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([input_ids], device=model.device), **cache_kwargs(cache), use_cache=True,
              logits_to_keep=1)
    layers = getattr(cache, "layers", [])
    if not layers or any(layer.keys is None or layer.keys.shape[-2] != len(input_ids) for layer in layers):
        return None
    return cache


def cropped(cache: DynamicCache, length: int, config) -> DynamicCache:
    """A cache in the model's own layout holding the first `length` positions of `cache` (the source stays intact).

    Each layer of a fresh `DynamicCache(config=config)` is fed the prefix through its own `update`, so a
    sliding-window layer ends up with exactly the window (and position count) it would have after a prefill.
    """
    fresh = DynamicCache(config=config)
    if len(fresh.layers) != len(cache.layers):
        raise ValueError(f"the shared cache has {len(cache.layers)} layers, the model {len(fresh.layers)}")
    for layer, source in zip(fresh.layers, cache.layers):
        layer.update(source.keys[..., :length, :], source.values[..., :length, :])
    return fresh


def greedy_decode(model, input_ids: list[int], *, stop_ids: set[int], max_new_tokens: int,
                  cache: DynamicCache | None = None, cached_length: int = 0, recorder=None) -> Decoded:
    """Greedy answer to `input_ids`; `cache` may already hold its first `cached_length` tokens.

    With a `ProbeRecorder` (rows=1), every forward call records the argmax keys of its last row, which is the
    row that predicts the token generated at that step (the Retrieval_Head convention).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = model.device
    if cache is None:
        cache, cached_length = DynamicCache(config=model.config), 0
    feed = torch.tensor([input_ids[cached_length:]], device=device)
    last_position = cached_length - 1  # sequence index of the last row fed so far
    tokens: list[int] = []
    steps: list[torch.Tensor] = []
    with torch.inference_mode():
        while True:
            out = model(input_ids=feed, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
            last_position += feed.shape[1]
            if recorder is not None:
                steps.append(recorder.collect(last_position)[:, 0, :, -1])
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in stop_ids or len(tokens) >= max_new_tokens:
                break
            feed = torch.tensor([[token]], device=device)
    return Decoded(tokens, torch.stack(steps) if steps else None)


def reference_decode(model, input_ids: list[int], *, stop_ids: set[int], max_new_tokens: int) -> Decoded:
    """The straightforward loop of the Retrieval_Head reference: prefill all but the last prompt token, then decode
    one token at a time with eager attention and `output_attentions=True`, taking each step's per-head argmax."""
    previous = model.config._attn_implementation
    eager = "sa_masked_eager" if previous.startswith("sa_") else "eager"
    if previous != eager:
        model.set_attn_implementation(eager)
    try:
        cache = DynamicCache(config=model.config)
        tokens: list[int] = []
        steps: list[torch.Tensor] = []
        with torch.inference_mode():
            if len(input_ids) > 1:
                model(input_ids=torch.tensor([input_ids[:-1]], device=model.device), **cache_kwargs(cache),
                      use_cache=True, logits_to_keep=1)
            feed = torch.tensor([[input_ids[-1]]], device=model.device)
            while True:
                out = model(input_ids=feed, **cache_kwargs(cache), use_cache=True, output_attentions=True)
                # a sliding-window layer's weights cover only its window: shift them to sequence positions
                position = len(input_ids) - 1 + len(tokens)
                # .cpu(): with a device_map the layers' weights sit on several devices
                steps.append(torch.stack([weights[0, :, -1].argmax(dim=-1).cpu()
                                          + key_offset(position, weights.shape[-1]) for weights in out.attentions]))
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                if token in stop_ids or len(tokens) >= max_new_tokens:
                    break
                feed = torch.tensor([[token]], device=model.device)
    finally:
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)
    return Decoded(tokens, torch.stack(steps))


class SharedPrefix:
    """Computes once the KV cache of the tokens a set of prompts share (template header + haystack before the
    longest-reaching needle) and hands each prompt a cropped copy: the keys are exact, since shared tokens sit
    at the same absolute positions in every prompt."""

    def __init__(self, model, prompts) -> None:
        self.model = model
        self.cache = None
        self.ids: list[int] = []
        headers = {tuple(p.input_ids[: p.header_length]) for p in prompts}
        if prompts and len(headers) == 1:
            longest = max(prompts, key=lambda p: p.prefix_length)
            self.ids = longest.input_ids[: longest.prefix_length]
            self.cache = prefix_cache(model, self.ids)

    def start(self, prompt) -> tuple[DynamicCache | None, int]:
        """(cache, number of prompt tokens it holds) for `prompt`; (None, 0) when nothing can be shared."""
        if self.cache is None:
            return None, 0
        length = min(prompt.prefix_length, len(prompt.input_ids) - 1)
        if length < 1 or prompt.input_ids[:length] != self.ids[:length]:
            return None, 0
        return cropped(self.cache, length, self.model.config), length
