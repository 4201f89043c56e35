"""Calibration: token ids from text, and per-layer Gram matrices of key/value activations on them."""

from __future__ import annotations

import torch

from selective_attention.loading import assets


def default_calibration_texts() -> list[str]:
    """The first haystack essays (Paul Graham), enough for a few hundred tokens."""
    essays = sorted(assets.haystack_dir().glob("*.txt"))
    return [path.read_text(encoding="utf-8") for path in essays[:2]]


def calibration_token_ids(tokenizer, texts: list[str] | None, tokens: int) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("calibration needs a tokenizer: pass tokenizer=, or calibration_ids= token ids")
    texts = texts or default_calibration_texts()
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] == 0:
        raise ValueError("calibration text is empty")
    return ids


def attention_of_layers(model) -> dict[int, torch.nn.Module]:
    found = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            found[layer] = module
    return found


@torch.no_grad()
def kv_gram_matrices(model, ids: torch.Tensor, layers: list[int], kv_counts: list[int]) -> dict[int, tuple]:
    """Per layer: Gram matrices (KV head x KV head) of the key and value activations on `ids`."""
    modules = attention_of_layers(model)
    grams: dict[int, tuple] = {}
    hooks = []

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None).float()
            count = kv_counts[layer]
            keys = module.k_proj(hidden.to(module.k_proj.weight.dtype)).float().reshape(-1, count, module.head_dim)
            values = module.v_proj(hidden.to(module.v_proj.weight.dtype)).float().reshape(-1, count, module.head_dim)
            grams[layer] = (torch.einsum("tid,tjd->ij", keys, keys), torch.einsum("tid,tjd->ij", values, values))
        return hook

    for layer in layers:
        hooks.append(modules[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True))
    try:
        model(input_ids=ids.to(model.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return grams
