"""Llama, Mistral, Qwen2 or Qwen3 checkpoint -> `selective_llama` with a chosen number of KV heads per layer.

Whole KV heads only (a head's `head_dim` rows of `k_proj`/`v_proj` move together, so RoPE pairs stay intact):

- ``duplicate`` raises a layer's KV heads: each query group is split and every new KV head is an exact copy of
  the old head it came from, so the model computes exactly the same function;
- ``mean`` lowers them by mean-pooling contiguous KV heads (Ainslie et al. 2023, "GQA");
- ``similarity`` lowers them by merging the KV heads whose key/value activations on calibration text are most
  alike: it searches groupings (exhaustively when few, else by local search from the contiguous grouping) for the
  least reconstruction error, and the contiguous grouping is always a candidate, so it is never worse than mean.

Reconstruction error of a layer: over calibration tokens and query heads, ||K_new - K||^2 / ||K||^2 averaged with
the same for V (RoPE rotates every head of a position alike, so it does not change the error). K is the output of
`k_proj` (bias included); on Qwen3 that is before the per-head q/k RMSNorm, which merging cannot pass through.

The steps live in `conversion/` (source, plan, calibration, grouping, surgery); this module runs them in order and
writes the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from selective_attention.cache.checkpoint import checkpoint_pattern, headwise_request
from selective_attention.gqa.configuration_selective_llama import SelectiveLlamaConfig
from selective_attention.gqa.conversion.calibration import (
    calibration_token_ids,
    default_calibration_texts,
    kv_gram_matrices,
)
from selective_attention.gqa.conversion.grouping import best_partition, contiguous_partition
from selective_attention.gqa.conversion.plan import (
    ConversionReport,
    LayerReport,
    check_target,
    parse_kv_heads,
    plan_layer,
    query_groups,
)
from selective_attention.gqa.conversion.source import (
    SUPPORTED_MODEL_TYPES,
    WINDOW_KEYS,
    load_source,
    selective_settings,
    source_layout,
)
from selective_attention.gqa.conversion.surgery import build_converted
from selective_attention.gqa.modeling_selective_llama import SelectiveLlamaForCausalLM

logger = logging.getLogger(__name__)

METHODS = ("duplicate", "mean", "similarity")
DROPPED_CONFIG_KEYS = ("model_type", "auto_map", "architectures", "transformers_version", "quantization_config",
                       "_name_or_path", "num_key_value_heads_per_layer", "kv_head_map", "conversion")
REPORT_FILE = "conversion_report.json"


def convert_model(
    model_or_path=None,
    kv_heads=None,
    method: str = "duplicate",
    calibration_texts: list[str] | None = None,
    *,
    tokenizer=None,
    calibration_ids: torch.Tensor | None = None,
    calibration_tokens: int = 512,
    out_dir: str | Path | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    headwise: dict | None = None,
) -> tuple[SelectiveLlamaForCausalLM, ConversionReport]:
    """Convert a Llama, Mistral, Qwen2 or Qwen3 model (or a selective_llama) to `selective_llama`.

    `kv_heads`: a list (one count per layer), {layer: count}, or a string ("9", "15:16,14:1", "all:1").
    Layers that gain heads are always duplicated (exact); layers that lose heads use `method` (mean | similarity).
    With `out_dir`, the checkpoint (+ tokenizer, `conversion_report.json`) is written to a temporary folder and
    moved into place only when complete.
    `headwise`: keyword arguments of `selective_attention.cache.checkpoint.headwise_request` (scores, full, sink,
    window, ...): the config then carries a head-wise KV pattern (`sa_headwise`) that `generate` uses.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if kv_heads is None:
        raise ValueError("kv_heads is required (e.g. '9', '29:1' or a list with one count per layer)")
    out_path = Path(out_dir).expanduser() if out_dir is not None else None
    if out_path is not None and out_path.exists() and not overwrite:
        raise ValueError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it")

    source_model, loaded_tokenizer, source_name = load_source(model_or_path, dtype)
    tokenizer = tokenizer or loaded_tokenizer
    config = source_model.config
    num_heads, num_layers = config.num_attention_heads, config.num_hidden_layers
    source_counts, source_maps = source_layout(config)
    targets = parse_kv_heads(kv_heads, source_counts)
    for layer in range(num_layers):  # validate every layer before any calibration work
        check_target(layer, num_heads, source_counts[layer], targets[layer],
                     query_groups(source_maps[layer], source_counts[layer]), method)
    if headwise is not None:
        headwise = headwise_request(**headwise, num_layers=num_layers, num_heads=num_heads,
                                    context=getattr(config, "max_position_embeddings", None))

    merged_layers = [layer for layer in range(num_layers) if targets[layer] < source_counts[layer]]
    grams: dict[int, tuple] = {}
    used_tokens = 0
    if merged_layers:
        if calibration_ids is None:
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(source_model.name_or_path)
                except Exception:
                    tokenizer = None
            calibration_ids = calibration_token_ids(tokenizer, calibration_texts, calibration_tokens)
        used_tokens = int(calibration_ids.numel())
        grams = kv_gram_matrices(source_model, calibration_ids, merged_layers, source_counts)

    reports, maps, origins = [], [], []
    for layer in range(num_layers):
        report, new_map, origin = plan_layer(layer, num_heads, source_counts[layer], targets[layer],
                                             source_maps[layer], method, grams.get(layer))
        reports.append(report)
        maps.append(new_map)
        origins.append(origin)
    report = ConversionReport(source=source_name, method=method, calibration_tokens=used_tokens, layers=reports)

    settings = {k: v for k, v in config.to_dict().items() if k not in DROPPED_CONFIG_KEYS + WINDOW_KEYS}
    settings.update(selective_settings(config))
    settings.update(num_key_value_heads_per_layer=targets, kv_head_map=maps, conversion={
        "method": method, "source": source_name, "source_kv_heads": source_counts,
        "layer_errors": report.errors, "groups": [row.groups for row in reports],
        "calibration_tokens": used_tokens,
    })
    if headwise is not None:
        settings["sa_headwise"] = checkpoint_pattern(headwise, maps, targets, settings.get("sliding_window_per_layer"))
    new_config = SelectiveLlamaConfig(**settings)
    new_config._attn_implementation = config._attn_implementation
    model = build_converted(source_model, new_config, reports, origins, source_counts, dtype,
                            share=not isinstance(model_or_path, PreTrainedModel))
    changed = [row for row in reports if row.method != "keep"]
    logger.info("converted %s (%s): %d layers changed, max error %.4f", source_name, method, len(changed),
                max((row.error for row in changed), default=0.0))
    logger.debug("%s", report.table())
    if out_path is not None:
        save_converted(model, tokenizer, report, out_path, overwrite=overwrite)
    return model, report


def save_converted(model, tokenizer, report: ConversionReport, out_path: Path, overwrite: bool = False) -> Path:
    """Write checkpoint + tokenizer + report into a temporary sibling folder, then move it to `out_path`."""
    out_path = Path(out_path).expanduser()
    if out_path.exists() and not overwrite:
        raise ValueError(f"{out_path} already exists; pass overwrite=True (--overwrite) to replace it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        backup = None
        if out_path.exists():
            backup = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
            os.replace(out_path, backup)
        os.replace(staging, out_path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", out_path)
    return out_path


__all__ = [
    "METHODS",
    "SUPPORTED_MODEL_TYPES",
    "ConversionReport",
    "LayerReport",
    "best_partition",
    "calibration_token_ids",
    "contiguous_partition",
    "convert_model",
    "default_calibration_texts",
    "kv_gram_matrices",
    "load_source",
    "parse_kv_heads",
    "save_converted",
]
