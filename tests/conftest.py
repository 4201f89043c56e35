"""Shared fixtures: tiny random models (fast) and the embedded SmolLM2 (real weights, offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import selective_attention  # noqa: F401  (registers the attention functions)
from selective_attention.loading import assets


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_tiny(config, attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32).eval()


@pytest.fixture
def tiny_llama():
    return build_tiny(tiny_llama_config())


@pytest.fixture(scope="session")
def embedded_model_dir():
    """Path of the embedded SmolLM2 checkpoint (fetched and converted once per machine)."""
    return assets.model_dir()


@pytest.fixture(scope="session")
def haystack_dir():
    return assets.haystack_dir()
