"""Head-wise KV cache: retrieval KV heads keep the whole context, the others a sink and a recent window."""

from ..models.headwise_cache_selective_llama import HeadwiseLayer
from .headwise import (
    HeadwiseCache,
    HeadwiseHandle,
    cache_bytes,
    dense_attention,
    headwise_cache,
    prefill,
)
from .policy import HeadwisePolicy
from .selection import (
    Budget,
    headwise_policy,
    kv_budget,
    kv_head_scores,
    load_duo_pattern,
    select_full_kv_heads,
)

__all__ = [
    "Budget",
    "HeadwiseCache",
    "HeadwiseHandle",
    "HeadwiseLayer",
    "HeadwisePolicy",
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
