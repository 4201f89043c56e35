"""Head-wise attention kernel: full KV heads attend to every key, streaming KV heads to a sink and a recent window
only (DuoAttention's split).

Part of the Hub modeling code (imports only torch and transformers): `selective_llama` checkpoints carry it, and
selective-attention registers it as `sa_headwise_sdpa` for any model.

The split is per KV head: a KV head is either full or streaming, and so are all the query heads it serves. A
streaming query at cache position `p` sees the first `sink` real positions of its row and the positions
`p - window .. p`; a full query sees every earlier position. Padding and causality come from the attention mask,
whose columns are cache positions.

Each attention module carries a `HeadwisePlan` (`PLAN_ATTRIBUTE`). The keys reaching `headwise_attention` are either
- a plain tensor of every KV head (no cache, or a `DynamicCache`): the policy is applied over all positions, so a
  recomputation without cache gives what the head-wise cache gives; or
- the full heads' keys from a `HeadwiseLayer`, which rides on the tensor (`LAYER_ATTRIBUTE`) and holds the
  streaming heads' sink and recent keys; after attention the layer is told to trim them (`commit`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PLAN_ATTRIBUTE = "sa_headwise_plan"
#: Attribute of the key tensor returned by `HeadwiseLayer.update`: the layer itself.
LAYER_ATTRIBUTE = "sa_headwise_layer"


@dataclass
class HeadwisePlan:
    """The KV heads of one attention module that keep every position (`full`) or sink + window (`streaming`)."""

    full: tuple[int, ...]
    streaming: tuple[int, ...]
    groups: int  # query heads per KV head
    sink: int
    window: int
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """Long index on `device`: "full_kv", "streaming_kv" (KV heads) or "full_q", "streaming_q" (query heads)."""
        key = (name, device)
        if key not in self._index:
            kv_heads = self.full if name.startswith("full") else self.streaming
            if name.endswith("_q"):  # query heads of a KV head, in repeat_kv order
                heads = [kv * self.groups + g for kv in kv_heads for g in range(self.groups)]
            else:
                heads = list(kv_heads)
            self._index[key] = torch.tensor(heads, dtype=torch.long, device=device)
        return self._index[key]


def first_real_positions(attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """(batch,) long: cache position of each row's first real token (left padding), read from the mask's last row."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = attention_mask[:, 0, -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    return visible.to(torch.int8).argmax(dim=-1).expand(batch).to(torch.long)


#: Query rows per streaming-attention block: a block of rows needs only the sink and the window before it, so
#: long prefills cost O(rows x (sink + window + block)) instead of O(rows x context).
BLOCK_ROWS = 512


def _visibility(attention_mask: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor, slots: int,
                start: torch.Tensor, sink: int, window: int) -> torch.Tensor | None:
    """(batch, 1, rows, slots + cols) bool: which streaming keys each query row sees; None when all of them.

    `rows`: cache positions of the query rows; `cols`: cache positions of the keys after the `slots` sink slots
    (those hold each row's first real positions, always visible); `attention_mask` (batch, 1, rows, total)."""
    causal = cols[None, :] <= rows[:, None]
    visible = causal & (rows[:, None] - cols[None, :] <= window)  # (rows, cols)
    offset = cols[None, :] - start[:, None]
    in_sink = (offset >= 0) & (offset < sink)  # (batch, cols): a row's sink positions still among the keys
    visible = visible[None] | (in_sink[:, None, :] & causal[None])
    if attention_mask is not None:  # (batch, 1, rows, total): padding and causality by cache position
        base = attention_mask[:, 0].index_select(-1, cols)
        visible = visible & (base if base.dtype == torch.bool else base == 0)
    elif bool(visible.all()):
        return None
    if slots:
        visible = torch.cat([visible.new_ones(visible.shape[0], rows.shape[0], slots), visible], dim=-1)
    return visible[:, None]


