"""Loading the model to convert: supported families, its KV layout, and checkpoints refused when incomplete."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selective_attention.loading import assets
from selective_attention.modeling import gguf_dequantize_kwargs

logger = logging.getLogger(__name__)

#: model_type -> the selective_llama flags that reproduce its attention (sliding windows are read per layer)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},  # sliding window on every layer when `sliding_window` is set
    "qwen2": {"qkv_bias": True},  # biases on q/k/v, none on o_proj
    "qwen3": {"qk_norm": True},  # RMSNorm over head_dim on q and k heads; windows on `layer_types` sliding layers
    "selective_llama": {},  # its own config carries every flag
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
#: source config keys that selective_llama replaces by `sliding_window_per_layer` (transformers' caches read
#: these names and would then keep only the window's keys)
WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types")


def source_layout(config) -> tuple[list[int], list[list[int]]]:
    """(KV heads per layer, query->KV map per layer) of a supported config (one layout for all but selective_llama)."""
    if getattr(config, "model_type", None) == "selective_llama":
        return list(config.num_key_value_heads_per_layer), [list(row) for row in config.kv_head_map]
    heads = config.num_attention_heads
    kv = config.num_key_value_heads or heads
    return [kv] * config.num_hidden_layers, [[h // (heads // kv) for h in range(heads)]] * config.num_hidden_layers


def check_model_type(config, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source} is a {model_type!r} model; convert supports these model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def sliding_windows(config) -> list[int | None] | None:
    """The source's sliding window per layer (None: full attention), or None when no layer slides."""
    window = getattr(config, "sliding_window", None)  # Qwen2/3 set it to None unless use_sliding_window
    if window is None:
        return None
    kinds = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    windows = [int(window) if kind == "sliding_attention" else None for kind in kinds]
    return windows if any(w is not None for w in windows) else None


def selective_settings(config) -> dict:
    """selective_llama config fields beyond Llama's that make the converted attention compute the source's."""
    if config.model_type == "selective_llama":
        return {}
    return {**FAMILIES[config.model_type], "sliding_window_per_layer": sliding_windows(config)}


def load_source(model_or_path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer or None, name) for a model object, HF id, local dir, .gguf file or None (embedded model).

    Refuses checkpoints whose tensors are missing or do not match the config: transformers would otherwise fill
    them with random values (which is how the reference conversion silently left a layer random).
    """
    if isinstance(model_or_path, PreTrainedModel):
        check_model_type(model_or_path.config, type(model_or_path).__name__)
        return model_or_path, None, str(getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__)
    if model_or_path is None:
        model_or_path = assets.model_dir()
    name = str(model_or_path)
    kwargs: dict = {}
    source = name
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf") or os.path.exists(name)
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"model path {name} does not exist")
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        source = str(path.parent)
        kwargs = dict(gguf_file=path.name)
    config = AutoConfig.from_pretrained(source, **kwargs)
    check_model_type(config, name)
    load_kwargs = dict(kwargs)
    if "gguf_file" in kwargs:
        load_kwargs.update(gguf_dequantize_kwargs())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, output_loading_info=True, **load_kwargs)
    except (RuntimeError, OSError) as error:
        raise ValueError(f"cannot load {name}: {error}") from error
    problems = {key: info.get(key) for key in ("missing_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"{name} is not a complete checkpoint for its config (tensors would be left random): "
                         + "; ".join(f"{key}: {sorted(map(str, value))[:8]}" for key, value in problems.items()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as error:  # a checkpoint without tokenizer files still converts
        logger.warning("no tokenizer for %s (%s)", name, error)
        tokenizer = None
    return model.eval(), tokenizer, name
