"""A PreTrainedModel whose attention is hard-wired (no AttentionInterface), to test that masking refuses it."""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class LegacyAttention(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(hidden @ hidden.transpose(-1, -2), dim=-1)
        return self.proj(weights @ hidden)


class LegacyModel(PreTrainedModel):
    config_class = PretrainedConfig

    def __init__(self) -> None:
        super().__init__(PretrainedConfig(num_hidden_layers=1, num_attention_heads=1))
        self.attn = LegacyAttention(0)
