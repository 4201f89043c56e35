"""The surgery: K/V projection rows copied or merged per whole head, loaded into a `selective_llama` skeleton."""

from __future__ import annotations

import torch

from selective_attention.gqa.configuration_selective_llama import SelectiveLlamaConfig
from selective_attention.gqa.conversion.calibration import attention_of_layers
from selective_attention.gqa.conversion.plan import LayerReport, query_groups
from selective_attention.gqa.conversion.source import source_layout
from selective_attention.gqa.modeling_selective_llama import SelectiveLlamaForCausalLM


def merge_rows(weight: torch.Tensor, head_dim: int, partition: list[list[int]], weights: torch.Tensor) -> torch.Tensor:
    """Rows of new KV head j = weighted mean over the source heads in cluster j (whole heads of head_dim rows)."""
    heads = weight.reshape(-1, head_dim, *weight.shape[1:]).float()
    merged = []
    for cluster in partition:
        w = weights[torch.tensor(cluster)].float()
        merged.append((heads[cluster] * (w / w.sum()).reshape(-1, *[1] * (heads.dim() - 1))).sum(0))
    return torch.stack(merged).reshape(-1, *weight.shape[1:]).to(weight.dtype)


def copy_rows(weight: torch.Tensor, head_dim: int, sources: list[int]) -> torch.Tensor:
    heads = weight.reshape(-1, head_dim, *weight.shape[1:])
    return heads[torch.tensor(sources)].reshape(-1, *weight.shape[1:]).clone()


def empty_model(config: SelectiveLlamaConfig, dtype: torch.dtype, state: dict) -> SelectiveLlamaForCausalLM:
    """The model skeleton on the meta device (no random init); only the RoPE buffers are built for real."""
    device = next(iter(state.values())).device
    with torch.device("meta"):
        model = SelectiveLlamaForCausalLM(config)
    rotary = type(model.model.rotary_emb)
    with torch.device(device):
        model.model.rotary_emb = rotary(config=config)
    return model


def converted_state_dict(source_model, reports: list[LayerReport], origins, source_counts) -> dict:
    state = dict(source_model.state_dict())
    modules = attention_of_layers(source_model)
    for row in reports:
        if row.method == "keep":
            continue
        module = modules[row.layer]
        prefix = next(name for name, m in source_model.named_modules() if m is module)
        head_dim = module.head_dim
        groups = query_groups(source_layout(source_model.config)[1][row.layer], source_counts[row.layer])
        weights = torch.tensor([float(len(g)) for g in groups])
        for projection in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                key = f"{prefix}.{projection}.{kind}"
                if key not in state:
                    continue
                tensor = state[key]
                if row.method == "duplicate":
                    state[key] = copy_rows(tensor, head_dim, [origin[0] for origin in origins[row.layer]])
                else:
                    state[key] = merge_rows(tensor, head_dim, origins[row.layer], weights)
    return state


def build_converted(source_model, config: SelectiveLlamaConfig, reports: list[LayerReport], origins,
                    source_counts: list[int], dtype: torch.dtype, share: bool) -> SelectiveLlamaForCausalLM:
    """The converted model, its tensors taken from `source_model` (cloned unless `share`), in eval mode."""
    state = converted_state_dict(source_model, reports, origins, source_counts)
    if not share:  # never share storage with a model the caller still holds
        state = {key: value.clone() for key, value in state.items()}
    model = empty_model(config, dtype, state)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in missing if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"converted state does not fit the new model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    if getattr(source_model, "generation_config", None) is not None:
        model.generation_config = source_model.generation_config
    return model.eval()
