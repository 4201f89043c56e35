"""`HeadwiseLayer`: one layer's KV cache in which the streaming KV heads really hold fewer tensors.

Part of the Hub modeling code (imports only torch and transformers): a `selective_llama` config with `sa_headwise`
builds its cache here (`headwise_cache_from_config`); selective-attention builds the same layers for any model.

Full KV heads: `keys`/`values` (batch, full_kv_heads, seq_len, head_dim), every position, as `DynamicLayer`.
Streaming KV heads: `stream_keys`/`stream_values` (batch, streaming_kv_heads, kept, head_dim). Until every row's
sink lies before the window they hold every position; from then on `sink` slots (each row's first real positions,
so left padding keeps the right tokens) followed by the last `window` positions (`recent_start..length-1`).
Keys are stored after RoPE and never re-rotated: a key keeps the position it was computed at.

`update` appends and hands the streaming keys to the head-wise attention through the returned key tensor; it calls
`commit` after attention, which trims (dropping a position only once no later query can see it).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .headwise_attention_selective_llama import LAYER_ATTRIBUTE, HeadwisePlan

#: the abstract "longest cache" method of a cache layer: `get_max_length` from transformers 5.16,
#: `get_max_cache_shape` before (this file is Hub code, so the fact is computed here, not in selective_attention)
MAX_LENGTH_METHOD = "get_max_length" if hasattr(CacheLayerMixin, "get_max_length") else "get_max_cache_shape"


class HeadwiseLayer(CacheLayerMixin):
    """A cache layer whose full KV heads keep every position and whose streaming KV heads keep sink + window."""

    is_sliding = False
    is_croppable = False  # positions dropped from streaming heads cannot be brought back

    def __init__(self, plan: HeadwisePlan, **kwargs) -> None:
        super().__init__()
        if not plan.streaming:
            raise ValueError("a HeadwiseLayer needs at least one streaming KV head (use DynamicLayer otherwise)")
        self.plan = plan
        self.num_kv_heads = len(plan.full) + len(plan.streaming)
        self.stream_keys: torch.Tensor | None = None
        self.stream_values: torch.Tensor | None = None
        self.length = 0  # positions seen, padding included
        self.start: torch.Tensor | None = None  # (batch,) first real position per row, set at the first attention
        self.recent_start: int | None = None  # None while every position is stored
        self._pending = False  # an update whose attention has not run yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[1] != self.num_kv_heads:
            raise ValueError(f"head-wise cache layer expects {self.num_kv_heads} KV heads, got {key_states.shape[1]}")
        self.device = key_states.device
        batch, _, _, head_dim = key_states.shape
        full, stream = len(self.plan.full), len(self.plan.streaming)
        self.keys = key_states.new_empty(batch, full, 0, head_dim)
        self.values = value_states.new_empty(batch, full, 0, value_states.shape[-1])
        self.stream_keys = key_states.new_empty(batch, stream, 0, head_dim)
        self.stream_values = value_states.new_empty(batch, stream, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value_states (batch, kv_heads, q, head_dim) -> the full heads' keys and values, all positions."""
        if self._pending:
            raise RuntimeError("head-wise cache updated twice without head-wise attention in between: the model must "
                               "attend through 'sa_headwise_sdpa' (selective_attention.headwise_cache sets it)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        device = key_states.device
        full, stream = self.plan.index("full_kv", device), self.plan.index("streaming_kv", device)
        self.keys = torch.cat([self.keys, key_states.index_select(1, full)], dim=-2)
        self.values = torch.cat([self.values, value_states.index_select(1, full)], dim=-2)
        self.stream_keys = torch.cat([self.stream_keys, key_states.index_select(1, stream)], dim=-2)
        self.stream_values = torch.cat([self.stream_values, value_states.index_select(1, stream)], dim=-2)
        self.length += key_states.shape[-2]
        self._pending = True
        keys = self.keys[:]  # a view carries the layer, so the stored tensor holds no reference back to it
        setattr(keys, LAYER_ATTRIBUTE, self)
        return keys, self.values

    def commit(self) -> None:
        """Drop what no later query can see: keep each row's sink and the last `window` positions."""
        self._pending = False
        sink, window = self.plan.sink, self.plan.window
        if self.recent_start is None:
            if self.length - window < int(self.start.max()) + sink:
                return  # some row's sink still overlaps the window: keep everything for now
            batch, heads, _, head_dim = self.stream_keys.shape
            slots = (self.start[:, None] + torch.arange(sink, device=self.start.device))[:, None, :, None]
            index = slots.expand(batch, heads, sink, head_dim)
            sink_keys = self.stream_keys.gather(2, index)
            sink_values = self.stream_values.gather(2, index.expand(-1, -1, -1, self.stream_values.shape[-1]))
        elif self.stream_keys.shape[-2] <= sink + window:
            return
        else:
            sink_keys, sink_values = self.stream_keys[:, :, :sink], self.stream_values[:, :, :sink]
        self.stream_keys = torch.cat([sink_keys, self.stream_keys[:, :, -window:]], dim=-2)
        self.stream_values = torch.cat([sink_values, self.stream_values[:, :, -window:]], dim=-2)
        self.recent_start = self.length - window

    def load(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor | None = None) -> None:
        """Fill an empty layer from every KV head's keys/values (batch, kv_heads, seq_len, head_dim), e.g. a
        prefix computed in a `DynamicCache` under the same plan, and trim at once."""
        if self.is_initialized:
            raise ValueError("load() needs an empty head-wise cache layer")
        self.update(keys, values)
        self.start = start if start is not None else torch.zeros(keys.shape[0], dtype=torch.long, device=keys.device)
        self.commit()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Masks span every position (the full heads see them all); the attention slices the streaming columns."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    if MAX_LENGTH_METHOD != "get_max_length":  # the same method under its name before transformers 5.16
        get_max_cache_shape = get_max_length

    def kv_bytes(self) -> int:
        """Bytes held by this layer's key and value tensors."""
        tensors = (self.keys, self.values, self.stream_keys, self.stream_values)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        self.keys = self.values = self.stream_keys = self.stream_values = None
        self.is_initialized, self.length, self.start, self.recent_start, self._pending = False, 0, None, None, False

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions; possible only while nothing was dropped yet."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of positions to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        if self.recent_start is not None:
            raise ValueError("cannot crop a head-wise cache once its streaming heads dropped positions (the sink and "
                             "window of an earlier length are gone); crop before the context exceeds sink + window")
        self.keys, self.values = self.keys[..., :tokens_to_remove, :], self.values[..., :tokens_to_remove, :]
        self.stream_keys = self.stream_keys[..., :tokens_to_remove, :]
        self.stream_values = self.stream_values[..., :tokens_to_remove, :]
        self.length = max(self.length + tokens_to_remove, 0)

    def _map_batch(self, function) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = function(self.keys), function(self.values)
        self.stream_keys, self.stream_values = function(self.stream_keys), function(self.stream_values)
        if self.start is not None:
            self.start = function(self.start)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams (sinks included)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        super().offload()
        if self.is_initialized:
            self.stream_keys = self.stream_keys.to("cpu", non_blocking=True)
            self.stream_values = self.stream_values.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized and self.stream_keys.device != self.device:
            self.stream_keys = self.stream_keys.to(self.device, non_blocking=True)
            self.stream_values = self.stream_values.to(self.device, non_blocking=True)

    def __repr__(self) -> str:
        return (f"HeadwiseLayer(full={self.plan.full}, streaming={self.plan.streaming}, sink={self.plan.sink}, "
                f"window={self.plan.window}, length={self.length})")


def config_headwise_plan(config, layer_idx: int, groups: int) -> HeadwisePlan | None:
    """The plan of one layer from a config's `sa_headwise` ({"pattern": [[1 full / 0 streaming per KV head] per
    layer], "sink": S, "window": W}), or None when the config has none."""
    settings = getattr(config, "sa_headwise", None)
    if not settings:
        return None
    row = [int(v) for v in settings["pattern"][layer_idx]]
    return HeadwisePlan(tuple(h for h, v in enumerate(row) if v), tuple(h for h, v in enumerate(row) if not v),
                        groups, int(settings["sink"]), int(settings["window"]))


def headwise_cache_from_config(config, groups_per_layer: list[int]) -> Cache:
    """An empty cache for a config with `sa_headwise`: `HeadwiseLayer` where a layer streams, `DynamicLayer` else."""
    layers = []
    for layer, groups in enumerate(groups_per_layer):
        plan = config_headwise_plan(config, layer, groups)
        layers.append(HeadwiseLayer(plan) if plan is not None and plan.streaming else DynamicLayer())
    return Cache(layers=layers)
