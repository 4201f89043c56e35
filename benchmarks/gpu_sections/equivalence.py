"""Section 1: masked attention with no mask == the plain kernel; zero ablation == zeroing `o_proj` input columns.

For each kernel (sdpa, eager, flash_attention_2 when flash-attn imports) and half dtype (bf16, fp16), on a
left-padded batch of two (so the masked names must also build the right padding mask):
- `sa_masked_<kernel>` with no head masked must give bit-identical logits (it calls the same kernel): tolerance 0;
- `mask_heads(..., "zero")` must equal the plain kernel with the masked heads' input columns of `o_proj` zeroed:
  max |difference| <= RTOL[dtype] x max |logits| (a different rounding order is allowed, nothing more).
Only the logits of real (non-padding) tokens are compared.
"""

from __future__ import annotations

import torch

from selective_attention import mask_heads
from selective_attention.registry import FLASH_ATTN_AVAILABLE, MASKED_VARIANTS

from .common import Suite, check, random_ids, random_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
RTOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}
KERNELS = ("sdpa", "eager", "flash_attention_2")


def _logits(model, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=attention_mask).logits[attention_mask.bool()].float()


def _zero_columns(model, heads: list[tuple[int, int]]) -> list[tuple[torch.nn.Linear, torch.Tensor]]:
    """Zero the `o_proj` input columns of `heads` in place; returns (layer, saved weight) to restore."""
    saved = []
    layers = model.model.layers
    dim = model.config.head_dim
    for layer, head in heads:
        o_proj = layers[layer].self_attn.o_proj
        saved.append((o_proj, o_proj.weight.detach().clone()))
        with torch.no_grad():
            o_proj.weight[:, head * dim:(head + 1) * dim] = 0
    return saved


def _compare(model, kernel: str, ids, attention_mask, heads) -> tuple[dict, list[dict]]:
    model.set_attn_implementation(kernel)
    plain = _logits(model, ids, attention_mask)
    model.set_attn_implementation(MASKED_VARIANTS[kernel])
    unmasked = _logits(model, ids, attention_mask)
    model.set_attn_implementation(kernel)
    with mask_heads(model, heads, "zero"):
        ablated = _logits(model, ids, attention_mask)
    saved = _zero_columns(model, heads)
    try:
        columns = _logits(model, ids, attention_mask)
    finally:
        with torch.no_grad():
            for o_proj, weight in saved:
                o_proj.weight.copy_(weight)
    dtype = model.dtype
    name = f"{kernel} {NAMES[dtype]}"
    no_mask_diff = float((unmasked - plain).abs().max())
    zero_diff = float((ablated - columns).abs().max())
    zero_tol = RTOL[dtype] * float(columns.abs().max())
    changed = float((ablated - plain).abs().max())
    row = dict(kernel=kernel, masked_name=MASKED_VARIANTS[kernel], no_mask_max_abs_diff=no_mask_diff,
               zero_vs_o_proj_max_abs_diff=zero_diff, zero_tolerance=zero_tol, ablation_changes_logits_by=changed)
    checks = [check(f"{name}: {MASKED_VARIANTS[kernel]} without mask == {kernel}", no_mask_diff == 0.0,
                    max_abs_diff=no_mask_diff, tolerance=0.0),
              check(f"{name}: zero ablation == o_proj column zeroing", zero_diff <= zero_tol,
                    max_abs_diff=zero_diff, tolerance=zero_tol),
              check(f"{name}: ablating {len(heads)} heads changes the logits by more than the two "
                    "ablation paths differ", changed > zero_diff, max_abs_diff=changed)]
    return row, checks


def _models(suite: Suite):
    """(name, builder(dtype)) of the models to check: the small random model, and --model when given."""
    yield "small random", lambda dtype: random_model(suite.small_config(), suite.device, dtype)
    if suite.model_path:
        from transformers import AutoModelForCausalLM

        yield suite.model_path, lambda dtype: AutoModelForCausalLM.from_pretrained(
            suite.model_path, dtype=dtype, attn_implementation="sdpa").to(suite.device).eval()


def run(suite: Suite) -> dict:
    length = 64 if suite.tiny else 1024
    rows, checks = [], []
    for model_name, build in _models(suite):
        for dtype_name, dtype in DTYPES.items():
            model = build(dtype)
            config = model.config
            ids = random_ids(config.vocab_size, length, suite.device, batch=2)
            attention_mask = torch.ones_like(ids)
            attention_mask[1, : length // 8] = 0  # left padding on the second row
            layers, heads_per_layer = config.num_hidden_layers, config.num_attention_heads
            heads = sorted({(0, 1), (layers // 2, heads_per_layer - 1), (layers - 1, heads_per_layer // 2)})
            for kernel in KERNELS:
                base = dict(model=model_name, dtype=dtype_name, tokens=f"2 x {length} (left-padded)")
                if kernel == "flash_attention_2" and not FLASH_ATTN_AVAILABLE:
                    rows.append(dict(base, kernel=kernel, skipped="flash-attn is not installed"))
                    continue
                if kernel == "flash_attention_2" and not suite.cuda:
                    rows.append(dict(base, kernel=kernel, skipped="flash-attn needs a CUDA device"))
                    continue
                row, row_checks = _compare(model, kernel, ids, attention_mask, heads)
                rows.append(dict(base, **row))
                checks += row_checks
            del model
            suite.empty_cache()
    return dict(rows=rows, checks=checks,
                notes=["no-mask tolerance 0 (the wrapper calls the same kernel); zero-ablation tolerance "
                       f"{RTOL[torch.bfloat16]:g} (bf16) / {RTOL[torch.float16]:g} (fp16) x max |logits|"])
