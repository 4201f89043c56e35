"""`HeadwiseCache` and the public entry point `headwise_cache`.

    cache = headwise_cache(model, "head_scores.json", full=0.25, sink=64, window=256)
    model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=32)      # prefill_chunk_size=... also works
    with headwise_cache(model, scores) as cache: ...                        # restores the model on exit

Layers with streaming KV heads get a `HeadwiseLayer`; layers whose KV heads are all full stay `DynamicLayer`, and
the model's own sliding-window layers keep `DynamicSlidingWindowLayer`, as `DynamicCache` would build them. The
model attends through `sa_headwise_sdpa`, with the policy's plan on every attention module.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from selective_attention.attention.headwise import NAME, PLAN_ATTRIBUTE
from selective_attention.attention.intervene import Intervention, intervene
from selective_attention.cache.policy import HeadwisePolicy, model_shape
from selective_attention.cache.selection import headwise_policy
from selective_attention.gqa.headwise_cache_selective_llama import HeadwiseLayer
from selective_attention.modeling import (
    attention_modules,
    cache_kwargs,
    cache_layer_types,
    check_attention_interface,
)

logger = logging.getLogger(__name__)


class HeadwiseHandle(Intervention):
    """Returned by `attach_headwise`: an `Intervention` that also holds the policy whose plans it attached."""

    policy: HeadwisePolicy


def attach_headwise(model: PreTrainedModel, policy: HeadwisePolicy) -> HeadwiseHandle:
    """Attach `policy`'s plans to the model's attention modules and switch it to `sa_headwise_sdpa`; the handle's
    `remove()` restores the previous plans and attention implementation."""
    check_attention_interface(model)
    policy.check_model(model)
    num_layers, num_heads, num_kv_heads = model_shape(model)
    missing = sorted(set(range(num_layers)) - set(attention_modules(model)))
    if missing:
        raise ValueError(f"no attention module found for layer(s) {missing}")
    previous = model.config._attn_implementation
    handle = intervene(model, PLAN_ATTRIBUTE, lambda layer: policy.plan(layer, num_heads // num_kv_heads), NAME,
                       name=f"headwise({policy.describe()})", handle=HeadwiseHandle)
    handle.policy = policy
    if previous != NAME:
        logger.info("attention %s -> %s (%s)", previous, NAME, policy.describe())
    return handle


class HeadwiseCache(Cache):
    """A transformers `Cache` whose streaming KV heads keep only `sink` + `window` positions."""

    def __init__(self, policy: HeadwisePolicy, config, handle: HeadwiseHandle | None = None) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = list(DynamicCache(config=text).layers)  # what DynamicCache builds, on every 5.x release
        groups = text.num_attention_heads // (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        if len(layers) != policy.num_layers:
            raise ValueError(f"head-wise policy has {policy.num_layers} layers, the config {len(layers)}")
        for layer, kind in enumerate(cache_layer_types(text)):
            if policy.streaming_heads(layer):
                if kind != "full_attention":
                    raise ValueError(f"layer {layer} is a {kind} layer: its KV heads cannot stream")
                layers[layer] = HeadwiseLayer(policy.plan(layer, groups))
        super().__init__(layers=layers)
        self.policy = policy
        self.handle = handle
        self._config = config

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # Another attention function would read the full heads' keys as if they were every KV head.
        if isinstance(self.layers[layer_idx], HeadwiseLayer) and self._config._attn_implementation != NAME:
            raise RuntimeError(f"the head-wise cache needs the attention implementation {NAME!r}, the model uses "
                               f"{self._config._attn_implementation!r}; build it with headwise_cache(model, ...)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @classmethod
    def from_dynamic(cls, dynamic: DynamicCache, policy: HeadwisePolicy, config) -> HeadwiseCache:
        """A head-wise cache holding what `dynamic` holds, trimmed. Exact only when `dynamic` was filled with the
        same policy's plans attached (e.g. a shared prefix computed under `attach_headwise`) and without padding."""
        cache = cls(policy, config)
        for index, (source, target) in enumerate(zip(dynamic.layers, cache.layers)):
            if type(source) is not DynamicLayer or not source.is_initialized:
                raise ValueError(f"layer {index} of the source cache is not a filled DynamicLayer")
            if isinstance(target, HeadwiseLayer):
                target.load(source.keys, source.values)
            else:
                target.update(source.keys, source.values)
        return cache

    def kv_bytes(self) -> int:
        return cache_bytes(self)

    def __enter__(self) -> HeadwiseCache:
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