def _streaming_attention(attention, module, query, keys, values, attention_mask, start: torch.Tensor, total: int,
                         recent_start: int | None, plan: HeadwisePlan, dropout: float, scaling, kwargs
                         ) -> torch.Tensor:
    """query (batch, heads, q, head_dim) of the streaming heads; keys/values (batch, kv_heads, kept, head_dim): every
    position when `recent_start` is None, else `sink` slots + positions recent_start..total-1.
    Returns (batch, q, heads, head_dim)."""
    device, q_len = query.device, query.shape[2]
    slots, first = (0, 0) if recent_start is None else (plan.sink, recent_start)
    sink_end = int(start.max()) + plan.sink if recent_start is None else 0  # sinks still among the positions
    outputs = []
    for r0 in range(0, q_len, BLOCK_ROWS):
        r1 = min(q_len, r0 + BLOCK_ROWS)
        low, high = total - q_len + r0 - plan.window, total - q_len + r1  # window positions of this block
        ranges = [(a, b) for a, b in [(first, min(sink_end, high)), (max(low, sink_end, first), high)] if b > a]
        if len(ranges) == 2 and ranges[0][1] == ranges[1][0]:
            ranges = [(ranges[0][0], ranges[1][1])]
        cols = torch.cat([torch.arange(a, b, device=device) for a, b in ranges])
        if ranges == [(first, total)]:
            block_keys, block_values = keys, values
        else:
            pieces = [(0, slots)] if slots else []
            pieces += [(a - first + slots, b - first + slots) for a, b in ranges]
            block_keys = torch.cat([keys[:, :, a:b] for a, b in pieces], dim=2)
            block_values = torch.cat([values[:, :, a:b] for a, b in pieces], dim=2)
        rows = torch.arange(total - q_len + r0, total - q_len + r1, device=device)
        block_mask = None if attention_mask is None else attention_mask[:, :, r0:r1]
        mask = _visibility(block_mask, rows, cols, slots, start, plan.sink, plan.window)
        outputs.append(_group_attention(attention, module, query[:, :, r0:r1], block_keys, block_values, mask,
                                        dropout, scaling, False if mask is None else None, **kwargs))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def _group_attention(attention, module, query, key, value, mask, dropout, scaling, is_causal, **kwargs
                     ) -> torch.Tensor:
    """Attention of one head group: (batch, q, heads, head_dim)."""
    return attention(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                     **kwargs)[0]


def headwise_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       attention: Callable = sdpa_attention_forward, **kwargs) -> tuple[torch.Tensor, None]:
    """query (batch, heads, q, head_dim); key/value (batch, kv_heads, kv, head_dim) or a `HeadwiseLayer`'s full
    heads. `attention`: the kernel each head group runs (an `AttentionInterface` function). Returns
    (batch, q, heads, head_dim) and no weights."""
    plan: HeadwisePlan | None = getattr(module, PLAN_ATTRIBUTE, None)
    layer = getattr(key, LAYER_ATTRIBUTE, None)
    kwargs.pop("is_causal", None)
    if plan is None or not plan.streaming:
        if layer is not None:
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} has a head-wise cache but its attention "
                             "module has no head-wise plan: build the cache and the plans from one policy")
        return attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, num_heads, q_len, head_dim = query.shape
    device = query.device
    if layer is None:
        if key.shape[1] * plan.groups != num_heads:
            raise ValueError(f"head-wise attention got {key.shape[1]} KV heads for {num_heads} query heads; the plan "
                             f"expects {num_heads // plan.groups}")
        total = key.shape[2]
        full_key = key.index_select(1, plan.index("full_kv", device))
        full_value = value.index_select(1, plan.index("full_kv", device))
        stream_key = key.index_select(1, plan.index("streaming_kv", device))
        stream_value = value.index_select(1, plan.index("streaming_kv", device))
        start = first_real_positions(attention_mask, batch, device)
        recent_start = None
    else:
        if layer.plan.streaming != plan.streaming:
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')}: the cache streams KV heads "
                             f"{layer.plan.streaming}, the module's plan {plan.streaming}; build the cache and the "
                             "plans from one policy")
        total = layer.length
        full_key, full_value = key, value
        stream_key, stream_value = layer.stream_keys, layer.stream_values
        if layer.start is None:
            layer.start = first_real_positions(attention_mask, batch, device)
        start, recent_start = layer.start, layer.recent_start
    output = query.new_empty(batch, q_len, num_heads, head_dim)
    if plan.full:
        full_q = plan.index("full_q", device)
        out = _group_attention(attention, module, query.index_select(1, full_q), full_key, full_value,
                               attention_mask, dropout, scaling, None, **kwargs)
        output.index_copy_(2, full_q, out)
    stream_q = plan.index("streaming_q", device)
    out = _streaming_attention(attention, module, query.index_select(1, stream_q), stream_key, stream_value,
                               attention_mask, start, total, recent_start, plan, dropout, scaling, kwargs)
    output.index_copy_(2, stream_q, out)
    if layer is not None:
        layer.commit()
    return output, None
