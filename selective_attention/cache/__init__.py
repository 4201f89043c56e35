"""Head-wise KV cache: retrieval KV heads keep the whole context, the others a sink and a recent window."""

from selective_attention.cache.headwise import (
    HeadwiseCache,
    HeadwiseHandle,
    attach_headwise,
    cache_bytes,
    dense_attention,
    headwise_cache,
    prefill,
)
from selective_attention.cache.policy import HeadwisePolicy
from selective_attention.cache.selection import (
    Budget,
    headwise_policy,
    kv_budget,
    kv_head_scores,
    load_duo_pattern,
    select_full_kv_heads,
)
from selective_attention.gqa.headwise_cache_selective_llama import HeadwiseLayer

__all__ = [
    "Budget",
    "HeadwiseCache",
    "HeadwiseHandle",
    "HeadwiseLayer",
    "HeadwisePolicy",
    "attach_headwise",
    "cache_bytes",
    "dense_attention",
    "headwise_cache",
    "headwise_policy",
    "kv_budget",
    "kv_head_scores",
    "load_duo_pattern",
    "prefill",
    "select_full_kv_heads",
]
