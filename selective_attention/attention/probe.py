"""Retrieval probe: SDPA attention that also records, per query head, the key each selected query row attends to most.

Retrieval scoring needs, for every answer token, the argmax key of the query row that produced it. Asking the
model for `output_attentions` materialises every (q x kv) weight matrix; the probe computes scores only for the
last `rows` query rows of each call (one row per decode step; the prompt's last row at prefill), so the extra
memory is O(rows x L) per layer, never L x L. The output itself comes from SDPA, unchanged.

The argmax is taken over the masked, scaled (and soft-capped) scores: softmax is monotonic, so it is the argmax
of the attention weights; ties go to the first key, as `torch.argmax` does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from selective_attention.attention.eager import exact_attention_forward
from selective_attention.attention.intervene import intervene
from selective_attention.attention.masked import masked

PROBE_NAME = "sa_probe"
PROBE_ATTRIBUTE = "sa_probe_recorder"


class ProbeRecorder:
    """Collects the per-head argmax keys that `sa_probe` computes during one forward call."""

    def __init__(self, rows: int = 1) -> None:
        self.rows = rows
        self.active = True
        self._layers: dict[int, tuple[torch.Tensor, int]] = {}

    def record(self, layer: int, argmax: torch.Tensor, key_length: int) -> None:
        """`argmax` (B, Hq, rows) indexes this layer's key tensor, which holds `key_length` positions."""
        self._layers[layer] = (argmax, key_length)

    def collect(self, last_position: int) -> torch.Tensor:
        """(num_layers, B, Hq, rows) absolute key positions of the last forward call; clears the buffer.

        `last_position` is the sequence index of the call's last query row. Every layer's key tensor ends at that row,
        but a sliding-window layer's starts later (its cache keeps only the last `window` positions), so each
        index is shifted by `last_position + 1 - key_length` to become a position in the sequence.
        """
        if not self._layers:
            raise RuntimeError("the probe recorded nothing: is the model running with attn_implementation='sa_probe'?")
        layers = [self._layers[layer] for layer in sorted(self._layers)]
        device = layers[0][0].device  # layers may sit on several devices (device_map): gather on the first's
        stacked = torch.stack([argmax.to(device) + key_offset(last_position, key_length)
                               for argmax, key_length in layers])
        self._layers = {}
        return stacked


def key_offset(last_position: int, key_length: int) -> int:
    """Absolute position of index 0 of a key tensor of `key_length` positions ending at `last_position`."""
    offset = last_position + 1 - key_length
    if offset < 0:
        raise ValueError(f"a key tensor of {key_length} positions cannot end at position {last_position}")
    return offset


def _row_argmax(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float | None,
                softcap: float | None, rows: int) -> torch.Tensor:
    """(B, Hq, rows) argmax over keys of the last `rows` query rows, computed per KV group without repeat_kv."""
    batch, q_heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    rows = min(rows, q_len)
    groups = q_heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    compute = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    selected = query[:, :, q_len - rows:].to(compute).reshape(batch, kv_heads, groups * rows, dim)
    scores = torch.matmul(selected, key.to(compute).transpose(2, 3)) * scaling  # (B, Hkv, groups*rows, kv)
    scores = scores.reshape(batch, q_heads, rows, kv_len)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[:, :, attention_mask.shape[2] - rows:, :kv_len]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(compute)
    else:  # pure causal: row r (absolute kv_len - rows + r) sees keys up to itself
        positions = torch.arange(kv_len, device=key.device)
        limit = torch.arange(kv_len - rows, kv_len, device=key.device)
        scores = scores.masked_fill(positions[None, :] > limit[:, None], float("-inf"))
    return scores.argmax(dim=-1)


def probe_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """SDPA output (eager under logit soft-capping, which SDPA lacks); when a `ProbeRecorder` is attached to the module, also the argmax keys of the last rows."""
    recorder: ProbeRecorder | None = getattr(module, PROBE_ATTRIBUTE, None)
    if recorder is not None and recorder.active:
        recorder.record(module.layer_idx, _row_argmax(module, query, key, attention_mask, scaling,
                                                      kwargs.get("softcap"), recorder.rows), key.shape[2])
    output, _ = exact_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                        **kwargs)
    return output, None


#: The registered function: head masks (`mask_heads`) keep working while probing.
probe_attention = masked(probe_attention_forward)


@contextmanager
def probing(model: nn.Module, rows: int = 1) -> Iterator[ProbeRecorder]:
    """Run `model` on `sa_probe` with one recorder attached to every attention module; restores everything after."""
    recorder = ProbeRecorder(rows)
    with intervene(model, PROBE_ATTRIBUTE, lambda layer: recorder, PROBE_NAME, name="probe"):
        yield recorder
