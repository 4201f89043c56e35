"""Trials of one prompt length decoded as one batch (`needle.batched`): each trial's tokens and probe records equal
the brute-force argmax over its whole sequence (one uncached eager pass, sliding window in the mask), including
trials that stop early and leave the batch, on a full-attention and a sliding-window model."""

from __future__ import annotations

import pytest
import torch

from selective_attention.attention.probe import probing
from selective_attention.retrieval.batched import batch_groups, decode_batch, stack_caches
from selective_attention.retrieval.generate import SharedPrefix, reference_decode
from selective_attention.retrieval.haystack import NeedlePrompt
from selective_attention.retrieval.needles import resolve_needles
from tests.conftest import build_tiny, tiny_llama_config
from tests.test_sliding_window import brute_force_argmax, tiny_mistral


def prompts(length: int = 40, starts: tuple[int, ...] = (4, 22, 33)) -> list[NeedlePrompt]:
    """Prompts of one length sharing a random "haystack" up to a 5-token "needle" at each start (like depths)."""
    generator = torch.Generator().manual_seed(7)
    haystack = torch.randint(1, 16, (length,), generator=generator).tolist()
    needle = [3, 1, 4, 1, 5]
    needle_spec = resolve_needles("sf")[0]
    out = []
    for start in starts:
        ids = haystack[:start] + needle + haystack[start:length - len(needle)]
        out.append(NeedlePrompt(ids, (start, start + 5), length, 0.0, 0.0, needle_spec, prefix_length=start))
    return out


MODELS = {"llama": lambda: build_tiny(tiny_llama_config(vocab_size=16), seed=0).double(), "mistral": tiny_mistral}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batch_equals_brute_force_per_trial(name):
    model = MODELS[name]()
    group = prompts()
    with probing(model) as recorder:
        first = decode_batch(model, group, stop_ids=set(), max_new_tokens=8, shared=SharedPrefix(model, group),
                             recorder=recorder)
    # an end token that one trial produces earlier than another: the batch shrinks mid-way
    first_at = lambda token: [a.tokens.index(token) if token in a.tokens else 8 for a in first]  # noqa: E731
    stop = next(t for a in first for t in a.tokens if len(set(first_at(t))) > 1 and 0 < min(first_at(t)))
    with probing(model) as recorder:
        answers = decode_batch(model, group, stop_ids={stop}, max_new_tokens=8, shared=SharedPrefix(model, group),
                               recorder=recorder)
    lengths = [len(answer.tokens) for answer in answers]
    assert min(lengths) < 8 and len(set(lengths)) > 1
    for prompt, answer in zip(group, answers):
        alone = reference_decode(model, prompt.input_ids, stop_ids={stop}, max_new_tokens=8)
        assert answer.tokens == alone.tokens
        assert torch.equal(answer.argmax, brute_force_argmax(model, prompt.input_ids, answer.tokens))


def test_groups_and_refusals():
    group = prompts()
    odd = prompts(length=41, starts=(9,))
    assert [len(g) for g in batch_groups(group + odd + group[:1], 2)] == [2, 2, 1]
    assert batch_groups(group + odd + group[:1], 2)[2][0].input_ids == odd[0].input_ids
    with pytest.raises(ValueError, match="at least 1"):
        batch_groups(group, 0)
    model = MODELS["llama"]()
    with pytest.raises(ValueError, match="one length"):
        decode_batch(model, group + odd, stop_ids=set(), max_new_tokens=2)
    from transformers import DynamicCache

    caches = []
    for length in (3, 4):
        cache = DynamicCache()
        cache.update(torch.zeros(1, 2, length, 8), torch.zeros(1, 2, length, 8), 0)
        caches.append(cache)
    with pytest.raises(ValueError, match="different lengths"):
        stack_caches(caches)
