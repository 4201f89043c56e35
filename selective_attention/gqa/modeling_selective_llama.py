"""`selective_llama`: Llama with a per-layer number of KV heads and an arbitrary query-head -> KV-head map.

Self-contained on purpose: it imports only torch and transformers (plus its sibling files), so a saved
checkpoint loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` in a process where
selective-attention is not installed.

- Each layer's `k_proj`/`v_proj` have that layer's own KV-head count, and so does its KV cache (DynamicCache
  sizes layers independently).
- A layer whose map is the contiguous, equal-group layout takes transformers' fast GQA path
  (`num_key_value_groups`); any other map gathers the per-query-head K/V with `index_select` first.
- Attention dispatches through `ALL_ATTENTION_FUNCTIONS.get_interface(...)`: every registered function works on it.
- A head mask persisted in the config (`sa_masked_heads`, `sa_mask_mode`) is applied by this model itself
  (`head_mask_selective_llama.py`) when the attention implementation is not one of selective-attention's own
  (`sa_*`, which apply it themselves).
- Converted Mistral / Qwen2 / Qwen3 attention: q/k/v biases (`qkv_bias`), per-head q/k RMSNorm (`qk_norm`) and
  sliding windows (`sliding_window_per_layer`). A sliding layer keeps every key in its cache and applies the
  window in the mask (flash attention gets `sliding_window` instead): the same outputs as the source, more memory.
- A head-wise KV pattern in the config (`sa_headwise`: full / streaming per KV head, sink, window) makes `generate`
  build a head-wise cache and the streaming heads attend to sink + window only
  (`headwise_*_selective_llama.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from .configuration_selective_llama import SelectiveLlamaConfig
from .head_mask_selective_llama import ablate_after, ablate_before, config_head_masks
from .headwise_attention_selective_llama import PLAN_ATTRIBUTE, headwise_attention
from .headwise_cache_selective_llama import config_headwise_plan, headwise_cache_from_config

MASK_ATTRIBUTE = "sa_head_mask"  # the attribute selective_attention.mask_heads sets on attention modules
PLUGIN_PREFIX = "sa_"  # selective-attention's registered attention functions apply head masks themselves
HEADWISE_IMPLEMENTATION = "sa_headwise_sdpa"  # selective-attention's registered head-wise attention

AUTO_MAP = {
    "AutoConfig": "configuration_selective_llama.SelectiveLlamaConfig",
    "AutoModel": "modeling_selective_llama.SelectiveLlamaModel",
    "AutoModelForCausalLM": "modeling_selective_llama.SelectiveLlamaForCausalLM",
    "AutoModelForSequenceClassification": "modeling_selective_llama.SelectiveLlamaForSequenceClassification",
}


# Copied from transformers.models.llama.modeling_llama.repeat_kv
def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """
    This is the equivalent of torch.repeat_interleave(x, dim=1, repeats=n_rep). The hidden states go from (batch,
    num_key_value_heads, seqlen, head_dim) to (batch, num_attention_heads, seqlen, head_dim)
    """
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


# Copied from selective_attention.attention.eager.eager_attention_forward
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QK^T * scaling + mask) V, returning (B, q, Hq, D) and the (B, Hq, q, kv) weights."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def sliding_window_mask(attention_mask, query_length: int, key_length: int, window: int, device):
    """`attention_mask` (None, or 4D bool / additive (B, 1, q, >= kv)) restricted to the last `window` positions.

    The keys are this layer's whole cache (B, Hkv, key_length, D), ending at the last query row, so query row i sits
    at position key_length - query_length + i and sees key j when i's position - window < j <= i's position.
    """
    rows = torch.arange(key_length - query_length, key_length, device=device)[:, None]
    keys = torch.arange(key_length, device=device)[None, :]
    inside = (keys <= rows) & (keys > rows - window)  # (q, kv)
    if attention_mask is None:
        return inside[None, None]
    mask = attention_mask[..., :key_length]
    if mask.dtype == torch.bool:
        return mask & inside
    return mask.masked_fill(~inside, torch.finfo(mask.dtype).min)


class SelectiveLlamaAttention(nn.Module):
    """Llama attention with this layer's own KV-head count and query-head -> KV-head map."""

    def __init__(self, config: SelectiveLlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads_per_layer[layer_idx]
        kv_map = list(config.kv_head_map[layer_idx])
        group = self.num_heads // self.num_kv_heads
        self.contiguous = self.num_heads % self.num_kv_heads == 0 and kv_map == [h // group for h in range(self.num_heads)]
        # Fast GQA path for the standard layout; otherwise K/V are gathered per query head (groups of 1).
        self.num_key_value_groups = group if self.contiguous else 1
        self.kv_map = kv_map  # a plain list, not a buffer: buffers are not restored by meta-device loading
        self._kv_index: dict = {}
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias or config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        # Qwen3: one RMSNorm over head_dim shared by every head, so it survives copying and merging KV heads.
        norm = (lambda: LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()
        windows = config.sliding_window_per_layer
        self.sliding_window = windows[layer_idx] if windows else None
        setattr(self, MASK_ATTRIBUTE, config_head_masks(config).get(layer_idx))
        plan = config_headwise_plan(config, layer_idx, group)
        if plan is not None and plan.streaming and (not self.contiguous or self.sliding_window is not None):
            raise ValueError(f"layer {layer_idx}: head-wise streaming needs a full-attention layer with contiguous "
                             "query groups")
        setattr(self, PLAN_ATTRIBUTE, plan)

    def kv_index(self, device) -> torch.Tensor:
        if device not in self._kv_index:
            self._kv_index[device] = torch.tensor(self.kv_map, dtype=torch.long, device=device)
        return self._kv_index[device]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:  # the cache stores this layer's own KV heads, before any gathering
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        if not self.contiguous:
            index = self.kv_index(key_states.device)
            key_states = key_states.index_select(1, index)
            value_states = value_states.index_select(1, index)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        implementation = self.config._attn_implementation or ""
        if self.sliding_window is not None and "flash" not in implementation:
            if getattr(cache, "is_compileable", False):  # static caches are longer than the keys seen so far
                raise ValueError("selective_llama sliding-window layers need a dynamic cache (DynamicCache)")
            attention_mask = sliding_window_mask(attention_mask, query_states.shape[2], key_states.shape[2],
                                                 self.sliding_window, query_states.device)
        mask = getattr(self, MASK_ATTRIBUTE, None)
        own_mask = mask if mask is not None and mask.heads and not implementation.startswith(PLUGIN_PREFIX) else None
        if own_mask is not None:
            query_states = ablate_before(own_mask, query_states)

        plan = getattr(self, PLAN_ATTRIBUTE, None)
        if plan is not None and plan.streaming and implementation != HEADWISE_IMPLEMENTATION:
            if implementation.startswith(PLUGIN_PREFIX):
                raise ValueError(f"a head-wise selective_llama attends through {HEADWISE_IMPLEMENTATION!r} or a base "
                                 f"implementation, not {implementation!r}")
            kwargs["attention"] = attention_interface  # each head group runs the model's own kernel
            attention_interface = headwise_attention
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        if own_mask is not None:
            attn_output = ablate_after(own_mask, attn_output, attention_mask, key_states.shape[2])

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


# Each class calls its Llama parent's `__init__` and replaces what differs. Built directly, the replaced Llama modules
# are allocated and dropped; `from_pretrained` and the converter build on the meta device, where that costs nothing.


class SelectiveLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: SelectiveLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = SelectiveLlamaAttention(config=config, layer_idx=layer_idx)


class SelectiveLlamaPreTrainedModel(LlamaPreTrainedModel):
    config_class = SelectiveLlamaConfig
    config: SelectiveLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["SelectiveLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": SelectiveLlamaDecoderLayer, "attentions": SelectiveLlamaAttention}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes `auto_map` for every auto class and copies this file and the configuration file."""
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class SelectiveLlamaModel(SelectiveLlamaPreTrainedModel, LlamaModel):
    _auto_class = "AutoModel"

    def __init__(self, config: SelectiveLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            [SelectiveLlamaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.post_init()


class SelectiveLlamaForCausalLM(SelectiveLlamaPreTrainedModel, LlamaForCausalLM):
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config: SelectiveLlamaConfig):
        super().__init__(config)
        self.model = SelectiveLlamaModel(config)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """With `sa_headwise` in the config, `generate` uses a head-wise cache unless the caller passed a cache."""
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if getattr(self.config, "sa_headwise", None) and given is None and generation_config.use_cache is not False:
            name = "cache" if "cache" in model_kwargs else "past_key_values"
            groups = [layer.self_attn.num_key_value_groups for layer in self.model.layers]
            model_kwargs[name] = headwise_cache_from_config(self.config, groups)
        return result


class SelectiveLlamaForSequenceClassification(SelectiveLlamaPreTrainedModel, LlamaForSequenceClassification):
    _auto_class = "AutoModelForSequenceClassification"

    def __init__(self, config: SelectiveLlamaConfig):
        # The parent builds its body with `AutoModel.from_config(config)`. Register SelectiveLlamaModel for this
        # config's class: under remote code, transformers loads the configuration file once more for the config
        # object, so its class is not the one imported above.
        AutoModel.register(type(config), SelectiveLlamaModel, exist_ok=True)
        super().__init__(config)


SelectiveLlamaConfig._auto_class = "AutoConfig"

__all__ = [
    "SelectiveLlamaForCausalLM",
    "SelectiveLlamaForSequenceClassification",
    "SelectiveLlamaModel",
    "SelectiveLlamaPreTrainedModel",
]