def cache_bytes(cache: Cache) -> int:
    """Bytes of every key/value tensor a cache holds, measured from the tensors themselves."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "stream_keys", "stream_values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def headwise_cache(model: PreTrainedModel, scores=None, *, full: int | float | None = 0.25,
                   threshold: float | None = None, sink: int = 64, window: int = 256, method: str = "top",
                   seed: int = 0, policy: HeadwisePolicy | None = None) -> HeadwiseCache:
    """An empty head-wise cache for `model`, with the model switched to `sa_headwise_sdpa` under its policy.

    `scores`: head-score JSON path, DuoAttention .tsv path, {"L-H": [...]} dict or [layer][kv_head] matrix.
    `full`: count (int) or fraction (float in (0, 1]) of KV heads kept full; or `threshold` on the KV-head score.
    `method`: "top" (highest scores, ties by `seed`) or "random" (seeded draw). `policy` overrides all of these.
    Each generation needs a fresh cache: call again (with `policy=cache.policy` to skip the selection).
    """
    check_attention_interface(model)
    if policy is None:
        policy = headwise_policy(model, scores, full=full, threshold=threshold, sink=sink, window=window,
                                 method=method, seed=seed)
    return HeadwiseCache(policy, model.config, attach_headwise(model, policy))


def prefill(model: PreTrainedModel, cache: Cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            chunk: int | None = None):
    """Run the prompt (batch, seq_len) into `cache`, `chunk` tokens per forward (None: one forward), so streaming
    heads never hold more than sink + window + chunk positions. Returns the last forward's output (last logits)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill chunk must be a positive number of tokens, got {chunk}")
    past = cache.get_seq_length()
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long,
                                    device=input_ids.device)
    # Positions count real tokens only (left padding), as `generate` computes them.
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    step = chunk or input_ids.shape[1]
    output = None
    with torch.inference_mode():
        for begin in range(0, input_ids.shape[1], step):
            end = min(begin + step, input_ids.shape[1])
            output = model(input_ids=input_ids[:, begin:end], attention_mask=attention_mask[:, : past + end],
                           position_ids=position_ids[:, past + begin: past + end], **cache_kwargs(cache),
                           use_cache=True, logits_to_keep=1)
    return output


def parse_full(text: str | int | float) -> int | float:
    """`--full-kv-heads` value: "0.25" (a fraction, has a point) or "23" (a count)."""
    if isinstance(text, (int, float)):
        return text
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise ValueError(f"full KV heads must be a count (e.g. 23) or a fraction (e.g. 0.25), got {text!r}") from None


def dense_attention(model: PreTrainedModel) -> Intervention:
    """Every KV head attends to every position until the returned intervention is removed (use it as a `with`
    block): the head-wise plans are detached from the attention modules and put back on exit, so a forward into a
    `DynamicCache` is the dense model's. Used for a dense prefill whose cache is trimmed afterwards
    (`trial_cache(dense_prefill=True)`)."""
    return intervene(model, PLAN_ATTRIBUTE, lambda layer: None, name="dense_attention")


def trial_cache(model: PreTrainedModel, policy: HeadwisePolicy, shared: DynamicCache | None, cached: int,
                input_ids: list[int], prefill_chunk: int | None = None, dense_prefill: bool = False
                ) -> tuple[HeadwiseCache, int]:
    """(cache, prompt tokens it holds) for one prompt: a shared-prefix `DynamicCache` (computed under the policy's
    plans) converted and trimmed, or an empty cache; with `prefill_chunk`, the prompt but its last token is
    prefilled here in chunks, so the streaming heads never hold more than sink + window + chunk positions.

    `dense_prefill=True` (RazorAttention's order instead of DuoAttention's): the prompt but its last token runs
    through the dense model (every head sees every position; `shared` must then be a dense prefix too), and the
    cache is trimmed afterwards; only the last prompt token and the answer are computed under the policy. The
    cache holds the same positions as with a streaming prefill, but the kept keys and values of the recent window
    were computed with the whole context, and the prefill's peak memory is the dense one."""
    if dense_prefill:
        dense = shared if shared is not None else DynamicCache(config=model.config)
        cached = 0 if shared is None else cached
        if len(input_ids) - 1 > cached:
            with dense_attention(model):
                prefill(model, dense, torch.tensor([input_ids[cached:-1]], device=model.device), chunk=prefill_chunk)
            cached = len(input_ids) - 1
        if cached == 0:
            return HeadwiseCache(policy, model.config), 0
        return HeadwiseCache.from_dynamic(dense, policy, model.config), cached
    cache = HeadwiseCache(policy, model.config) if shared is None else HeadwiseCache.from_dynamic(shared, policy,
                                                                                                  model.config)
    cached = 0 if shared is None else cached
    if prefill_chunk and len(input_ids) - 1 > cached:
        prefill(model, cache, torch.tensor([input_ids[cached:-1]], device=model.device), chunk=prefill_chunk)
        cached = len(input_ids) - 1
    return cache, cached
