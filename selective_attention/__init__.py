"""selective-attention: head-level attention surgery for Hugging Face Transformers.

Importing the package registers its attention functions (`sa_masked_sdpa`, `sa_masked_eager`, ...) with
transformers' `AttentionInterface` and `AttentionMaskInterface`.
"""

from selective_attention.registry import register_all as _register_all

_register_all()

from selective_attention.attention.masked import MASK_MODES, HeadMask  # noqa: E402
from selective_attention.cache import HeadwiseCache, HeadwisePolicy, headwise_cache  # noqa: E402
from selective_attention.gqa import SelectiveLlamaConfig, SelectiveLlamaForCausalLM  # noqa: E402  (registers selective_llama)
from selective_attention.heads.ids import head_key, parse_heads  # noqa: E402
from selective_attention.heads.masking import apply_config_head_mask, mask_heads, masked_heads, unmask_heads  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MASK_MODES",
    "HeadMask",
    "HeadwiseCache",
    "HeadwisePolicy",
    "SelectiveLlamaConfig",
    "SelectiveLlamaForCausalLM",
    "apply_config_head_mask",
    "head_key",
    "headwise_cache",
    "mask_heads",
    "masked_heads",
    "parse_heads",
    "unmask_heads",
]
