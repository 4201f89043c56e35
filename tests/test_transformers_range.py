"""The installed transformers is inside the declared range, and the compat facts of `selective_attention.modeling`
hold for it: the cache goes in under a name the installed forward and `generate` really use."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import DynamicCache, LlamaForCausalLM

from selective_attention.modeling import CACHE_ARGUMENT, cache_kwargs, output_cache

from .conftest import build_tiny, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 3, 99, 42, 8, 23, 64, 7, 11, 2, 90]])


def declared_range() -> SpecifierSet:
    """The transformers specifier of pyproject.toml's dependencies, e.g. `>=5.5,<6`."""
    match = re.search(r'^\s*"transformers([<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml declares no transformers range"
    return SpecifierSet(match.group(1))


def test_installed_version_is_in_the_declared_range():
    assert Version(transformers.__version__) in declared_range()


def test_ci_tests_the_declared_lower_bound():
    """.ci/run pins exactly the oldest release the range admits, so the lower bound is a tested one."""
    pins = re.findall(r"^OLDEST_TRANSFORMERS=([0-9][0-9.]*)", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    lower = [spec.version for spec in declared_range() if spec.operator == ">="]
    assert len(pins) == 1 and len(lower) == 1
    assert Version(pins[0]) == Version(lower[0])


def test_cache_argument_is_a_forward_parameter():
    assert CACHE_ARGUMENT in inspect.signature(LlamaForCausalLM.forward).parameters
    assert CACHE_ARGUMENT in inspect.signature(transformers.LlamaModel.forward).parameters


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_forward_with_a_cache_equals_recomputation(attn):
    config = tiny_llama_config()
    model = build_tiny(config, attn)
    split = 7
    with torch.no_grad():
        full = model(IDS).logits
        cache = DynamicCache(config=config)
        prefix = model(IDS[:, :split], **cache_kwargs(cache), use_cache=True)
        assert output_cache(prefix) is cache and cache.get_seq_length() == split
        rest = model(IDS[:, split:], **cache_kwargs(cache), use_cache=True)
    assert output_cache(rest) is cache and cache.get_seq_length() == IDS.shape[1]
    torch.testing.assert_close(torch.cat([prefix.logits, rest.logits], dim=1), full, atol=1e-5, rtol=1e-5)


def test_generate_continues_from_a_cache_passed_through_cache_kwargs():
    """A prefilled cache handed to `generate` is used (it grows) and greedy tokens equal a cache-free run."""
    config = tiny_llama_config()
    model = build_tiny(config)
    new_tokens = 5
    with torch.no_grad():
        reference = model.generate(IDS, max_new_tokens=new_tokens, do_sample=False)
        cache = DynamicCache(config=config)
        model(IDS[:, :-1], **cache_kwargs(cache), use_cache=True)
        generated = model.generate(IDS, **cache_kwargs(cache), max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(generated, reference)
    # the last generated token is never fed back, so the cache ends one short of the output
    assert cache.get_seq_length() == generated.shape[1] - 1
