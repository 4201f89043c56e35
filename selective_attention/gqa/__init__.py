"""Variable-group GQA models (`selective_llama`) and the Llama -> selective_llama converter.

Importing this package registers `selective_llama` with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM` and
`AutoModelForSequenceClassification`, so saved checkpoints load without `trust_remote_code` when the plugin is
installed.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from selective_attention.gqa.configuration_selective_llama import SelectiveLlamaConfig
from selective_attention.gqa.modeling_selective_llama import (
    SelectiveLlamaForCausalLM,
    SelectiveLlamaForSequenceClassification,
    SelectiveLlamaModel,
    SelectiveLlamaPreTrainedModel,
)


def register() -> None:
    """Register `selective_llama` with the transformers auto classes (idempotent)."""
    model_type = SelectiveLlamaConfig.model_type
    pairs = [(AutoModel, SelectiveLlamaModel), (AutoModelForCausalLM, SelectiveLlamaForCausalLM),
             (AutoModelForSequenceClassification, SelectiveLlamaForSequenceClassification)]
    AutoConfig.register(model_type, SelectiveLlamaConfig, exist_ok=True)
    for auto_class, model_class in pairs:
        auto_class.register(SelectiveLlamaConfig, model_class, exist_ok=True)


register()

__all__ = [
    "SelectiveLlamaConfig",
    "SelectiveLlamaForCausalLM",
    "SelectiveLlamaForSequenceClassification",
    "SelectiveLlamaModel",
    "SelectiveLlamaPreTrainedModel",
    "register",
]
