"""Configuration of `selective_llama`: a Llama whose layers each have their own number of KV heads.

Self-contained (imports only transformers and huggingface_hub, which transformers depends on) so that a saved
checkpoint loads with `trust_remote_code=True` where selective-attention is not installed.

Fields beyond `LlamaConfig`:
- `num_key_value_heads_per_layer`: KV heads of each layer (the KV cache of layer i holds that many heads);
- `kv_head_map`: per layer, for each query head the index of the KV head it reads (groups may be uneven or
  non-contiguous); defaults to the contiguous GQA layout `h // (num_attention_heads // kv_heads)`;
- `conversion`: how the checkpoint was made (method, source model, per-layer reconstruction error), or None;
- `sa_masked_heads` / `sa_mask_mode`: a persisted head mask ("L-H" strings, zero | uniform | mean), applied on load;
- `qkv_bias`: biases on q/k/v only (Qwen2); `attention_bias` keeps Llama's meaning (all four projections);
- `qk_norm`: RMSNorm over `head_dim` on every query and key head before RoPE (Qwen3);
- `sliding_window_per_layer`: each layer's sliding window, None for full attention (Mistral, Qwen2/3 windows).
`num_key_value_heads` is kept as the largest per-layer count, for tools that read a single number.

The windows are not called `sliding_window` / `layer_types` on purpose: transformers' caches read those names and
would keep only the window's keys; selective_llama keeps every key and applies the window in the attention mask.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MASK_MODES = ("zero", "uniform", "mean")


def contiguous_map(num_heads: int, kv_heads: int) -> list[int]:
    """Query head -> KV head for standard GQA: `num_heads // kv_heads` consecutive query heads share a KV head."""
    group = num_heads // kv_heads
    return [head // group for head in range(num_heads)]


@strict
class SelectiveLlamaConfig(LlamaConfig):
    model_type = "selective_llama"

    num_key_value_heads_per_layer: list[int] | None = None
    kv_head_map: list[list[int]] | None = None
    conversion: dict | None = None
    sa_masked_heads: list[str] | None = None
    sa_mask_mode: str | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window_per_layer: list[int | None] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers, heads = self.num_hidden_layers, self.num_attention_heads
        if self.num_key_value_heads_per_layer is None:
            self.num_key_value_heads_per_layer = [self.num_key_value_heads] * layers
        counts = [int(count) for count in self.num_key_value_heads_per_layer]
        if len(counts) != layers:
            raise ValueError(f"num_key_value_heads_per_layer has {len(counts)} entries for {layers} layers")
        if self.kv_head_map is None:
            for layer, count in enumerate(counts):
                if count < 1 or heads % count:
                    raise ValueError(
                        f"layer {layer}: {heads} query heads cannot form equal groups over {count} KV heads; "
                        "give kv_head_map for uneven groups"
                    )
            self.kv_head_map = [contiguous_map(heads, count) for count in counts]
        self.kv_head_map = [[int(kv) for kv in row] for row in self.kv_head_map]
        if len(self.kv_head_map) != layers:
            raise ValueError(f"kv_head_map has {len(self.kv_head_map)} rows for {layers} layers")
        for layer, (row, count) in enumerate(zip(self.kv_head_map, counts)):
            if len(row) != heads:
                raise ValueError(f"kv_head_map[{layer}] has {len(row)} entries for {heads} query heads")
            if sorted(set(row)) != list(range(count)):
                raise ValueError(
                    f"kv_head_map[{layer}] must use every KV head 0..{count - 1} (each KV head serves at least one "
                    f"query head); got {row}"
                )
        self.num_key_value_heads_per_layer = counts
        self.num_key_value_heads = max(counts)
        windows = self.sliding_window_per_layer
        if windows is not None and (len(windows) != layers or any(w is not None and int(w) < 1 for w in windows)):
            raise ValueError(f"sliding_window_per_layer needs one window >= 1 (or null) per layer; got {windows}")
        if self.sa_mask_mode is not None and self.sa_mask_mode not in MASK_MODES:
            raise ValueError(f"sa_mask_mode must be one of {MASK_MODES}, got {self.sa_mask_mode!r}")


__all__ = ["SelectiveLlamaConfig", "contiguous_map"]
